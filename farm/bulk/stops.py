"""How a bulk job's run stops: it ends (completed, paused, budget reached: :func:`finish`), the owner's
daily GPU-seconds are spent while it runs (it pauses itself and says why: :func:`quota_spent`,
:func:`pause_for`), or the run ends in an error (:func:`failed_run`).

Every job ends (issue 20). An error that repeats used to end the task but not the job: the sweeper sent it
again every 30 s, forever, while it held one of the owner's running slots. Now each such run is counted in
the ledger (``bulk_jobs.attempts``); at ``FARM_BULK_MAX_ATTEMPTS`` the job is FAILED, and at once for bad
input (a strict manifest's bad row, a Parquet file unreadable midway), which no retry mends. A run whose
process was killed (out of memory, a native crash on a hostile file) raises nothing: the next driver finds its
lease left behind and counts it (:func:`crashed_run`) if it died within ten minutes of its start. A FAILED job
frees its running slot (only RUNNING jobs count), cancels its farm jobs in flight, and its ``error`` says
why, in words that name no path, bucket or key (an unexpected error by its type only; the log has the rest).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from db.models import BulkJob, BulkSample, BulkShard, utcnow
from db.session import session_scope
from farm.accounting import quota_for, used_today
from farm.bulk.control import get, progress
from farm.bulk.writers import write_stats
from farm.config import Settings
from farm.errors import InvalidInputError
from farm.lifecycle import submit as submission
from farm.status import BulkStatus, SampleStatus

log = logging.getLogger(__name__)

QUOTA_CHECK_SECONDS = 1.0  # a running job looks at its owner's usage at most this often (and at its start)
CRASH_WINDOW_SECONDS = 600  # a run killed sooner than this after its start counts as a failed run
REJECTIONS_KEPT = 100  # rejected rows whose reason the job keeps for its report (all are counted)


def quota_spent(owner: str, settings: Settings) -> str | None:
    """Why the owner's bulk jobs must pause now (its daily GPU-second quota is spent), or None."""
    limit = quota_for(owner, settings)
    if limit is None:
        return None
    with session_scope() as s:
        used = used_today(s, owner)
    if used < limit:
        return None
    return (f"daily GPU-second quota spent ({used:.1f} of {limit:g} GPU-seconds today, UTC): paused; "
            "resume it after 00:00 UTC")


def pause_for(bulk_id: str, reason: str) -> None:
    """Pause a running job with the reason in its ``error`` (a resume clears it)."""
    with session_scope() as s:
        s.execute(update(BulkJob).where(BulkJob.id == bulk_id, BulkJob.status == BulkStatus.RUNNING)
                  .values(status=BulkStatus.PAUSED, error=reason))
    log.warning("bulk %s: %s", bulk_id, reason)


def failed_run(bulk_id: str, exc: Exception, settings: Settings) -> bool:
    """Count a run of the job that ended in ``exc``; whether the job is FAILED now (see the module doc)."""
    bad_input = isinstance(exc, InvalidInputError)
    return _count(bulk_id, repr(exc), settings, at_once=bad_input,
                  error=str(exc) if bad_input else f"the bulk driver failed {{n}} times ({type(exc).__name__}; "
                  f"FARM_BULK_MAX_ATTEMPTS is {settings.bulk_max_attempts})")


def crashed_run(bulk_id: str, runner: str, settings: Settings) -> bool:
    """Count a run that never ended (its process was killed, or crashed in native code: no exception to
    catch) if it died within ``CRASH_WINDOW_SECONDS`` of its start, as a crash loop would; whether the job
    is FAILED now. A run that lasted longer (a worker restarted by a deploy after hours) is not a failure,
    as Kubernetes resets a container's crash back-off after ten minutes of running."""
    started = runner.rsplit(":", 1)[-1]
    if not started.isdigit() or time.time() - int(started) > CRASH_WINDOW_SECONDS:
        return False
    return _count(bulk_id, f"its driver {runner} died", settings, at_once=False,
                  error="the bulk driver's run ended {n} times without finishing (killed or crashed within "
                  f"{CRASH_WINDOW_SECONDS // 60} minutes of its start; FARM_BULK_MAX_ATTEMPTS is "
                  f"{settings.bulk_max_attempts})")


def _count(bulk_id: str, what: str, settings: Settings, *, at_once: bool, error: str) -> bool:
    """One more failed run of a RUNNING job; FAILED (``error``, ``{n}``: the runs) at the limit or ``at_once``."""
    with session_scope() as s:
        job = get(s, bulk_id)
        if job.status != BulkStatus.RUNNING:  # paused or cancelled meanwhile: nothing to fail
            return False
        job.attempts += 1
        if not at_once and job.attempts < settings.bulk_max_attempts:
            log.warning("bulk %s: run %d of at most %d ended (%s); it runs again", bulk_id, job.attempts,
                        settings.bulk_max_attempts, what)
            return False
        job.status, job.finished_at = BulkStatus.FAILED, utcnow()
        job.error = error.replace("{n}", str(job.attempts))
        in_flight = [j for j in s.scalars(select(BulkSample.job_id).where(
            BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.SUBMITTED)) if j]
    for job_id in in_flight:
        submission.cancel(job_id)
    log.error("bulk %s FAILED: %s", bulk_id, what)
    return True


def rejected(job: BulkJob, message: str) -> None:
    """Count a rejected row on the job, keeping the first ones' reasons for the report."""
    job.rows_rejected += 1
    kept = list(job.rejections or [])
    if len(kept) < REJECTIONS_KEPT:
        job.rejections = [*kept, message]


def finish(bulk_id: str, status: BulkStatus, dest: Any) -> None:
    """The run stops cleanly with ``status`` (unless cancelled meanwhile): the job's report is written."""
    with session_scope() as s:
        job = get(s, bulk_id)
        job.attempts = 0  # a clean stop: errors before it do not count against the next run
        if job.status != BulkStatus.CANCELLED:
            job.status = status
            job.finished_at = utcnow()
        snap = progress(s, bulk_id)
        shards = [sh.stats for sh in s.scalars(select(BulkShard).where(BulkShard.bulk_id == bulk_id)
                                               .order_by(BulkShard.shard))]
        stats = {"bulk_id": bulk_id, "status": job.status, "manifest": Path(job.manifest).name, "format": job.format,
                 "shard_size": job.shard_size, "total": snap.ingested, "done": snap.done, "failed": snap.failed,
                 "rows_rejected": snap.rows_rejected, "rejections": job.rejections or [], "error": job.error,
                 "shards": len(shards), "gpu_seconds": round(snap.gpu_seconds, 3), "spec": job.spec,
                 "created_at": job.created_at.isoformat(), "finished_at": (job.finished_at or utcnow()).isoformat()}
    write_stats(dest, stats)  # rewritten (atomically) at every stop; final when COMPLETED
    log.info("bulk job %s %s: %d done, %d failed of %d", bulk_id, status.lower(), snap.done, snap.failed,
             snap.ingested)
