"""``farm.render``: claim batches in the ledger, render them, hand them to the uploader.

The Celery message only says "batch k of job J is ready" (farm.dispatch). The ledger decides
(farm.lifecycle): the worker claims the batch (and companions of other jobs that fit the same GPU
batch), renders what is not stored yet while its keeper beats for the claims, and its uploader
finishes it (on a GPU: waits for its decoded pixels, safety checks; see models.render) and stores the result
in one fenced transaction while the next batch renders. While a batch renders,
the worker already pulls its next one from the ledger (highest lane first; given back if a
higher lane has work by the time the render ends), for up to ``pull_seconds``: in steady state
no Celery hop sits between two batches, and a message whose batch was pulled finds nothing. A claim taken over
meanwhile (a stall past the lease, a partition) refuses every later write of this worker: it
drops the batch, logs that once, and never touches the new holder's rows or fails the job.

A failed render gives the batch back after a backoff (the sweeper republishes it) up to
``batch_retries`` times; then its job fails with an error naming the image indices (the rule:
farm.lifecycle.retry, shared with the sweeper). Every
path drops the claims from the keeper (``finally``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from celery import Celery, Task
from celery.worker import state as worker_state
from sqlalchemy.exc import OperationalError

from db import batches as ledger_batches
from db.session import session_scope
from farm.celery_config import soft_time_limit
from farm.config import Settings, get_settings
from farm.inputs.retrieve import owner_scope
from farm.lifecycle.claim import Claimed, claim_group, claim_next_group, describe, higher_lane_waiting, release
from farm.lifecycle.retry import abort, give_back
from farm.lifecycle.store import store
from farm.metrics import count
from farm.schemas import GenerateInput
from farm.storage import get_storage
from models.protocol import Renderer
from models.rendered import PendingRender, ProgressHook, Ready, RenderItem, RenderResult, SourceImages
from tasks.lease import BatchAborted
from tasks.loaded_model import get_renderer
from tasks.realtime import gate as realtime_gate
from tasks.services import WorkerServices, get_services
from tasks.sources import sources_of

log = logging.getLogger(__name__)
CLAIM_RETRIES = 8


def render_batch(self: Task, request_id: str, indices: list[int] | None = None, k: int | None = None,
                 group: list[list[Any]] | None = None) -> None:
    """Claim the batch the message names (or, if it was taken already, pull the next one), render it,
    and keep pulling for ``pull_seconds``: the next batch is claimed while the current one renders."""
    settings = get_settings()
    services = get_services()
    renderer = get_renderer()
    t0 = time.perf_counter()
    if k is None:  # a message from before batches had numbers: find it by its first index
        k = _k_of(request_id, indices or [])
    try:
        claimed = claim_group(request_id, k, [(str(r), int(kk)) for r, kk in group or []], worker=services.name,
                              model_name=renderer.spec.name, max_batch=services.max_batch, settings=settings)
        if not claimed and settings.pull_seconds > 0:  # a spare message still wakes the worker
            claimed = _pull(renderer, services, settings)
    except OperationalError as exc:  # the ledger is unreachable: nothing was claimed, try the message later
        if self.request.retries >= CLAIM_RETRIES:
            raise
        log.warning("ledger unreachable claiming %s.%s (%s); retry %d", request_id, k, exc, self.request.retries + 1)
        raise self.retry(exc=exc, countdown=min(30, 2**self.request.retries), max_retries=CLAIM_RETRIES) from None
    if claimed:
        services.keeper.hold(claimed)
    deadline = time.monotonic() + settings.pull_seconds
    with ThreadPoolExecutor(1, thread_name_prefix="farm-pull") as puller:
        while claimed:
            pulling = time.monotonic() < deadline and not worker_state.should_stop
            ahead = puller.submit(_pull, renderer, services, settings) if pulling else None
            ok = _run_group(self.app, claimed, renderer, services, settings, t0)
            following = _next(ahead, renderer, services, settings) if ahead is not None else []
            if not ok:  # the render failed: hand back what was pulled ahead and stop here
                release(following)
                services.keeper.drop([c.batch_id for c in following])
                return
            claimed, t0 = following, time.perf_counter()


def _pull(renderer: Renderer, services: WorkerServices, settings: Settings) -> list[Claimed]:
    """The next batch of this model from the ledger, held by the keeper at once (it beats for it)."""
    group = claim_next_group(worker=services.name, model_name=renderer.spec.name, model_key=renderer.spec.key,
                             max_batch=services.max_batch, settings=settings)
    if group:
        services.keeper.hold(group)
    return group


def _next(ahead: Future[list[Claimed]], renderer: Renderer, services: WorkerServices,
          settings: Settings) -> list[Claimed]:
    """The batch pulled while the last one rendered; given back if a higher lane has work waiting now."""
    try:
        group = ahead.result()
    except Exception as exc:  # the ledger went away: the sweeper covers whatever was half-claimed
        log.warning("pulling the next batch failed: %s", exc)
        return []
    if group and higher_lane_waiting(renderer.spec.key, group[0].lane):
        release(group)
        services.keeper.drop([c.batch_id for c in group])
        group = _pull(renderer, services, settings)
    return group


def _run_group(app: Celery, claimed: list[Claimed], renderer: Renderer, services: WorkerServices, settings: Settings,
               t0: float) -> bool:
    """Render one claimed group and hand it to the uploader; False if the render failed."""
    ids = [c.batch_id for c in claimed]
    handed_off = False
    try:
        _fault_hook(claimed, settings)
        realtime_gate.wait_turn(lambda: services.keeper.progress_quietly(ids))  # realtime frames go first
        claimed, sources = _prepare(claimed, services, settings)
        if not claimed:
            return True
        t1 = time.perf_counter()
        pending = _render(renderer, claimed, sources, lambda: services.keeper.progress(ids), settings)
        t2 = time.perf_counter()
        count.rendered(renderer.spec.key, len(pending), pending.inference_seconds)
        count.gpu_memory(renderer.spec.key, renderer.device)
        note = renderer.stand_in_note  # farm/hold says it held, not rendered
        suffix = f", {renderer.spec.name} {note}" if note else ""
        services.uploader.submit(lambda: _store(app, claimed, pending, suffix, settings, services))
        handed_off = True
        log.info("batch %s: claim %.1f ms, render %.1f ms, hand-off %.1f ms (%d image(s), %d request(s))",
                 describe(claimed[:1]), (t1 - t0) * 1000, (t2 - t1) * 1000, (time.perf_counter() - t2) * 1000,
                 len(pending), len(claimed))
        return True
    except BatchAborted:
        abort(claimed)
        return True
    except Exception as exc:
        give_back(claimed, exc, settings)
        return False
    finally:
        if not handed_off:
            services.keeper.drop(ids)


def _k_of(request_id: str, indices: list[int]) -> int:
    with session_scope() as s:
        return next((b.k for b in ledger_batches.get_batches(s, request_id) if b.indices[:1] == indices[:1]), -1)


def _fault_hook(claimed: list[Claimed], settings: Settings) -> None:
    """TEST-ONLY fault hook (``FARM_FAULT_KILL_PROMPT``): this process SIGKILLs itself, as a worker that
    crashes on a batch would die, when it starts rendering that prompt. Never set in production."""
    if settings.fault_kill_prompt and any(c.params.prompt == settings.fault_kill_prompt for c in claimed):
        log.error("FARM_FAULT_KILL_PROMPT matched: killing this worker process (test-only fault hook)")
        os.kill(os.getpid(), signal.SIGKILL)


def _prepare(claimed: list[Claimed], services: WorkerServices,
             settings: Settings) -> tuple[list[Claimed], dict[int, tuple[GenerateInput, SourceImages | None]]]:
    """Each job's params and source images (tasks.sources), job by job: a job whose own input fails here
    (a fetched image that is no image, a mask of another size) is given back alone, with its own error,
    and the other requests of the GPU batch render on."""
    kept, sources = [], {}
    for c in claimed:
        try:
            sources[c.batch_id] = sources_of(c, settings) if c.todo else (c.params, None)
        except Exception as exc:
            give_back([c], exc, settings)
            services.keeper.drop([c.batch_id])
            continue
        kept.append(c)
    return kept, sources


def _render(renderer: Renderer, claimed: list[Claimed], sources: dict[int, tuple[GenerateInput, SourceImages | None]],
            on_progress: ProgressHook, settings: Settings) -> PendingRender:
    """Denoise the group's images; on a GPU the batch comes back unfinished (decode queued: models.render).
    Image-to-image and inpainting jobs carry their prepared source images on each item (``_prepare``)."""
    items = []
    for c in claimed:
        params, source = sources[c.batch_id]
        items += [RenderItem(params, c.seed, i, tag=c.job_id, source=source) for i in c.todo]
    if not items:
        return Ready(RenderResult(images=[], prompt="", inference_seconds=0.0))
    with owner_scope(claimed[0].owner):  # upload URLs resolve only for their owner
        pending: PendingRender = renderer.begin_items(items, on_progress=on_progress)
    return pending


def _store(app: Celery, group: list[Claimed], pending: PendingRender, suffix: str, settings: Settings,
           services: WorkerServices) -> None:
    """The uploader's step: finish the batch (pixels, safety check: models.render), then store, record and
    complete (farm.lifecycle.store); a failure gives the batch back."""
    ids = [c.batch_id for c in group]
    try:
        result = pending.result()
        outcome = store(group, result.images, worker=services.name, storage=get_storage(settings), settings=settings,
                        note=suffix, inference_seconds=result.inference_seconds,
                        on_progress=lambda: services.keeper.progress_quietly(ids))
        count.stored(get_renderer().spec.key, outcome.usage, len(outcome.refused))
    except Exception as exc:
        give_back(group, exc, settings)
    finally:
        services.keeper.drop(ids)


def register(app: Celery) -> None:
    settings = get_settings()
    app.task(
        name="farm.render",
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,  # internal: the ledger holds the outcome
        time_limit=settings.task_time_limit,
        soft_time_limit=soft_time_limit(settings.task_time_limit),
    )(render_batch)
