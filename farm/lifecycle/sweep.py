"""Sweep: what must run is in the ledger; the sweeper makes sure a message says so.

Every worker (its lease keeper thread) and every API process runs :func:`sweep` every
``FARM_SWEEP_SECONDS``; any number may run at once, because each step locks the rows it takes
with ``SKIP LOCKED`` and a duplicate message is harmless (the claim decides). One sweep:

1. **Reap**: claimed batches whose lease ran out (the holder died, hung, froze or was cut off,
   or gave a failed attempt back) go back to queued with no known message. The old holder's
   fenced writes are refused from then on. A batch out of retries (farm.lifecycle.retry: tried
   ``batch_retries + 1`` times) fails its job instead, naming its indices.
2. **Fetches**: jobs whose file inputs are still to be fetched and that no process holds
   (farm.lifecycle.fetch) are fetched in this process's fetch pool.
3. **Unserved models** (not embedded): a queued or in-progress job whose model has lost its last live
   worker since the job was submitted (or, in progress, since it started) gets the WARNING line "no
   live worker serves M (none since T) …" once (``farm.lifecycle.pool.log_unserved``), as a submit
   for an unserved model gets it at once.

   The steps below publish; while the broker is known to be down they wait for the next sweep.
4. **Broker epoch**: if the broker lost its data (restarted without AOF, flushed), its epoch key
   is gone with the messages; the first sweeper to see that sets it again and every queued batch
   published before the broker (re)started is published again (on a new broker: none).
5. **Publish what may be gone**: queued batches never published (a crash or a broker outage
   between commit and publish, or just reaped), and batches not claimed within
   ``FARM_DISPATCH_TIMEOUT`` of their last message while their queue is empty (the message was
   taken by a worker that died before claiming, or lost some other way).
6. **Bulk jobs** (not embedded): a RUNNING bulk job with no live driver (its ``farm.bulk`` message
   was never sent because the broker was down, or its bulk worker died) gets a new message once the
   dispatch timeout has passed and the bulk queue is empty; the driver's runner lease keeps it
   to one driver at a time.

So no job stays non-terminal without either a live lease or a recent message.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update

from db import batch_sweep, ledger
from db.models import BulkJob, utcnow
from db.session import session_scope
from farm import dispatch
from farm.config import Settings
from farm.lifecycle.announce import announce, messages
from farm.lifecycle.finish import finish
from farm.lifecycle.pool import log_unserved
from farm.lifecycle.retry import out_of_retries
from farm.metrics import count
from farm.queues import render_queue
from farm.status import JobStatus

log = logging.getLogger(__name__)


@dataclass
class Swept:
    reaped: int = 0
    failed: int = 0
    published: int = 0
    broker_reset: datetime | None = None
    bulk: int = 0
    fetches: int = 0
    unserved: int = 0  # jobs told that no live worker serves their model


def reap(settings: Settings) -> tuple[int, int]:
    """Step 1: expired leases back to queued, or their jobs failed when out of retries."""
    reaped = failed = 0
    taken: list[str] = []
    with session_scope() as s:
        for row in batch_sweep.reap(s):
            taken.append(row.model_key)
            what = f"images {row.indices[0]}..{row.indices[-1]}"
            if out_of_retries(row.attempts, settings):
                reason = f"images {list(row.indices)} failed: {row.error or 'worker lost'} (tried {row.attempts} times)"
                failed += finish(s, row.job_id, JobStatus.FAILED, message=reason, error=reason,
                                 error_type="render_error", source="sweeper", settings=settings)
                continue
            reaped += 1
            ledger.add_log(s, row.job_id, f"batch {row.k} ({what}): {row.error}; back to the pool",
                           level="WARNING", source="sweeper")
    if taken:
        count.lease_takeovers(taken)
    return reaped, failed


def sweep(settings: Settings) -> Swept:
    """One sweep (see the module docstring); raises only if the ledger is unreachable."""
    out = Swept()
    out.reaped, out.failed = reap(settings)
    from farm.lifecycle import fetch

    out.fetches = fetch.sweep(settings)
    if not settings.embedded:  # embedded: the in-process worker serves the one model it was started for
        out.unserved = log_unserved(settings)
    if dispatch.broker_down():
        return out  # publishing now would only wait on timeouts; the next sweep tries again
    now = utcnow()
    older = now - timedelta(seconds=settings.dispatch_timeout)
    try:
        out.broker_reset = None if settings.embedded else dispatch.broker_epoch_reset(settings)
        with session_scope() as s:
            stale = batch_sweep.stale_queues(s, older)
        depths = dispatch.queue_depths([render_queue(m, lane) for m, lane in stale], settings)
    except Exception as exc:  # the broker is unreachable: nothing can be published now
        log.debug("sweep: broker unreachable (%s)", exc)
        return out
    empty = [(m, lane) for m, lane in stale if depths.get(render_queue(m, lane), 0) == 0]
    with session_scope() as s:
        rows = batch_sweep.due(s, older_than=older, empty_queues=empty,
                                  published_before=out.broker_reset)
    failed = announce(messages(rows), settings)
    out.published = len(rows) - len(failed)
    if not settings.embedded:
        out.bulk = bulk_dispatch(settings, older)
    if out.broker_reset is not None and out.published:
        log.warning("sweeper: the broker had no epoch key (restarted without its data, flushed, or new); %d queued "
                    "batch(es) published before it started published again", out.published)
    elif out.published:
        log.info("sweeper: %d queued batch(es) published again", out.published)
    return out


def bulk_dispatch(settings: Settings, older: datetime) -> int:
    """Step 6: a ``farm.bulk`` message for each RUNNING bulk job without a live driver (see above)."""
    from farm.status import BulkStatus

    now = utcnow()
    with session_scope() as s:
        ids = list(s.scalars(select(BulkJob.id).where(
            BulkJob.status == BulkStatus.RUNNING, BulkJob.updated_at < older,
            or_(BulkJob.runner.is_(None), BulkJob.runner_until < now)).order_by(BulkJob.id).limit(20)))
    if not ids or dispatch.queue_depths([settings.bulk_queue], settings).get(settings.bulk_queue, 0):
        return 0
    sent = 0
    for bulk_id in ids:
        try:
            dispatch.send_task(dispatch.BULK_TASK, {"bulk_id": bulk_id}, settings.bulk_queue, settings)
        except Exception as exc:  # the broker went away: the next sweep tries again
            log.debug("sweep: could not send farm.bulk for %s: %s", bulk_id, exc)
            break
        with session_scope() as s:  # the dispatch timeout starts again
            s.execute(update(BulkJob).where(BulkJob.id == bulk_id).values(updated_at=now))
        sent += 1
    if sent:
        log.warning("sweeper: %d running bulk job(s) had no driver; farm.bulk sent again", sent)
    return sent


class Sweeper:
    """A daemon thread that sweeps every ``sweep_seconds`` (the API's; workers sweep from their keeper)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        failing = False
        first = True  # at once on start: the broker's epoch key is set before this farm's first submits
        while first or not self._stop.wait(self.settings.sweep_seconds):
            first = False
            try:
                sweep(self.settings)
                failing = False
            except Exception as exc:  # the ledger is down: logged once per outage, tried again next period
                if not failing:
                    log.warning("sweeper: %s", exc)
                failing = True
