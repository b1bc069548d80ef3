"""Leased batches and the worker registry, in the ledger.

A job's images are split into batches when it is submitted (one row each). A Celery message
only says "batch k of job J is ready"; the ledger decides who renders it:

* :func:`claim` takes a batch with ``SELECT … FOR UPDATE SKIP LOCKED`` if it is queued, or if
  its lease ran out. A redelivered message for a batch that is done, or leased to a live
  worker, claims nothing and is dropped, so a batch is never rendered twice at once.
* :func:`claim_companions` takes other queued batches that fit in the same GPU batch
  (cross-request batching; same ``compat`` key and lane).
* :func:`extend` is the heartbeat: it pushes a held lease on. A worker that dies or hangs
  stops beating, and :func:`reap` (run by every worker) puts its batches back to queued.

SQLite has no row locks; there ``BEGIN IMMEDIATE`` (see :mod:`db.session`) serialises writers,
which gives the same answers. Callers own the transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from db.models import Batch, Worker, utcnow

QUEUED, CLAIMED, DONE, FAILED, CANCELLED = "queued", "claimed", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)

_COMPAT_FIELDS = (
    "model_name", "image_size", "num_inference_steps", "guidance_scale", "guidance_rescale",
    "loras", "embeddings", "enable_safety_checker", "safety_checker_version", "has_negative_prompt", "owner",
)


def compat_key(input: dict[str, Any]) -> str:
    """Batches with the same key can share a GPU batch: same model, size, steps, guidance, LoRAs."""
    picked = {name: input.get(name) for name in _COMPAT_FIELDS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:32]


def split(num_images: int, size: int, workers: int = 1) -> list[list[int]]:
    """Indices ``0..num_images-1`` in consecutive batches of at most ``size``, balanced.

    The number of batches is rounded up to a multiple of ``workers`` (when there are enough
    images) and batch sizes differ by at most one, so that every worker of the pool gets the
    same number of images and none is left with a last batch while the others idle. On a
    long job (two rounds or more) the last round is cut in halves.
    """
    size, workers = max(1, size), max(1, workers)
    count = -(-num_images // size)
    if workers > 1:
        count = min(num_images, -(-count // workers) * workers)
    base, extra = divmod(num_images, max(1, count))
    out, start = [], 0
    for k in range(count):
        length = base + (1 if k < extra else 0)
        out.append(list(range(start, start + length)))
        start += length
    if workers > 1 and count >= 2 * workers:
        # the last round in halves: workers drift apart over a long job, and the ones that finish
        # early then wait for the others' last batch; half batches halve that wait
        head, tail = out[:-workers], out[-workers:]
        out = head + [half for b in tail for half in (b[: (len(b) + 1) // 2], b[(len(b) + 1) // 2 :]) if half]
    return out


def create_batches(s: Session, job_id: str, model_key: str, lane: str, compat: str,
                   chunks: Sequence[list[int]]) -> list[Batch]:
    rows = [Batch(job_id=job_id, k=k, indices=list(chunk), model_key=model_key, lane=lane, compat=compat,
                  status=QUEUED, attempts=0)
            for k, chunk in enumerate(chunks)]
    s.add_all(rows)
    s.flush()
    return rows


def get_batches(s: Session, job_id: str) -> list[Batch]:
    stmt = select(Batch).where(Batch.job_id == job_id).order_by(Batch.k)
    return list(s.scalars(stmt.execution_options(populate_existing=True)))


def _lease(seconds: float, now: datetime | None = None) -> datetime:
    return (now or utcnow()) + timedelta(seconds=seconds)


def _take(rows: Iterable[Batch], worker: str, lease_seconds: float) -> list[Batch]:
    now = utcnow()
    taken = []
    for row in rows:
        row.status = CLAIMED
        row.worker = worker
        row.attempts += 1
        row.claimed_at = now
        row.lease_expires_at = _lease(lease_seconds, now)
        taken.append(row)
    return taken


def claim(s: Session, job_id: str, k: int, worker: str, lease_seconds: float) -> Batch | None:
    """Batch ``k`` of ``job_id`` for ``worker``, if it is queued or its lease ran out; else None."""
    now = utcnow()
    stmt = (
        select(Batch)
        .where(Batch.job_id == job_id, Batch.k == k)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    )
    row = s.scalars(stmt).one_or_none()
    if row is None:
        return None
    expired = row.status == CLAIMED and row.lease_expires_at is not None and row.lease_expires_at < now
    unheld = row.status == CLAIMED and row.worker is None  # reaped, waiting for its new message
    if row.status != QUEUED and not expired and not unheld:
        return None
    _take([row], worker, lease_seconds)
    s.flush()
    return row


def claim_companions(s: Session, first: Batch, worker: str, lease_seconds: float, room: int,
                     exclude_jobs: Iterable[str] = ()) -> list[Batch]:
    """Queued batches of other jobs that can join ``first`` in one GPU batch, up to ``room`` images.

    Same model, same ``compat`` key, same lane; oldest first. Only whole batches are taken.
    """
    if room <= 0:
        return []
    stmt = (
        select(Batch)
        .where(Batch.model_key == first.model_key, Batch.compat == first.compat, Batch.lane == first.lane,
               Batch.status == QUEUED, Batch.job_id.not_in([first.job_id, *exclude_jobs]))
        .order_by(Batch.id)
        .limit(room)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    )
    picked: list[Batch] = []
    for row in s.scalars(stmt):
        if len(row.indices) <= room:
            picked.append(row)
            room -= len(row.indices)
    _take(picked, worker, lease_seconds)
    s.flush()
    return picked


def compatible_in_flight(s: Session, first: Batch) -> bool:
    """Whether another job's batch that could share ``first``'s GPU batch is being rendered now.

    Only then is it worth waiting for companions: compatible traffic is arriving. A lone
    request on a quiet pool does not wait.
    """
    stmt = select(Batch.id).where(Batch.model_key == first.model_key, Batch.compat == first.compat,
                                  Batch.status == CLAIMED, Batch.job_id != first.job_id).limit(1)
    return s.scalar(stmt) is not None


def extend(s: Session, batch_ids: Sequence[int], worker: str, lease_seconds: float) -> set[int]:
    """Heartbeat: push on the leases ``worker`` still holds; returns the ids it still holds."""
    if not batch_ids:
        return set()
    stmt = (
        update(Batch)
        .where(Batch.id.in_(list(batch_ids)), Batch.worker == worker, Batch.status == CLAIMED)
        .values(lease_expires_at=_lease(lease_seconds))
        .returning(Batch.id)
    )
    return set(s.scalars(stmt))


def finish(s: Session, batch_id: int, status: str, error: str | None = None) -> bool:
    """A claimed batch → done | failed | cancelled; False if it was not claimed any more."""
    stmt = (
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == CLAIMED)
        .values(status=status, finished_at=utcnow(), lease_expires_at=None, error=error)
    )
    return cast(CursorResult[Any], s.execute(stmt)).rowcount == 1


def release(s: Session, batch_id: int, error: str | None = None) -> bool:
    """A claimed batch back to queued (to be retried); False if it was not claimed any more."""
    stmt = (
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == CLAIMED)
        .values(status=QUEUED, worker=None, lease_expires_at=None, error=error)
    )
    return cast(CursorResult[Any], s.execute(stmt)).rowcount == 1


def reap(s: Session, lease_seconds: float, limit: int = 100) -> list[Batch]:
    """Claimed batches whose lease ran out, taken from their holder (named in ``error``).

    They stay *claimed*, by nobody, under a fresh lease: the caller publishes them after its
    commit, and the first worker to get a message claims them (``claim`` takes unheld rows).
    If the caller dies before publishing, the lease runs out again and the next reap retries.
    """
    stmt = (
        select(Batch)
        .where(Batch.status == CLAIMED, Batch.lease_expires_at < utcnow())
        .order_by(Batch.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    )
    rows = list(s.scalars(stmt))
    for row in rows:
        if row.worker is not None:
            row.error = f"lease of {row.worker} expired"
        row.worker = None
        row.lease_expires_at = _lease(lease_seconds)
    s.flush()
    return rows


def cancel_open(s: Session, job_id: str) -> int:
    """Queued batches of a job → cancelled (claimed ones stop at their holder's next check)."""
    stmt = update(Batch).where(Batch.job_id == job_id, Batch.status == QUEUED).values(
        status=CANCELLED, finished_at=utcnow())
    return cast(CursorResult[Any], s.execute(stmt)).rowcount


# Workers.


def register_worker(s: Session, *, name: str, model_name: str, model_key: str, device: str,
                    max_batch: int, loads: int, pid: int) -> None:
    """Insert or refresh the row of a worker that has just become ready."""
    now = utcnow()
    row = s.get(Worker, name, populate_existing=True)
    if row is None:
        row = Worker(name=name)
        s.add(row)
    row.model_name, row.model_key, row.device = model_name, model_key, device
    row.max_batch, row.loads, row.pid = max_batch, loads, pid
    row.started_at = row.heartbeat_at = now
    row.stopped_at = None
    s.flush()


def beat_worker(s: Session, name: str, loads: int) -> None:
    s.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=utcnow(), loads=loads))


