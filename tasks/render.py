"""``farm.render``: claim a batch in the ledger, render it, hand it to the uploader.

The Celery message only says "batch k of job J is ready". The ledger decides:

1. **Claim** batch k with ``SELECT … FOR UPDATE SKIP LOCKED`` (db.batches). A batch that is done,
   or leased to a live worker, is not claimed: the message was a redelivery and is dropped.
2. **Companions** (cross-request batching): queued batches of other jobs that share model,
   size, steps, guidance and LoRAs join the GPU batch. If none is queued but compatible work
   is being rendered (traffic is arriving), the worker waits at most ``batch_wait_ms`` for some.
3. **Render**, beating for the leases between steps (tasks/lease.py); images already stored are
   skipped, so a batch that comes back after a worker died renders only what is missing.
4. **Store** in the uploader thread while the next batch renders: encode, put (deterministic
   keys), upsert image rows on ``(job_id, index)``, mark the batch done, log "24/64 images".
   The job completes when its last image row lands, whichever worker stores it; the guarded
   status change lets exactly one of them finish the job.

A failed batch goes back to the pool after a backoff (its lease is left to lapse, and the
reaper publishes it again) up to ``batch_retries`` times; then its job fails with an error
naming the image indices that failed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from db import batches as ledger_batches
from db import ledger
from db.models import Batch, utcnow
from db.session import session_scope
from farm.config import Settings, get_settings
from farm.errors import FarmError, RenderError
from farm.inputs import owner_scope
from farm.results import build_output, used_prompt
from farm.schemas import GenerateInput
from farm.status import JobStatus
from farm.storage import get_storage, object_key
from farm.webhooks import outbox
from models.rendered import RenderItem, RenderResult
from tasks.app import soft_time_limit
from tasks.lease import BatchAborted, WorkerServices, get_services
from tasks.runtime import get_renderer

log = logging.getLogger(__name__)
STORE_TRIES = 3
CLAIM_RETRIES = 8


@dataclass
class Claimed:
    """A claimed batch and what rendering it needs."""

    batch_id: int
    job_id: str
    k: int
    indices: list[int]
    todo: list[int]
    params: GenerateInput
    seed: int
    owner: str
    total: int
    attempts: int


def render_batch(self: Task, request_id: str, indices: list[int], k: int | None = None,
                 group: list[list[Any]] | None = None) -> dict[str, Any]:
    settings = get_settings()
    services = get_services()
    renderer = get_renderer()
    t0 = time.perf_counter()
    try:
        claimed = _claim_group(request_id, indices, k, services, renderer.spec.name, settings, group or [])
    except OperationalError as exc:  # the ledger is unreachable: nothing was claimed, try the message later
        if self.request.retries >= CLAIM_RETRIES:
            raise
        log.warning("ledger unreachable claiming %s.%s (%s); retry %d", request_id, k, exc, self.request.retries + 1)
        raise self.retry(exc=exc, countdown=min(30, 2**self.request.retries), max_retries=CLAIM_RETRIES) from None
    if not claimed:
        return {"request_id": request_id, "claimed": False}
    t1 = time.perf_counter()
    services.keeper.hold({c.batch_id: c.job_id for c in claimed})
    items = [RenderItem(c.params, c.seed, i, tag=c.job_id) for c in claimed for i in c.todo]
    try:
        if items:
            with owner_scope(claimed[0].owner):  # upload URLs resolve only for their owner
                result = renderer.render_items(items, on_progress=services.keeper.progress)
        else:
            result = RenderResult(images=[], prompt="", inference_seconds=0.0)
    except BatchAborted:
        _finish_all(claimed, ledger_batches.CANCELLED, services)
        return {"request_id": request_id, "cancelled": [c.k for c in claimed]}
    except Exception as exc:
        _give_back(self.app, claimed, exc, settings, services)
        return {"request_id": request_id, "failed": [i for c in claimed for i in c.todo]}
    note = getattr(renderer, "stand_in_note", None)  # farm/hold says it held, not rendered
    suffix = f", {renderer.spec.name} {note}" if note else ""
    t2 = time.perf_counter()
    services.uploader.submit(lambda: _store(self.app, claimed, result, suffix, settings, services))
    log.info("batch %s.%s: claim %.1f ms, render %.1f ms, hand-off %.1f ms (%d image(s), %d request(s))",
             request_id, k, (t1 - t0) * 1000, (t2 - t1) * 1000, (time.perf_counter() - t2) * 1000, len(items),
             len(claimed))
    return {"request_id": request_id, "rendered": [c.todo for c in claimed if c.job_id == request_id]}


def _claim_group(request_id: str, indices: list[int], k: int | None, services: WorkerServices,
                 model_name: str, settings: Settings, listed: list[list[Any]]) -> list[Claimed]:
    """Claim batch k of the job (and the batches ``listed`` with it by ``submit_many``) and, if
    there is room, companions from other jobs."""
    with session_scope() as s:
        if k is None:  # a message from before batches had numbers: find it by its first index
            k = next((b.k for b in ledger_batches.get_batches(s, request_id) if b.indices[:1] == indices[:1]), -1)
        rows = [ledger_batches.claim(s, rid, int(kk), services.name, settings.lease_seconds)
                for rid, kk in [(request_id, k), *listed]]
        taken = [row for row in rows if row is not None]
        if not taken:
            log.info("batch %s.%s already done or leased elsewhere: message dropped", request_id, k)
            return []
        first = taken[0]
        group = _prepare(s, taken, model_name)
        room = services.max_batch - sum(len(c.todo) for c in group)
        if not group or room <= 0 or settings.batch_wait_ms <= 0 or len(group[0].indices) < group[0].total:
            return group  # full, or a slice of a larger job (cut to balance the pool): no company
        companions = ledger_batches.claim_companions(s, first, services.name, settings.lease_seconds, room)
        group += _prepare(s, companions, model_name)
        busy = not companions and ledger_batches.compatible_in_flight(s, first)
    if not busy or not group:
        return group  # company found already, or a quiet pool: nothing to wait for
    time.sleep(settings.batch_wait_ms / 1000)  # bounded wait for companions to arrive
    with session_scope() as s:
        anchor = s.get(Batch, group[0].batch_id)
        if anchor is not None:
            companions = ledger_batches.claim_companions(s, anchor, services.name, settings.lease_seconds, room)
            group += _prepare(s, companions, model_name)
    return group


def _prepare(s: Any, rows: list[Batch], model_name: str) -> list[Claimed]:
    """Claimed rows → what rendering them needs; batches of finished jobs are closed instead."""
    group = []
    for row in rows:
        job = ledger.get_job(s, row.job_id)
        if job is None or _finished(job):
            row.status, row.finished_at = ledger_batches.CANCELLED, utcnow()
            continue
        if job.model_name != model_name:
            row.status, row.error = ledger_batches.FAILED, f"reached a worker of {model_name}"
            ledger.finish_job(s, job.id, JobStatus.FAILED, error=f"job for {job.model_name} reached a worker of "
                              f"{model_name}", error_type="render_error")
            continue
        if job.status == JobStatus.IN_QUEUE:
            ledger.start_job(s, row.job_id)
        # a batch claimed for the first time has nothing stored yet (batches never overlap)
        done = ledger.done_indices(s, row.job_id) if row.attempts > 1 else set()
        todo = [i for i in row.indices if i not in done]
        if len(todo) < len(row.indices):
            ledger.add_log(s, row.job_id, f"images {sorted(set(row.indices) - set(todo))} already stored: "
                           "skipped (redelivery)")
        group.append(Claimed(batch_id=row.id, job_id=row.job_id, k=row.k, indices=list(row.indices), todo=todo,
                             params=GenerateInput.model_validate(job.input), seed=job.seed, owner=job.owner,
                             total=job.num_images, attempts=row.attempts))
    return group


def _store(app: Celery, group: list[Claimed], result: RenderResult, suffix: str, settings: Settings,
           services: WorkerServices) -> None:
    """Encode, upload and record a rendered batch; mark its batches done; complete finished jobs."""
    from models.encode import encode_image

    by_job = {c.job_id: c for c in group}
    with session_scope() as s:  # a job cancelled while it rendered: store nothing more of it
        gone = {c.job_id for c in group if _finished(ledger.get_job(s, c.job_id))}
    storage = get_storage(settings)
    try:
        for img in result.images:
            c = by_job[img.tag]
            if c.job_id in gone:
                continue
            data, content_type = encode_image(img.image, c.params.format)
            key = object_key(c.owner, c.job_id, img.index, c.params.format)
            _retrying(lambda: storage.put(key, data, content_type), f"store {key}")  # noqa: B023
            with session_scope() as s:
                ledger.record_image(
                    s, job_id=c.job_id, index=img.index, seed=img.seed, object_key=key,
                    width=img.image.width, height=img.image.height, content_type=content_type,
                    size_bytes=len(data), nsfw=img.nsfw, render_seconds=img.render_seconds,
                )
            services.keeper.progress_quietly()
    except Exception as exc:
        _give_back(app, group, exc, settings, services)
        return
    others = len(group) - 1
    shared = f", batched with {others} other request(s)" if others else ""
    with session_scope() as s:
        for c in group:
            if c.job_id in gone:
                ledger_batches.finish(s, c.batch_id, ledger_batches.CANCELLED)
                continue
            ledger_batches.finish(s, c.batch_id, ledger_batches.DONE)
            count = ledger.count_images(s, c.job_id)
            ledger.add_log(s, c.job_id, f"{count}/{c.total} images ({len(c.todo)} in "
                           f"{result.inference_seconds:.3f} s{shared}{suffix})")
    services.keeper.drop([c.batch_id for c in group])
    for job_id in by_job:
        complete_if_done(app, job_id, settings)


def _finished(job: Any) -> bool:
    return job is None or JobStatus(job.status).is_terminal


def _retrying(action: Any, what: str) -> None:
    for attempt in range(STORE_TRIES):
        try:
            action()
            return
        except Exception as exc:
            if attempt == STORE_TRIES - 1:
                raise
            log.warning("%s failed (%s); try %d of %d", what, exc, attempt + 2, STORE_TRIES)
            time.sleep(0.5 * 2**attempt)


def _finish_all(group: list[Claimed], status: str, services: WorkerServices) -> None:
    with session_scope() as s:
        for c in group:
            ledger_batches.finish(s, c.batch_id, status)
    services.keeper.drop([c.batch_id for c in group])


def _give_back(app: Celery, group: list[Claimed], exc: BaseException, settings: Settings,
               services: WorkerServices) -> None:
    """A failed batch: back to the pool after a backoff, or, out of retries, fail its job."""
    reason = _reason(exc)
    final = isinstance(exc, FarmError) and 400 <= exc.http_status < 500  # bad input: retrying cannot help
    with session_scope() as s:
        for c in group:
            failed = c.todo or c.indices
            if final or c.attempts > settings.batch_retries:
                ledger_batches.finish(s, c.batch_id, ledger_batches.FAILED, error=reason)
                continue
            backoff = 2.0 ** (c.attempts - 1)
            row = s.get(Batch, c.batch_id, populate_existing=True)
            if row is not None and row.status == ledger_batches.CLAIMED:
                # let the lease lapse after the backoff: the reaper publishes the batch again
                row.worker, row.error = f"{services.name} (failed)", reason
                row.lease_expires_at = utcnow() + timedelta(seconds=backoff)
            ledger.add_log(s, c.job_id, f"images {failed} failed: {reason}; retry {c.attempts} of "
                           f"{settings.batch_retries} in {backoff:.0f} s", level="WARNING")
    log.warning("batch of %s failed: %s", [f"{c.job_id}.{c.k}" for c in group], reason)
    services.keeper.drop([c.batch_id for c in group])
    for c in group:
        if final or c.attempts > settings.batch_retries:
            fail_job(app, c.job_id, exc, c.todo or c.indices)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SoftTimeLimitExceeded):
        return "render took longer than the task time limit"
    return str(exc) or type(exc).__name__


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
        error_type = "timeout"
    else:
        error_type = exc.error_type if isinstance(exc, FarmError) else "render_error"
    message = f"images {indices} failed: {_reason(exc)}"
    with session_scope() as s:
        applied = ledger.finish_job(s, request_id, JobStatus.FAILED, error=message, error_type=error_type)
        ledger.add_log(s, request_id, message, level="ERROR")
        ledger_batches.cancel_open(s, request_id)
        job = ledger.get_job(s, request_id)
        source = job.source if job else None
        if applied and job is not None:
            outbox.enqueue(s, job)
    if applied and source == "celery":
        app.backend.store_result(request_id, RenderError(message), "FAILURE")


def register(app: Celery) -> None:
    settings = get_settings()
    app.task(
        name="farm.render",
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        time_limit=settings.task_time_limit,
        soft_time_limit=soft_time_limit(settings.task_time_limit),
    )(render_batch)
