"""fal's queue protocol: the app id we serve, the reply models and the status mapping.

The ledger knows five states; fal's clients know three. FAILED and CANCELLED jobs are
reported as ``COMPLETED`` with ``error`` and ``error_type`` (any other status string
makes ``fal_client`` raise ValueError).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from db import ledger
from db.models import Job, JobLog
from farm.results import api_status
from farm.status import JobStatus

APP_OWNER = "fal-ai"
APP_ALIAS = "fast-lcm-diffusion"
APP_ID = f"{APP_OWNER}/{APP_ALIAS}"

FalStatus = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
CancelStatus = Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


class LogEntry(BaseModel):
    timestamp: str = Field(..., description="ISO 8601, UTC.")
    level: str = Field(..., description="INFO, WARNING, ERROR …")
    source: str = Field(..., description="Who wrote it: api, coordinator, worker.")
    message: str


class RequestUrls(BaseModel):
    request_id: str = Field(..., description="The request's id.")
    response_url: str = Field(..., description="GET: the result (the output schema) once COMPLETED.")
    status_url: str = Field(..., description="GET: the status; `?logs=1` adds the logs.")
    cancel_url: str = Field(..., description="PUT: cancel the request.")


class QueueSubmitted(RequestUrls):
    """A submitted request (or the same one again, for a repeated idempotent submit)."""

    status: FalStatus = Field("IN_QUEUE", description="The request's status now.")


class QueueStatus(RequestUrls):
    """A request's status, as fal reports it."""

    status: FalStatus
    queue_position: int | None = Field(
        None, description="IN_QUEUE only: queued requests of the same model ahead of this one (0: next)."
    )
    logs: list[LogEntry] | None = Field(None, description="With `?logs=1`: the request's log lines, else null.")
    metrics: dict[str, float] | None = Field(
        None, description="COMPLETED only: `inference_time` (seconds spent rendering)."
    )
    error: str | None = Field(None, description="COMPLETED only: why the request failed or was cancelled.")
    error_type: str | None = Field(None, description="COMPLETED only: e.g. render_error, cancelled.")


class CancelResult(BaseModel):
    """Outcome of a cancellation (202, 400 or 404)."""

    status: CancelStatus
    detail: str | None = None
    error_type: str | None = None


def request_urls(app_base: str, request_id: str) -> dict[str, str]:
    """The URLs of a request; ``app_base`` is ``https://host[/prefix]/fal-ai/fast-lcm-diffusion``."""
    base = f"{app_base}/requests/{request_id}"
    return {"request_id": request_id, "response_url": base, "status_url": f"{base}/status",
            "cancel_url": f"{base}/cancel"}  # fmt: skip


def fal_status(status: JobStatus) -> FalStatus:
    """FAILED and CANCELLED are COMPLETED (with ``error``) here; ``farm status`` shows both words."""
    return api_status(status)


def log_entry(row: JobLog) -> dict[str, Any]:
    return {"timestamp": row.timestamp.isoformat(), "level": row.level, "source": row.source, "message": row.message}


def status_payload(
    s: Session, job: Job, app_base: str, *, with_logs: bool, after_log_id: int | None = None
) -> tuple[dict[str, Any], int | None]:
    """The fal status of ``job`` and the id of the last log line in it.

    ``after_log_id`` keeps only newer log lines (the status stream sends each line once).
    """
    status = JobStatus(job.status)
    payload: dict[str, Any] = {**request_urls(app_base, job.id), "status": fal_status(status), "logs": None}
    last_id = after_log_id
    if with_logs:
        rows = [r for r in ledger.get_logs(s, job.id) if after_log_id is None or r.id > after_log_id]
        payload["logs"] = [log_entry(r) for r in rows]
        if rows:
            last_id = max(r.id for r in rows)
    if status == JobStatus.IN_QUEUE:
        payload["queue_position"] = ledger.queue_position(s, job) or 0
    elif status.is_terminal:
        payload["metrics"] = {} if job.inference_seconds is None else {"inference_time": job.inference_seconds}
        if status != JobStatus.COMPLETED:
            payload["error"] = job.error or status.value.lower()
            payload["error_type"] = job.error_type or ("cancelled" if status == JobStatus.CANCELLED else "error")
    return payload, last_id
