"""Realtime abuse (issue 20, findings 2, 13, 14, 15): each attack made for real over websockets against a
live ``farm api`` on loopback.

One API process of its own, with small realtime limits, beside the session stack's worker, ledger,
Redis and S3. Frames for ``IDLE_MODEL`` (no worker serves it) wait at the API for as long as the test
holds them; frames for the tiny model are answered by the session's worker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.api_stack import APP, ApiStack, tiny_input
from tests.services import free_port

KiB = 1024
FRAME_CAP = 512 * KiB
BUFFERING_CAP = 4
OWNER_HELD = 600_000
INLINE_CAP = 200_000
QUOTA = 1_000_000
SECRET = secrets.token_urlsafe(32)
METRICS_TOKEN = secrets.token_urlsafe(16)
WAIT = 60.0  # one answer; the tiny model renders in milliseconds


@pytest.fixture(scope="module")
def rt_guarded(api_stack: ApiStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    """A second ``farm api`` on the session stack's ledger, storage, Redis and worker, with small realtime limits."""
    root = tmp_path_factory.mktemp("abuse-realtime")
    env = {**api_stack.env, "FARM_REALTIME_MAX_FRAME_BYTES": str(FRAME_CAP),
           "FARM_REALTIME_BUFFERING_CAP": str(BUFFERING_CAP), "FARM_REALTIME_OWNER_MAX_BYTES": str(OWNER_HELD),
           "FARM_INLINE_INPUT_MAX_BYTES": str(INLINE_CAP), "FARM_UPLOAD_QUOTA_BYTES": str(QUOTA),
           "FARM_MAX_UPLOAD_BYTES": str(QUOTA), "FARM_REALTIME_TOKEN_SECRET": SECRET,
           "FARM_METRICS_TOKEN": METRICS_TOKEN, "FARM_REALTIME_FRAME_TIMEOUT": "600"}  # fmt: skip
    stack = ApiStack(env=env, db_url=api_stack.db_url, bucket=api_stack.bucket, port=free_port(),
                     ca_path=api_stack.ca_path, log_path=root / "api.log", worker=api_stack.worker)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _socket(stack: ApiStack, query: str = "", key: str | None = None) -> ClientConnection:
    headers = {"Authorization": f"Key {key}"} if key else None
    return connect(f"wss://{stack.host}/run/{APP}/realtime{query}", ssl=stack.ssl_context,
                   additional_headers=headers, open_timeout=30, close_timeout=5)


def _closed(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes: its close code and reason (a result or error frame first fails)."""
    with pytest.raises(ConnectionClosed) as info:
        got = ws.recv(timeout=WAIT)
        pytest.fail(f"a frame came instead of the close: {got!r:.300}")
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


def _answer(ws: ClientConnection) -> dict[str, Any]:
    """The next frame: a result (msgpack) or an error (the x-fal-error JSON text frame)."""
    got = ws.recv(timeout=WAIT)
    return json.loads(got) if isinstance(got, str) else msgpack.unpackb(got)


def _data_uri(size: int) -> tuple[str, bytes]:
    """A base64 data URI of ``size`` random bytes (weights of no model: a worker refuses them as a file)."""
    raw = os.urandom(size)
    return "data:application/octet-stream;base64," + base64.b64encode(raw).decode(), raw


def _with_lora(base: dict[str, Any], size: int, **extra: Any) -> bytes:
    return msgpack.packb({**base, "loras": [{"path": _data_uri(size)[0]}], **extra})


def test_a_token_signed_with_sha1_is_refused(rt_guarded: ApiStack) -> None:
    """Finding 15: tokens are HMAC-SHA256. The same claims, secret and salt signed with itsdangerous's
    default (SHA-1) are refused; signed with SHA-256 they open the socket."""
    from itsdangerous import URLSafeSerializer

    from farm.realtime.tokens import SALT

    rt_guarded.make_key("rt-sha")
    claims = {"o": "rt-sha", "k": None, "a": [APP], "e": time.time() + 120}
    sha1 = URLSafeSerializer(SECRET, salt=SALT).dumps(claims)
    sha256 = URLSafeSerializer(SECRET, salt=SALT, signer_kwargs={"digest_method": hashlib.sha256}).dumps(claims)
    with _socket(rt_guarded, f"?fal_jwt_token={sha1}") as ws:
        code, reason = _closed(ws)
    assert (code, reason) == (4001, "invalid realtime token (bad signature)")
    with _socket(rt_guarded, f"?fal_jwt_token={sha256}") as ws:
        ws.send(msgpack.packb(tiny_input(request_id="sha256")))
        assert _answer(ws)["request_id"] == "sha256"
    with rt_guarded.client(rt_guarded.make_key("rt-sha-issued")) as c:  # what POST /tokens/ issues is SHA-256
        token = c.post("/tokens/", json={"allowed_apps": ["fast-lcm-diffusion"]}).json()
    body, signature = token.rsplit(".", 1)
    assert len(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))) == 32
