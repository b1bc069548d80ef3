"""The bulk driver: manifest → ledger rows → farm jobs in the bulk lane → shards at the destination.

One loop, resumable at any point because every step is recorded in the ledger first:

1. **Ingest**: the manifest is read as a stream (``farm.bulk.manifest``) and recorded in
   ``bulk_samples`` in chunks of ``INGEST_CHUNK`` rows per transaction, at most ``window``
   samples ahead of what is finished, so a 1,000,000-line manifest never sits whole in memory
   or in one transaction (one multi-row insert per chunk). A resumed run skips the samples
   already recorded.
2. **Submit**: each pending sample becomes a one-image farm job in the ``bulk`` lane with
   request id ``<bulk id>-<idx>-<try>`` (idempotent: a run killed between the two steps
   finds the same job again), at most ``max_in_flight`` at a time, in chunks: one
   ``submit_many`` (a multi-row insert of jobs, one of batches, one message per GPU batch)
   and one update of the samples per chunk. The pool renders them like any other job:
   leases, retries, cross-request batching (compatible samples share a GPU batch) and lanes
   (interactive requests overtake bulk work between batches).
3. **Collect**: finished farm jobs mark their samples done or failed, in one statement per
   round (``UPDATE bulk_samples … FROM jobs``), with the round's counts in the same
   transaction. Rounds come closer together while they find many samples finished and further
   apart while they find none (between ``POLL_MIN_SECONDS`` and ``poll_seconds``), so that each
   collects a handful at any pool speed.
4. **Shards**: a shard whose samples are all done or failed is written to the destination
   once, atomically (``farm.bulk.writers``), and recorded in ``bulk_shards``.

Pause, budget, the owner's daily GPU-second quota spent or a storage quota too full for the source images
stop submitting, let what is in flight finish, write the complete shards and stop (``farm.bulk.stops``);
cancel also cancels the farm jobs in flight. A run that ends in an error, or dies soon after its start, is
counted: the job is FAILED when that repeats. ``retry_failed`` puts failed samples back to pending."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import String, case, cast, func, insert, literal, null, select, update
from sqlalchemy.orm import Session

from db.models import BulkJob, BulkSample, BulkShard, Job
from db.session import session_scope
from farm.bulk import control, image_column, runners, stops
from farm.bulk.control import BulkSpec, Progress, create, get, gpu_seconds, progress, retry_failed, set_status
from farm.bulk.manifest import RowError, Sample, read_manifest
from farm.bulk.shards import ReadAhead, ShardWriter, sample_fields, write_ready_shards
from farm.bulk.writers import open_destination, sample_key
from farm.config import Settings, get_settings
from farm.errors import ConflictError, InvalidInputError, JobNotFoundError
from farm.image_schemas import admitted_input
from farm.inputs.quota import UploadQuotaError
from farm.lifecycle import submit as submission
from farm.schemas import GenerateInput
from farm.status import BulkStatus, JobStatus, Lane, SampleStatus
from farm.storage import get_storage

log = logging.getLogger(__name__)

__all__ = ["BulkSpec", "BulkStatus", "Progress", "create", "get", "progress", "retry_failed", "run", "set_status"]

INGEST_CHUNK = 1000
SUBMIT_CHUNK = 64  # samples per submit at least (when the window has room for that many)
POLL_MIN_SECONDS = 0.02  # rounds are at least this far apart, at most poll_seconds (see BulkRun)
TAIL_POLL_SECONDS = 0.05  # … and at most this far while few samples are left in flight
LOST_CHECK_SECONDS = 5.0  # how often an idle round looks for submitted samples without a farm job


def run(
    bulk_id: str,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    on_row_error: Callable[[RowError], None] | None = None,
    max_in_flight: int = 256,
    poll_seconds: float = 0.5,
    settings: Settings | None = None,
    resume: bool = True,
) -> Progress:
    """Drive a bulk job until it completes, is paused or cancelled, reaches its budget, or fails. ``resume``:
    a job not RUNNING runs again; without it (a ``farm.bulk`` message, maybe stale) it is left as it is."""
    settings = settings or get_settings()
    try:
        with runners.driving(bulk_id) as runner:
            try:
                return _run(bulk_id, runner, on_progress, on_row_error, max_in_flight, poll_seconds, settings, resume)
            except (ConflictError, JobNotFoundError):  # another driver has it, or it is gone: not its failure
                raise
            except Exception as exc:
                stops.failed_run(bulk_id, exc, settings)  # counted; FAILED when it repeats
                raise
    except runners.BulkFailedError:  # its earlier runs kept dying: FAILED now, logged where counted
        return control.progress_of(bulk_id)


def _run(bulk_id: str, runner: str, on_progress: Callable[[Progress], None] | None,
         on_row_error: Callable[[RowError], None] | None, max_in_flight: int, poll_seconds: float,
         settings: Settings, resume: bool) -> Progress:
    with session_scope() as s:
        job = get(s, bulk_id)
        if job.status != BulkStatus.RUNNING and not resume:
            return progress(s, bulk_id)
        if job.status in (BulkStatus.PAUSED, BulkStatus.BUDGET_REACHED, BulkStatus.FAILED):
            job.status, job.error = BulkStatus.RUNNING, None  # running it again resumes it
        spec = BulkSpec(**job.spec)
        manifest, dest_url, fmt, shard_size = Path(job.manifest), job.dest, job.format, job.shard_size
        skip, owner = job.ingested, job.owner
        manifest_done = job.manifest_done
    if spec.max_in_flight is not None:  # the key's limit of the owner who started it over HTTP
        max_in_flight = max(1, min(max_in_flight, spec.max_in_flight))
    dest = open_destination(dest_url, settings)
    storage = get_storage(settings)
    window = max(2 * max_in_flight, 2 * shard_size)
    samples: Iterator[Sample] = iter(())
    rejected: list[RowError] = []  # filled while the manifest is read, applied by _ingest
    if not manifest_done:
        if not manifest.is_file():
            raise InvalidInputError("manifest", f"no such file: {manifest.name} (a resumed job reads it again)")
        samples = itertools.islice(
            read_manifest(manifest, defaults={**spec.defaults, "model_name": spec.model_name},
                          images_per_prompt=spec.images_per_prompt, base_seed=spec.base_seed,
                          expand=spec.expand,  # type: ignore[arg-type]
                          variants=spec.variants, wildcards=Path(spec.wildcards) if spec.wildcards else None,
                          strict=spec.strict, on_error=rejected.append, owner=owner,
                          image_root=image_column.root(spec.image_root, settings)),
            skip, None)
    # shards are fetched and written by a thread of their own, so that the rounds go on meanwhile
    # (collecting, submitting: the pool is kept fed while thousands of images are read back)
    ahead = ReadAhead(bulk_id, owner, storage)

    def write() -> int:
        return write_ready_shards(bulk_id, dest, fmt, shard_size, owner, storage, spec, ahead)

    def write_and_read_ahead() -> int:
        written = write()
        ahead.read()  # the images of the next shard done so far
        return written

    run = BulkRun(bulk_id=bulk_id, runner=runner, owner=owner, spec=spec, settings=settings, dest=dest,
                  shard_size=shard_size, max_in_flight=max_in_flight, poll_seconds=poll_seconds, window=window,
                  manifest_done=manifest_done, samples=samples, rejected=rejected, on_progress=on_progress,
                  on_row_error=on_row_error)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-shards") as writer:
        run.rounds(ShardWriter(writer, write_and_read_ahead, write))
    return control.progress_of(bulk_id)


@dataclass
class BulkRun:
    """One driver's run of a bulk job: the job's options, where it writes, the manifest's samples still to
    record, and the run's limits and callbacks. :meth:`rounds` drives it."""

    bulk_id: str
    runner: str  # the driver holding the job's lease
    owner: str
    spec: BulkSpec
    settings: Settings
    dest: Any  # a farm.bulk.writers destination
    shard_size: int
    max_in_flight: int
    poll_seconds: float
    window: int  # at most this many samples recorded ahead of what is finished
    manifest_done: bool  # every sample of the manifest recorded
    samples: Iterator[Sample]  # the manifest's samples not recorded yet
    rejected: list[RowError]  # filled while the manifest is read, applied by _ingest
    on_progress: Callable[[Progress], None] | None = None
    on_row_error: Callable[[RowError], None] | None = None

    def rounds(self, shards: ShardWriter) -> None:
        """The driver's rounds, until the job completes, stops (pause, budget) or is cancelled."""
        chunk = max(1, min(self.max_in_flight // 4, SUBMIT_CHUNK))  # fewer, larger submits (see below)
        budgeted = self.spec.budget_images is not None or self.spec.budget_gpu_seconds is not None
        renew_at = time.monotonic() + runners.RENEW_SECONDS  # run() has just taken the lease
        lost_check_at = time.monotonic() + LOST_CHECK_SECONDS
        quota_at = 0.0  # the owner's daily quota is looked at now, then while the run goes on
        wait = POLL_MIN_SECONDS
        while True:
            if runners.leaving():
                log.info("bulk job %s: this worker is stopping; the job stays RUNNING for the next driver",
                         self.bulk_id)
                return
            if time.monotonic() >= renew_at:
                runners.take(self.bulk_id, self.runner)  # renews the lease; lost to another driver: ConflictError
                renew_at = time.monotonic() + runners.RENEW_SECONDS
            # one transaction per round: the job's status, the finished farm jobs collected, the counts
            with session_scope() as s:
                if _status(s, self.bulk_id) == BulkStatus.CANCELLED:
                    return
                collected = _collect(s, self.bulk_id)
                snap = _snapshot(s, self.bulk_id, gpu_seconds(s, self.bulk_id) if budgeted else 0.0)
            pending = snap.ingested - snap.done - snap.failed - snap.in_flight
            if snap.status == BulkStatus.RUNNING and time.monotonic() >= quota_at:
                quota_at = time.monotonic() + stops.QUOTA_CHECK_SECONDS
                if (spent := stops.quota_spent(self.owner, self.settings)) is not None:
                    stops.pause_for(self.bulk_id, spent)  # what is in flight finishes, then it stops
                    snap.status = BulkStatus.PAUSED
            stopping = snap.status == BulkStatus.PAUSED or (budgeted and _over_budget(snap, self.spec))
            busy = False  # driver-side work that may go on at once: more rows to ingest or to submit
            if not stopping and not self.manifest_done:
                ingested, self.manifest_done = _ingest(self.bulk_id, self.samples, self.window, self.shard_size,
                                                       self.rejected, self.on_row_error,
                                                       unfinished=pending + snap.in_flight)
                snap.ingested += ingested
                pending += ingested
                if snap.total is None and self.manifest_done:
                    snap.total = snap.ingested
                shards.due |= self.manifest_done  # the last shard may be complete now
                busy |= ingested > 0
            room = self.max_in_flight - snap.in_flight
            # a submit waits until there is room for a chunk (or nothing is in flight): the pool still
            # has at least max_in_flight - chunk jobs to render meanwhile
            if not stopping and pending and room > 0 and (room >= min(chunk, pending) or snap.in_flight == 0):
                submitted = _submit(self.bulk_id, self.owner, self.spec, room, snap, self.settings)
                snap.in_flight += submitted
                busy |= submitted > 0
            finishing = snap.in_flight == 0 and (
                stopping or (self.manifest_done and snap.done + snap.failed == snap.ingested))
            if finishing:
                shards.flush()
            elif collected or shards.due:
                shards.poke()
            if self.on_progress is not None:
                self.on_progress(snap)
            if finishing:
                paused = BulkStatus.PAUSED if snap.status == BulkStatus.PAUSED else BulkStatus.BUDGET_REACHED
                stops.finish(self.bulk_id, paused if stopping else BulkStatus.COMPLETED, self.dest)
                return
            if busy:
                continue
            if not collected and snap.in_flight and time.monotonic() >= lost_check_at:
                lost_check_at = time.monotonic() + LOST_CHECK_SECONDS
                if _requeue_lost(self.bulk_id):
                    continue
            # how often to look: twice as often when a round collects a whole chunk, half as often when it
            # collects nothing, so that a round has some finished samples to collect at any pool speed;
            # often near the end (the job completes soon after its last image)
            if collected >= chunk:
                wait = max(POLL_MIN_SECONDS, wait / 2)
            elif not collected:
                wait = min(max(self.poll_seconds, POLL_MIN_SECONDS), wait * 2)
            time.sleep(min(wait, TAIL_POLL_SECONDS) if snap.in_flight <= chunk else wait)


def _status(s: Session, bulk_id: str) -> BulkStatus:
    status = s.scalar(select(BulkJob.status).where(BulkJob.id == bulk_id))
    if status is None:
        raise JobNotFoundError(f"no bulk job {bulk_id!r}")
    return BulkStatus(status)


def _snapshot(s: Session, bulk_id: str, gpu: float) -> Progress:
    """The job's progress in two small queries: its row (with its shard count), and one grouped count of
    its unfinished and failed samples (the done ones are the rest of those ingested, so a round costs the
    same at the first sample and at the millionth)."""
    shards = select(func.count()).select_from(BulkShard).where(BulkShard.bulk_id == bulk_id).scalar_subquery()
    row = s.execute(select(BulkJob.status, BulkJob.ingested, BulkJob.manifest_done, BulkJob.rows_rejected, shards)
                    .where(BulkJob.id == bulk_id)).one_or_none()
    if row is None:
        raise JobNotFoundError(f"no bulk job {bulk_id!r}")
    status, ingested, manifest_done, rows_rejected, written = row
    counts = {str(state): int(n) for state, n in s.execute(
        select(BulkSample.status, func.count()).where(
            BulkSample.bulk_id == bulk_id,
            BulkSample.status.in_((SampleStatus.PENDING, SampleStatus.SUBMITTED, SampleStatus.FAILED)))
        .group_by(BulkSample.status))}
    unfinished = counts.get(SampleStatus.PENDING, 0) + counts.get(SampleStatus.SUBMITTED, 0)
    failed = counts.get(SampleStatus.FAILED, 0)
    return Progress(bulk_id=bulk_id, status=BulkStatus(status), total=ingested if manifest_done else None,
                    ingested=ingested, done=ingested - unfinished - failed, failed=failed,
                    in_flight=counts.get(SampleStatus.SUBMITTED, 0), shards_written=int(written or 0),
                    rows_rejected=rows_rejected, gpu_seconds=gpu)


def _ingest(bulk_id: str, samples: Iterator[Sample], window: int, shard_size: int, rejected: list[RowError],
            on_row_error: Callable[[RowError], None] | None, unfinished: int) -> tuple[int, bool]:
    """Record up to a chunk of samples, keeping at most ``window`` unfinished (``unfinished`` now, as
    counted by the caller); ``(how many, whether the manifest is read to its end)``.

    One multi-row insert per chunk. Rows rejected while reading are counted once: a resumed run
    reads the manifest from the start again, and rows up to the last one recorded were counted by
    the run before.
    """
    room = min(INGEST_CHUNK, window - unfinished)
    if room <= 0:
        return 0, False
    chunk = list(itertools.islice(samples, room))
    with session_scope() as s:
        job = get(s, bulk_id)
        rows: list[dict[str, Any]] = []
        for sample in chunk:
            idx = job.ingested + len(rows)
            shard, within = divmod(idx, shard_size)
            rows.append({"bulk_id": bulk_id, "idx": idx, "shard": shard, "key": sample_key(shard, within),
                         "row": sample.row, "prompt": sample.prompt, "negative_prompt": sample.negative_prompt,
                         "seed": sample.seed, "params": {**sample.params, "template": sample.template},
                         "extra": sample.extra, "status": SampleStatus.PENDING, "tries": 0})
        if rows:
            s.execute(insert(BulkSample), rows)
            job.ingested += len(rows)
        for error in rejected:
            if error.row > job.last_row:
                stops.rejected(job, error.message)
                log.warning("bulk %s: %s", bulk_id, error.message)
                if on_row_error is not None:
                    on_row_error(error)
        rejected.clear()
        if chunk:
            job.last_row = max(job.last_row, chunk[-1].row)
        if len(chunk) < room:
            job.manifest_done = True
        return len(rows), job.manifest_done


def _submit(bulk_id: str, owner: str, spec: BulkSpec, room: int, snap: Progress, settings: Settings) -> int:
    """Submit up to ``room`` pending samples as farm jobs (one ``submit_many``); how many."""
    if spec.budget_images is not None:  # never submit past the image budget
        room = min(room, spec.budget_images - snap.done - snap.in_flight)
    if room <= 0:
        return 0
    with session_scope() as s:
        rows = s.execute(select(BulkSample.idx, BulkSample.tries, BulkSample.params, BulkSample.prompt,
                                BulkSample.negative_prompt, BulkSample.seed)
                         .where(BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.PENDING)
                         .order_by(BulkSample.idx).limit(room)).all()
    batch: list[tuple[GenerateInput, str]] = []
    invalid: dict[int, str] = {}
    inline, root = 0, image_column.root(spec.image_root, settings)  # bytes of source files read for this submit
    for idx, tries, params, prompt, negative_prompt, seed in rows:
        if inline > image_column.SUBMIT_BYTES:  # the rest wait for the next round
            break
        try:  # a file under the bulk root goes inline, or fails if gone or changed since the manifest was read
            fields = sample_fields(params, prompt, negative_prompt, seed)
            fields, read = image_column.submitted(fields, params, root, settings)
            inline += read
            batch.append((admitted_input(fields), f"{bulk_id}-{idx}-{tries}"))
        except (ValueError, InvalidInputError) as exc:  # else admitted when the manifest was read: a malformed row
            invalid[idx] = str(exc).splitlines()[0]
    # never fails on the broker: the jobs wait in the ledger and the sweeper announces them
    try:
        rids = submission.submit_many(batch, owner=owner, lane=Lane.BULK, source="bulk", settings=settings)
    except UploadQuotaError as exc:  # source images past the owner's storage quota: paused until room is made
        stops.pause_for(bulk_id, f"source images: {exc}")
        return 0
    idxs = [int(rid.rsplit("-", 2)[1]) for rid in rids]
    with session_scope() as s:
        if idxs:  # the job id is the deterministic <bulk id>-<idx>-<tries>, as submitted
            s.execute(update(BulkSample)
                      .where(BulkSample.bulk_id == bulk_id, BulkSample.idx.in_(idxs),
                             BulkSample.status == SampleStatus.PENDING)
                      .values(status=SampleStatus.SUBMITTED,
                              job_id=BulkSample.bulk_id + "-" + cast(BulkSample.idx, String) + "-"
                              + cast(BulkSample.tries, String))
                      .execution_options(synchronize_session=False))
        for idx, error in invalid.items():
            s.execute(update(BulkSample).where(BulkSample.bulk_id == bulk_id, BulkSample.idx == idx)
                      .values(status=SampleStatus.FAILED, error=error))
    snap.failed += len(invalid)
    return len(idxs)


_FINISHED_JOB = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


def _collect(s: Session, bulk_id: str) -> int:
    """Samples whose farm job finished: done, or failed with the job's error; how many.

    One statement (``UPDATE bulk_samples … FROM jobs``): the submitted samples joined to their
    finished farm jobs.
    """
    completed = Job.status == JobStatus.COMPLETED
    result = s.execute(
        update(BulkSample)
        .where(BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.SUBMITTED,
               BulkSample.job_id == Job.id, Job.status.in_(_FINISHED_JOB))
        .values(status=case((completed, literal(SampleStatus.DONE.value)), else_=literal(SampleStatus.FAILED.value)),
                error=case((completed, null()), else_=Job.error))
        .execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]


def _requeue_lost(bulk_id: str) -> int:
    """Submitted samples whose farm job does not exist (any more): pending again, submitted anew."""
    with session_scope() as s:
        lost = s.execute(update(BulkSample).where(
            BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.SUBMITTED,
            ~select(Job.id).where(Job.id == BulkSample.job_id).exists())
            .values(status=SampleStatus.PENDING, job_id=None)
            .execution_options(synchronize_session=False))
        n = int(lost.rowcount)  # type: ignore[attr-defined]
    if n:
        log.warning("bulk %s: %d submitted sample(s) had no farm job: pending again", bulk_id, n)
    return n


def _over_budget(snap: Progress, spec: BulkSpec) -> bool:
    rendered = snap.done + snap.in_flight  # what is in flight will be rendered too
    if spec.budget_images is not None and rendered >= spec.budget_images:
        return True
    return spec.budget_gpu_seconds is not None and snap.gpu_seconds >= spec.budget_gpu_seconds
