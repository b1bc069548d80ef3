"""Job status, shared by the ledger, the coordinator, the API and the client."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE = frozenset({JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS})


class Lane(StrEnum):
    """Priority lanes, highest first."""

    REALTIME = "realtime"
    SYNC = "sync"
    QUEUE = "queue"
    BULK = "bulk"


LANES_BY_PRIORITY = (Lane.REALTIME, Lane.SYNC, Lane.QUEUE, Lane.BULK)


class BatchStatus(StrEnum):
    """A batch of a job's images in the ledger: (fetching →) queued → claimed → done | failed | cancelled.

    ``fetching``: the job's file inputs are being fetched (farm.lifecycle.fetch); no worker may claim it."""

    FETCHING = "fetching"
    QUEUED = "queued"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (BatchStatus.DONE, BatchStatus.FAILED, BatchStatus.CANCELLED)


class SampleStatus(StrEnum):
    """One sample of a bulk job: pending → submitted (a farm job renders it) → done | failed."""

    PENDING = "pending"
    SUBMITTED = "submitted"
    DONE = "done"
    FAILED = "failed"


class DeliveryStatus(StrEnum):
    """A webhook delivery in the outbox: pending → delivered | failed (gave up) | gone (job deleted)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    GONE = "gone"


class BulkStatus(StrEnum):
    """A bulk job: running → paused | cancelled | completed | budget reached | failed (a paused, budgeted or
    failed job resumes). ``PAUSED`` by the driver itself when the owner's daily GPU-seconds are spent, and
    ``FAILED`` when its runs keep ending in an error: the job's ``error`` says why."""

    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    CANCELLED = "CANCELLED"
    COMPLETED = "COMPLETED"
    BUDGET_REACHED = "BUDGET_REACHED"
    FAILED = "FAILED"
