"""The blocking client: ``SyncClient`` and its ``SyncRequestHandle``."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import EventSource
from tenacity import Retrying

from farm.client._common import (
    DEFAULT_APP,
    TERMINAL_CANCEL,
    Arguments,
    Completed,
    Endpoint,
    Log,
    Status,
    Verify,
    failed_result,
    failure,
    logs_so_far,
    parse_status,
    retry_delay,
    retry_policy,
    status_event,
    stream_idle,
    to_payload,
    upload_fields,
    verify_option,
)
from farm.client._errors import FarmClientError, FarmTimeoutError, error_from_response, transport_error
from farm.client._realtime import RealtimeConnection, realtime_url, socket_headers, socket_ssl
from farm.schemas import GenerateOutput


@dataclass(frozen=True)
class SyncRequestHandle:
    """A submitted request: ask for its status, result, events, or cancel it."""

    client: SyncClient
    request_id: str

    def status(self, *, with_logs: bool = False) -> Status:
        return self.client.status(self.request_id, with_logs=with_logs)

    def result(self) -> GenerateOutput:
        return self.client.result(self.request_id)

    def cancel(self) -> str:
        return self.client.cancel(self.request_id)

    def stream(self, *, with_logs: bool = False) -> Iterator[Status]:
        return self.client.stream(self.request_id, with_logs=with_logs)

    def wait(self, **options: Any) -> GenerateOutput:
        """Wait for the job (see ``SyncClient.wait``) and return its output."""
        return self.client.wait(self.request_id, **options)


class SyncClient:
    """Blocking client of a farm's fal-compatible HTTP API.

    ``base_url`` defaults to ``$FARM_API_URL``; ``key`` to ``$FARM_API_KEY`` or ``$FAL_KEY``.
    TLS is verified against ``verify`` (a CA bundle path), else ``$SSL_CERT_FILE``, else the
    system's store. Idempotent calls are retried on transport errors and 408/429/502–504;
    so is submit, with an ``Idempotency-Key`` that makes the retry return the same job.
    """

    def __init__(
        self,
        base_url: str | None = None,
        key: str | None = None,
        app: str = DEFAULT_APP,
        *,
        timeout: float = 30.0,
        verify: Verify = None,
        max_retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.endpoint = Endpoint.resolve(base_url, key, app)
        self.max_retries = max_retries
        self._verify = verify
        self._http = httpx.Client(
            headers=self.endpoint.headers, timeout=timeout, verify=verify_option(verify), transport=transport
        )

    # -- plumbing ------------------------------------------------------------------------------

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- realtime (farm.client._realtime) ---------------------------------------------------------

    def realtime_token(self, *, expiration: int = 120) -> str:
        """A short-lived token for the realtime socket (``POST /tokens/``), as fal's JS clients get one."""
        body = {"allowed_apps": [self.endpoint.app], "token_expiration": expiration}
        token: str = self._request("POST", f"{self.endpoint.base_url}/tokens/", json=body, retry=False)
        return token

    @contextlib.contextmanager
    def realtime(self, *, max_buffering: int | None = None, use_token: bool = False,
                 open_timeout: float = 30.0) -> Iterator[RealtimeConnection]:
        """A realtime connection: ``send`` frames, ``recv`` results with the images' bytes inline.

        The key goes on the upgrade (``Authorization: Key``), or with ``use_token`` as a token from
        ``POST /tokens/`` in the URL. ``max_buffering`` (1-60): frames the server keeps waiting, the newest.
        """
        from websockets.sync.client import connect

        token = self.realtime_token() if use_token else None
        url = realtime_url(self.endpoint, token=token, max_buffering=max_buffering)
        with connect(url, ssl=socket_ssl(url, self._verify), additional_headers=socket_headers(self.endpoint, token),
                     open_timeout=open_timeout, max_size=None) as ws:  # fmt: skip
            yield RealtimeConnection(ws)

    def _request(self, method: str, url: str, *, retry: bool = True, ok: tuple[int, ...] = (), **kw: Any) -> Any:
        """Send with retries; return the JSON body, or raise FarmClientError."""
        policy = retry_policy(self.max_retries + 1 if retry else 1, lambda n, r: retry_delay(n, r), ok)
        try:
            response: httpx.Response = Retrying(**policy)(self._http.request, method, url, **kw)
        except httpx.TransportError as exc:
            raise transport_error(exc, f"{method} {url}") from exc
        if response.is_success or response.status_code in ok:
            return response.json() if response.content else None
        raise error_from_response(response)

    # -- the queue -----------------------------------------------------------------------------

    def submit(
        self, arguments: Arguments, *, webhook_url: str | None = None, idempotency_key: str | None = None
    ) -> SyncRequestHandle:
        """Queue a request; return its handle at once."""
        payload = to_payload(arguments)
        # retries of this call must not make a second job: the caller's key, else the input's
        # request_id (the server's own default), else a fresh one
        key = idempotency_key or payload.get("request_id") or uuid.uuid4().hex
        headers = {"Idempotency-Key": str(key)}
        params = {"fal_webhook": webhook_url} if webhook_url else None
        body = self._request("POST", self.endpoint.submit_url, json=payload, headers=headers,
                             params=params)  # fmt: skip
        return SyncRequestHandle(self, body["request_id"])

    def handle(self, request_id: str) -> SyncRequestHandle:
        return SyncRequestHandle(self, request_id)

    def status(self, request_id: str, *, with_logs: bool = False) -> Status:
        url = self.endpoint.request_url(request_id, "/status")
        return parse_status(self._request("GET", url, params={"logs": int(with_logs)}))

    def result(self, request_id: str) -> GenerateOutput:
        """The output of a finished job; RequestFailedError if it failed or was cancelled."""
        try:
            body = self._request("GET", self.endpoint.request_url(request_id))
        except FarmClientError as exc:
            if failed_result(exc):  # the job's own error, or a server fault? the status tells
                status = self.status(request_id)
                if isinstance(status, Completed) and not status.ok:
                    raise failure(status, request_id) from exc
            raise
        return GenerateOutput.model_validate(body)

    def cancel(self, request_id: str) -> str:
        """``CANCELLATION_REQUESTED``, ``ALREADY_COMPLETED`` or ``NOT_FOUND``."""
        try:
            body = self._request("PUT", self.endpoint.request_url(request_id, "/cancel"), ok=(400, 404))
        except FarmClientError as exc:
            if exc.status_code == 404:
                return "NOT_FOUND"
            raise
        status = body.get("status") if isinstance(body, dict) else None
        if status in TERMINAL_CANCEL:
            return str(status)
        raise FarmClientError(f"unexpected cancel answer: {body!r}", detail=body)

    def stream(
        self, request_id: str, *, with_logs: bool = False, timeout: float | None = None
    ) -> Generator[Status, None, None]:
        """Status events from the server-sent event stream, until COMPLETED.

        The server pushes an event as soon as the job's status, queue position or logs change;
        with ``with_logs`` each event carries only the new log lines. ``timeout`` bounds the
        wait for each event (FarmTimeoutError); None waits on.
        """
        with contextlib.closing(self._events(request_id, with_logs, timeout)) as events:
            for event in events:
                yield parse_status(event)

    def _events(
        self, request_id: str, with_logs: bool, timeout: float | None
    ) -> Generator[dict[str, Any], None, None]:
        """The status stream's events as JSON objects, until COMPLETED."""
        url = self.endpoint.request_url(request_id, "/status/stream")
        headers = {"Accept": "text/event-stream"}
        limits = httpx.Timeout(self._http.timeout.connect, read=timeout)
        try:
            with self._http.stream("GET", url, params={"logs": int(with_logs)}, headers=headers,
                                   timeout=limits) as response:  # fmt: skip
                if not response.is_success:
                    response.read()
                    raise error_from_response(response)
                for sse in EventSource(response).iter_sse():
                    event = status_event(sse)
                    if event is None or "status" not in event:
                        continue
                    yield event
                    if event["status"] == "COMPLETED":
                        return
        except httpx.ReadTimeout as exc:
            raise FarmTimeoutError(f"no status event of {request_id} within {timeout} s",
                                   request_id=request_id) from exc  # fmt: skip
        except httpx.TransportError as exc:
            raise transport_error(exc, f"status stream of {request_id}") from exc
        raise FarmClientError(f"status stream of {request_id} ended before COMPLETED", request_id=request_id)

    def wait(
        self,
        request_id: str,
        *,
        with_logs: bool = False,
        on_queue_update: Callable[[Status], Any] | None = None,
        poll_interval: float = 0.1,
        timeout: float | None = None,
        use_stream: bool | None = None,
    ) -> GenerateOutput:
        """Follow the job until COMPLETED, then return the output.

        By default (``use_stream=None``) the statuses come from the server-sent status stream,
        which the server pushes as the job changes; each one carries all the logs so far, like
        the status route. A stream silent for a few seconds is reopened; if the stream fails,
        the status route is polled every ``poll_interval`` seconds instead. ``use_stream=True``
        follows only the stream (events with only the new log lines); ``False`` only polls.
        Each status goes to ``on_queue_update``. A failed or cancelled job raises
        RequestFailedError. After ``timeout`` seconds the job is cancelled and
        FarmTimeoutError raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if use_stream is None:
            events = self._follow(request_id, with_logs, poll_interval, deadline)
        elif use_stream:
            events = self.stream(request_id, with_logs=with_logs, timeout=timeout)
        else:
            events = self._poll(request_id, with_logs, poll_interval, deadline)
        try:
            for status in events:
                if on_queue_update is not None:
                    on_queue_update(status)
                if isinstance(status, Completed):
                    if not status.ok:
                        raise failure(status, request_id)
                    return self.result(request_id)
                if deadline is not None and time.monotonic() > deadline:
                    break
        except FarmTimeoutError:
            pass
        finally:
            events.close()
        with contextlib.suppress(FarmClientError):
            self.cancel(request_id)
        raise FarmTimeoutError(f"request {request_id} not done after {timeout} s", request_id=request_id)

    def _follow(
        self, request_id: str, with_logs: bool, interval: float, deadline: float | None
    ) -> Generator[Status, None, None]:
        """Statuses pushed by the status stream, reopened when it falls silent; polling if it fails."""
        while (idle := stream_idle(deadline)) is not None:
            logs: list[Log] = []  # a (re)opened stream sends all the logs first
            try:
                with contextlib.closing(self._events(request_id, with_logs, idle)) as events:
                    for event in events:
                        status = parse_status(logs_so_far(event, logs) if with_logs else event)
                        yield status
                        if isinstance(status, Completed) or stream_idle(deadline) is None:
                            return
            except FarmTimeoutError:
                continue  # silent for `idle` seconds: look at the deadline, open it again
            except FarmClientError:
                yield from self._poll(request_id, with_logs, interval, deadline)
                return

    def _poll(
        self, request_id: str, with_logs: bool, interval: float, deadline: float | None
    ) -> Generator[Status, None, None]:
        while True:
            status = self.status(request_id, with_logs=with_logs)
            yield status
            if isinstance(status, Completed) or (deadline is not None and time.monotonic() > deadline):
                return
            time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    def subscribe(
        self,
        arguments: Arguments,
        *,
        with_logs: bool = False,
        on_queue_update: Callable[[Status], Any] | None = None,
        on_enqueue: Callable[[str], Any] | None = None,
        poll_interval: float = 0.1,
        timeout: float | None = None,
        use_stream: bool | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> GenerateOutput:
        """Submit, wait, return the output: fal's ``subscribe``."""
        handle = self.submit(arguments, webhook_url=webhook_url, idempotency_key=idempotency_key)
        if on_enqueue is not None:
            on_enqueue(handle.request_id)
        return handle.wait(with_logs=with_logs, on_queue_update=on_queue_update, poll_interval=poll_interval,
                           timeout=timeout, use_stream=use_stream)  # fmt: skip

    # -- the run host and files ----------------------------------------------------------------

    def run(self, arguments: Arguments, *, timeout: float | None = 300.0) -> GenerateOutput:
        """Render synchronously: one request that answers with the output."""
        body = self._request("POST", self.endpoint.run_url, json=to_payload(arguments), retry=False,
                             timeout=timeout)  # fmt: skip
        return GenerateOutput.model_validate(body)

    def upload(self, data: bytes | str | Path, content_type: str | None = None, file_name: str | None = None) -> str:
        """Store a file on the farm; return a URL usable as input (LoRA or embedding path) by this key's owner.

        fal's protocol: ``POST /storage/upload/initiate``, then a PUT of the bytes to the
        ``upload_url`` it returns (a signed farm URL, on S3 storage too: no key is sent there).
        """
        if not isinstance(data, bytes):
            path = Path(data)
            file_name = file_name or path.name
            data = path.read_bytes()
        fields = upload_fields(file_name, content_type)
        target = self._request("POST", self.endpoint.initiate_upload_url, json=fields)  # nothing stored yet: retry
        request = self._http.build_request("PUT", target["upload_url"], content=data,
                                           headers={"Content-Type": fields["content_type"]})  # fmt: skip
        request.headers.pop("Authorization", None)  # the URL carries its own signature
        policy = retry_policy(self.max_retries + 1, lambda n, r: retry_delay(n, r))  # the same PUT: idempotent
        try:
            response: httpx.Response = Retrying(**policy)(self._http.send, request)
        except httpx.TransportError as exc:
            raise transport_error(exc, "PUT upload_url") from exc
        if response.is_success:
            return str(target["file_url"])
        raise error_from_response(response)

    def delete_upload(self, url: str) -> None:
        """Delete one of this key's uploads by the URL upload returned (``DELETE`` on it: 204); its bytes leave
        the owner's quota. FarmClientError (404) when there is no such upload of this key's owner."""
        self._request("DELETE", self.endpoint.file_url(url), retry=False)