def stop_worker(s: Session, name: str) -> None:
    s.execute(update(Worker).where(Worker.name == name).values(stopped_at=utcnow()))


def live_workers(s: Session, model_key: str, within_seconds: float) -> list[Worker]:
    """Workers of ``model_key`` that beat within ``within_seconds`` and did not stop."""
    since = utcnow() - timedelta(seconds=within_seconds)
    stmt = select(Worker).where(Worker.model_key == model_key, Worker.heartbeat_at >= since,
                                Worker.stopped_at.is_(None)).order_by(Worker.name)
    return list(s.scalars(stmt.execution_options(populate_existing=True)))


def plan_batches(pool: Sequence[Worker], num_images: int, configured: int) -> list[list[int]]:
    """Cut ``num_images`` into batches for ``pool``: see :func:`batch_size_for`, :func:`split`."""
    return split(num_images, batch_size_for(pool, num_images, configured), workers=len(pool))


def pool_max_batch(pool: Sequence[Worker], configured: int) -> int:
    """The most images every worker of the pool renders at once: the smallest reported maximum."""
    return min((w.max_batch for w in pool), default=configured) or configured


def batch_size_for(pool: Sequence[Worker], num_images: int, configured: int) -> int:
    """How big each batch of a ``num_images`` job should be so that it spreads over the pool.

    Each live worker reports its maximum batch (configured, or found from free GPU memory);
    the smallest one bounds the batch. With W live workers, a job is cut into at least W
    batches, so every worker of the pool gets a share. With no live worker, ``configured``.
    """
    share = -(-num_images // max(1, len(pool)))  # ceil
    return max(1, min(pool_max_batch(pool, configured), share))


def pool_batch_size(s: Session, model_key: str, num_images: int, configured: int, within_seconds: float) -> int:
    """:func:`batch_size_for` the live pool of ``model_key``."""
    return batch_size_for(live_workers(s, model_key, within_seconds), num_images, configured)


def counts_by_status(s: Session, job_id: str) -> dict[str, int]:
    stmt = select(Batch.status, func.count()).where(Batch.job_id == job_id).group_by(Batch.status)
    return {status: int(n) for status, n in s.execute(stmt)}
