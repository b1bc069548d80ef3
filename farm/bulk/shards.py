"""Shards: a bulk job's finished samples, fetched from farm storage and written to the destination.

A shard is written once, when every one of its samples is done or failed (and the manifest
has been read past its end), atomically, and recorded in ``bulk_shards``. Each sample's
metadata holds every input parameter: rendered alone with them, the image is the same.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from db.models import BulkSample, BulkShard, Image, utcnow
from db.session import session_scope
from farm.bulk.control import BulkSpec, get
from farm.bulk.writers import Destination, ShardSample, write_shard
from farm.status import SampleStatus
from farm.storage import Storage, object_key


def sample_input(row: BulkSample) -> dict[str, Any]:
    params = {k: v for k, v in row.params.items() if k != "template"}
    return {**params, "prompt": row.prompt, "negative_prompt": row.negative_prompt or "", "seed": row.seed,
            "num_images": 1, "sync_mode": False}


def write_ready_shards(bulk_id: str, dest: Destination, fmt: str, shard_size: int, owner: str, storage: Storage,
                       spec: BulkSpec) -> int:
    """Write every shard whose samples are all finished and that is not written yet."""
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
        samples = []
        for key, job_id, meta in plan:
            ext = "png" if meta["format"] == "png" else "jpg"
            data = storage.get(object_key(owner, job_id, 0, meta["format"]))
            samples.append(ShardSample(key=key, image=data, ext=ext, meta=meta))
        stats = write_shard(dest, fmt, shard, samples, failed=failed)
        with session_scope() as s:
            s.merge(BulkShard(bulk_id=bulk_id, shard=shard, count=len(samples), failed=failed, stats=stats,
                              written_at=utcnow()))
        count += 1
    return count


def _meta(row: BulkSample, spec: BulkSpec, image: Image | None) -> dict[str, Any]:
    """Per-sample metadata: every input parameter (rendered alone with these, the image is the same)."""
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
    }
