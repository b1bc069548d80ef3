"""Submit: record a job in the ledger, pick its seed, split it into batches, announce them.

Import-light (no torch). Every entry point (CLI, ``farm.generate``, HTTP API, bulk) goes through
:func:`submit` or :func:`submit_many`. A job is accepted once its rows are committed: the
messages that announce its batches are sent after the commit, and a broker that is down or slow
never fails a submit. The batches then wait in the ledger, marked unpublished, and the sweeper
(farm.lifecycle.sweep) publishes them when the broker is back.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db import batches as ledger_batches
from db import ledger
from db.batches import compat_key
from db.models import Batch, Job, Worker
from db.session import session_scope
from db.worker_registry import live_workers, plan_batches, pool_max_batch
from farm.config import Settings, get_settings
from farm.errors import NoLiveWorkerError
from farm.inputs import staging
from farm.lifecycle.announce import announce, message, messages
from farm.lifecycle.fetch import schedule as schedule_fetch
from farm.lifecycle.finish import finish_now
from farm.lifecycle.pool import unserved
from farm.queues import render_queue
from farm.schemas import GenerateInput
from farm.status import JobStatus, Lane
from models.registry import ModelSpec, get_model

log = logging.getLogger(__name__)


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
    background: bool = False,
    settings: Settings | None = None,
    admit: Callable[[Session, Job, bool], bool] | None = None,
) -> str:
    """Record the job and its batches, then announce them; return the request id.

    A repeated submit of the same request (same id, or same idempotency key) returns the existing
    job and records nothing (its batches, if still queued, are announced again: duplicates are
    harmless, the claim decides). The broker being down never fails a submit. ``background``
    publishes from a thread (the HTTP API answers as soon as the rows are committed).

    ``admit(s, job, created)`` runs in the transaction right after the job row is recorded (or
    found): it gets the row (no caller needs to read it back), may raise to refuse the submit
    (nothing is recorded: the transaction rolls back), or return False to stop there (nothing
    more is recorded or announced; the HTTP API answers a repeated idempotency key so).
    """
    settings = settings or get_settings()
    spec = get_model(inp.model_name, settings)
    seed = inp.seed if inp.seed is not None else secrets.randbelow(2**31)
    request_id = request_id or inp.request_id or uuid.uuid4().hex
    inp, blobs = staging.stage_inline(inp, owner, settings)  # data URIs as storage keys: the row holds keys
    fetch = bool(staging.pending(inp, settings))  # URLs / hub ids: fetched before any worker may claim
    rows, request_id, announce_now = _record(inp, spec, seed, request_id, owner, lane, source, idempotency_key,
                                             webhook_url, settings, admit, fetch, blobs)
    if fetch and announce_now:
        schedule_fetch(request_id, owner, settings)
    elif announce_now:
        announce(messages(rows), settings, background=background)
    return request_id


def _record(inp: GenerateInput, spec: ModelSpec, seed: int, request_id: str, owner: str, lane: Lane, source: str,
            idempotency_key: str | None, webhook_url: str | None, settings: Settings,
            admit: Callable[[Session, Job, bool], bool] | None, fetch: bool,
            blobs: dict[str, bytes]) -> tuple[list[Batch], str, bool]:
    """submit's transaction: (batches to announce, request id, whether to announce or fetch at all). The
    request's data-URI blobs are stored in it (a refused submit deletes only what it stored: staging.held)."""
    with session_scope() as s, staging.held(s, owner, blobs, settings):
        waiting = None if settings.embedded else unserved(s, spec.name, spec.key, settings)
        if waiting is not None and settings.require_live_worker:
            raise NoLiveWorkerError(waiting.describe().split(": the job waits")[0])
        job, created = ledger.create_job(
            s, request_id=request_id, owner=owner, model_name=spec.name, model_key=spec.key, lane=lane.value,
            source=source, input=inp.model_dump(mode="json"), seed=seed, num_images=inp.num_images,
            idempotency_key=idempotency_key, webhook_url=webhook_url,
        )  # fmt: skip
        request_id = job.id
        if admit is not None and not admit(s, job, created):
            return [], request_id, False
        if created:
            # one image is one batch whatever the pool (plan_batches gives [[0]]): no look at the pool
            chunks = [[0]] if inp.num_images == 1 else split_job(s, spec.name, inp.num_images, settings)
            compat = compat_key(inp.model_dump(mode="json"), owner)
            rows = ledger_batches.create_batches(s, request_id, spec.key, lane.value, compat, chunks, fetching=fetch)
            ledger.add_log(s, request_id, f"queued {inp.num_images} image(s) in {len(chunks)} batch(es) on "
                           f"{render_queue(spec.key, lane)}" + ("; file inputs are fetched first" if fetch else ""),
                           source="coordinator")
            if waiting is not None:
                ledger.add_log(s, request_id, waiting.describe(), level="WARNING", source="coordinator")
        elif JobStatus(job.status).is_terminal:
            return [], request_id, False
        else:
            rows = [b for b in ledger_batches.get_batches(s, request_id) if b.status == ledger_batches.QUEUED]
            fetch = False  # a repeat: its fetch, if any, is under way (or left to the sweepers)
    return rows, request_id, True


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

    Set-based: one multi-row insert of the jobs (ids that exist already are skipped, then read
    back in one query), one of their batches, one query for the queued batches of the jobs that
    existed; no ledger log line per job (one debug line of this process per call). Jobs that exist already
    are not created again; their queued batches are announced again (a submitter that died
    between recording and publishing loses nothing; a spare message claims nothing). The broker
    being down never fails it: the batches wait in the ledger.
    """
    settings = settings or get_settings()
    if not items:
        return []
    items, blobs, fetch_ids = _stage_many(items, owner, settings)
    with session_scope() as s, staging.held(s, owner, blobs, settings):
        rows, sizes, created = _record_many(s, items, owner, lane, source, settings)
        if fetch_ids:  # fetched first (farm.lifecycle.fetch): not claimable, not announced yet
            ledger_batches.to_fetch(s, fetch_ids)
            rows = [b for b in rows if b.job_id not in fetch_ids]
    for request_id in fetch_ids:
        schedule_fetch(request_id, owner, settings)
    groups: dict[tuple[str, str, str], list[_Queued]] = {}
    for b in rows:
        groups.setdefault((b.model_key, b.lane, b.compat), []).append(b)
    grouped = []
    for (model_key, _, _), members in groups.items():
        size, images = sizes[model_key], 0
        chunk: list[_Queued] = []
        for b in members:
            if chunk and images + len(b.indices) > size:
                grouped.append(message(chunk))
                chunk, images = [], 0
            chunk.append(b)
            images += len(b.indices)
        if chunk:
            grouped.append(message(chunk))
    announce(grouped, settings)
    log.debug("submitted %d %s job(s) (%d new) on the %s lane: %d batch(es) announced in %d message(s)",
             len(items), source, created, lane.value, len(rows), len(grouped))
    return [request_id for _, request_id in items]


def _stage_many(items: list[tuple[GenerateInput, str]], owner: str,
                settings: Settings) -> tuple[list[tuple[GenerateInput, str]], dict[str, bytes], set[str]]:
    """:func:`submit_many`'s inputs with their data URIs as storage keys (each distinct input staged once), the
    blobs to store under them, and the request ids whose URL / hub inputs the fetch stage must get first."""
    out: list[tuple[GenerateInput, str]] = []
    staged: dict[str, bytes] = {}
    fetch_ids: set[str] = set()
    done: dict[tuple[str, tuple[Any, ...]], tuple[GenerateInput, bool]] = {}
    for inp, request_id in items:
        images = tuple(getattr(inp, name, None) for name in staging.IMAGE_FIELDS)  # image-to-image's sources
        if not inp.loras and not inp.embeddings and images == (None, None):
            out.append((inp, request_id))
            continue
        marker = (repr([(x.path, x.scale, x.force) for x in inp.loras] + [(x.path, x.tokens) for x in inp.embeddings]),
                  images)
        if marker not in done:
            new, blobs = staging.stage_inline(inp, owner, settings)
            staged.update(blobs)
            done[marker] = (new, bool(staging.pending(new, settings)))
        new, fetch = done[marker]
        sources = {name: getattr(new, name) for name, value in zip(staging.IMAGE_FIELDS, images, strict=True)
                   if value is not None}
        out.append((inp.model_copy(update={"loras": new.loras, "embeddings": new.embeddings, **sources}), request_id))
        if fetch:
            fetch_ids.add(request_id)
    return out, staged, fetch_ids


@dataclass
class _Queued:
    """A queued batch to announce (what a message names)."""

    id: int
    job_id: str
    k: int
    indices: list[int]
    model_key: str
    lane: str
    compat: str

    @classmethod
    def of(cls, b: Batch) -> _Queued:
        return cls(b.id, b.job_id, b.k, list(b.indices), b.model_key, b.lane, b.compat)


def _record_many(s: Session, items: list[tuple[GenerateInput, str]], owner: str, lane: Lane, source: str,
                 settings: Settings) -> tuple[list[_Queued], dict[str, int], int]:
    """submit_many's rows in three statements: jobs, their batches, the queued batches of jobs already there."""
    specs: dict[str, ModelSpec] = {}  # by model name
    pools: dict[str, list[Worker]] = {}  # one look at each model's pool per call
    jobs: dict[str, dict[str, Any]] = {}
    plans: dict[str, tuple[ModelSpec, str, list[list[int]]]] = {}  # by request id: spec, compat, chunks
    for inp, request_id in items:
        if request_id in jobs:  # listed twice: recorded once
            continue
        spec = specs.get(inp.model_name)
        if spec is None:
            spec = specs[inp.model_name] = get_model(inp.model_name, settings)
        if spec.key not in pools:
            pools[spec.key] = live_workers(s, spec.key, settings.lease_seconds)
        fields = inp.model_dump(mode="json")
        seed = inp.seed if inp.seed is not None else secrets.randbelow(2**31)
        jobs[request_id] = {"id": request_id, "owner": owner, "model_name": spec.name, "model_key": spec.key,
                            "lane": lane.value, "source": source, "input": fields, "seed": seed,
                            "num_images": inp.num_images}
        chunks = plan_batches(pools[spec.key], inp.num_images, _configured(spec, settings))
        plans[request_id] = (spec, compat_key(fields, owner), chunks)
    created, existing = ledger.create_jobs(s, list(jobs.values()))
    new = {(request_id, k): _Queued(0, request_id, k, list(chunk), spec.key, lane.value, compat)
           for request_id, (spec, compat, chunks) in plans.items() if request_id in created
           for k, chunk in enumerate(chunks)}
    ids = ledger.insert_batches(s, [{"job_id": b.job_id, "k": b.k, "indices": b.indices, "model_key": b.model_key,
                                     "lane": b.lane, "compat": b.compat} for b in new.values()])
    rows = [dataclasses.replace(new[(job_id, k)], id=i) for i, job_id, k in ids]
    waiting = [job_id for job_id, job in existing.items() if not JobStatus(job.status).is_terminal]
    if waiting:
        rows += [_Queued.of(b) for b in s.scalars(select(Batch).where(Batch.job_id.in_(waiting),
                                                                      Batch.status == ledger_batches.QUEUED))]
    order = {request_id: i for i, request_id in enumerate(jobs)}
    rows.sort(key=lambda b: (order[b.job_id], b.k))  # announced in the order they were listed
    sizes = {spec.key: pool_max_batch(pools[spec.key], _configured(spec, settings)) for spec in specs.values()}
    return rows, sizes, len(created)


def cancel(request_id: str, owner: str | None = None, source: str = "api", reason: str | None = None) -> str:
    """Cancel a job: ``CANCELLATION_REQUESTED``, ``ALREADY_COMPLETED`` or ``NOT_FOUND``.

    A queued job never starts (its batches are closed, its messages find nothing to claim); a
    running one stops within its current batch (its worker's fenced writes are refused and its
    keeper aborts the render between steps). ``reason``, when the cancel is not a caller's plain
    request (a time limit passed, the caller hung up …), is the job's log line and its error.
    """
    with session_scope() as s:
        if ledger.get_job(s, request_id, owner=owner) is None:
            return "NOT_FOUND"
    done = finish_now(request_id, JobStatus.CANCELLED, message=reason or "cancellation requested", owner=owner,
                      source=source, error=reason or "cancelled by request", error_type="cancelled")
    return "CANCELLATION_REQUESTED" if done else "ALREADY_COMPLETED"
