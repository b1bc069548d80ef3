"""The ledger's bulk tables: a bulk job, its samples and the shards written (re-exported by ``db.models``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, JSONType, UTCDateTime, utcnow
from farm.status import BulkStatus


class BulkJob(Base):
    """A bulk dataset job: a manifest rendered into a sharded dataset at ``dest``.

    ``status``: a :class:`farm.status.BulkStatus` (its value is stored). ``spec`` holds every
    option (defaults for the input fields, images per prompt, base seed, template expansion,
    shard size, format, budget), so a resumed job renders exactly what the first run would.
    """

    __tablename__ = "bulk_jobs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(16), default=BulkStatus.RUNNING.value)
    manifest: Mapped[str] = mapped_column(Text)
    dest: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))
    shard_size: Mapped[int] = mapped_column(Integer)
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    ingested: Mapped[int] = mapped_column(Integer, default=0)  # samples recorded so far
    manifest_done: Mapped[bool] = mapped_column(default=False)  # every sample of the manifest recorded
    rows_rejected: Mapped[int] = mapped_column(Integer, default=0)
    last_row: Mapped[int] = mapped_column(Integer, default=0)  # manifest row of the last sample recorded
    runner: Mapped[str | None] = mapped_column(String(128))  # the driver running it now (one at a time)
    runner_until: Mapped[datetime | None] = mapped_column(UTCDateTime())  # its lease; renewed while it runs
    error: Mapped[str | None] = mapped_column(Text)  # why it FAILED, or why it paused itself (quota)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # runs ended in an error
    rejections: Mapped[list[str] | None] = mapped_column(JSONType)  # the first rejected rows' reasons
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BulkSample(Base):
    """One image of a bulk job: what to render, where it stands, which farm job rendered it."""

    __tablename__ = "bulk_samples"
    __table_args__ = (Index(None, "bulk_id", "status"), Index(None, "bulk_id", "shard"))

    bulk_id: Mapped[str] = mapped_column(String(128), ForeignKey("bulk_jobs.id", ondelete="CASCADE"),
                                         primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    shard: Mapped[int] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String(16))
    row: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    extra: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # farm.status.SampleStatus
    job_id: Mapped[str | None] = mapped_column(String(128))
    tries: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)


class BulkShard(Base):
    """A shard written to the destination (once, when all its samples are done or failed)."""

    __tablename__ = "bulk_shards"

    bulk_id: Mapped[str] = mapped_column(String(128), ForeignKey("bulk_jobs.id", ondelete="CASCADE"),
                                         primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    stats: Mapped[dict[str, Any]] = mapped_column(JSONType)
    written_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
