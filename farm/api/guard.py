"""The door of the HTTP API: the key and the size of a body are checked before any body is read.

A pure ASGI middleware, outside every route:

- a request that carries a body (``POST``, ``PUT``, ``PATCH``) must show a valid key
  (``Authorization: Key <id>:<secret>``) before a byte of it is read: a missing, malformed,
  unknown or revoked key answers 401 at once (the client's upload is cut off there); the one
  exceptions are a signed upload URL (``PUT /storage/upload/signed/…``, fal's upload protocol),
  whose route checks the signature and expiry before it reads a byte, and fal_client's
  ``POST /files/upload[/multipart]`` (farm.api.cdn_upload), whose route checks its upload token
  (``Authorization: Bearer``) before it reads a byte;
- a body may be at most ``max_body_bytes`` (``FARM_MAX_BODY_BYTES``, JSON routes) or, on
  ``POST /storage/upload``, ``max_upload_bytes`` plus a little multipart framing (on a signed
  upload PUT and ``POST /files/upload``: ``max_upload_bytes``). A declared
  ``Content-Length`` beyond it answers 413 before reading; a body sent without one (chunked)
  is counted as it streams and answers 413 as soon as it passes the limit.

The verified key is left in the request's state for :func:`farm.api.deps.get_tenant`, so
it costs no second read.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from farm.api_keys import KeyInfo, cached_key, verify_key
from farm.config import Settings

UPLOAD_PATH = "/storage/upload"
SIGNED_UPLOAD_PREFIX = "/storage/upload/signed/"  # fal's upload protocol: the signed URL is the credential
CDN_UPLOAD_PATHS = frozenset({"/files/upload", "/files/upload/multipart"})  # fal_client's: token-checked
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around an uploaded file
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
STATE_KEY = "farm_key"  # request.state.farm_key: (token, KeyInfo) verified at the door


class BodyTooLarge(Exception):
    """Raised (inside the app) when a streamed body passes its limit; the middleware answers 413."""


def body_limit(path: str, settings: Settings) -> tuple[int, str]:
    """The most bytes a body on ``path`` may have, and the setting that says so."""
    if path.rstrip("/") == UPLOAD_PATH:
        return settings.max_upload_bytes + MULTIPART_SLACK, "FARM_MAX_UPLOAD_BYTES"
    if path.startswith(SIGNED_UPLOAD_PREFIX) or path in CDN_UPLOAD_PATHS:
        return settings.max_upload_bytes, "FARM_MAX_UPLOAD_BYTES"
    return settings.max_body_bytes, "FARM_MAX_BODY_BYTES"


async def _answer(send: Send, status: int, detail: Any, error_type: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"detail": detail, "error_type": error_type}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _too_large(limit: int, setting: str) -> str:
    return f"the request body is larger than the {limit} bytes allowed ({setting})"


class BodyGuard:
    """Key first, then a capped body (see the module docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET")
        limit, setting = body_limit(scope.get("path", ""), self.settings)
        has_body = method in BODY_METHODS  # other methods' bodies are never read (a declared one is capped)
        # a signed upload URL, or fal_client's upload with its token, carries no key: the route checks
        # the signature or token before reading the body
        path = scope.get("path", "")
        keyless = path.startswith(SIGNED_UPLOAD_PREFIX) or (method == "POST" and path in CDN_UPLOAD_PATHS)
        if has_body and self.settings.auth_enabled and not keyless:
            problem = await self._check_key(scope, headers.get(b"authorization"))
            if problem is not None:
                await _answer(send, 401, problem, "unauthorized", [(b"www-authenticate", b"Key")])
                return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, _too_large(limit, setting), "payload_too_large", [])
            return
        if not has_body:
            await self.app(scope, receive, send)
            return
        await self._capped(scope, receive, send, limit, setting)

    async def _check_key(self, scope: Scope, raw: bytes | None) -> str | None:
        """None if the key is good (then kept in the request state), else why it is refused."""
        if not raw:
            return "missing Authorization header: send `Authorization: Key <id>:<secret>`"
        scheme, _, token = raw.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "key" or not token.strip():
            return "the Authorization header must be `Key <id>:<secret>`"
        key: KeyInfo | None = cached_key(token)
        if key is None:
            key = await run_in_threadpool(verify_key, token)
        if key is None:
            return "invalid or revoked API key"
        scope.setdefault("state", {})[STATE_KEY] = (token, key)
        return None

    async def _capped(self, scope: Scope, receive: Receive, send: Send, limit: int, setting: str) -> None:
        seen = 0
        exceeded = False
        started = False

        async def counted() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise BodyTooLarge(_too_large(limit, setting))
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a body cut short is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except BodyTooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _answer(send, 413, _too_large(limit, setting), "payload_too_large", [])
