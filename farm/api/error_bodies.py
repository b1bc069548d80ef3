"""Errors as the HTTP API answers them, in one place.

Every error body has ``detail`` and ``error_type``, the way fal's do. Validation errors
are 422 with ``detail`` a list of ``{loc, msg, type}`` (FastAPI's shape), naming the field.
Any :class:`~farm.errors.FarmError` answers its own ``http_status``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from farm.errors import BrokerUnavailableError, FarmError, InvalidInputError, StorageError
from farm.schemas import MAX_FIELD_ERRORS, error_reason, more_errors

log = logging.getLogger("farm.api")

# union branch tags that pydantic puts in a location (see farm.schemas.ImageSizeField)
_TAGS = ("named", "custom")
# job error types that no exception class carries (see farm/lifecycle/)
_STORED_ERROR_STATUS = {"cancelled": 400, "timeout": 504}
_UNPARSABLE_BODY = "There was an error parsing the body"
_HTTP_ERROR_TYPES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                     429: "too_many_requests"}


class AuthError(FarmError):
    """Raised when a request has no API key, or a key that is unknown, wrong or revoked."""

    http_status = 401
    error_type = "unauthorized"


class TooManyJobsError(FarmError):
    """Raised when an owner already has as many jobs in flight as its limit allows."""

    http_status = 429
    error_type = "too_many_requests"


class TooManyStreamsError(FarmError):
    """Raised when an owner already has as many status streams open as its limit allows."""

    http_status = 429
    error_type = "too_many_requests"


class RequestInProgressError(FarmError):
    """Raised when the result of a request that has not finished is asked for."""

    http_status = 400
    error_type = "request_in_progress"


class JobFailedError(FarmError):
    """Raised when the result of a request that failed or was cancelled is asked for."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.http_status = error_status(error_type)


class RequestTimeoutError(FarmError):
    """Raised when a synchronous run does not finish (or start) within its time limit."""

    http_status = 504
    error_type = "request_timeout"
    # tells fal_client not to retry: the limit was the caller's (or ours), not a gateway's
    headers = {"X-Fal-Request-Timeout-Type": "user"}


class RequestFieldError(InvalidInputError):
    """Raised when a header or query parameter of a request is invalid (``where``: header|query|body)."""

    def __init__(self, where: str, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.where = where


class InvalidField(BaseModel):
    """One entry of a 422 answer's ``detail``: where the bad field is and what is wrong with it."""

    loc: list[str | int] = Field(..., description="Where: 'body', 'query' or 'header', then the field path.")
    msg: str = Field(..., description="What is wrong with it.")
    type: str = Field(..., description="Machine-readable kind of error.")


class ErrorBody(BaseModel):
    """An error: what went wrong and its kind."""

    detail: str = Field(..., description="Human-readable reason.")
    error_type: str = Field(..., description="Machine-readable kind, e.g. not_found, unauthorized.")


class ValidationErrorBody(BaseModel):
    """Invalid input: one entry per bad field."""

    detail: list[InvalidField]
    error_type: str = Field("validation_error", description="Always validation_error.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No API key, or an unknown, wrong or revoked one."},
    422: {"model": ValidationErrorBody, "description": "Invalid input; `detail` names each bad field."},
}
FAILED: dict[int | str, dict[str, Any]] = {
    500: {"model": ErrorBody, "description": "The request failed; its `error_type` (render_error, storage_error, "
          "broker_unavailable …) sets the status: 500, 502, 503 or 504."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such request for this key's owner."},
}


def error_status(error_type: str | None) -> int:
    """The HTTP status of a stored job error (e.g. a failed job's ``error_type``)."""
    for cls in _subclasses(FarmError):
        if cls.error_type == error_type and cls is not JobFailedError:
            return cls.http_status
    return _STORED_ERROR_STATUS.get(error_type or "", 500)


def _subclasses(cls: type[FarmError]) -> list[type[FarmError]]:
    out: list[type[FarmError]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def error_response(status: int, detail: Any, error_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "error_type": error_type}, status_code=status, headers=headers)


def _clean_loc(loc: Any) -> list[str | int]:
    return [p if isinstance(p, int) else str(p) for p in loc if p not in _TAGS]


def _farm_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FarmError)
    if isinstance(exc, InvalidInputError):
        where = getattr(exc, "where", "body")
        pairs = getattr(exc, "errors", None) or [(exc.field, exc.reason)]
        detail = [
            {"loc": [where, *(int(p) if p.isdigit() else p for p in field.split("."))], "msg": msg,
             "type": "value_error"}
            for field, msg in pairs
        ]  # fmt: skip
        return error_response(422, _bounded(detail, len(detail)), exc.error_type)
    headers: dict[str, str] | None = getattr(exc, "headers", None)
    if isinstance(exc, AuthError):
        headers = {"WWW-Authenticate": "Key"}
    if isinstance(exc, RequestTimeoutError | JobFailedError):
        # the caller's own limit (X-Fal-Request-Timeout), or a job's stored failure answered again
        # (logged where it failed): an outcome of the request, not a fault of this server
        log.info("%s %s: %d %s: %s", request.method, request.url.path, exc.http_status, exc.error_type,
                 " ".join(str(exc).split()))
    elif exc.http_status >= 500:
        log.error("%s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return error_response(exc.http_status, _public(exc), exc.error_type, headers)


def _public(exc: FarmError) -> str:
    """What the client is told: storage and broker errors name buckets, object keys, paths and hosts,
    so they get a fixed sentence (the full one is in the server's log, above)."""
    if isinstance(exc, StorageError):
        return "storage is unavailable or refused the operation; try again later (details in the server's log)"
    if isinstance(exc, BrokerUnavailableError):
        return "the broker is unavailable; try again later"
    return str(exc)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    detail = [
        {"loc": _clean_loc(err.get("loc", ())), "msg": error_reason(err), "type": str(err.get("type", "value_error"))}
        for err in errors[:MAX_FIELD_ERRORS + 1]
    ]  # fmt: skip
    return error_response(422, _bounded(detail, len(errors)), "validation_error")


def _bounded(detail: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """At most ``MAX_FIELD_ERRORS`` of ``total`` entries, then one saying how many more there were: an
    answer stays a few KB whatever the body held (100,000 bad items are not answered one by one)."""
    if total <= MAX_FIELD_ERRORS + 1:
        return detail
    more = {"loc": ["body"], "msg": more_errors(total - MAX_FIELD_ERRORS), "type": "too_many_errors"}
    return [*detail[:MAX_FIELD_ERRORS], more]


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:  # FastAPI's, for a body it cannot decode
        return error_response(422, [{"loc": ["body"], "msg": "not valid JSON", "type": "json_invalid"}],
                              "validation_error")  # fmt: skip
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, exc.detail, error_type, dict(exc.headers or {}))


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", "internal_error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(FarmError, _farm_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
