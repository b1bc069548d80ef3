"""Claim: a worker takes batches from the ledger (the message only woke it).

The batch named by the message (and those listed with it by ``submit_many``) is claimed in one
statement, which bumps each batch's fencing token; the jobs are started and read in one more.
If the GPU batch has room, compatible queued batches of other jobs join it (cross-request
batching), after a bounded wait only while compatible work is arriving. A stored input is not
validated again (image_schemas.admitted_input): admission happened once, at submit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db import batches as ledger_batches
from db import ledger
from db.models import Batch, Job, utcnow
from db.session import session_scope
from farm.config import Settings
from farm.image_schemas import admitted_input
from farm.lifecycle.finish import finish
from farm.schemas import GenerateInput
from farm.status import ACTIVE, BatchStatus, JobStatus

log = logging.getLogger(__name__)


@dataclass
class Claimed:
    """A claimed batch and what rendering and storing it needs."""

    batch_id: int
    token: int
    job_id: str
    k: int
    indices: list[int]
    todo: list[int]
    params: GenerateInput
    seed: int
    owner: str
    total: int
    attempts: int
    source: str
    lane: str
    webhook: bool

    @property
    def held(self) -> tuple[int, int]:
        return (self.batch_id, self.token)


def claim_group(request_id: str, k: int, listed: Sequence[tuple[str, int]], *, worker: str, model_name: str,
                max_batch: int, settings: Settings) -> list[Claimed]:
    """Claim batch ``k`` of ``request_id`` (and ``listed``) and, with room, companions of other jobs."""
    with session_scope() as s:
        rows = ledger_batches.claim_many(s, [(request_id, k), *listed], worker, settings.lease_seconds)
        if not rows:
            log.info("batch %s.%s already done or leased elsewhere: message dropped", request_id, k)
            return []
        first = rows[0]
        group = _prepare(s, rows, model_name, settings)
        room = max_batch - sum(len(c.todo) for c in group)
        if not group or room <= 0 or settings.batch_wait_ms <= 0 or len(group[0].indices) < group[0].total:
            return group  # full, or a slice of a larger job (cut to balance the pool): no company
        companions = ledger_batches.claim_companions(s, first, worker, settings.lease_seconds, room)
        group += _prepare(s, companions, model_name, settings)
        busy = not companions and ledger_batches.compatible_in_flight(s, first)
    if not busy or not group:
        return group  # company found already, or a quiet pool: nothing to wait for
    time.sleep(settings.batch_wait_ms / 1000)  # bounded wait for companions to arrive
    with session_scope() as s:
        companions = ledger_batches.claim_companions(s, first, worker, settings.lease_seconds, room)
        group += _prepare(s, companions, model_name, settings)
    return group


def claim_next_group(*, worker: str, model_name: str, model_key: str, max_batch: int,
                     settings: Settings) -> list[Claimed]:
    """Pull the next queued batch of the model (highest lane first) and companions that fit with it.

    No message is needed and none is waited for: this is how a worker takes its next batch while
    the current one renders. Returns [] when nothing is queued.
    """
    with session_scope() as s:
        for _ in range(8):  # a pulled batch of an ended job is closed; try the next (bounded)
            row = ledger_batches.claim_next(s, model_key, worker, settings.lease_seconds)
            if row is None:
                return []
            group = _prepare(s, [row], model_name, settings)
            if group:
                break
        else:
            return []
        room = max_batch - sum(len(c.todo) for c in group)
        if room > 0 and settings.batch_wait_ms > 0 and len(group[0].indices) == group[0].total:
            group += _prepare(s, ledger_batches.claim_companions(s, row, worker, settings.lease_seconds, room),
                              model_name, settings)
        return group


def release(group: Sequence[Claimed]) -> None:
    """Give back claims that were pulled but not started (a higher lane came first, or the worker stops)."""
    if group:
        with session_scope() as s:
            ledger_batches.release(s, [c.held for c in group])


def higher_lane_waiting(model_key: str, lane: str) -> bool:
    with session_scope() as s:
        return ledger_batches.higher_lane_waiting(s, model_key, lane)


def start_jobs(s: Session, job_ids: Sequence[str]) -> dict[str, Job]:
    """The active jobs among ``job_ids``; those still queued move to IN_PROGRESS.

    A read, then an update of only the queued ones: claims of a running job never take its row lock
    (a job's stores count their images on that row, and would queue behind every claim).
    """
    if not job_ids:
        return {}
    stmt = select(Job).where(Job.id.in_(list(job_ids)), Job.status.in_(list(ACTIVE)))
    jobs = {job.id: job for job in s.scalars(stmt.execution_options(populate_existing=True))}
    queued = [job.id for job in jobs.values() if job.status == JobStatus.IN_QUEUE]
    if queued:
        now = utcnow()
        started = set(s.scalars(update(Job).where(Job.id.in_(queued), Job.status == JobStatus.IN_QUEUE)
                                .values(status=JobStatus.IN_PROGRESS, started_at=now, updated_at=now)
                                .returning(Job.id).execution_options(synchronize_session=False)))
        _notify(s, sorted(started))
    return jobs


def _notify(s: Session, job_ids: list[str]) -> None:
    try:
        from farm import events
    except ImportError:  # pragma: no cover - events are optional wake-ups
        return
    for job_id in job_ids:
        events.notify(s, job_id)


def _prepare(s: Session, rows: list[Batch], model_name: str, settings: Settings) -> list[Claimed]:
    """Claimed rows → what rendering them needs; batches of ended jobs are closed instead."""
    jobs = start_jobs(s, sorted({row.job_id for row in rows}))
    group = []
    for row in rows:
        job = jobs.get(row.job_id)
        if job is None:  # ended (cancelled, failed) or deleted: nothing to render
            ledger_batches.finish_held(s, [(row.id, row.token)], BatchStatus.CANCELLED)
            continue
        if job.model_name != model_name:
            reason = f"job for {job.model_name} reached a worker of {model_name}"
            ledger_batches.fail(s, row.id, row.token, reason)
            finish(s, job, JobStatus.FAILED, message=reason, error=reason, error_type="render_error",
                   settings=settings)
            continue
        # a batch claimed for the first time has nothing stored yet (batches never overlap)
        done = ledger.done_indices(s, row.job_id) if row.attempts > 1 else set()
        todo = [i for i in row.indices if i not in done]
        if len(todo) < len(row.indices):
            ledger.add_log(s, row.job_id, f"images {sorted(set(row.indices) - set(todo))} already stored: "
                           "skipped (redelivery)")
        group.append(Claimed(batch_id=row.id, token=row.token, job_id=row.job_id, k=row.k,
                             indices=list(row.indices), todo=todo, params=admitted_input(job.input), seed=job.seed,
                             owner=job.owner, total=job.num_images, attempts=row.attempts, source=job.source,
                             lane=row.lane, webhook=bool(job.webhook_url)))
    return group


def describe(group: Sequence[Claimed]) -> Any:
    return [f"{c.job_id}.{c.k}" for c in group]
