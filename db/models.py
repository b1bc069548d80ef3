"""The ledger's tables: jobs, one row per image, job log lines, keys, webhooks, batches, workers, usage,
storage usage.

The declarative base and column types are in ``db.base``, the bulk tables in ``db.bulk_tables``; both are
re-exported here, so ``db.models`` names every table. ``Job.status`` loads as a :class:`JobStatus`.
"""

from __future__ import annotations

import os
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import NAMING_CONVENTION, Base, JSONType, StatusType, UTCDateTime, utcnow
from db.bulk_tables import BulkJob, BulkSample, BulkShard
from farm.errors import WorkerNameTakenError
from farm.status import JobStatus

__all__ = ["NAMING_CONVENTION", "ApiKey", "Base", "Batch", "BulkJob", "BulkSample", "BulkShard", "Image", "Job",
           "JobLog", "JSONType", "StatusType", "StorageUsage", "UTCDateTime", "Usage", "WebhookAttempt",
           "WebhookDelivery", "Worker", "utcnow"]

_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in JobStatus)


class Job(Base):
    """One request: what was asked, by whom, where it stands, and how it ended."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        CheckConstraint(f"status IN ({_STATUS_VALUES})", name="status"),
        Index(None, "model_key", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    model_name: Mapped[str] = mapped_column(String(256))
    model_key: Mapped[str] = mapped_column(String(64))
    lane: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    status: Mapped[JobStatus] = mapped_column(StatusType(), index=True, default=JobStatus.IN_QUEUE)
    input: Mapped[dict[str, Any]] = mapped_column(JSONType)
    seed: Mapped[int] = mapped_column(BigInteger)
    num_images: Mapped[int] = mapped_column(Integer)
    images_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # counted as batches land
    error: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(64))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    inference_seconds: Mapped[float | None] = mapped_column(Float)
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    input_digest: Mapped[str | None] = mapped_column(String(64))  # of the input as sent (a retry's key compares it)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    images: Mapped[list[Image]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="Image.index"
    )
    logs: Mapped[list[JobLog]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="JobLog.id"
    )

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.status} owner={self.owner} model={self.model_key}>"


class Image(Base):
    """One rendered image; ``(job_id, index)`` is unique, so a redelivered task overwrites."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(128), ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    object_key: Mapped[str] = mapped_column(String(1024))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    nsfw: Mapped[bool] = mapped_column(default=False)
    render_seconds: Mapped[float] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(256))  # whose fenced write stored it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="images")

    def __repr__(self) -> str:
        return f"<Image {self.job_id}#{self.index} {self.object_key}>"


class JobLog(Base):
    """One log line of a job, as the fal status endpoint returns them with ``logs=1``."""

    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(128), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="INFO")
    source: Mapped[str] = mapped_column(String(32), default="worker")
    message: Mapped[str] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="logs")


