"""The one way a job ends: completed, failed or cancelled, from any process.

:func:`finish` is called inside the transaction that decides the outcome (the store of the last
image, a batch out of retries, a worker of the wrong model, a cancel from the API, the CLI or a
bulk job, a broker-side failure). It

1. closes the job's open batches, before touching the job row (the lock order everywhere:
   batches, then jobs): queued ones never start, and the holders of claimed ones find their
   fenced writes refused and their keepers stop the render (closing the batches of a job that
   turns out to have ended already changes nothing: they are closed);
2. moves the job to its terminal status with a guarded update (a second caller changes nothing);
3. writes the log line;
4. enqueues the webhook (the outbox row commits with the outcome);
5. for a ``farm.generate`` job, stores the Celery result once committed, so a plain
   ``send_task`` caller gets an answer for every outcome;
6. wakes the waiters: the ledger's change notification (farm.events, sent on commit);
7. once committed, deletes the jobs' stored inputs that no live job of their owner names any more
   (farm.inputs.retention: best effort, so the owner's upload quota is not held by ended jobs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from db import batches as ledger_batches
from db import ledger
from db.models import Job, JobLog, utcnow
from db.session import after_commit, session_scope
from farm import events
from farm.config import Settings, get_settings
from farm.inputs.retention import release
from farm.metrics import count
from farm.status import BatchStatus, JobStatus
from farm.webhooks import outbox

log = logging.getLogger(__name__)


@dataclass
class Ending:
    """How one job ends. ``source``/``webhook``: what the caller knows of the job already (None: look it up)."""

    job_id: str
    status: JobStatus
    message: str | None
    error: str | None = None
    error_type: str | None = None
    result: dict[str, Any] | None = None
    inference_seconds: float | None = None
    log_source: str = "worker"
    source: str | None = None
    webhook: bool | None = None


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
    known = job if isinstance(job, Job) else None
    ending = Ending(job_id=known.id if known else str(job), status=JobStatus(status), message=message, error=error,
                    error_type=error_type, result=result, inference_seconds=inference_seconds, log_source=source,
                    source=known.source if known else None, webhook=bool(known.webhook_url) if known else None)
    return bool(finish_all(s, [ending], settings or get_settings()))


def finish_all(s: Session, endings: Sequence[Ending], settings: Settings, *, locked: bool = False) -> list[str]:
    """End many jobs in the caller's transaction (the work of :func:`finish`); the ids that ended now.

    ``locked``: the caller holds the jobs' rows locked and has seen them active (the store of
    their last images), so one statement moves them all; otherwise each move is guarded.
    """
    if locked:
        applied = list(endings)
        if applied:
            now = utcnow()
            s.execute(update(Job).execution_options(synchronize_session=False), [
                {"id": e.job_id, "status": e.status, "finished_at": now, "updated_at": now,
                 **{k: v for k, v in (("error", e.error), ("error_type", e.error_type), ("result", e.result),
                                      ("inference_seconds", e.inference_seconds)) if v is not None}}
                for e in applied])  # fmt: skip
            for e in applied:
                events.notify(s, e.job_id)
    else:
        for e in endings:  # batches first, then the job: the lock order of claims and stores
            if e.status != JobStatus.COMPLETED:
                closed = BatchStatus.FAILED if e.status == JobStatus.FAILED else BatchStatus.CANCELLED
                ledger_batches.close_open(s, e.job_id, closed, e.error)
        applied = [e for e in endings
                   if ledger.finish_job(s, e.job_id, e.status, error=e.error, error_type=e.error_type,
                                        result=e.result, inference_seconds=e.inference_seconds)]
    now = utcnow()
    logs = []
    for e in applied:
        if e.message:
            level = {JobStatus.COMPLETED: "INFO", JobStatus.CANCELLED: "WARNING"}.get(e.status, "ERROR")
            logs.append(JobLog(job_id=e.job_id, message=e.message, level=level, source=e.log_source, timestamp=now))
    s.add_all(logs)
    for e in applied:
        source, webhook = e.source, e.webhook
        if source is None or webhook is None:
            row = ledger.get_job(s, e.job_id)
            source, webhook = (row.source, bool(row.webhook_url)) if row is not None else ("", False)
        if webhook:
            outbox.enqueue(s, e.job_id, settings)
        if source == "celery":
            after_commit(s, partial(_store_celery_result, e.job_id, settings))
    if applied:
        after_commit(s, partial(count.jobs_finished, [e.status for e in applied]))
        after_commit(s, partial(release, [e.job_id for e in applied], settings))
    return [e.job_id for e in applied]


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
