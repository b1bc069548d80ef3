"""Who serves a model: the live pool, and since when nobody does.

A job for a model that no live worker serves still waits (a pool can scale up from zero), but
its submitter is told: the job's log says so (``farm status``, the fal status logs), at submit or,
when the pool's last worker goes away later (while the job waits, or in the middle of it), by the
sweeper (:func:`log_unserved`); ``farm generate`` and ``farm bulk run`` warn before they wait,
``farm generate`` prints the line when it comes while it follows the job, and ``FARM_REQUIRE_LIVE_WORKER=true``
makes such a submit (or a new bulk job) answer 503 at once, naming the model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, func, or_, select, text
from sqlalchemy.orm import Session

from db import ledger
from db.models import Job, JobLog, Worker
from db.session import session_scope
from db.worker_registry import live_workers
from farm.config import Settings
from farm.status import JobStatus

UNSERVED = "no live worker serves "  # how every such log line starts (once per job)


@dataclass
class PoolState:
    model_name: str
    live: int
    last_seen: datetime | None  # the last heartbeat of any worker of the model; None: none ever joined

    def describe(self, started: bool = False) -> str:
        """Why a job of this model waits, in words (only meaningful when ``live`` is 0); ``started``: the
        job is in progress (its pool went away in the middle of it)."""
        when = (f"none since {self.last_seen:%Y-%m-%d %H:%M:%S} UTC" if self.last_seen is not None
                else "none has joined this farm yet")
        waits = "the job waits for the rest of its images" if started else "the job waits in the queue"
        return (f"{UNSERVED}{self.model_name} ({when}): {waits} until one joins "
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


def log_unserved(settings: Settings, limit: int = 500, job_id: str | None = None) -> int:
    """Sweep step: a WARNING line on queued and in-progress jobs whose model has no live worker (its
    pool went away after they were submitted, or in the middle of them); how many lines were written.
    Once per job while it waits, and once more if it started since (a pool that joined, then left).
    ``job_id``: that job only (``farm generate`` asks for its own). Bulk samples get none (``farm
    bulk run`` warns). Per model, one sweeper at a time writes (PostgreSQL: a transaction-scoped
    advisory lock, skipped when taken), and reads the logs only after taking it, so two sweepers
    never write a job's line twice."""
    written = 0
    waiting = (Job.status.in_([JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS]), Job.source != "bulk",
               *((Job.id == job_id,) if job_id is not None else ()))
    with session_scope() as s:
        models = s.execute(select(Job.model_key, Job.model_name).where(*waiting).distinct()).all()
    for key, name in dict(models).items():
        with session_scope() as s:
            state = unserved(s, name, key, settings)
            if state is None:
                continue
            if s.get_bind().dialect.name == "postgresql" and not s.scalar(
                    text("SELECT pg_try_advisory_xact_lock(hashtext('farm.unserved:' || :key))"), {"key": key}):
                continue  # another sweeper writes this model's lines now
            told = exists().where(JobLog.job_id == Job.id, JobLog.message.startswith(UNSERVED),
                                  or_(Job.started_at.is_(None), JobLog.timestamp >= Job.started_at))
            rows = s.execute(select(Job.id, Job.status).where(Job.model_key == key, *waiting, ~told)
                             .limit(limit)).all()
            for request_id, status in rows:
                ledger.add_log(s, request_id, state.describe(started=status == JobStatus.IN_PROGRESS), level="WARNING",
                               source="sweeper")
            written += len(rows)
    return written


def unserved_notices(job_id: str, after: int, settings: Settings, write: bool = True) -> list[tuple[int, str]]:
    """For a client that follows one job (``farm generate``): its "no live worker serves …" lines
    after log line ``after`` (id, message); ``write``: the line written first if its model has no live
    worker now (no process may be left to sweep: no API, no worker)."""
    if write:
        log_unserved(settings, job_id=job_id)
    with session_scope() as s:
        return [(int(i), m) for i, m in s.execute(
            select(JobLog.id, JobLog.message).where(JobLog.job_id == job_id, JobLog.id > after,
                                                    JobLog.message.startswith(UNSERVED)).order_by(JobLog.id))]
