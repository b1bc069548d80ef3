"""The one way a job ends: completed, failed or cancelled, from any process.

:func:`finish` is called inside the transaction that decides the outcome (the store of the last
image, a batch out of retries, a worker of the wrong model, a cancel from the API, the CLI or a
bulk job, a broker-side failure). It

1. moves the job to its terminal status with a guarded update (a second caller changes nothing);
2. closes the job's open batches (queued ones never start; the holders of claimed ones find
   their fenced writes refused and their keepers stop the render);
3. writes the log line;
4. enqueues the webhook (the outbox row commits with the outcome);
5. for a ``farm.generate`` job, stores the Celery result once committed, so a plain
   ``send_task`` caller gets an answer for every outcome;
6. wakes the waiters: the ledger's change notification (farm.events, sent on commit).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from db import batches as ledger_batches
from db import ledger
from db.models import Job
from db.session import after_commit, session_scope
from farm.config import Settings, get_settings
from farm.status import BatchStatus, JobStatus
from farm.webhooks import outbox

log = logging.getLogger(__name__)


def finish(
    s: Session,
    job: Job | str,
    status: JobStatus,
    *,
    message: str,
    error: str | None = None,
    error_type: str | None = None,
    result: dict[str, Any] | None = None,
    inference_seconds: float | None = None,
    source: str = "worker",
    settings: Settings | None = None,
) -> bool:
    """End ``job`` with ``status`` in the caller's transaction; False if it had already ended."""
    settings = settings or get_settings()
    job_id = job if isinstance(job, str) else job.id
    status = JobStatus(status)
    if not ledger.finish_job(s, job_id, status, error=error, error_type=error_type, result=result,
                             inference_seconds=inference_seconds):
        return False
    if status != JobStatus.COMPLETED:
        closed = BatchStatus.FAILED if status == JobStatus.FAILED else BatchStatus.CANCELLED
        ledger_batches.close_open(s, job_id, closed, error)
    level = "INFO" if status == JobStatus.COMPLETED else "WARNING" if status == JobStatus.CANCELLED else "ERROR"
    ledger.add_log(s, job_id, message, level=level, source=source)
    outbox.enqueue(s, job_id, settings)
    row = job if isinstance(job, Job) else ledger.get_job(s, job_id)
    if row is not None and row.source == "celery":
        after_commit(s, lambda: _store_celery_result(job_id, settings))
    return True


def finish_now(job_id: str, status: JobStatus, *, message: str, owner: str | None = None, source: str = "api",
               error: str | None = None, error_type: str | None = None, settings: Settings | None = None) -> bool:
    """:func:`finish` in a transaction of its own (``owner`` given: only that owner's job)."""
    with session_scope() as s:
        if owner is not None and ledger.get_job(s, job_id, owner=owner) is None:
            return False
        return finish(s, job_id, status, message=message, error=error, error_type=error_type, source=source,
                      settings=settings)


def _store_celery_result(job_id: str, settings: Settings) -> None:
    """The ``farm.generate`` caller's answer: the output schema, or the job's error as a failure."""
    from farm import dispatch
    from farm.errors import RenderError
    from farm.results import build_output
    from farm.storage import get_storage

    with session_scope() as s:
        job = ledger.get_job(s, job_id)
        if job is None:
            return
        if job.status == JobStatus.COMPLETED:
            value: Any = build_output(s, job, get_storage(settings), settings).model_dump(mode="json")
            state = "SUCCESS"
        else:
            value, state = RenderError(job.error or f"request {job.status.value.lower()}"), "FAILURE"
    dispatch.store_result(job_id, value, state, settings)
