"""Fetch: a job's URL and hub inputs are got into storage before any GPU worker may claim it.

A job with such inputs is recorded with its batches ``fetching`` (not claimable, not announced).
The process that recorded it fetches them in its own thread pool (``input_fetch_threads``), apart
from any render; every sweeper (farm.lifecycle.sweep) picks up fetching jobs that nobody holds (the
fetcher died, or the owner was at its cap). A fetch holds a lease on the job's batches (``worker`` =
``fetch:<host>:<pid>``, ``lease_expires_at``), so one process fetches a job at a time, and at most
``input_fetches_per_owner`` jobs of one owner are fetched at once across the farm (counted in the
ledger when a fetch is taken, under a lock). Each input has a wall-clock deadline
(``input_fetch_deadline_seconds``, the whole download). Then:

* got: the job's input names ``farm-stored:<key>`` instead, its batches become queued and are
  announced: a worker renders it like any other;
* refused or not got in time: the job fails with an error naming the field (``loras.0.path: …``),
  error type ``file_download_error``; nothing is retried (a server that trickles is not worth a
  second deadline); the client may submit again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session

from db import batches as ledger_batches
from db import ledger, storage_usage
from db.models import Batch, Job, utcnow
from db.session import session_scope
from farm import netguard
from farm.config import Settings
from farm.errors import FileDownloadError
from farm.image_schemas import admitted_input
from farm.inputs.quota import listed
from farm.inputs.refs import STORED
from farm.inputs.retrieve import fetch_one
from farm.inputs.staging import pending
from farm.lifecycle.announce import announce, messages
from farm.lifecycle.finish import finish
from farm.schemas import GenerateInput
from farm.status import JobStatus
from farm.storage import get_storage

log = logging.getLogger(__name__)

FETCHING = ledger_batches.FETCHING
LOCK_KEY = 0x6661726D66657463  # pg_advisory_xact_lock key of fetch claims ("farmfetc")
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_running: Counter[str] = Counter()  # this process's fetches by owner


def _forget() -> None:  # a forked child has none of its parent's threads
    global _pool, _lock, _running
    _pool, _lock, _running = None, threading.Lock(), Counter()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def holder() -> str:
    return f"fetch:{socket.gethostname()}:{os.getpid()}"


def schedule(job_id: str, owner: str, settings: Settings) -> bool:
    """Fetch ``job_id``'s inputs in this process's pool, unless this process runs the owner's cap already."""
    global _pool
    with _lock:
        if _running[owner] >= settings.input_fetches_per_owner:
            return False  # left to the next fetch of this owner, or a sweeper
        if _pool is None:
            _pool = ThreadPoolExecutor(settings.input_fetch_threads, thread_name_prefix="farm-input-fetch")
        _running[owner] += 1
        _pool.submit(_run, job_id, owner, settings)
    return True


def _run(job_id: str, owner: str, settings: Settings) -> None:
    try:
        fetch_job(job_id, settings)
    except Exception as exc:  # the ledger went away: the job stays fetching, a sweeper takes it later
        log.warning("fetching the inputs of %s: %s", job_id, exc)
    finally:
        with _lock:
            _running[owner] -= 1
    try:
        sweep(settings, owner=owner, limit=1)  # the owner's next job, now that a slot is free
    except Exception as exc:
        log.debug("fetch: no look for the next job of %s: %s", owner, exc)


def _lease(settings: Settings, inputs: int) -> timedelta:
    return timedelta(seconds=settings.input_fetch_deadline_seconds * max(1, inputs) + 60)


def _owner_busy(s: Session, owner: str, settings: Settings) -> bool:
    """Whether ``owner`` has ``input_fetches_per_owner`` jobs being fetched (held, lease unexpired)."""
    if s.get_bind().dialect.name == "postgresql":  # one claim at a time: the count below stays true
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
    held = (select(func.count(func.distinct(Batch.job_id))).join(Job, Job.id == Batch.job_id)
            .where(Job.owner == owner, Batch.status == FETCHING, Batch.lease_expires_at > utcnow()))
    return int(s.scalar(held) or 0) >= settings.input_fetches_per_owner


