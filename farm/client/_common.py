"""What the sync and async clients share: settings, status types, payloads, retries, SSE."""

from __future__ import annotations

import json
import mimetypes
import os
import random
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import EventSource, ServerSentEvent
from tenacity import RetryCallState, stop_after_attempt

from farm.client._errors import FarmClientError, RequestFailedError
from farm.schemas import GenerateInput

DEFAULT_APP = "fal-ai/fast-lcm-diffusion"
DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUS = frozenset({408, 429, 502, 503, 504})
STREAM_IDLE_SECONDS = 2.0  # wait(): a status stream silent this long is reopened (and the deadline looked at)
TERMINAL_CANCEL = frozenset({"CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"})

Arguments = GenerateInput | Mapping[str, Any]
Log = dict[str, Any]


# -- statuses (the shapes fal-client parses) -----------------------------------------------


@dataclass(frozen=True)
class Status:
    """A job's status as the queue API reports it."""


@dataclass(frozen=True)
class Queued(Status):
    """Waiting in the model's queue; ``position`` counts from 0."""

    position: int


@dataclass(frozen=True)
class InProgress(Status):
    """Rendering; ``logs`` is None unless asked for."""

    logs: list[Log] | None = None


@dataclass(frozen=True)
class Completed(Status):
    """Finished. Failures and cancellations are Completed with ``error`` and ``error_type``."""

    logs: list[Log] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_status(data: Mapping[str, Any]) -> Status:
    status = data.get("status")
    if status == "IN_QUEUE":
        return Queued(position=int(data.get("queue_position") or 0))
    if status == "IN_PROGRESS":
        return InProgress(logs=data.get("logs"))
    if status == "COMPLETED":
        return Completed(
            logs=data.get("logs"),
            metrics=data.get("metrics") or {},
            error=data.get("error"),
            error_type=data.get("error_type"),
        )
    raise ValueError(f"unknown status {status!r}")


