"""The bulk driver: manifest → ledger rows → farm jobs in the bulk lane → shards at the destination.

One loop, resumable at any point because every step is recorded in the ledger first:

1. **Ingest**: the manifest is read as a stream (``farm.bulk.manifest``) and recorded in
   ``bulk_samples`` in chunks of ``INGEST_CHUNK`` rows per transaction, at most ``window``
   samples ahead of what is finished, so a 1,000,000-line manifest never sits whole in memory
   or in one transaction. A resumed run skips the samples already recorded.
2. **Submit**: each pending sample becomes a one-image farm job in the ``bulk`` lane with
   request id ``<bulk id>-<idx>-<try>`` (idempotent: a run killed between the two steps
   finds the same job again), at most ``max_in_flight`` at a time. The pool renders them like
   any other job: leases, retries, cross-request batching (compatible samples share a GPU
   batch) and lanes (interactive requests overtake bulk work between batches).
3. **Collect**: finished farm jobs mark their samples done or failed.
4. **Shards**: a shard whose samples are all done or failed is written to the destination
   once, atomically (``farm.bulk.writers``), and recorded in ``bulk_shards``.

Pause and budget stop submitting, let what is in flight finish, write the complete shards
and stop; cancel also cancels the farm jobs in flight. ``retry_failed`` puts failed samples
back to pending (their shards are written again, whole, when they complete).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select, update

from db.models import BulkJob, BulkSample, BulkShard, Job, utcnow
from db.session import session_scope
from farm import lifecycle
from farm.bulk.control import (
    BUDGET,
    CANCELLED,
    COMPLETED,
    PAUSED,
    RUNNING,
    BulkSpec,
    Progress,
    create,
    get,
    progress,
    retry_failed,
    set_status,
)
from farm.bulk.manifest import RowError, Sample, read_manifest
from farm.bulk.shards import sample_input, write_ready_shards
from farm.bulk.writers import open_destination, sample_key, write_stats
from farm.config import Settings, get_settings
from farm.errors import ConflictError, InvalidInputError
from farm.schemas import GenerateInput, stored_input
from farm.status import JobStatus, Lane, SampleStatus
from farm.storage import get_storage

log = logging.getLogger(__name__)

__all__ = ["BUDGET", "CANCELLED", "COMPLETED", "PAUSED", "RUNNING", "BulkSpec", "Progress", "create", "get",
           "progress", "retry_failed", "run", "set_status"]

INGEST_CHUNK = 1000


def run(
    bulk_id: str,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_row_error: Callable[[RowError], None] | None = None,
    max_in_flight: int = 256,
    poll_seconds: float = 0.5,
    settings: Settings | None = None,
) -> Progress:
    """Drive a bulk job until it completes, is paused or cancelled, or reaches its budget."""
    settings = settings or get_settings()
    runner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _take_runner(bulk_id, runner)
    try:
        return _run(bulk_id, runner, on_progress, on_row_error, max_in_flight, poll_seconds, settings)
    finally:
        with session_scope() as s:
            s.execute(update(BulkJob).where(BulkJob.id == bulk_id, BulkJob.runner == runner)
                      .values(runner=None, runner_until=None))


RUNNER_LEASE_SECONDS = 60.0


def _take_runner(bulk_id: str, runner: str) -> None:
    """Become the one driver of the job, or raise ConflictError naming the one that is."""
    now = utcnow()
    with session_scope() as s:
        get(s, bulk_id)
        taken = s.execute(
            update(BulkJob)
            .where(BulkJob.id == bulk_id,
                   or_(BulkJob.runner.is_(None), BulkJob.runner_until < now, BulkJob.runner == runner))
            .values(runner=runner, runner_until=now + timedelta(seconds=RUNNER_LEASE_SECONDS))
        ).rowcount  # type: ignore[attr-defined]
        if not taken:
            job = get(s, bulk_id)
            if job.runner and _dead_here(job.runner):  # its driver died on this host: take over now
                s.execute(update(BulkJob).where(BulkJob.id == bulk_id, BulkJob.runner == job.runner)
                          .values(runner=runner, runner_until=now + timedelta(seconds=RUNNER_LEASE_SECONDS)))
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


def _run(bulk_id: str, runner: str, on_progress: Callable[[Progress], None] | None,
         on_row_error: Callable[[RowError], None] | None, max_in_flight: int, poll_seconds: float,
         settings: Settings) -> Progress:
    with session_scope() as s:
        job = get(s, bulk_id)
        if job.status in (PAUSED, BUDGET):
            job.status = RUNNING  # running it again resumes it
        spec = BulkSpec(**job.spec)
        manifest, dest_url, fmt, shard_size = Path(job.manifest), job.dest, job.format, job.shard_size
        skip, owner = job.ingested, job.owner
        manifest_done = job.manifest_done
    dest = open_destination(dest_url, settings)
    storage = get_storage(settings)
    window = max(2 * max_in_flight, 2 * shard_size)
    samples: Iterator[Sample] = iter(())
    rejected: list[RowError] = []  # filled while the manifest is read, applied by _ingest
    if not manifest_done:
        if not manifest.is_file():
            raise InvalidInputError("manifest", f"no such file: {manifest} (a resumed job reads it again)")
        samples = itertools.islice(
            read_manifest(manifest, defaults={**spec.defaults, "model_name": spec.model_name},
                          images_per_prompt=spec.images_per_prompt, base_seed=spec.base_seed,
                          expand=spec.expand,  # type: ignore[arg-type]
                          variants=spec.variants, wildcards=Path(spec.wildcards) if spec.wildcards else None,
                          strict=spec.strict, on_error=rejected.append),
            skip, None)
    while True:
        _take_runner(bulk_id, runner)  # renews the lease; lost to another driver: ConflictError
        with session_scope() as s:
            job = get(s, bulk_id)
            status = job.status
        if status == CANCELLED:
            break
        stopping = status == PAUSED or _over_budget(bulk_id, spec)
        moved = False
        if not stopping and not manifest_done:
            moved |= _ingest(bulk_id, samples, window, shard_size, rejected, on_row_error) > 0
            with session_scope() as s:
                manifest_done = get(s, bulk_id).manifest_done
        if not stopping:
            moved |= _submit(bulk_id, owner, spec, max_in_flight, settings) > 0
        moved |= _collect(bulk_id) > 0
        moved |= write_ready_shards(bulk_id, dest, fmt, shard_size, owner, storage, spec) > 0
        with session_scope() as s:
            snap = progress(s, bulk_id)
        if on_progress is not None:
            on_progress(snap)
        if snap.in_flight == 0 and stopping:
            final = PAUSED if status == PAUSED else BUDGET
            _finish(bulk_id, final, dest)
            break
        if manifest_done and snap.in_flight == 0 and snap.done + snap.failed == snap.ingested:
            with session_scope() as s:
                pending = s.scalar(select(func.count()).select_from(BulkSample).where(
                    BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.PENDING)) or 0
            if not pending:
                _finish(bulk_id, COMPLETED, dest)
                break
        if not moved:
            time.sleep(poll_seconds)
    with session_scope() as s:
        return progress(s, bulk_id)


def _ingest(bulk_id: str, samples: Iterator[Sample], window: int, shard_size: int, rejected: list[RowError],
            on_row_error: Callable[[RowError], None] | None) -> int:
    """Record up to a chunk of samples, keeping at most ``window`` unfinished; how many.

    Rows rejected while reading are counted once: a resumed run reads the manifest from the
    start again, and rows up to the last one recorded were counted by the run before.
    """
    with session_scope() as s:
        job = get(s, bulk_id)
        unfinished = s.scalar(select(func.count()).select_from(BulkSample).where(
            BulkSample.bulk_id == bulk_id, BulkSample.status.in_((SampleStatus.PENDING, SampleStatus.SUBMITTED)))) or 0
        room = min(INGEST_CHUNK, window - unfinished)
        if room <= 0:
            return 0
        chunk = list(itertools.islice(samples, room))
        for sample in chunk:
            idx = job.ingested
            shard, within = divmod(idx, shard_size)
            s.add(BulkSample(bulk_id=bulk_id, idx=idx, shard=shard, key=sample_key(shard, within), row=sample.row,
                             prompt=sample.prompt, negative_prompt=sample.negative_prompt, seed=sample.seed,
                             params={**sample.params, "template": sample.template}, extra=sample.extra,
                             status=SampleStatus.PENDING, tries=0))
            job.ingested += 1
        for error in rejected:
            if error.row > job.last_row:
                job.rows_rejected += 1
                log.warning("bulk %s: %s", bulk_id, error.message)
                if on_row_error is not None:
                    on_row_error(error)
        rejected.clear()
        if chunk:
            job.last_row = max(job.last_row, chunk[-1].row)
        if len(chunk) < room:
            job.manifest_done = True
        return len(chunk)


def _submit(bulk_id: str, owner: str, spec: BulkSpec, max_in_flight: int, settings: Settings) -> int:
    with session_scope() as s:
        in_flight = s.scalar(select(func.count()).select_from(BulkSample).where(
            BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.SUBMITTED)) or 0
        room = max_in_flight - in_flight
        if spec.budget_images is not None:  # never submit past the image budget
            done = s.scalar(select(func.count()).select_from(BulkSample).where(
                BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.DONE)) or 0
            room = min(room, spec.budget_images - done - in_flight)
        if room <= 0:
            return 0
        rows = list(s.scalars(select(BulkSample).where(BulkSample.bulk_id == bulk_id,
                                                       BulkSample.status == SampleStatus.PENDING)
                              .order_by(BulkSample.idx).limit(room)))
        todo = [(r.idx, r.tries, sample_input(r)) for r in rows]
    batch: list[tuple[GenerateInput, str]] = []
    invalid: dict[int, str] = {}
    for idx, tries, fields in todo:
        try:
            batch.append((stored_input(fields), f"{bulk_id}-{idx}-{tries}"))
        except ValueError as exc:  # admitted when the manifest was read; only a malformed row gets here
            invalid[idx] = str(exc).splitlines()[0]
    # never fails on the broker: the jobs wait in the ledger and the sweeper announces them
    rids = lifecycle.submit_many(batch, owner=owner, lane=Lane.BULK, source="bulk", settings=settings)
    by_idx = {int(rid.rsplit("-", 2)[1]): rid for rid in rids}
    with session_scope() as s:
        for idx, rid in by_idx.items():
            s.execute(update(BulkSample).where(BulkSample.bulk_id == bulk_id, BulkSample.idx == idx)
                      .values(status=SampleStatus.SUBMITTED, job_id=rid))
        for idx, error in invalid.items():
            s.execute(update(BulkSample).where(BulkSample.bulk_id == bulk_id, BulkSample.idx == idx)
                      .values(status=SampleStatus.FAILED, error=error))
    return len(by_idx)


def _collect(bulk_id: str) -> int:
    """Samples whose farm job finished: done, or failed with the job's error."""
    with session_scope() as s:
        stmt = (select(BulkSample.idx, Job.status, Job.error)
                .join(Job, Job.id == BulkSample.job_id)
                .where(BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.SUBMITTED,
                       Job.status.in_([JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])))
        rows = s.execute(stmt).all()
        lost = s.execute(update(BulkSample).where(  # submitted, but no farm job of that id: submit again
            BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.SUBMITTED,
            ~select(Job.id).where(Job.id == BulkSample.job_id).exists())
            .values(status=SampleStatus.PENDING, job_id=None))
        if lost.rowcount:  # type: ignore[attr-defined]
            log.warning("bulk %s: %d submitted sample(s) had no farm job: pending again", bulk_id,
                        lost.rowcount)  # type: ignore[attr-defined]
        for idx, status, error in rows:
            done = status == JobStatus.COMPLETED
            s.execute(update(BulkSample).where(BulkSample.bulk_id == bulk_id, BulkSample.idx == idx)
                      .values(status=SampleStatus.DONE if done else SampleStatus.FAILED, error=None if done else error))
    return len(rows)


