"""Submit: record a job in the ledger, pick its seed, split it into batches, announce them.

Import-light (no torch). Every entry point (CLI, ``farm.generate``, HTTP API, bulk) goes through
:func:`submit` or :func:`submit_many`. A job is accepted once its rows are committed: the
messages that announce its batches are sent after the commit, and a broker that is down or slow
never fails a submit. The batches then wait in the ledger, marked unpublished, and the sweeper
(farm.lifecycle.sweep) publishes them when the broker is back.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections.abc import Sequence

from sqlalchemy.orm import Session

from db import batches as ledger_batches
from db import ledger
from db.batches import compat_key, live_workers, plan_batches, pool_max_batch
from db.models import Batch, Worker
from db.session import session_scope
from farm import dispatch
from farm.config import Settings, get_settings
from farm.lifecycle.finish import finish_now
from farm.schemas import GenerateInput
from farm.status import JobStatus, Lane
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


def _messages(rows: Sequence[Batch]) -> list[dispatch.Message]:
    return [dispatch.Message(model_key=b.model_key, lane=b.lane, request_id=b.job_id, k=b.k,
                             indices=list(b.indices), batch_ids=[b.id]) for b in rows]


def unpublished(batch_ids: list[int]) -> None:
    """Their messages were not sent: leave them to the sweeper (published when the broker is back)."""
    with session_scope() as s:
        ledger_batches.unpublished(s, batch_ids)


def announce(messages: list[dispatch.Message], settings: Settings, *, background: bool = False) -> None:
    """Publish after the commit; what cannot be sent now is marked unpublished for the sweeper."""
    if background:
        dispatch.publish_soon(messages, settings, unpublished)
        return
    failed = dispatch.publish(messages, settings)
    if failed:
        unpublished(failed)


def submit(
    inp: GenerateInput,
    *,
    owner: str,
    lane: Lane = Lane.QUEUE,
    source: str = "cli",
    request_id: str | None = None,
    idempotency_key: str | None = None,
    webhook_url: str | None = None,
    background: bool = False,
    settings: Settings | None = None,
) -> str:
    """Record the job and its batches, then announce them; return the request id.

    A repeated submit of the same request (same id, or same idempotency key) returns the existing
    job and records nothing (its batches, if still queued, are announced again: duplicates are
    harmless, the claim decides). The broker being down never fails a submit. ``background``
    publishes from a thread (the HTTP API answers as soon as the rows are committed).
    """
    settings = settings or get_settings()
    spec = get_model(inp.model_name, settings)
    seed = inp.seed if inp.seed is not None else secrets.randbelow(2**31)
    rid = request_id or inp.request_id or uuid.uuid4().hex
    with session_scope() as s:
        job, created = ledger.create_job(
            s, request_id=rid, owner=owner, model_name=spec.name, model_key=spec.key, lane=lane.value,
            source=source, input=inp.model_dump(mode="json"), seed=seed, num_images=inp.num_images,
            idempotency_key=idempotency_key, webhook_url=webhook_url,
        )  # fmt: skip
        rid = job.id
        if created:
            chunks = split_job(s, spec.name, inp.num_images, settings)
            rows = ledger_batches.create_batches(s, rid, spec.key, lane.value, _compat(inp, owner), chunks)
            ledger.add_log(s, rid, f"queued {inp.num_images} image(s) in {len(chunks)} batch(es) on "
                           f"{render_queue(spec.key, lane)}", source="coordinator")
        elif JobStatus(job.status).is_terminal:
            return rid
        else:
            rows = [b for b in ledger_batches.get_batches(s, rid) if b.status == ledger_batches.QUEUED]
    announce(_messages(rows), settings, background=background)
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
    companion claim would take anyway).

    Jobs that exist already are not created again; their queued batches are announced again
    (a submitter that died between recording and publishing loses nothing; a spare message
    claims nothing). The broker being down never fails it: the batches wait in the ledger.
    """
    settings = settings or get_settings()
    rids = []
    pools: dict[str, list[Worker]] = {}  # one look at each model's pool per call
    specs: dict[str, ModelSpec] = {}
    rows: list[Batch] = []
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
                rows += ledger_batches.create_batches(s, job.id, spec.key, lane.value, _compat(inp, owner),
                                                      split_job(s, spec.name, inp.num_images, settings,
                                                                pools[spec.key]))
            elif not JobStatus(job.status).is_terminal:
                rows += [b for b in ledger_batches.get_batches(s, job.id) if b.status == ledger_batches.QUEUED]
            rids.append(job.id)
        sizes = {key: pool_max_batch(pools[key], _configured(specs[key], settings)) for key in pools}
    groups: dict[tuple[str, str, str], list[Batch]] = {}
    for b in rows:
        groups.setdefault((b.model_key, b.lane, b.compat), []).append(b)
    messages = []
    for (model_key, _, _), members in groups.items():
        size, images = sizes[model_key], 0
        chunk: list[Batch] = []
        for b in members:
            if chunk and images + len(b.indices) > size:
                messages.append(_group_message(chunk))
                chunk, images = [], 0
            chunk.append(b)
            images += len(b.indices)
        if chunk:
            messages.append(_group_message(chunk))
    announce(messages, settings)
    return rids


def _group_message(chunk: list[Batch]) -> dispatch.Message:
    first, rest = chunk[0], chunk[1:]
    return dispatch.Message(model_key=first.model_key, lane=first.lane, request_id=first.job_id, k=first.k,
                            indices=list(first.indices), batch_ids=[c.id for c in chunk],
                            group=[(c.job_id, c.k) for c in rest])


def cancel(rid: str, owner: str | None = None, source: str = "api") -> str:
    """Cancel a job: ``CANCELLATION_REQUESTED``, ``ALREADY_COMPLETED`` or ``NOT_FOUND``.

    A queued job never starts (its batches are closed, its messages find nothing to claim); a
    running one stops within its current batch (its worker's fenced writes are refused and its
    keeper aborts the render between steps).
    """
    with session_scope() as s:
        if ledger.get_job(s, rid, owner=owner) is None:
            return "NOT_FOUND"
    done = finish_now(rid, JobStatus.CANCELLED, message="cancellation requested", owner=owner, source=source,
                      error="cancelled by request", error_type="cancelled")
    return "CANCELLATION_REQUESTED" if done else "ALREADY_COMPLETED"
