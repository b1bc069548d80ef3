"""``farm.render``: render some images of a job on this worker's model.

At-least-once delivery is made safe by the ledger: indices already stored are skipped,
object keys are deterministic (a rewrite overwrites) and image rows are upserted on
``(job_id, index)``. The job completes when its last image row lands, whichever task
stores it; the guarded status change lets exactly one of them finish the job.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from db import ledger
from db.session import session_scope
from farm.config import Settings, get_settings
from farm.errors import FarmError, RenderError, StorageError
from farm.inputs import owner_scope
from farm.results import build_output, used_prompt
from farm.schemas import GenerateInput
from farm.status import JobStatus
from farm.storage import get_storage, object_key
from farm.webhooks import outbox
from tasks.app import soft_time_limit
from tasks.runtime import get_renderer

log = logging.getLogger(__name__)
MAX_RETRIES = 3
TRANSIENT = (StorageError, ConnectionError, TimeoutError)


def render_batch(self: Task, request_id: str, indices: list[int]) -> dict[str, Any]:
    settings = get_settings()
    try:
        rendered = _render(request_id, indices, settings)
    except Exception as exc:
        retryable = isinstance(exc, TRANSIENT) or _is_db_outage(exc)
        if retryable and self.request.retries < MAX_RETRIES:
            log.warning("batch %s of %s failed (%s); retry %d", indices, request_id, exc, self.request.retries + 1)
            raise self.retry(exc=exc, countdown=2**self.request.retries) from None
        log.exception("batch %s of job %s failed", indices, request_id)
        fail_job(self.app, request_id, exc, indices)
        return {"request_id": request_id, "failed": indices}
    complete_if_done(self.app, request_id, settings)
    return {"request_id": request_id, "rendered": rendered}


def _render(request_id: str, indices: list[int], settings: Settings) -> list[int]:
    renderer = get_renderer()
    with session_scope() as s:
        job = ledger.get_job(s, request_id)
        if job is None:
            log.warning("render task for unknown job %s dropped", request_id)
            return []
        if JobStatus(job.status).is_terminal:
            return []
        if job.model_name != renderer.spec.name:
            raise RenderError(f"job for {job.model_name} reached a worker of {renderer.spec.name}")
        ledger.start_job(s, request_id)
        done = ledger.done_indices(s, request_id)
        inp = GenerateInput.model_validate(job.input)
        seed, owner, total = job.seed, job.owner, job.num_images
    todo = [i for i in indices if i not in done]
    if len(todo) < len(indices):
        _log(request_id, f"images {sorted(set(indices) - set(todo))} already stored: skipped (redelivery)")
    if not todo:
        return []

    from models.encode import encode_image

    storage = get_storage(settings)
    with owner_scope(owner):  # upload URLs resolve only for their owner
        result = renderer.render(inp, seed, todo)
    for img in result.images:
        data, content_type = encode_image(img.image, inp.format)
        key = object_key(owner, request_id, img.index, inp.format)
        storage.put(key, data, content_type)
        with session_scope() as s:
            ledger.record_image(
                s, job_id=request_id, index=img.index, seed=img.seed, object_key=key,
                width=img.image.width, height=img.image.height, content_type=content_type,
                size_bytes=len(data), nsfw=img.nsfw, render_seconds=img.render_seconds,
            )
    with session_scope() as s:
        count = ledger.count_images(s, request_id)
        note = getattr(renderer, "stand_in_note", None)  # farm/hold says it held, not rendered
        suffix = f", {renderer.spec.name} {note}" if note else ""
        ledger.add_log(s, request_id,
                       f"{count}/{total} images ({len(todo)} in {result.inference_seconds:.3f} s{suffix})")
    return todo


def complete_if_done(app: Celery, request_id: str, settings: Settings) -> bool:
    """Finish the job if all its images are stored; True for the one caller that does."""
    with session_scope() as s:
        job = ledger.get_job(s, request_id)
        if job is None or ledger.count_images(s, request_id) < job.num_images:
            return False
        rows = ledger.list_images(s, request_id)
        inp = GenerateInput.model_validate(job.input)
        applied = ledger.finish_job(
            s, request_id, JobStatus.COMPLETED,
            result={"has_nsfw_concepts": [r.nsfw for r in rows], "prompt": used_prompt(inp)},
            inference_seconds=sum(r.render_seconds for r in rows),
        )
        if not applied:
            return False
        ledger.add_log(s, request_id, f"completed {job.num_images} image(s)")
        outbox.enqueue(s, job, settings)
        source = job.source
    if source == "celery":
        with session_scope() as s:
            job = ledger.get_job(s, request_id)
            assert job is not None
            output = build_output(s, job, get_storage(settings), settings)
        app.backend.store_result(request_id, output.model_dump(mode="json"), "SUCCESS")
    return True


def fail_job(app: Celery, request_id: str, exc: BaseException, indices: list[int]) -> None:
    if isinstance(exc, SoftTimeLimitExceeded):
        reason, error_type = "render took longer than the task time limit", "timeout"
    else:
        reason = str(exc) or type(exc).__name__
        error_type = exc.error_type if isinstance(exc, FarmError) else "render_error"
    message = f"images {indices} failed: {reason}"
    with session_scope() as s:
        applied = ledger.finish_job(s, request_id, JobStatus.FAILED, error=message, error_type=error_type)
        ledger.add_log(s, request_id, message, level="ERROR")
        job = ledger.get_job(s, request_id)
        source = job.source if job else None
        if applied and job is not None:
            outbox.enqueue(s, job)
    if applied and source == "celery":
        app.backend.store_result(request_id, RenderError(message), "FAILURE")


def _is_db_outage(exc: BaseException) -> bool:
    from sqlalchemy.exc import OperationalError

    return isinstance(exc, OperationalError)


def _log(request_id: str, message: str) -> None:
    with session_scope() as s:
        ledger.add_log(s, request_id, message)


def register(app: Celery) -> None:
    settings = get_settings()
    app.task(
        name="farm.render",
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        max_retries=MAX_RETRIES,
        time_limit=settings.task_time_limit,
        soft_time_limit=soft_time_limit(settings.task_time_limit),
    )(render_batch)
