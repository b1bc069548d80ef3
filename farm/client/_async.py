"""The asyncio client: ``AsyncClient`` and its ``AsyncRequestHandle``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import EventSource
from tenacity import AsyncRetrying

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
from farm.client._realtime import AsyncRealtimeConnection, realtime_url, socket_headers, socket_ssl
from farm.schemas import GenerateOutput


@dataclass(frozen=True)
class AsyncRequestHandle:
    """A submitted request: ask for its status, result, events, or cancel it."""

    client: AsyncClient
    request_id: str

    async def status(self, *, with_logs: bool = False) -> Status:
        return await self.client.status(self.request_id, with_logs=with_logs)

    async def result(self) -> GenerateOutput:
        return await self.client.result(self.request_id)

    async def cancel(self) -> str:
        return await self.client.cancel(self.request_id)

    def stream(self, *, with_logs: bool = False) -> AsyncIterator[Status]:
        return self.client.stream(self.request_id, with_logs=with_logs)

    async def wait(self, **options: Any) -> GenerateOutput:
        """Wait for the job (see ``AsyncClient.wait``) and return its output."""
        return await self.client.wait(self.request_id, **options)


class AsyncClient:
    """The asyncio twin of :class:`farm.client.SyncClient`, same arguments and methods.

    ``on_queue_update`` may be a plain function or a coroutine function.
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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.endpoint = Endpoint.resolve(base_url, key, app)
        self.max_retries = max_retries
        self._verify = verify
        self._http = httpx.AsyncClient(
            headers=self.endpoint.headers, timeout=timeout, verify=verify_option(verify), transport=transport
        )

    # -- plumbing ------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- realtime (farm.client._realtime) ---------------------------------------------------------

    async def realtime_token(self, *, expiration: int = 120) -> str:
        """A short-lived token for the realtime socket (``POST /tokens/``)."""
        body = {"allowed_apps": [self.endpoint.app], "token_expiration": expiration}
        token: str = await self._request("POST", f"{self.endpoint.base_url}/tokens/", json=body, retry=False)
        return token

    @contextlib.asynccontextmanager
    async def realtime(self, *, max_buffering: int | None = None, use_token: bool = False,
                       open_timeout: float = 30.0) -> AsyncIterator[AsyncRealtimeConnection]:
        """The asyncio twin of ``SyncClient.realtime``."""
        from websockets.asyncio.client import connect

        token = await self.realtime_token() if use_token else None
        url = realtime_url(self.endpoint, token=token, max_buffering=max_buffering)
        async with connect(url, ssl=socket_ssl(url, self._verify), additional_headers=socket_headers(self.endpoint,
                           token), open_timeout=open_timeout, max_size=None) as ws:  # fmt: skip
            yield AsyncRealtimeConnection(ws)

    async def _request(
        self, method: str, url: str, *, retry: bool = True, ok: tuple[int, ...] = (), **kw: Any
    ) -> Any:
        policy = retry_policy(self.max_retries + 1 if retry else 1, lambda n, r: retry_delay(n, r), ok)
        try:
            response: httpx.Response = await AsyncRetrying(**policy)(self._http.request, method, url, **kw)
        except httpx.TransportError as exc:
            raise transport_error(exc, f"{method} {url}") from exc
        if response.is_success or response.status_code in ok:
            return response.json() if response.content else None
        raise error_from_response(response)

    # -- the queue -----------------------------------------------------------------------------

    async def submit(
        self, arguments: Arguments, *, webhook_url: str | None = None, idempotency_key: str | None = None
    ) -> AsyncRequestHandle:
        payload = to_payload(arguments)
        # retries of this call must not make a second job: the caller's key, else the input's
        # request_id (the server's own default), else a fresh one
        key = idempotency_key or payload.get("request_id") or uuid.uuid4().hex
        headers = {"Idempotency-Key": str(key)}
        params = {"fal_webhook": webhook_url} if webhook_url else None
        body = await self._request("POST", self.endpoint.submit_url, json=payload,
                                   headers=headers, params=params)  # fmt: skip
        return AsyncRequestHandle(self, body["request_id"])

    def handle(self, request_id: str) -> AsyncRequestHandle:
        return AsyncRequestHandle(self, request_id)

    async def status(self, request_id: str, *, with_logs: bool = False) -> Status:
        url = self.endpoint.request_url(request_id, "/status")
        return parse_status(await self._request("GET", url, params={"logs": int(with_logs)}))

    async def result(self, request_id: str) -> GenerateOutput:
        try:
            body = await self._request("GET", self.endpoint.request_url(request_id))
        except FarmClientError as exc:
            if failed_result(exc):  # the job's own error, or a server fault? the status tells
                status = await self.status(request_id)
                if isinstance(status, Completed) and not status.ok:
                    raise failure(status, request_id) from exc
            raise
        return GenerateOutput.model_validate(body)

    async def cancel(self, request_id: str) -> str:
        try:
            body = await self._request("PUT", self.endpoint.request_url(request_id, "/cancel"), ok=(400, 404))
        except FarmClientError as exc:
            if exc.status_code == 404:
                return "NOT_FOUND"
            raise
        status = body.get("status") if isinstance(body, dict) else None
        if status in TERMINAL_CANCEL:
            return str(status)
        raise FarmClientError(f"unexpected cancel answer: {body!r}", detail=body)

    async def stream(
        self, request_id: str, *, with_logs: bool = False, timeout: float | None = None
    ) -> AsyncGenerator[Status, None]:
        async with contextlib.aclosing(self._events(request_id, with_logs, timeout)) as events:
            async for event in events:
                yield parse_status(event)

    async def _events(
        self, request_id: str, with_logs: bool, timeout: float | None
    ) -> AsyncGenerator[dict[str, Any], None]:
        url = self.endpoint.request_url(request_id, "/status/stream")
        headers = {"Accept": "text/event-stream"}
        limits = httpx.Timeout(self._http.timeout.connect, read=timeout)
        try:
            async with self._http.stream("GET", url, params={"logs": int(with_logs)}, headers=headers,
                                         timeout=limits) as response:  # fmt: skip
                if not response.is_success:
                    await response.aread()
                    raise error_from_response(response)
                async for sse in EventSource(response).aiter_sse():
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

    async def wait(
        self,
        request_id: str,
        *,
        with_logs: bool = False,
        on_queue_update: Callable[[Status], Any] | None = None,
        poll_interval: float = 0.1,
        timeout: float | None = None,
        use_stream: bool | None = None,
    ) -> GenerateOutput:
        deadline = None if timeout is None else time.monotonic() + timeout
        if use_stream is None:
            events = self._follow(request_id, with_logs, poll_interval, deadline)
        elif use_stream:
            events = self.stream(request_id, with_logs=with_logs, timeout=timeout)
        else:
            events = self._poll(request_id, with_logs, poll_interval, deadline)
        try:
            async for status in events:
                if on_queue_update is not None:
                    called = on_queue_update(status)
                    if inspect.isawaitable(called):
                        await called
                if isinstance(status, Completed):
                    if not status.ok:
                        raise failure(status, request_id)
                    return await self.result(request_id)
                if deadline is not None and time.monotonic() > deadline:
                    break
        except FarmTimeoutError:
            pass
        finally:
            await events.aclose()
        with contextlib.suppress(FarmClientError):
            await self.cancel(request_id)
        raise FarmTimeoutError(f"request {request_id} not done after {timeout} s", request_id=request_id)

    async def _follow(
        self, request_id: str, with_logs: bool, interval: float, deadline: float | None
    ) -> AsyncGenerator[Status, None]:
        while (idle := stream_idle(deadline)) is not None:
            logs: list[Log] = []  # a (re)opened stream sends all the logs first
            try:
                async with contextlib.aclosing(self._events(request_id, with_logs, idle)) as events:
                    async for event in events:
                        status = parse_status(logs_so_far(event, logs) if with_logs else event)
                        yield status
                        if isinstance(status, Completed) or stream_idle(deadline) is None:
                            return
            except FarmTimeoutError:
                continue  # silent for `idle` seconds: look at the deadline, open it again
            except FarmClientError:
                async with contextlib.aclosing(self._poll(request_id, with_logs, interval, deadline)) as polled:
                    async for status in polled:
                        yield status
                return

    async def _poll(
        self, request_id: str, with_logs: bool, interval: float, deadline: float | None
    ) -> AsyncGenerator[Status, None]:
        while True:
            status = await self.status(request_id, with_logs=with_logs)
            yield status
            if isinstance(status, Completed) or (deadline is not None and time.monotonic() > deadline):
                return
            await asyncio.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))

    async def subscribe(
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
        handle = await self.submit(arguments, webhook_url=webhook_url, idempotency_key=idempotency_key)
        if on_enqueue is not None:
            on_enqueue(handle.request_id)
        return await handle.wait(with_logs=with_logs, on_queue_update=on_queue_update,
                                 poll_interval=poll_interval, timeout=timeout, use_stream=use_stream)  # fmt: skip

    # -- the run host and files ----------------------------------------------------------------

    async def run(self, arguments: Arguments, *, timeout: float | None = 300.0) -> GenerateOutput:
        body = await self._request("POST", self.endpoint.run_url, json=to_payload(arguments), retry=False,
                                   timeout=timeout)  # fmt: skip
        return GenerateOutput.model_validate(body)

    async def upload(
        self, data: bytes | str | Path, content_type: str | None = None, file_name: str | None = None
    ) -> str:
        if not isinstance(data, bytes):
            path = Path(data)
            file_name = file_name or path.name
            data = await asyncio.to_thread(path.read_bytes)
        fields = upload_fields(file_name, content_type)
        target = await self._request("POST", self.endpoint.initiate_upload_url, json=fields)
        request = self._http.build_request("PUT", target["upload_url"], content=data,
                                           headers={"Content-Type": fields["content_type"]})  # fmt: skip
        request.headers.pop("Authorization", None)  # the URL carries its own signature
        policy = retry_policy(self.max_retries + 1, lambda n, r: retry_delay(n, r))  # the same PUT: idempotent
        try:
            response: httpx.Response = await AsyncRetrying(**policy)(self._http.send, request)
        except httpx.TransportError as exc:
            raise transport_error(exc, "PUT upload_url") from exc
        if response.is_success:
            return str(target["file_url"])
        raise error_from_response(response)

    async def delete_upload(self, url: str) -> None:
        """Delete one of this key's uploads by the URL upload returned (``DELETE`` on it: 204); its bytes leave
        the owner's quota. FarmClientError (404) when there is no such upload of this key's owner."""
        await self._request("DELETE", self.endpoint.file_url(url), retry=False)