def _take(job_id: str, settings: Settings) -> tuple[str, dict[str, object]] | None:
    """Lease the job's fetching batches for this process; (owner, input), or None if not ours to fetch."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or JobStatus(job.status) != JobStatus.IN_QUEUE:
            return None
        inputs = len(pending(admitted_input(job.input), settings))
        if _owner_busy(s, job.owner, settings):
            return None
        if not ledger_batches.take_fetch(s, job_id, holder(), utcnow() + _lease(settings, inputs)):
            return None
        return job.owner, dict(job.input)


def fetch_job(job_id: str, settings: Settings) -> bool:
    """Fetch the inputs of ``job_id`` if nobody else is (see the module docstring); True if it was queued."""
    taken = _take(job_id, settings)
    if taken is None:
        return False
    owner, data = taken
    inp = admitted_input(data)
    todo = pending(inp, settings)
    paths: dict[str, str] = {}
    for _ in range(2):  # a second pass gets again what was deleted meanwhile (see _recorded)
        if not _fetch_missing(job_id, owner, todo, paths, settings):
            return False
        rows = _recorded(job_id, owner, inp, paths, todo, settings)
        if rows is not None:
            break
    else:
        return False  # deleted meanwhile twice: the job stays fetching, a sweeper takes it again
    if rows:
        announce(messages(rows), settings)
    return bool(rows)


def _fetch_missing(job_id: str, owner: str, todo: list[tuple[str, str]], paths: dict[str, str],
                   settings: Settings) -> bool:
    """Fetch each input of ``todo`` not in ``paths`` yet into it; False (the job failed, naming the field) when one
    is refused or not got in time."""
    for field, path in todo:
        if field in paths:
            continue
        with session_scope() as s:
            ledger.add_log(s, job_id, f"fetching {field} ({netguard.redact(path)})", source="fetcher")
        try:
            paths[field] = fetch_one(field, path, owner, settings)
        except Exception as exc:  # refused, too slow, unreachable, storage down: the job fails, naming the field
            reason = f"{field}: {exc}" if str(exc) else f"{field}: {type(exc).__name__}"
            with session_scope() as s:
                finish(s, job_id, JobStatus.FAILED, message=f"input not fetched: {reason}", error=reason,
                       error_type=FileDownloadError.error_type, source="fetcher", settings=settings)
            log.warning("job %s of %s: input not fetched: %s", job_id, owner, reason)
            return False
    return True


def _recorded(job_id: str, owner: str, inp: GenerateInput, paths: dict[str, str], todo: list[tuple[str, str]],
              settings: Settings) -> list[Batch] | None:
    """Queue the job with its fetched inputs, under the owner's storage lock; None (and ``paths`` without
    them) when some were deleted since they were stored (the last job naming the same bytes ended:
    farm.inputs.retention), so that they are got again. Under the lock, the job's input names them from
    the commit on, and no release deletes them."""
    from farm.inputs.staging import _with_paths

    storage = get_storage(settings)
    with session_scope() as s:  # the lock order everywhere: the storage lock, batches, then jobs
        storage_usage.hold(s, owner, lambda: listed(storage, owner))
        gone = [f for f, p in paths.items() if not storage.exists(p.removeprefix(STORED))]
        if gone:
            for f in gone:
                del paths[f]
            return None
        rows = ledger_batches.fetched(s, job_id, holder())
        if rows:  # still ours (not cancelled, no lease lost): the job renders what was fetched
            fetched = _with_paths(inp, paths).model_dump(mode="json")
            s.execute(update(Job).where(Job.id == job_id).values(input=fetched))
            ledger.add_log(s, job_id, f"fetched {', '.join(f for f, _ in todo)}; queued", source="fetcher")
    return rows


def sweep(settings: Settings, *, owner: str | None = None, limit: int = 20) -> int:
    """Schedule fetching jobs that nobody holds (of ``owner`` only, if given); how many were scheduled."""
    with session_scope() as s:
        stmt = (select(Batch.job_id, Job.owner).join(Job, Job.id == Batch.job_id)
                .where(Batch.status == FETCHING,
                       or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < utcnow()))
                .group_by(Batch.job_id, Job.owner, Job.created_at).order_by(Job.created_at).limit(limit))
        if owner is not None:
            stmt = stmt.where(Job.owner == owner)
        rows = s.execute(stmt).all()
    return sum(schedule(job_id, who, settings) for job_id, who in rows)
