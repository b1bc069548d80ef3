"""Errors of the HTTP client, under the farm's one error root."""

from __future__ import annotations

from typing import Any

import httpx

from farm.errors import FarmError


class FarmClientError(FarmError):
    """Raised when the farm's HTTP API answers with an error (or cannot be reached).

    ``status_code`` is the HTTP status (None when no answer came), ``detail`` the
    server's ``detail`` as sent, ``error_type`` its ``error_type`` and, for 422,
    ``errors`` the ``(field, reason)`` pairs it named.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        detail: Any = None,
        error_type: str | None = None,
        errors: list[tuple[str, str]] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.detail = detail if detail is not None else message
        self.error_type = error_type or self.error_type
        self.errors = errors or []
        self.request_id = request_id

    @property
    def field(self) -> str | None:
        """The first field a validation error named."""
        return self.errors[0][0] if self.errors else None


class RequestFailedError(FarmClientError):
    """Raised when a job finished with an error: failed, or cancelled (COMPLETED with ``error``)."""


class FarmTimeoutError(FarmClientError, TimeoutError):
    """Raised when waiting for a job took longer than the caller's ``timeout``."""

    error_type = "timeout"


def _loc_to_field(loc: Any) -> str:
    parts = [str(p) for p in loc] if isinstance(loc, list | tuple) else [str(loc)]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(p for p in parts if p not in ("named", "custom")) or "input"


def field_errors(body: Any) -> list[tuple[str, str]]:
    """``(field, reason)`` pairs from an error body: FastAPI/fal ``detail`` lists or ``field``."""
    if not isinstance(body, dict):
        return []
    detail = body.get("detail")
    out: list[tuple[str, str]] = []
    if isinstance(detail, list):
        for item in detail:
            if isinstance(item, dict) and ("loc" in item or "field" in item):
                field = str(item["field"]) if "field" in item else _loc_to_field(item["loc"])
                reason = str(item.get("msg") or item.get("reason") or item.get("message") or "")
                out.append((field, reason.removeprefix("Value error, ")))
    for item in body.get("errors") or []:
        if isinstance(item, dict) and "field" in item and not out:
            out.append((str(item["field"]), str(item.get("reason") or item.get("msg") or "")))
        elif isinstance(item, list | tuple) and len(item) == 2 and not out:
            out.append((str(item[0]), str(item[1])))
    if not out and isinstance(body.get("field"), str):
        out.append((body["field"], str(body.get("reason") or detail or "")))
    return out


def error_from_response(response: httpx.Response) -> FarmClientError:
    """The FarmClientError an error answer stands for."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    detail: Any = body.get("detail", response.text) if isinstance(body, dict) else (response.text or None)
    error_type = body.get("error_type") if isinstance(body, dict) else None
    error_type = error_type or response.headers.get("x-fal-error-type")
    errors = field_errors(body)
    if errors:
        message = "; ".join(f"{f}: {r}" if r else f for f, r in errors)
    elif isinstance(detail, str) and detail:
        message = detail
    else:
        message = f"HTTP {response.status_code} from {response.request.method} {response.request.url.path}"
    request_id = body.get("request_id") if isinstance(body, dict) else None
    return FarmClientError(
        message,
        status_code=response.status_code,
        detail=detail,
        error_type=error_type or _default_type(response.status_code),
        errors=errors,
        request_id=request_id if isinstance(request_id, str) else None,
    )


def _default_type(status: int) -> str:
    return {401: "unauthorized", 403: "forbidden", 404: "not_found", 422: "validation_error"}.get(
        status, "http_error"
    )


def transport_error(exc: httpx.TransportError, what: str) -> FarmClientError:
    return FarmClientError(f"{what}: {type(exc).__name__}: {exc}", error_type="transport_error")
