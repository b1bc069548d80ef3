"""Bulk jobs in the ledger: create one, read its progress, pause, resume, cancel, retry failures.

The options of a job (``BulkSpec``) are stored with it, so a resumed run renders exactly what
the first run would. ``farm.bulk.driver`` runs a job; this module only records and reads.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import BulkJob, BulkSample, BulkShard, Image, utcnow
from db.session import session_scope
from farm.bulk.manifest import read_manifest
from farm.bulk.writers import FORMATS, open_destination
from farm.config import Settings, get_settings
from farm.errors import ConflictError, InvalidInputError, JobNotFoundError, NoLiveWorkerError
from farm.lifecycle import submit as submission
from farm.status import BulkStatus, SampleStatus


@dataclass
class BulkSpec:
    """Every option of a bulk job; stored with it, so a resumed run renders the same samples."""

    model_name: str
    defaults: dict[str, Any] = field(default_factory=dict)
    images_per_prompt: int = 1
    base_seed: int = 0
    expand: str = "combinatorial"
    variants: int = 1
    wildcards: str | None = None
    strict: bool = False
    budget_images: int | None = None
    budget_gpu_seconds: float | None = None
    max_in_flight: int | None = None  # the owner's key's limit on jobs in flight (a job started over HTTP)
    image_root: str | None = None  # image-column paths resolve in this folder of the bulk root (over HTTP: the owner's)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Progress:
    bulk_id: str
    status: BulkStatus
    total: int | None  # None while the manifest is still being read
    ingested: int
    done: int
    failed: int
    in_flight: int
    shards_written: int
    rows_rejected: int
    gpu_seconds: float
    error: str | None = None  # why it FAILED, or why it paused itself (the daily quota)


def create(
    *,
    manifest: Path,
    dest: str,
    fmt: str,
    shard_size: int,
    spec: BulkSpec,
    owner: str,
    bulk_id: str | None = None,
    settings: Settings | None = None,
    admit: Callable[[Session], None] | None = None,
) -> str:
    """Record a bulk job (or find the one with ``bulk_id`` and the same options); its id.

    ``admit(s)`` runs in the transaction before a new job is recorded and may raise to refuse it
    (the HTTP API's per-owner cap on running bulk jobs, under the owner's lock)."""
    settings = settings or get_settings()
    if fmt not in FORMATS:
        raise InvalidInputError("format", f"must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if not 1 <= shard_size <= 10000:
        raise InvalidInputError("shard_size", "must be between 1 and 10000")
    if spec.images_per_prompt < 1:
        raise InvalidInputError("images_per_prompt", "must be at least 1")
    if not manifest.is_file():
        raise InvalidInputError("manifest", f"no such file: {manifest.name}")  # its name only: no server path
    # defaults, expansion options and the manifest's format are checked now (the file is read later)
    read_manifest(manifest, defaults={**spec.defaults, "model_name": spec.model_name},
                  images_per_prompt=spec.images_per_prompt, base_seed=spec.base_seed,
                  expand=spec.expand,  # type: ignore[arg-type]
                  variants=spec.variants, wildcards=Path(spec.wildcards) if spec.wildcards else None)
    open_destination(dest, settings)  # a bad destination fails here, before anything is recorded
    bulk_id = bulk_id or uuid.uuid4().hex[:16]
    with session_scope() as s:
        job = s.get(BulkJob, bulk_id)
        if job is not None:
            same = (job.owner, job.dest, job.format, job.shard_size, job.spec) == (
                owner, dest, fmt, shard_size, spec.to_json())
            if not same:
                raise ConflictError(f"bulk job {bulk_id} was started with other options; resume it with "
                                    f"`farm bulk resume {bulk_id}`")
            return bulk_id
        if admit is not None:
            admit(s)
        if settings.require_live_worker and not settings.embedded:
            _require_live_worker(s, spec.model_name, settings)
        s.add(BulkJob(id=bulk_id, owner=owner, status=BulkStatus.RUNNING, manifest=str(manifest), dest=dest, format=fmt,
                      shard_size=shard_size, spec=spec.to_json(), ingested=0, manifest_done=False,
                      rows_rejected=0))
    return bulk_id


def _require_live_worker(s: Session, model_name: str, settings: Settings) -> None:
    """``FARM_REQUIRE_LIVE_WORKER``: a new bulk job for a model that no live worker serves is refused
    (``farm bulk run`` exits with the reason, ``POST /bulk`` answers 503, a ``farm.bulk`` task fails
    with it), as a submit is."""
    from farm.lifecycle.pool import unserved
    from models.registry import get_model

    model = get_model(model_name, settings)
    state = unserved(s, model.name, model.key, settings)
    if state is not None:
        raise NoLiveWorkerError(state.describe().split(": the job waits")[0])


def get(s: Session, bulk_id: str, owner: str | None = None) -> BulkJob:
    job = s.get(BulkJob, bulk_id, populate_existing=True)
    if job is None or (owner is not None and job.owner != owner):
        raise JobNotFoundError(f"no bulk job {bulk_id!r}")
    return job


def progress(s: Session, bulk_id: str) -> Progress:
    job = get(s, bulk_id)
    counts = dict(s.execute(select(BulkSample.status, func.count()).where(BulkSample.bulk_id == bulk_id)
                            .group_by(BulkSample.status)).all())
    shards = s.scalar(select(func.count()).select_from(BulkShard).where(BulkShard.bulk_id == bulk_id)) or 0
    return Progress(bulk_id=bulk_id, status=BulkStatus(job.status), total=job.ingested if job.manifest_done else None,
                    ingested=job.ingested, done=int(counts.get("done", 0)), failed=int(counts.get("failed", 0)),
                    in_flight=int(counts.get("submitted", 0)), shards_written=int(shards),
                    rows_rejected=job.rows_rejected, gpu_seconds=gpu_seconds(s, bulk_id), error=job.error)


def progress_of(bulk_id: str) -> Progress:
    """:func:`progress` in a session of its own."""
    with session_scope() as s:
        return progress(s, bulk_id)


def set_status(bulk_id: str, status: BulkStatus, owner: str | None = None,
               admit: Callable[[Session], None] | None = None) -> BulkStatus:
    """Pause, resume or cancel; returns the status the job had. ``admit`` (over HTTP: the owner's running
    cap and quota, under the owner's lock) may refuse a job that would start running, in the same transaction."""
    with session_scope() as s:
        job = get(s, bulk_id, owner)
        before = BulkStatus(job.status)
        if before in (BulkStatus.COMPLETED, BulkStatus.CANCELLED):
            return before
        if admit is not None and status == BulkStatus.RUNNING and before != BulkStatus.RUNNING:
            admit(s)
        job.status = status
        if status == BulkStatus.RUNNING and before != BulkStatus.RUNNING:  # resumed: no reason, no failed runs
            job.error, job.attempts = None, 0
        if status == BulkStatus.CANCELLED:
            job.finished_at = utcnow()
            in_flight = list(s.scalars(select(BulkSample.job_id).where(
                BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.SUBMITTED)))
        else:
            in_flight = []
    for job_id in in_flight:
        if job_id:
            submission.cancel(job_id)
    return before


def retry_failed(bulk_id: str) -> int:
    """Failed samples back to pending (their shards are rewritten when complete); how many."""
    with session_scope() as s:
        shards = set(s.scalars(select(BulkSample.shard).where(BulkSample.bulk_id == bulk_id,
                                                               BulkSample.status == SampleStatus.FAILED)))
        n = s.execute(update(BulkSample).where(BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.FAILED)
                      .values(status=SampleStatus.PENDING, error=None, tries=BulkSample.tries + 1)).rowcount  # type: ignore[attr-defined]
        if shards:
            s.query(BulkShard).filter(BulkShard.bulk_id == bulk_id, BulkShard.shard.in_(shards)).delete()
        job = get(s, bulk_id)
        if n and job.status in (BulkStatus.COMPLETED, BulkStatus.BUDGET_REACHED):
            job.status, job.finished_at = BulkStatus.RUNNING, None
    return int(n)


def gpu_seconds(s: Session, bulk_id: str) -> float:
    stmt = (select(func.coalesce(func.sum(Image.render_seconds), 0.0))
            .join(BulkSample, BulkSample.job_id == Image.job_id)
            .where(BulkSample.bulk_id == bulk_id, BulkSample.status == SampleStatus.DONE))
    return float(s.scalar(stmt) or 0.0)
