"""The coordinator: record a job in the ledger, pick its seed, split it, route it.

Import-light (no torch). Every entry point (CLI, ``farm.generate``, HTTP API) goes
through :func:`submit`, so every job lands in the ledger the same way.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Sequence

from sqlalchemy.orm import Session

from db import ledger
from db.batches import (
    QUEUED,
    cancel_open,
    compat_key,
    create_batches,
    get_batches,
    live_workers,
    plan_batches,
    pool_max_batch,
)
from db.models import Worker
from db.session import session_scope
from farm.config import Settings, get_settings
from farm.errors import BrokerUnavailableError
from farm.schemas import GenerateInput
from farm.status import JobStatus, Lane
from farm.webhooks import outbox
from models.registry import ModelSpec, get_model
from tasks.queues import render_queue

log = logging.getLogger(__name__)


def _compat(inp: GenerateInput, owner: str) -> str:
    """The cross-request batching key; requests with LoRAs or embeddings batch only with their owner's."""
    fields = inp.model_dump(mode="json")
    fields["has_negative_prompt"] = bool(inp.negative_prompt)  # SDXL: no negative prompt ≠ ""
    if inp.loras or inp.embeddings:
        fields["owner"] = owner
    return compat_key(fields)


def split_job(s: Session, model_name: str, num_images: int, settings: Settings,
              pool: Sequence[Worker] | None = None) -> list[list[int]]:
    """Cut a job into batches: at most the pool's batch size, and at least one per live worker."""
    spec = get_model(model_name, settings)
    if pool is None:
        pool = live_workers(s, spec.key, settings.lease_seconds)
    return plan_batches(pool, num_images, _configured(spec, settings))


def _configured(spec: ModelSpec, settings: Settings) -> int:
    """The batch size when no worker has reported one: FARM_BATCH_SIZE, capped by the model's."""
    return min(settings.batch_size or spec.max_batch, spec.max_batch)


def submit(
    inp: GenerateInput,
    *,
    owner: str,
    lane: Lane = Lane.QUEUE,
    source: str = "cli",
    request_id: str | None = None,
    idempotency_key: str | None = None,
    webhook_url: str | None = None,
    republish: bool = False,
    settings: Settings | None = None,
) -> str:
    """Record the job and publish its render tasks; return the request id.

    A repeated submit of the same request (same id, or same idempotency key) returns
    the existing job and publishes nothing, unless ``republish`` (a redelivered
    dispatch, whose first attempt may have died between the two steps).
    If the broker is down the job is marked FAILED and BrokerUnavailableError raised:
    no job is left behind in a non-terminal state.
    """
    settings = settings or get_settings()
    spec = get_model(inp.model_name, settings)
    seed = inp.seed if inp.seed is not None else secrets.randbelow(2**31)
    rid = request_id or inp.request_id or uuid.uuid4().hex
    with session_scope() as s:
        job, created = ledger.create_job(
            s,
            request_id=rid,
            owner=owner,
            model_name=spec.name,
            model_key=spec.key,
            lane=lane.value,
            source=source,
            input=inp.model_dump(mode="json"),
            seed=seed,
            num_images=inp.num_images,
            idempotency_key=idempotency_key,
        )
        rid = job.id
        if created and webhook_url:
            job.webhook_url = webhook_url
        if not created and not (republish and not JobStatus(job.status).is_terminal):
            return rid
        if created:
            chunks = split_job(s, spec.name, inp.num_images, settings)
            create_batches(s, rid, spec.key, lane.value, _compat(inp, owner), chunks)
            ledger.add_log(s, rid, f"queued {inp.num_images} image(s) in {len(chunks)} batch(es) on "
                           f"{render_queue(spec.key, lane)}", source="coordinator")
    publish(rid, settings)
    return rid