def failure(status: Completed, request_id: str) -> RequestFailedError:
    return RequestFailedError(
        f"request {request_id} failed: {status.error}",
        detail=status.error,
        error_type=status.error_type or "request_failed",
        request_id=request_id,
    )


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the API lives and how to call it."""

    base_url: str
    key: str | None
    app: str

    @classmethod
    def resolve(cls, base_url: str | None, key: str | None, app: str) -> Endpoint:
        url = base_url or os.environ.get("FARM_API_URL") or DEFAULT_URL
        if "://" not in url:
            url = "https://" + url
        key = key or os.environ.get("FARM_API_KEY") or os.environ.get("FAL_KEY") or None
        app = app.strip("/")
        if app.count("/") < 1:
            raise ValueError(f"app must be 'owner/alias' (got {app!r})")
        return cls(base_url=url.rstrip("/"), key=key, app=app)

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "lcm-farm-client"}
        if self.key:
            headers["Authorization"] = f"Key {self.key}"
        return headers

    # the queue API at the root, the run host under /run, uploads under /storage (farm/api/app.py)
    @property
    def submit_url(self) -> str:
        return f"{self.base_url}/{self.app}"

    @property
    def run_url(self) -> str:
        return f"{self.base_url}/run/{self.app}"

    def request_url(self, request_id: str, suffix: str = "") -> str:
        """Status, result and cancel live at the app's ``owner/alias`` URLs, without an endpoint's subpath
        (``…/image-to-image`` submits there, its requests are read at the app's), as fal's clients build them."""
        owner_alias = "/".join(self.app.split("/")[:2])
        return f"{self.base_url}/{owner_alias}/requests/{quote(request_id, safe='')}{suffix}"

    @property
    def upload_url(self) -> str:
        return f"{self.base_url}/storage/upload"

    @property
    def initiate_upload_url(self) -> str:
        return f"{self.base_url}/storage/upload/initiate"

    def file_url(self, url: str) -> str:
        """This farm's ``/storage/files/<owner>/uploads/<id>/<name>`` URL of an upload's URL (as upload
        returned it, or its signed ``/cdn/…`` form); ValueError for any other URL."""
        path = httpx.URL(url).raw_path.split(b"?", 1)[0].decode("ascii")
        start = path.find("/storage/files/")
        if start < 0 or "/uploads/" not in path[start:]:
            raise ValueError(f"not an upload URL of this farm: {url!r}")
        return self.base_url + path[start:]


def upload_fields(file_name: str | None, content_type: str | None) -> dict[str, str]:
    """The body of ``POST /storage/upload/initiate`` (fal's upload protocol)."""
    name = file_name or "upload.bin"
    return {"content_type": content_type or mimetypes.guess_type(name)[0] or "application/octet-stream",
            "file_name": name}  # fmt: skip


Verify = bool | str | os.PathLike[str] | ssl.SSLContext | None


def verify_option(verify: Verify) -> bool | ssl.SSLContext:
    """What httpx verifies TLS with: a CA file or folder given as a path, a context, or a flag.

    None means True, and then httpx honours ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``.
    """
    if verify is None:
        return True
    if isinstance(verify, bool | ssl.SSLContext):
        return verify
    path = os.fspath(verify)
    if os.path.isdir(path):
        return ssl.create_default_context(capath=path)
    return ssl.create_default_context(cafile=path)


# -- payloads and retries ----------------------------------------------------------------------


def to_payload(arguments: Arguments) -> dict[str, Any]:
    """The JSON body of a request: the fields a GenerateInput was given, or a dict as is."""
    if isinstance(arguments, GenerateInput):
        return arguments.model_dump(mode="json", exclude_unset=True)
    if isinstance(arguments, Mapping):
        return dict(arguments)
    raise TypeError(f"arguments must be a GenerateInput or a dict, not {type(arguments).__name__}")


def should_retry(result: httpx.Response | Exception) -> bool:
    """Transport errors, 408, 429, and 502–504 from a proxy are worth another try.

    A 5xx that the farm itself answered (a body with ``error_type``: a failed job's
    result, a dead broker) is final.
    """
    if not isinstance(result, httpx.Response):
        return isinstance(result, httpx.TransportError)
    if result.status_code not in RETRY_STATUS:
        return False
    if result.status_code >= 500:
        try:
            body = result.json()
        except ValueError:
            return True
        return not (isinstance(body, dict) and "error_type" in body)
    return True


def retry_policy(attempts: int, delay: Callable[[int, httpx.Response | None], float],
                 ok: tuple[int, ...] = ()) -> dict[str, Any]:
    """tenacity's options for one call: at most ``attempts``, again on what :func:`should_retry` names (not
    on an answer the caller takes, ``ok``), ``delay(attempt, answer)`` apart; the last answer or error
    comes back as it came (httpx's transport retries only reconnect; these also cover 429 and proxy 5xx)."""

    def retry(state: RetryCallState) -> bool:
        outcome = state.outcome
        if outcome is None:
            return False
        if outcome.failed:
            exc = outcome.exception()
            return isinstance(exc, Exception) and should_retry(exc)
        response: httpx.Response = outcome.result()
        return not (response.is_success or response.status_code in ok) and should_retry(response)

    def wait(state: RetryCallState) -> float:
        outcome = state.outcome
        return delay(state.attempt_number - 1, None if outcome is None or outcome.failed else outcome.result())

    def last(state: RetryCallState) -> Any:
        assert state.outcome is not None
        return state.outcome.result()  # the last answer, or its error raised

    return {"stop": stop_after_attempt(attempts), "retry": retry, "wait": wait, "retry_error_callback": last}


def failed_result(exc: FarmClientError) -> bool:
    """Whether an error answer of the result route may stand for a failed or cancelled job."""
    return exc.status_code not in (None, 401, 403, 404, 422, 429) and exc.error_type != "request_in_progress"


def retry_delay(attempt: int, response: httpx.Response | None = None) -> float:
    if response is not None:
        after = response.headers.get("retry-after", "")
        if after.replace(".", "", 1).isdigit():
            return min(float(after), 10.0)
    return min(0.1 * 2**attempt, 2.0) * (0.5 + random.random())


# -- server-sent events --------------------------------------------------------------------------


def stream_idle(deadline: float | None) -> float | None:
    """How long a followed status stream may stay silent before it is reopened; None: ``deadline`` passed."""
    if deadline is None:
        return STREAM_IDLE_SECONDS
    left = deadline - time.monotonic()
    return None if left <= 0 else min(STREAM_IDLE_SECONDS, left)


def logs_so_far(event: dict[str, Any], logs: list[Log]) -> dict[str, Any]:
    """A status stream event with all the log lines of its stream so far (it sends each line once).

    ``logs`` collects them; the result reads like the status route's answer with logs.
    """
    logs.extend(event.get("logs") or [])
    return {**event, "logs": list(logs)}


def status_event(sse: ServerSentEvent) -> dict[str, Any] | None:
    """The JSON object in a status stream event's ``data`` (httpx-sse joins its lines); None without one."""
    if not sse.data:
        return None
    value = json.loads(sse.data)
    return value if isinstance(value, dict) else None


class SSEParser:
    """Reads the lines of a recorded ``text/event-stream`` the way the clients read a live one (httpx-sse)."""

    def feed_all(self, lines: Iterable[str]) -> list[dict[str, Any]]:
        body = "".join(f"{line}\n" for line in lines).encode()
        response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
        return [event for sse in EventSource(response).iter_sse() if (event := status_event(sse)) is not None]
