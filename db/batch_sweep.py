"""Sweeping the batches: leases that ran out, and queued batches whose message may be gone.

The ledger side of farm.lifecycle.sweep: :func:`reap` puts batches whose lease ran out back to
queued with no known message (``published_at`` NULL); :func:`due` lists queued batches whose
message may be gone, for the sweeper to publish again. Imports db only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, literal, or_, select, tuple_, update
from sqlalchemy.orm import Session

from db.batches import CLAIMED, QUEUED, returning_batches
from db.models import Batch, utcnow


def reap(s: Session, limit: int = 100) -> list[Batch]:
    """Claimed batches whose lease ran out → queued, with no known message (``published_at`` NULL).

    ``error`` says whose lease expired (a batch given back after a failure keeps its reason). The
    old holder's fenced writes are refused from now on; the sweeper publishes the batch again.
    """
    expired = (select(Batch.id).where(Batch.status == CLAIMED, Batch.lease_expires_at < utcnow())
               .order_by(Batch.id).limit(limit).with_for_update(skip_locked=True))
    ids = list(s.scalars(expired))
    if not ids:
        return []
    why = case((Batch.worker.is_(None), Batch.error), else_=literal("lease of ") + Batch.worker + literal(" expired"))
    stmt = (update(Batch).where(Batch.id.in_(ids), Batch.status == CLAIMED)
            .values(status=QUEUED, worker=None, lease_expires_at=None, published_at=None, error=why))
    return sorted(returning_batches(s, stmt), key=lambda b: b.id)


def stale_queues(s: Session, older_than: datetime) -> set[tuple[str, str]]:
    """``(model_key, lane)`` of queued batches whose last message is older than ``older_than``."""
    stmt = select(Batch.model_key, Batch.lane).where(Batch.status == QUEUED, Batch.published_at < older_than)
    return {(m, lane) for m, lane in s.execute(stmt.distinct())}


def due(s: Session, *, older_than: datetime, empty_queues: Iterable[tuple[str, str]],
        published_before: datetime | None = None, limit: int = 500) -> list[Batch]:
    """Queued batches whose message may be gone, locked (SKIP LOCKED) and marked published now.

    * never published, or the publish failed, or reaped: ``published_at`` NULL;
    * published before the broker lost its data: ``published_at < published_before``;
    * not claimed within the dispatch timeout (``published_at < older_than``) while its queue
      is empty, so its message cannot be waiting there.
    """
    now = utcnow()
    due_if: list[Any] = [Batch.published_at.is_(None)]
    if published_before is not None:
        due_if.append(Batch.published_at < published_before)
    empty = [tuple(q) for q in empty_queues]
    if empty:
        due_if.append(and_(Batch.published_at < older_than, tuple_(Batch.model_key, Batch.lane).in_(empty)))
    ids = list(s.scalars(select(Batch.id).where(Batch.status == QUEUED, or_(*due_if)).order_by(Batch.id)
                         .limit(limit).with_for_update(skip_locked=True)))
    if not ids:
        return []
    stmt = (update(Batch).where(Batch.id.in_(ids), Batch.status == QUEUED)
            .values(published_at=now, publishes=Batch.publishes + 1))
    return sorted(returning_batches(s, stmt), key=lambda b: b.id)


def unpublished(s: Session, batch_ids: Sequence[int]) -> None:
    """The publish of these batches failed: no message is known, the next sweep sends one."""
    if batch_ids:
        s.execute(update(Batch).where(Batch.id.in_(list(batch_ids)), Batch.status == QUEUED)
                  .values(published_at=None))
