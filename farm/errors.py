"""The one error root of lcm-farm and its precise subclasses.

Each subclass carries an ``http_status`` and an ``error_type`` so the HTTP API and
the CLI map them in one place.
"""

from __future__ import annotations


class FarmError(Exception):
    """Raised for any failure that lcm-farm reports to a user."""

    http_status = 500
    error_type = "internal_error"


class InvalidInputError(FarmError):
    """Raised when a request's input breaks the schema or a configured bound."""

    http_status = 422
    error_type = "validation_error"

    def __init__(self, field: str, reason: str = "") -> None:
        # one readable arg, "field: reason", which is also how Celery rebuilds the error
        if not reason and ": " in field:
            field, reason = field.split(": ", 1)
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class UnknownModelError(FarmError):
    """Raised when a model name is not in the registry."""

    http_status = 422
    error_type = "validation_error"


class ModelNotFoundError(FarmError):
    """Raised when a model's weights cannot be found where the loader looked."""

    http_status = 503
    error_type = "model_not_found"


class JobNotFoundError(FarmError):
    """Raised when a request id is unknown (or belongs to another owner)."""

    http_status = 404
    error_type = "not_found"


class ConflictError(FarmError):
    """Raised when a request id is already taken by a different job."""

    http_status = 409
    error_type = "conflict"


class RequestIdTakenError(ConflictError):
    """Raised when a request id is taken by another owner's job, or by a job with a different input
    (the caller's input is at fault: ``farm generate --request-id`` exits 2, as for bad input)."""


class WorkerNameTakenError(FarmError):
    """Raised when a worker starts under the name of another live worker."""

    http_status = 409
    error_type = "conflict"


class BrokerUnavailableError(FarmError):
    """Raised when a task that has no ledger row (``farm.bulk``) cannot be published: the broker is down."""

    http_status = 503
    error_type = "broker_unavailable"


class NoLiveWorkerError(FarmError):
    """Raised at submit when no live worker serves the model and ``FARM_REQUIRE_LIVE_WORKER`` is set."""

    http_status = 503
    error_type = "no_live_worker"


class StorageError(FarmError):
    """Raised when an object cannot be written to or read from storage."""

    http_status = 502
    error_type = "storage_error"


class ObjectNotFound(StorageError):
    """Raised when a storage object that is read does not exist."""


class FileDownloadError(FarmError):
    """Raised when a file input (LoRA / embedding URL or hub id) cannot be fetched: refused, too big, too slow."""

    http_status = 422
    error_type = "file_download_error"


class RenderError(FarmError):
    """Raised when a worker fails to render a batch."""

    http_status = 500
    error_type = "render_error"


class LedgerSchemaError(FarmError):
    """Raised when the ledger's tables are missing or older than the code."""

    http_status = 503
    error_type = "ledger_not_migrated"


class QuotaExceededError(FarmError):
    """Raised at submit when the owner has spent its daily GPU-second quota (``FARM_DAILY_GPU_SECONDS``)."""

    http_status = 429
    error_type = "quota_exceeded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}
