"""Usage counters per owner, model, UTC day and source (``batch`` or ``realtime``).

:func:`record_usage` adds to the counters with one upsert per entry (``INSERT … ON CONFLICT
DO UPDATE SET x = usage.x + excluded.x``, on PostgreSQL and SQLite), in the caller's
transaction: call it in the transaction that stores the work, so usage is counted exactly
when the work is (a refused, fenced store counts nothing). Entries for the same key are
summed first, so one statement touches each row once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Usage

SOURCES = ("batch", "realtime")


def today_utc() -> date:
    return datetime.now(UTC).date()


@dataclass(frozen=True)
class UsageEntry:
    """Work to count for one owner and model: ``images`` and ``gpu_seconds`` (batches), ``frames`` (realtime)."""

    owner: str
    model: str
    source: str
    images: int = 0
    frames: int = 0
    gpu_seconds: float = 0.0
    day: date = field(default_factory=today_utc)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"usage source {self.source!r}: must be one of {', '.join(SOURCES)}")
        if self.images < 0 or self.frames < 0 or self.gpu_seconds < 0:
            raise ValueError(f"usage counters must not be negative: {self!r}")


def record_usage(session: Session, entries: Iterable[UsageEntry]) -> None:
    """Add ``entries`` to the usage counters, in ``session``'s transaction (the caller commits)."""
    totals: dict[tuple[str, str, date, str], list[Any]] = {}
    for e in entries:
        t = totals.setdefault((e.owner, e.model, e.day, e.source), [0, 0, 0.0])
        t[0] += e.images
        t[1] += e.frames
        t[2] += e.gpu_seconds
    if not totals:
        return
    rows = [
        {"owner": o, "model": m, "day": d, "source": src, "images": i, "frames": f, "gpu_seconds": g}
        for (o, m, d, src), (i, f, g) in sorted(totals.items())  # one order: no deadlock between writers
    ]
    name = session.get_bind().dialect.name
    if name == "postgresql":
        stmt: Any = postgresql.insert(Usage)
    elif name == "sqlite":
        stmt = sqlite.insert(Usage)
    else:  # pragma: no cover - the ledger runs on PostgreSQL or SQLite
        raise NotImplementedError(f"usage upsert on {name}")
    ex = stmt.excluded
    c = Usage.__table__.c
    stmt = stmt.on_conflict_do_update(
        index_elements=[c.owner, c.model, c.day, c.source],
        set_={
            "images": c.images + ex.images,
            "frames": c.frames + ex.frames,
            "gpu_seconds": c.gpu_seconds + ex.gpu_seconds,
        },
    )
    session.execute(stmt, rows)


__all__ = ["SOURCES", "UsageEntry", "record_usage", "today_utc"]
