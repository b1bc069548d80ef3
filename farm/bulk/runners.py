"""The one driver of a bulk job: a lease in the ledger (``bulk_jobs.runner``, ``runner_until``).

A driver (``farm bulk run``/``resume`` or a ``farm.bulk`` task) takes the lease before it drives and
renews it every ``RENEW_SECONDS``; a second driver is refused with ConflictError naming the first,
unless the lease ran out or its holder is a process of this host that no longer exists. A bulk
worker's warm shutdown (SIGTERM, Ctrl-C) makes every driver of its process hand its job back after
the current round (:func:`leave_jobs`): the job stays RUNNING with no driver, its farm jobs in flight
go on rendering, and a sweeper sends ``farm.bulk`` again, so another bulk worker carries on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

from sqlalchemy import or_, update

from db.models import BulkJob, utcnow
from db.session import session_scope
from farm.bulk import stops
from farm.bulk.control import get
from farm.config import get_settings
from farm.errors import ConflictError, FarmError

log = logging.getLogger(__name__)

LEASE_SECONDS = 60.0
RENEW_SECONDS = 5.0  # how often a driver renews its lease


class BulkFailedError(FarmError):
    """Raised when a driver finds that the job's earlier runs kept dying, and the job is FAILED now."""

    http_status = 409
    error_type = "bulk_failed"


_leaving = threading.Event()


def leave_jobs() -> None:
    """Make the drivers of this process hand their jobs back after their current round."""
    _leaving.set()


def leaving() -> bool:
    return _leaving.is_set()


@contextlib.contextmanager
def driving(bulk_id: str) -> Iterator[str]:
    """Hold the job's lease (ConflictError if another driver does) and give it back on the way out."""
    runner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{int(time.time())}"  # host:pid:id:start
    take(bulk_id, runner)
    try:
        yield runner
    finally:
        with session_scope() as s:
            s.execute(update(BulkJob).where(BulkJob.id == bulk_id, BulkJob.runner == runner)
                      .values(runner=None, runner_until=None))


def take(bulk_id: str, runner: str) -> None:
    """Become (or stay) the one driver of the job, or raise ConflictError naming the one that is."""
    now = utcnow()
    until = now + timedelta(seconds=LEASE_SECONDS)
    with session_scope() as s:
        left = get(s, bulk_id)
        crashed = left.runner if left.runner and left.runner != runner and (
            left.runner_until is None or left.runner_until < now or _dead_here(left.runner)) else None
    if crashed and stops.crashed_run(bulk_id, crashed, get_settings()):  # its last run died, as it keeps doing
        raise BulkFailedError(f"bulk job {bulk_id} has FAILED: its driver's runs keep dying")
    with session_scope() as s:
        taken = s.execute(
            update(BulkJob)
            .where(BulkJob.id == bulk_id,
                   or_(BulkJob.runner.is_(None), BulkJob.runner_until < now, BulkJob.runner == runner))
            .values(runner=runner, runner_until=until)
        ).rowcount  # type: ignore[attr-defined]
        if not taken:
            job = get(s, bulk_id)
            if job.runner and _dead_here(job.runner):  # its driver died on this host: take over now
                s.execute(update(BulkJob).where(BulkJob.id == bulk_id, BulkJob.runner == job.runner)
                          .values(runner=runner, runner_until=until))
                log.warning("bulk %s: its driver %s is gone; taking over", bulk_id, job.runner)
                return
            raise ConflictError(f"bulk job {bulk_id} is being driven by {job.runner} (lease until "
                                f"{job.runner_until:%H:%M:%S} UTC); pause it, or wait for that driver to stop")


def _dead_here(runner: str) -> bool:
    """Whether ``runner`` (``host:pid:token``) ran on this host in a process that no longer exists."""
    host, _, rest = runner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
