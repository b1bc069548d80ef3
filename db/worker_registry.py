"""The worker registry in the ledger, and how a job is cut into batches for the live pool.

Each worker process has a row (:func:`register_worker` when ready, :func:`beat_worker`,
:func:`stop_worker`); :func:`live_workers` is the pool of a model, and :func:`plan_batches` cuts a
job so that every live worker gets a share (:func:`db.batches.split`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.batches import split
from db.models import Worker, utcnow
from farm.errors import WorkerNameTakenError


def register_worker(s: Session, *, name: str, model_name: str, model_key: str, device: str,
                    max_batch: int, loads: int, pid: int, host: str | None = None,
                    live_within: float | None = None, metrics_url: str | None = None) -> None:
    """Insert or refresh the row of a worker that has just become ready.

    A name belongs to one live worker: the row of another live process (see
    :meth:`Worker.live_other_than`; ``live_within`` defaults to ``FARM_LEASE_SECONDS``) is not
    taken over, the registration raises :class:`WorkerNameTakenError` naming it.
    """
    now = utcnow()
    host = host or socket.gethostname()
    if live_within is None:
        from farm.config import get_settings

        live_within = get_settings().lease_seconds
    row = s.get(Worker, name, populate_existing=True, with_for_update=True)
    if row is not None and row.live_other_than(host, pid, live_within, now):
        raise row.name_taken(now)
    if row is None:
        row = Worker(name=name)
        s.add(row)
    row.model_name, row.model_key, row.device = model_name, model_key, device
    row.max_batch, row.loads, row.pid, row.host = max_batch, loads, pid, host
    row.metrics_url = metrics_url
    row.recompiles = row.cold_renders = 0
    row.started_at = row.heartbeat_at = now
    row.stopped_at = None
    try:
        s.flush()
    except IntegrityError as exc:  # another process inserted the same name at the same moment
        raise WorkerNameTakenError(f"worker name {name!r} was registered by another worker at the same moment: "
                                   "give this one another --name") from exc


def beat_worker(s: Session, name: str, loads: int, pid: int | None = None, host: str | None = None,
                recompiles: int = 0, cold_renders: int = 0) -> None:
    """Refresh this process's row (``pid``/``host`` default to this process's): never a namesake's."""
    s.execute(update(Worker).where(Worker.name == name, Worker.pid == (pid or os.getpid()),
                                   Worker.host == (host or socket.gethostname()))
              .values(heartbeat_at=utcnow(), loads=loads, recompiles=recompiles, cold_renders=cold_renders))


def stop_worker(s: Session, name: str, pid: int | None = None, host: str | None = None) -> None:
    """Mark this process's row stopped (``pid``/``host`` default to this process's): never a namesake's."""
    s.execute(update(Worker).where(Worker.name == name, Worker.pid == (pid or os.getpid()),
                                   Worker.host == (host or socket.gethostname()))
              .values(stopped_at=utcnow()))


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
