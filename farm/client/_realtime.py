"""Realtime connections of ``farm.client``: fal's websocket protocol (``/run/{app}/realtime``).

Frames are msgpack both ways; a result comes back as a dict with the images' bytes inline
(``images[i]["content"]``). ``recv`` raises :class:`RealtimeError` for an ``x-fal-error`` frame
(bad input, a timeout; the connection stays usable) and for a socket the server closed with a
reason (a refused key or token, a revoked key, an owner over its limits).
"""

from __future__ import annotations

import json
import ssl
from typing import Any
from urllib.parse import urlencode

import msgpack

from farm.client._common import Arguments, Endpoint, Verify, to_payload, verify_option
from farm.client._errors import FarmClientError

NORMAL_CLOSE = (1000, 1001)


class RealtimeError(FarmClientError):
    """Raised when the realtime socket answers an error frame, or closes with an error code.

    ``error`` is the server's error (``invalid_input``, ``timeout`` …, or ``closed``), ``reason``
    why, ``field`` the input field a bad frame named, ``code`` the close code of a closed socket.
    """

    error_type = "realtime_error"

    def __init__(self, error: str, reason: str, *, field: str | None = None, code: int | None = None,
                 payload: dict[str, Any] | None = None) -> None:
        super().__init__(f"{error}: {reason}", error_type=error, request_id=(payload or {}).get("request_id"))
        self.error, self.reason, self.code = error, reason, code
        self.payload = payload or {}
        if field:
            self.errors = [(field, reason)]


def realtime_url(endpoint: Endpoint, *, token: str | None = None, max_buffering: int | None = None) -> str:
    """``ws(s)://host[:port]/run/{app}/realtime`` with the query fal's clients send."""
    if max_buffering is not None and not 1 <= max_buffering <= 60:
        raise ValueError(f"max_buffering must be between 1 and 60 (got {max_buffering})")
    base = endpoint.base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    query: dict[str, str] = {}
    if token:
        query["fal_jwt_token"] = token
    if max_buffering is not None:
        query["max_buffering"] = str(max_buffering)
    url = f"{base}/run/{endpoint.app}/realtime"
    return f"{url}?{urlencode(query)}" if query else url


def socket_ssl(url: str, verify: Verify) -> ssl.SSLContext | None:
    """The TLS context of a ``wss://`` URL, verified as the HTTP calls are."""
    if not url.startswith("wss://"):
        return None
    option = verify_option(verify)
    if isinstance(option, ssl.SSLContext):
        return option
    context = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR, like httpx
    if option is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def socket_headers(endpoint: Endpoint, token: str | None) -> dict[str, str]:
    headers = {"User-Agent": "lcm-farm-client"}
    if endpoint.key and not token:
        headers["Authorization"] = f"Key {endpoint.key}"
    return headers


def encode_frame(arguments: Arguments) -> bytes:
    packed: bytes = msgpack.packb(to_payload(arguments), use_bin_type=True)
    return packed


def decode_frame(message: str | bytes) -> dict[str, Any] | None:
    """A result, or None for a message to skip; raises RealtimeError for an error frame."""
    if isinstance(message, bytes | bytearray | memoryview):
        data = msgpack.unpackb(bytes(message), raw=False)
    else:
        data = json.loads(message)
    if not isinstance(data, dict):
        return {"payload": data}
    if data.get("type") == "x-fal-error":
        raise RealtimeError(str(data.get("error") or "error"), str(data.get("reason") or ""),
                            field=data.get("field"), payload=data)  # fmt: skip
    if data.get("type") == "x-fal-message":
        return None
    return data


def closed_error(exc: Exception) -> RealtimeError | None:
    """A RealtimeError for a socket closed with an error code; None for a normal close."""
    rcvd = getattr(exc, "rcvd", None)
    code = rcvd.code if rcvd is not None else 1006
    if code in NORMAL_CLOSE:
        return None
    reason = rcvd.reason if rcvd is not None and rcvd.reason else "the connection was lost"
    return RealtimeError("closed", reason, code=code)


class RealtimeConnection:
    """A blocking realtime connection (``SyncClient.realtime()``)."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws

    def send(self, arguments: Arguments) -> None:
        """Send one frame (a GenerateInput or a dict); add a ``request_id`` to find its result."""
        self._ws.send(encode_frame(arguments))

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next result (None once the server closed normally); TimeoutError after ``timeout`` s."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                message = self._ws.recv(timeout=timeout)
            except ConnectionClosed as exc:
                error = closed_error(exc)
                if error is None:
                    return None
                raise error from None
            result = decode_frame(message)
            if result is not None:
                return result

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> RealtimeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRealtimeConnection:
    """An asyncio realtime connection (``AsyncClient.realtime()``)."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws

    async def send(self, arguments: Arguments) -> None:
        await self._ws.send(encode_frame(arguments))

    async def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        import asyncio

        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                message = await asyncio.wait_for(self._ws.recv(), timeout)
            except ConnectionClosed as exc:
                error = closed_error(exc)
                if error is None:
                    return None
                raise error from None
            result = decode_frame(message)
            if result is not None:
                return result

    async def close(self) -> None:
        await self._ws.close()

    async def __aenter__(self) -> AsyncRealtimeConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