def _over_budget(bulk_id: str, spec: BulkSpec) -> bool:
    if spec.budget_images is None and spec.budget_gpu_seconds is None:
        return False
    with session_scope() as s:
        snap = progress(s, bulk_id)
    rendered = snap.done + snap.in_flight  # what is in flight will be rendered too
    if spec.budget_images is not None and rendered >= spec.budget_images:
        return True
    return spec.budget_gpu_seconds is not None and snap.gpu_seconds >= spec.budget_gpu_seconds


def _finish(bulk_id: str, status: str, dest: Any) -> None:
    with session_scope() as s:
        job = get(s, bulk_id)
        if job.status not in (CANCELLED,):
            job.status = status
            job.finished_at = utcnow()
        snap = progress(s, bulk_id)
        shards = [sh.stats for sh in s.scalars(select(BulkShard).where(BulkShard.bulk_id == bulk_id)
                                               .order_by(BulkShard.shard))]
        stats = {"bulk_id": bulk_id, "status": job.status, "manifest": job.manifest, "format": job.format,
                 "shard_size": job.shard_size, "total": snap.ingested, "done": snap.done, "failed": snap.failed,
                 "rows_rejected": snap.rows_rejected, "shards": len(shards), "gpu_seconds": round(snap.gpu_seconds, 3),
                 "spec": job.spec, "created_at": job.created_at.isoformat(),
                 "finished_at": (job.finished_at or utcnow()).isoformat()}
    write_stats(dest, stats)  # rewritten (atomically) at every stop; final when COMPLETED
    log.info("bulk job %s %s: %d done, %d failed of %d", bulk_id, status.lower(), snap.done, snap.failed,
             snap.ingested)
