"""Usage per owner: what a stored batch counts, what an owner used, and the daily GPU-second quota.

A GPU batch may carry the images of several requests (cross-request batching), of several
owners: its render time is split by image, so each request is charged its images' share
(:func:`batch_usage`). The counters go to the ledger's ``usage`` table (db.usage_counters) in the
transaction that stores the images, so usage is counted exactly when images are: a store
refused by fencing counts nothing, and a batch rendered twice (its lease ran out) is charged
only for the render that was stored. The model is named as requested (``farm/tiny-lcm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Usage
from db.usage_counters import UsageEntry, today_utc
from farm.config import Settings
from farm.errors import QuotaExceededError


def batch_usage(stored: Sequence[dict[str, Any]], owners: dict[str, tuple[str, str]], rendered: int,
                inference_seconds: float, day: date | None = None) -> list[UsageEntry]:
    """Usage of the image rows ``stored`` (``job_id`` each) out of a GPU batch of ``rendered`` images
    that took ``inference_seconds``; ``owners``: job id → (owner, model name)."""
    share = inference_seconds / rendered if rendered else 0.0
    counts: dict[tuple[str, str], int] = {}
    for row in stored:
        key = owners[row["job_id"]]
        counts[key] = counts.get(key, 0) + 1
    when = day or today_utc()
    return [UsageEntry(owner=o, model=m, source="batch", images=n, gpu_seconds=share * n, day=when)
            for (o, m), n in sorted(counts.items())]


@dataclass(frozen=True)
class UsageRow:
    owner: str
    model: str
    source: str
    images: int
    frames: int
    gpu_seconds: float
    day: date | None = None  # None: summed over the days asked for

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"owner": self.owner, "model": self.model, "source": self.source,
                               "images": self.images, "frames": self.frames,
                               "gpu_seconds": round(self.gpu_seconds, 6)}
        if self.day is not None:
            out["day"] = self.day.isoformat()
        return out


def usage_rows(s: Session, *, owner: str | None = None, since: date | None = None, until: date | None = None,
               daily: bool = False) -> list[UsageRow]:
    """Usage per owner, model and source (and day, with ``daily``) from ``since`` to ``until`` (UTC days,
    both included)."""
    keys: list[Any] = [Usage.owner, Usage.model, Usage.source] + ([Usage.day] if daily else [])
    stmt = select(*keys, func.sum(Usage.images), func.sum(Usage.frames), func.sum(Usage.gpu_seconds))
    if owner is not None:
        stmt = stmt.where(Usage.owner == owner)
    if since is not None:
        stmt = stmt.where(Usage.day >= since)
    if until is not None:
        stmt = stmt.where(Usage.day <= until)
    stmt = stmt.group_by(*keys).order_by(*keys)
    out = []
    for row in s.execute(stmt):
        o, m, src = row[0], row[1], row[2]
        d = row[3] if daily else None
        i, f, g = row[-3], row[-2], row[-1]
        out.append(UsageRow(o, m, src, int(i or 0), int(f or 0), float(g or 0.0), d))
    return out


def quota_for(owner: str, settings: Settings) -> float | None:
    """The owner's daily GPU-second quota; None: none."""
    limit = settings.owner_daily_gpu_seconds.get(owner, settings.daily_gpu_seconds)
    return limit if limit > 0 else None


def used_today(s: Session, owner: str) -> float:
    """GPU-seconds the owner used today (UTC), every model and source."""
    stmt = select(func.sum(Usage.gpu_seconds)).where(Usage.owner == owner, Usage.day == today_utc())
    return float(s.scalar(stmt) or 0.0)


def seconds_to_midnight(now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return max(1, int((midnight - now).total_seconds()) + 1)


def check_quota(s: Session, owner: str, settings: Settings) -> None:
    """Refuse (429) a new request of an owner whose daily GPU-second quota is spent. Work already
    accepted still runs (and is counted), so the day's usage may end a little above the quota."""
    limit = quota_for(owner, settings)
    if limit is None:
        return
    used = used_today(s, owner)
    if used >= limit:
        wait = seconds_to_midnight()
        raise QuotaExceededError(
            f"daily GPU-second quota spent: {used:.1f} of {limit:g} GPU-seconds used today (UTC) by owner "
            f"{owner!r}; new requests are accepted again at 00:00 UTC, in {wait} s", retry_after=wait)
