"""Shards: a bulk job's finished samples, fetched from farm storage and written to the destination.

A shard is written once, when every one of its samples is done or failed (and the manifest
has been read past its end), atomically, and recorded in ``bulk_shards``. Each sample's
metadata holds every input parameter: rendered alone with them, the image is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sqlalchemy import func, select

from db.models import BulkSample, BulkShard, Image, utcnow
from db.session import session_scope
from farm.bulk import image_column
from farm.bulk.control import BulkSpec, get
from farm.bulk.writers import Destination, ShardSample, write_shard
from farm.status import SampleStatus
from farm.storage import Storage, object_key

_NOT_INPUT = ("template", image_column.SHA256)  # params kept beside a sample's input


def sample_input(row: BulkSample) -> dict[str, Any]:
    return sample_fields(row.params, row.prompt, row.negative_prompt, row.seed)


def sample_fields(params: dict[str, Any], prompt: str, negative_prompt: str | None, seed: int) -> dict[str, Any]:
    """The farm job input of a sample, from its ``bulk_samples`` columns."""
    fields = {k: v for k, v in params.items() if k not in _NOT_INPUT}
    return {**fields, "prompt": prompt, "negative_prompt": negative_prompt or "", "seed": seed,
            "num_images": 1, "sync_mode": False}


def write_ready_shards(bulk_id: str, dest: Destination, fmt: str, shard_size: int, owner: str, storage: Storage,
                       spec: BulkSpec, ahead: ReadAhead | None = None) -> int:
    """Write every shard whose samples are all finished and that is not written yet (with ``ahead``, the
    images it read already are taken from it, the others read now)."""
    with session_scope() as s:
        job = get(s, bulk_id)
        written = set(s.scalars(select(BulkShard.shard).where(BulkShard.bulk_id == bulk_id)))
        open_shards = set(s.scalars(select(BulkSample.shard).where(
            BulkSample.bulk_id == bulk_id,
            BulkSample.status.in_((SampleStatus.PENDING, SampleStatus.SUBMITTED))).distinct()))
        last = (job.ingested - 1) // shard_size if job.ingested else -1
        complete_upto = last if job.manifest_done else job.ingested // shard_size - 1
        ready = [k for k in range(complete_upto + 1) if k not in written and k not in open_shards]
    count = 0
    for shard in ready:
        with session_scope() as s:
            rows = list(s.scalars(select(BulkSample).where(BulkSample.bulk_id == bulk_id, BulkSample.shard == shard)
                                  .order_by(BulkSample.idx)))
            images = {i.job_id: i for i in s.scalars(select(Image).where(
                Image.job_id.in_([r.job_id for r in rows if r.status == SampleStatus.DONE]), Image.index == 0))}
            plan = [(r.key, r.job_id, _meta(r, spec, images.get(r.job_id))) for r in rows
                    if r.status == SampleStatus.DONE and r.job_id is not None]
            failed = sum(1 for r in rows if r.status == SampleStatus.FAILED)
        keys = [object_key(owner, job_id, 0, meta["format"]) for _, job_id, meta in plan]
        datas = ahead.take(keys) if ahead is not None else _fetch(storage, keys)
        samples = [ShardSample(key=key, image=data, ext="png" if meta["format"] == "png" else "jpg", meta=meta)
                   for (key, _, meta), data in zip(plan, datas, strict=True)]
        stats = write_shard(dest, fmt, shard, samples, failed=failed)
        with session_scope() as s:
            s.merge(BulkShard(bulk_id=bulk_id, shard=shard, count=len(samples), failed=failed, stats=stats,
                              written_at=utcnow()))
        count += 1
    return count


FETCH_THREADS = 8  # storage reads of a shard's images in flight at once


def _fetch(storage: Storage, keys: list[str]) -> list[bytes]:
    """The objects ``keys``, in order, read by a small thread pool (a shard is thousands of small GETs,
    each mostly waiting on the storage server)."""
    if len(keys) < 2:
        return [storage.get(key) for key in keys]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(keys)), thread_name_prefix="bulk-fetch") as pool:
        return list(pool.map(storage.get, keys))


READ_AHEAD_BYTES = 128 * 2**20  # at most this many bytes of images held in memory ahead of their shard


class ReadAhead:
    """Images of the done samples of the first shard still open, read from storage while the shard fills, so
    that writing it does not wait for a thousand reads at once (the last shard of a job is written as soon as
    its last image is done). At most ``budget`` bytes are held; what is not held is read when the shard is
    written. Not thread-safe: one thread reads ahead and writes shards (the driver's shard writer)."""

    def __init__(self, bulk_id: str, owner: str, storage: Storage, budget: int = READ_AHEAD_BYTES) -> None:
        self.bulk_id = bulk_id
        self.owner = owner
        self.storage = storage
        self.budget = budget
        self.held: dict[str, bytes] = {}  # by object key
        self.size = 0
        self.fetched = self.fetched_bytes = self.mean = 0  # read ahead so far: how many, bytes, mean size

    def read(self) -> int:
        """Read the images of the first open shard's done samples not held yet; how many."""
        if self.size >= self.budget:
            return 0
        unfinished = (SampleStatus.PENDING, SampleStatus.SUBMITTED)
        with session_scope() as s:
            shard = s.scalar(select(func.min(BulkSample.shard)).where(BulkSample.bulk_id == self.bulk_id,
                                                                      BulkSample.status.in_(unfinished)))
            if shard is None:
                return 0
            rows = s.execute(select(BulkSample.job_id, BulkSample.params["format"].as_string()).where(
                BulkSample.bulk_id == self.bulk_id, BulkSample.shard == shard,
                BulkSample.status == SampleStatus.DONE)).all()
        keys = [key for job_id, fmt in rows if job_id is not None
                and (key := object_key(self.owner, job_id, 0, fmt or "jpeg")) not in self.held]
        # as many as fit, at the mean size seen so far (a few first, to learn it)
        room = (self.budget - self.size) // self.mean if self.mean else FETCH_THREADS
        keys = keys[:room]
        for key, data in zip(keys, _fetch(self.storage, keys), strict=True):
            self.held[key] = data
            self.size += len(data)
            self.fetched += 1
            self.fetched_bytes += len(data)
        self.mean = -(-self.fetched_bytes // self.fetched) if self.fetched else 0
        return len(keys)

    def take(self, keys: list[str]) -> list[bytes]:
        """The objects ``keys``, in order: those held (and let go), the others read now."""
        got = {key: self.held.pop(key) for key in keys if key in self.held}
        self.size -= sum(len(data) for data in got.values())
        missing = [key for key in keys if key not in got]
        got.update(zip(missing, _fetch(self.storage, missing), strict=True))
        return [got[key] for key in keys]


def _meta(row: BulkSample, spec: BulkSpec, image: Image | None) -> dict[str, Any]:
    """Per-sample metadata: every input parameter (rendered alone with these, the image is the same), with an
    image-to-image sample's source image and mask as given (``image_url``, ``mask_url``) and their hashes."""
    fields = sample_input(row)
    fields.pop("sync_mode", None)
    return {
        **fields,
        "model": fields.get("model_name", spec.model_name),
        "nsfw": bool(image.nsfw) if image else False,
        "render_seconds": float(image.render_seconds) if image else 0.0,
        "width": image.width if image else None,
        "height": image.height if image else None,
        "template": row.params.get("template", row.prompt),
        "row": row.row,
        "index": row.idx,
        "extra": row.extra,
        # a source image given as a file: its bytes' sha256 (image_url / mask_url hold the path as given)
        **{f"{name.removesuffix('_url')}_sha256": sha for name, sha in row.params.get(image_column.SHA256, {}).items()},
    }


class ShardWriter:
    """At most one ``write_ready_shards`` (and read-ahead) at a time, in the background; a failure is raised
    by the next call."""

    def __init__(self, pool: ThreadPoolExecutor, background: Callable[[], int], write: Callable[[], int]) -> None:
        self.pool = pool
        self.background = background  # writes the complete shards, then reads ahead for the next one
        self.write = write
        self.running: Future[int] | None = None
        self.due = True  # look for complete shards in the first round (a resumed job may have some)

    def poke(self) -> None:
        """Look for complete shards now, or as soon as the write under way is over."""
        if self.running is not None:
            if not self.running.done():
                self.due = True  # shards may complete meanwhile: look again when it is over
                return
            self.running.result()  # a write that failed fails the run here
        self.due = False
        self.running = self.pool.submit(self.background)

    def flush(self) -> None:
        """Wait for the write under way, then write every complete shard left (in this thread)."""
        if self.running is not None:
            self.running.result()
            self.running = None
        self.due = False
        self.write()
