"""Who serves a model: the live pool, and since when nobody does.

A job for a model that no live worker serves still waits (a pool can scale up from zero), but
its submitter is told: the job's log says so (``farm status``, the fal status logs), ``farm
generate`` warns before it waits, and ``FARM_REQUIRE_LIVE_WORKER=true`` makes such a submit
answer 503 at once, naming the model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.batches import live_workers
from db.models import Worker
from farm.config import Settings


@dataclass
class PoolState:
    model_name: str
    live: int
    last_seen: datetime | None  # the last heartbeat of any worker of the model; None: none ever joined

    def describe(self) -> str:
        """Why a job of this model waits, in words (only meaningful when ``live`` is 0)."""
        when = (f"none since {self.last_seen:%Y-%m-%d %H:%M:%S} UTC" if self.last_seen is not None
                else "none has joined this farm yet")
        return (f"no live worker serves {self.model_name} ({when}): the job waits in the queue until one joins "
                f"(start one with `farm worker --model {self.model_name}`)")


def pool_state(s: Session, model_name: str, model_key: str, settings: Settings) -> PoolState:
    live = live_workers(s, model_key, settings.lease_seconds)
    last = None
    if not live:
        last = s.scalar(select(func.max(Worker.heartbeat_at)).where(Worker.model_key == model_key))
    return PoolState(model_name=model_name, live=len(live), last_seen=last)


_LIVE_CACHE_SECONDS = 1.0
_live_until: dict[str, float] = {}  # model key → until when "it has a live worker" is trusted
_lock = threading.Lock()


def unserved(s: Session, model_name: str, model_key: str, settings: Settings) -> PoolState | None:
    """None if a live worker serves the model, else why not. A positive answer is trusted for a
    second (pool membership changes slowly; a submit on a served pool costs no query then)."""
    now = time.monotonic()
    with _lock:
        if _live_until.get(model_key, 0.0) > now:
            return None
    state = pool_state(s, model_name, model_key, settings)
    if state.live:
        with _lock:
            _live_until[model_key] = now + _LIVE_CACHE_SECONDS
        return None
    return state
