"""fal's proxy convention: a request to ``/fal/proxy`` (or ``/api/fal/proxy``, the path fal's own
server proxies use) carries its real target in the ``x-fal-target-url`` header, which is what
fal's JavaScript client sends when configured with ``proxyUrl``.

fal's proxies forward the request to that URL; this one serves it itself: the target's host
picks the farm's matching routes (``queue.fal.run`` → ``/queue``, ``fal.run`` → ``/run``,
``rest.fal.ai`` and ``rest.alpha.fal.ai`` → the root, for uploads and realtime tokens), and
the request is dispatched inside this process with the same method, headers (the caller's own
``Authorization: Key …`` included) and body. No outbound request is ever made, so the header
cannot reach anything but this API. As in fal's proxies, a missing header is 400 and a host
that is not fal's is 412.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote, unquote, urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

TARGET_URL_HEADER = "x-fal-target-url"
PROXY_PATHS = frozenset({"/fal/proxy", "/api/fal/proxy"})
# fal's host → where the farm serves that host's routes
SERVED_HOSTS = {"queue.fal.run": "/queue", "fal.run": "/run", "rest.fal.ai": "", "rest.alpha.fal.ai": ""}
FAL_HOST = re.compile(r"(\.|^)fal\.(run|ai|dev)$")  # the check fal's own proxies make


class ProxyTargetError(ValueError):
    """Raised when ``x-fal-target-url`` is missing or names something the farm does not serve."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def target_path(target: str | None) -> tuple[str, str]:
    """The farm path (percent-encoded) and query string serving ``target``; ProxyTargetError if none."""
    if not target:
        raise ProxyTargetError(400, f"missing the {TARGET_URL_HEADER} header (the fal URL this request is for)")
    try:
        parts = urlsplit(target)
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        raise ProxyTargetError(412, f"{TARGET_URL_HEADER}: not a URL") from None
    if parts.scheme != "https" or not FAL_HOST.search(host) or parts.username or parts.password:
        raise ProxyTargetError(412, f"{TARGET_URL_HEADER}: must be an https:// URL on one of fal's hosts")
    prefix = SERVED_HOSTS.get(host)
    if prefix is None or port not in (None, 443):
        served = ", ".join(sorted(SERVED_HOSTS))
        raise ProxyTargetError(404, f"{TARGET_URL_HEADER}: lcm-farm serves {served}, not {parts.netloc}")
    path = parts.path or "/"
    segments = unquote(path).split("/")
    if any(s in (".", "..") for s in segments) or "//" in path:
        raise ProxyTargetError(400, f"{TARGET_URL_HEADER}: the path must not hold '.', '..' or empty segments")
    return prefix + path, parts.query


class FalProxy:
    """ASGI middleware: requests to a proxy path are re-dispatched to the routes their target names."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") not in PROXY_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            path, query = target_path(Headers(scope=scope).get(TARGET_URL_HEADER))
        except ProxyTargetError as exc:
            await _error(send, exc.status, str(exc))
            return
        raw = quote(path, safe="/%:@!$&'()*+,;=-._~")
        scope = {**scope, "path": unquote(path), "raw_path": raw.encode("ascii"), "query_string": query.encode()}
        await self.app(scope, receive, send)


async def _error(send: Send, status: int, detail: str) -> None:
    error_type = {400: "bad_request", 404: "not_found", 412: "invalid_target_url"}.get(status, "http_error")
    body = json.dumps({"detail": detail, "error_type": error_type}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