def submit_many(
    items: list[tuple[GenerateInput, str]],
    *,
    owner: str,
    lane: Lane = Lane.BULK,
    source: str = "bulk",
    settings: Settings | None = None,
) -> list[str]:
    """Record many one-batch jobs ``(input, request_id)`` in one transaction and wake the pool
    with one message per GPU batch of them (bulk work: no message is spent on a batch that a
    companion claim took already).

    Jobs that exist already are not created again; their open batches are published again
    (a submitter that died between recording and publishing loses nothing; a spare message
    claims nothing). Broker down: the jobs are FAILED and BrokerUnavailableError raised.
    """
    settings = settings or get_settings()
    rids = []
    pools: dict[str, list[Worker]] = {}  # one look at each model's pool per call
    specs: dict[str, ModelSpec] = {}
    with session_scope() as s:
        for inp, rid in items:
            spec = get_model(inp.model_name, settings)
            if spec.key not in pools:
                pools[spec.key], specs[spec.key] = live_workers(s, spec.key, settings.lease_seconds), spec
            seed = inp.seed if inp.seed is not None else secrets.randbelow(2**31)
            job, created = ledger.create_job(
                s, request_id=rid, owner=owner, model_name=spec.name, model_key=spec.key, lane=lane.value,
                source=source, input=inp.model_dump(mode="json"), seed=seed, num_images=inp.num_images,
            )
            if created:
                create_batches(s, job.id, spec.key, lane.value, _compat(inp, owner),
                               split_job(s, spec.name, inp.num_images, settings, pools[spec.key]))
            rids.append(job.id)
        groups: dict[tuple[str, str, str], list[tuple[str, int, list[int]]]] = {}
        for rid in rids:
            for b in get_batches(s, rid):
                if b.status == QUEUED:
                    groups.setdefault((b.model_key, b.lane, b.compat), []).append((b.job_id, b.k, list(b.indices)))
        sizes = {key: pool_max_batch(pools[key], _configured(specs[key], settings)) for key in pools}
    messages = []
    for (model_key, lane_name, _), batches_ in groups.items():
        size = sizes[model_key]
        chunk: list[tuple[str, int, list[int]]] = []
        images = 0
        for entry in batches_:
            if chunk and images + len(entry[2]) > size:
                messages.append((render_queue(model_key, lane_name), chunk))
                chunk, images = [], 0
            chunk.append(entry)
            images += len(entry[2])
        if chunk:
            messages.append((render_queue(model_key, lane_name), chunk))
    _send(messages, rids, settings)
    return rids


def _send(messages: list[tuple[str, list[tuple[str, int, list[int]]]]], rids: list[str], settings: Settings) -> None:
    from tasks.app import get_app

    app = get_app(settings)
    try:
        with app.producer_or_acquire() as producer:
            for queue, chunk in messages:
                (rid, k, indices), rest = chunk[0], chunk[1:]
                app.send_task("farm.render", queue=queue, task_id=f"{rid}.{k}.g", producer=producer,
                              kwargs={"request_id": rid, "indices": indices, "k": k,
                                      "group": [[r, kk] for r, kk, _ in rest]})
    except Exception as exc:  # kombu/redis raise many types for a dead broker
        reason = f"broker unavailable: {exc}"
        with session_scope() as s:
            for rid in rids:
                if ledger.finish_job(s, rid, JobStatus.FAILED, error=reason, error_type="broker_unavailable"):
                    outbox.enqueue(s, rid)
                cancel_open(s, rid)
        raise BrokerUnavailableError(reason) from exc


def publish(rid: str, settings: Settings) -> None:
    """Send one message per open batch of the job, on its model's lane."""
    from tasks.app import get_app

    app = get_app(settings)
    with session_scope() as s:
        rows = [(b.k, list(b.indices), render_queue(b.model_key, b.lane))
                for b in get_batches(s, rid) if b.status == QUEUED]
    try:
        with app.producer_or_acquire() as producer:
            for k, indices, queue in rows:
                app.send_task(
                    "farm.render",
                    kwargs={"request_id": rid, "indices": indices, "k": k},
                    queue=queue,
                    task_id=f"{rid}.{k}",
                    producer=producer,
                )
    except Exception as exc:  # kombu/redis raise many types for a dead broker
        reason = f"broker unavailable: {exc}"
        with session_scope() as s:
            if ledger.finish_job(s, rid, JobStatus.FAILED, error=reason, error_type="broker_unavailable"):
                outbox.enqueue(s, rid)
            cancel_open(s, rid)
            ledger.add_log(s, rid, reason, level="ERROR", source="coordinator")
        raise BrokerUnavailableError(reason) from exc


def cancel(rid: str, owner: str | None = None) -> str:
    """Cancel a job: ``CANCELLATION_REQUESTED``, ``ALREADY_COMPLETED`` or ``NOT_FOUND``.

    A queued job never starts (its open batches are closed, its messages find nothing to
    claim); a running one stops within its current batch (the worker checks between steps).
    """
    with session_scope() as s:
        job = ledger.get_job(s, rid, owner=owner)
        if job is None:
            return "NOT_FOUND"
        cancel_open(s, rid)  # batches first, then the job: the order a worker's claim locks them in
        if not ledger.finish_job(s, rid, JobStatus.CANCELLED, error="cancelled by request", error_type="cancelled"):
            return "ALREADY_COMPLETED"
        outbox.enqueue(s, job)
        ledger.add_log(s, rid, "cancellation requested", level="WARNING", source="api")
        return "CANCELLATION_REQUESTED"