class ApiKey(Base):
    """An API key: ``<id>:<secret>`` handed out once; only the secret's SHA-256 is kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    max_in_flight: Mapped[int | None] = mapped_column(Integer)
    max_images: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """Outbox row: one webhook to deliver for a finished job (status pending|delivered|failed|gone).

    The body is built from the ledger when an attempt is made (``body`` is NULL; rows written before
    revision i10b_webhooks keep the body they stored). ``leased_until``: an attempt is under way."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index(None, "owner", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(128), ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    owner: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    leased_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)  # farm.status.DeliveryStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookAttempt(Base):
    """One delivery attempt of a webhook: when, the HTTP status or the error, how long."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float, default=0.0)


class Batch(Base):
    """A slice of a job's images, the unit a worker claims, renders and stores.

    ``status`` (:class:`farm.status.BatchStatus`): queued → claimed (by ``worker``, until
    ``lease_expires_at``; the worker's heartbeats push the lease on) → done | failed | cancelled.
    Each claim bumps ``token``; the holder's later writes are conditional on it (fencing). A
    claim whose lease ran out is put back to queued by the sweeper and published again. ``compat``
    groups batches that can share one GPU batch (same model, size, steps, guidance, LoRAs).
    """

    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("job_id", "k"),
        Index(None, "model_key", "status", "compat"),
        Index(None, "status", "lease_expires_at"),
        Index(None, "status", "published_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(128), ForeignKey("jobs.id", ondelete="CASCADE"))
    k: Mapped[int] = mapped_column(Integer)
    indices: Mapped[list[int]] = mapped_column(JSONType)
    model_key: Mapped[str] = mapped_column(String(64))
    lane: Mapped[str] = mapped_column(String(16))
    compat: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="queued")  # farm.status.BatchStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # fencing: bumped by each claim
    publishes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # messages sent for it
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # last message; NULL: none known
    worker: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def __repr__(self) -> str:
        return f"<Batch {self.job_id}.{self.k} {self.status} {self.indices[0]}..{self.indices[-1]}>"


class Worker(Base):
    """A live (or once live) worker process: what it serves, its batch size, its reload and compile counters."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(256))
    model_key: Mapped[str] = mapped_column(String(64), index=True)
    device: Mapped[str] = mapped_column(String(32))
    max_batch: Mapped[int] = mapped_column(Integer)
    loads: Mapped[int] = mapped_column(Integer, default=1)
    # with FARM_COMPILE: graphs compiled after warm-up (0 in steady state), and micro-batches run uncompiled
    recompiles: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cold_renders: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str | None] = mapped_column(String(256))  # with pid, which process the row is (NULL: before 0006)
    metrics_url: Mapped[str | None] = mapped_column(String(512))  # where to scrape it (NULL: no exporter)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def live_other_than(self, host: str, pid: int | None, live_within: float, now: datetime) -> bool:
        """Whether this row is a live worker other than process ``pid`` of ``host``: not stopped, beat
        within ``live_within`` seconds, and not a process of this host that is gone (a crashed worker
        restarted at once takes its name back). ``pid`` None: any process of ``host``."""
        if self.stopped_at is not None or (now - self.heartbeat_at).total_seconds() > live_within:
            return False
        if self.host is None or self.host != host:
            return True  # another host's (or an unknown host's) process: only its heartbeat tells
        if pid is not None and self.pid == pid:
            return False  # this very process (registering again)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False  # gone: its name is free again
        except PermissionError:
            pass  # alive, another user's
        try:  # a zombie (exited, not yet reaped) is gone too
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    def name_taken(self, now: datetime) -> WorkerNameTakenError:
        """The error for a worker that would start under this live row's name."""
        return WorkerNameTakenError(
            f"worker name {self.name!r} is taken by a live worker: pid {self.pid} on {self.host or 'an unknown host'}, "
            f"serving {self.model_name} on {self.device} since {self.started_at:%Y-%m-%d %H:%M:%S} UTC, last beat "
            f"{(now - self.heartbeat_at).total_seconds():.0f} s ago. Stop that worker first, or give this one "
            "another --name")


class Usage(Base):
    """What an owner used, per model (its name as requested, e.g. ``farm/tiny-lcm``), UTC day and source:
    counters that only grow.

    ``source`` is ``batch`` (rendered batches: images and GPU-seconds, ``frames`` 0) or
    ``realtime`` (websocket frames). Rows are added to with an upsert (:func:`db.usage_counters.record_usage`)
    in the transaction that stores the work, so usage is counted exactly when the work is.
    """

    __tablename__ = "usage"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    images: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    frames: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    gpu_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")


class StorageUsage(Base):
    """Bytes an owner keeps in storage (uploads and stored inputs): a counter kept with the writes.

    Changed (:mod:`db.storage_usage`) in the transaction that stores or deletes the object, under the
    owner's storage lock, so the upload quota is one row read, never a LIST of the owner's objects.
    """

    __tablename__ = "storage_usage"

    owner: Mapped[str] = mapped_column(String(128), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
