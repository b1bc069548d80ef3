"""``GET /usage``: an owner's own usage (images, realtime frames, GPU-seconds per model), and its quota.

Scoped to the key's owner: no query reaches another owner's counters.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from db.session import session_scope
from db.usage_counters import today_utc
from farm.accounting import quota_for, usage_rows, used_today
from farm.api.deps import SettingsDep, TenantDep
from farm.api.error_bodies import ERROR_RESPONSES, RequestFieldError
from farm.config import Settings

router = APIRouter(tags=["usage"])
DEFAULT_DAYS = 30


class UsageLine(BaseModel):
    model: str = Field(..., description="The model, as requested")
    source: str = Field(..., description="batch (rendered requests) or realtime (websocket frames)")
    day: date | None = Field(None, description="UTC day (with daily=true)")
    images: int
    frames: int
    gpu_seconds: float


class Quota(BaseModel):
    daily_gpu_seconds: float | None = Field(..., description="The owner's daily quota; null: none")
    used_today: float = Field(..., description="GPU-seconds used today (UTC)")
    remaining_today: float | None = Field(..., description="What is left today; null: no quota")


class UsageReport(BaseModel):
    owner: str
    since: date
    until: date
    usage: list[UsageLine]
    total_images: int
    total_frames: int
    total_gpu_seconds: float
    quota: Quota


def _report(owner: str, since: date, until: date, daily: bool, settings: Settings) -> UsageReport:
    with session_scope() as s:
        rows = usage_rows(s, owner=owner, since=since, until=until, daily=daily)
        today = used_today(s, owner)
    limit = quota_for(owner, settings)
    return UsageReport(
        owner=owner, since=since, until=until,
        usage=[UsageLine(model=r.model, source=r.source, day=r.day, images=r.images, frames=r.frames,
                         gpu_seconds=round(r.gpu_seconds, 6)) for r in rows],
        total_images=sum(r.images for r in rows), total_frames=sum(r.frames for r in rows),
        total_gpu_seconds=round(sum(r.gpu_seconds for r in rows), 6),
        quota=Quota(daily_gpu_seconds=limit, used_today=round(today, 6),
                    remaining_today=None if limit is None else round(max(0.0, limit - today), 6)),
    )  # fmt: skip


@router.get("/usage", response_model=UsageReport, summary="Your usage and quota", responses=ERROR_RESPONSES)
async def usage(
    tenant: TenantDep,
    settings: SettingsDep,
    since: Annotated[date | None, Query(description=f"First UTC day (default: {DEFAULT_DAYS} days ago)")] = None,
    until: Annotated[date | None, Query(description="Last UTC day (default: today)")] = None,
    daily: Annotated[bool, Query(description="One line per day")] = False,
) -> UsageReport:
    """Images, realtime frames and GPU-seconds of this key's owner, per model, from `since` to `until`."""
    last = until or today_utc()
    first = since or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise RequestFieldError("query", "since", f"must not be after until ({last.isoformat()})")
    return await run_in_threadpool(_report, tenant.owner, first, last, daily, settings)
