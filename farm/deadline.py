"""An httpx transport with a wall-clock deadline for the whole exchange, not per read.

httpx's timeouts apply to each network operation: a server that sends one byte every 25 s never
trips a 30 s read timeout and can hold a download (or a webhook attempt) for as long as it likes.
Here every connect, TLS handshake, read and write gets at most the time left until one
``deadline`` (``time.monotonic()``): past it the next operation fails at once with a timeout, and
an operation that is waiting is cut when the deadline comes (its socket timeout is the time left).
:func:`expired` tells such a cut from an ordinary timeout.
"""

from __future__ import annotations

import ssl
import time
import typing
from collections.abc import Iterable

import httpcore
import httpx


def _left(deadline: float, timeout: float | None) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("the deadline passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(self._deadline, timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(self._deadline, timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, _left(self._deadline, timeout))
        return _Stream(inner, self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self, deadline: float) -> None:
        self._inner = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, _left(self._deadline, timeout), local_address, socket_options)
        return _Stream(stream, self._deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not used here")

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, max(0.0, self._deadline - time.monotonic())))


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (no proxies, no retries), every operation bounded by ``deadline``."""

    def __init__(self, deadline: float) -> None:
        super().__init__(trust_env=True, retries=0)
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(trust_env=True), retries=0,
                                             network_backend=_Backend(deadline))


def expired(deadline: float | None) -> bool:
    """Whether ``deadline`` (``time.monotonic()``) has passed."""
    return deadline is not None and time.monotonic() >= deadline
