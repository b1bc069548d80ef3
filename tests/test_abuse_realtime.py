"""Realtime abuse (issue 20, findings 2, 13, 14, 15): each attack made for real over websockets against a
live ``farm api`` on loopback.

One API process of its own, with small realtime limits, beside the session stack's worker, ledger,
Redis and S3. Frames for ``IDLE_MODEL`` (no worker serves it) wait at the API for as long as the test
holds them; frames for the tiny model are answered by the session's worker.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.api_stack import APP, IDLE_MODEL, ApiStack, idle_input, tiny_input

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
    limits = {"FARM_REALTIME_MAX_FRAME_BYTES": str(FRAME_CAP), "FARM_REALTIME_BUFFERING_CAP": str(BUFFERING_CAP),
              "FARM_REALTIME_OWNER_MAX_BYTES": str(OWNER_HELD), "FARM_INLINE_INPUT_MAX_BYTES": str(INLINE_CAP),
              "FARM_UPLOAD_QUOTA_BYTES": str(QUOTA), "FARM_MAX_UPLOAD_BYTES": str(QUOTA),
              "FARM_REALTIME_TOKEN_SECRET": SECRET, "FARM_METRICS_TOKEN": METRICS_TOKEN,
              "FARM_REALTIME_FRAME_TIMEOUT": "600"}  # fmt: skip
    with api_stack.beside(root / "api.log", **limits) as stack:
        yield stack


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


def _closed_by(stack: ApiStack, key: str, frame: bytes | str) -> tuple[int, str]:
    """Send ``frame`` on a new connection: the close code and reason it gets, and never an answer. The
    server stops reading at the frame's header and closes while the rest is on its way: send may fail,
    and the reset of a socket closed with unread data may beat its close frame (seen once in 30 tries),
    so at most 3 tries, each of which must end in a close."""
    for _ in range(3):
        with _socket(stack, key=key) as ws, pytest.raises(ConnectionClosed) as info:
            ws.send(frame)
            got = ws.recv(timeout=WAIT)
            pytest.fail(f"a frame came instead of the close: {got!r:.300}")
        if info.value.rcvd is not None:
            return info.value.rcvd.code, info.value.rcvd.reason
    pytest.fail("3 tries, each reset before its close frame was read")


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


def test_an_oversized_frame_closes_1009_naming_the_limit(rt_guarded: ApiStack) -> None:
    """Finding 2: a frame over FARM_REALTIME_MAX_FRAME_BYTES (uvicorn's default would take 16 MiB) closes
    the socket with 1009 and the limit; the owner's next connection is served."""
    key = rt_guarded.make_key("rt-big")
    code, reason = _closed_by(rt_guarded, key, _with_lora(tiny_input(), FRAME_CAP))  # base64: 4/3 of the cap
    assert code == 1009 and str(FRAME_CAP) in reason, (code, reason)
    code, reason = _closed_by(rt_guarded, key, json.dumps(tiny_input(pad="y" * FRAME_CAP)))  # a text frame too
    assert code == 1009 and str(FRAME_CAP) in reason, (code, reason)
    with _socket(rt_guarded, key=key) as ws:
        ws.send(msgpack.packb(tiny_input(request_id="after")))
        assert _answer(ws)["request_id"] == "after"
    assert rt_guarded.proc is not None and rt_guarded.proc.poll() is None


def test_max_buffering_past_the_cap_is_refused_naming_the_field(rt_guarded: ApiStack) -> None:
    """Finding 2: max_buffering is bounded by FARM_REALTIME_BUFFERING_CAP (60 was accepted)."""
    key = rt_guarded.make_key("rt-buffering")
    for asked in (BUFFERING_CAP + 1, 60):
        with _socket(rt_guarded, f"?max_buffering={asked}", key=key) as ws:
            code, reason = _closed(ws)
        assert code == 4022, (code, reason)
        assert reason == (f"max_buffering: must be an integer between 1 and {BUFFERING_CAP} (got '{asked}'; "
                          "FARM_REALTIME_BUFFERING_CAP)")
    with _socket(rt_guarded, f"?max_buffering={BUFFERING_CAP}", key=key) as ws:
        ws.send(msgpack.packb(tiny_input(request_id="at-the-cap")))
        assert _answer(ws)["request_id"] == "at-the-cap"


def test_a_frames_data_uris_are_capped_together(rt_guarded: ApiStack) -> None:
    """Finding 2: the decoded bytes of one frame's data URIs are capped by FARM_INLINE_INPUT_MAX_BYTES,
    naming the field where they pass it; the connection goes on."""
    key = rt_guarded.make_key("rt-inline")
    loras = [{"path": _data_uri(INLINE_CAP * 3 // 5)[0]} for _ in range(2)]
    with _socket(rt_guarded, key=key) as ws:
        ws.send(msgpack.packb(tiny_input(loras=loras, request_id="two-loras")))
        error = _answer(ws)
        assert error["type"] == "x-fal-error" and error["error"] == "invalid_input", error
        assert error["field"] == "loras.1.path" and error["request_id"] == "two-loras"
        assert "FARM_INLINE_INPUT_MAX_BYTES" in error["reason"] and str(INLINE_CAP) in error["reason"]
        ws.send(msgpack.packb(tiny_input(request_id="next")))
        assert _answer(ws)["request_id"] == "next"


def _processed(ws: ClientConnection) -> None:
    """Wait until the API has taken every frame sent on ``ws`` so far: it reads a connection's frames in
    order, so the error frame of a bad one sent now comes after them all."""
    ws.send(msgpack.packb(idle_input(num_inference_steps=0, request_id="ack")))
    answer = _answer(ws)
    assert answer["request_id"] == "ack" and answer["field"] == "num_inference_steps", answer


def _upload(stack: ApiStack, key: str, size: int) -> None:
    with stack.client(key) as c:
        reply = c.post("/storage/upload", params={"file_name": "fill.bin"}, content=os.urandom(size))
    assert reply.status_code == 200, reply.text


def test_data_uri_frames_count_against_the_upload_quota(rt_guarded: ApiStack) -> None:
    """Finding 2: a frame's data URIs count against the owner's FARM_UPLOAD_QUOTA_BYTES with its uploads
    and with the data URIs of its frames held now (on any of its connections)."""
    key = rt_guarded.make_key("rt-quota")
    lora = INLINE_CAP * 3 // 4
    with _socket(rt_guarded, key=key) as ws:
        ws.send(_with_lora(tiny_input(), lora, request_id="fits"))
        answer = _answer(ws)  # admitted: the worker read the file (and refused it: it is random bytes)
        assert answer["request_id"] == "fits" and answer["error"] == "validation_error", answer
        _upload(rt_guarded, key, QUOTA - lora // 2)
        ws.send(_with_lora(tiny_input(), lora, request_id="past"))
        answer = _answer(ws)
        assert answer["error"] == "upload_quota_exceeded" and answer["request_id"] == "past", answer
        assert "FARM_UPLOAD_QUOTA_BYTES" in answer["reason"]

    key = rt_guarded.make_key("rt-quota-held")
    _upload(rt_guarded, key, QUOTA - 2 * lora + lora // 2)  # room for one frame's data URI, not two
    with _socket(rt_guarded, key=key) as held, _socket(rt_guarded, key=key) as second:
        held.send(_with_lora(idle_input(), lora))  # waits at the API: no worker serves the model
        _processed(held)
        second.send(_with_lora(tiny_input(), lora, request_id="second"))
        answer = _answer(second)
        assert answer["error"] == "upload_quota_exceeded" and answer["request_id"] == "second", answer
        second.send(msgpack.packb(tiny_input(request_id="no-data-uri")))
        assert _answer(second)["request_id"] == "no-data-uri"


def test_an_owners_held_frames_are_bounded(rt_guarded: ApiStack) -> None:
    """Finding 2: rapid big frames: an owner's frames held in the API stay within FARM_REALTIME_OWNER_MAX_BYTES;
    a connection's oldest waiting frames go first (latest wins), then a new frame is refused; bytes come
    back when the connection that held them closes."""
    key = rt_guarded.make_key("rt-held")
    lora = INLINE_CAP * 9 // 10  # about 240 KB a frame: two fit in the owner's bytes, three do not
    with _socket(rt_guarded, f"?max_buffering={BUFFERING_CAP}", key=key) as rapid:
        for i in range(12):  # one at the lane, then waiting ones replaced: never refused
            rapid.send(_with_lora(idle_input(), lora, request_id=f"rapid-{i}"))
        _processed(rapid)  # never refused (the ack is the next frame): one at the lane, the newest waiting
        with _socket(rt_guarded, key=key) as other:
            other.send(_with_lora(idle_input(), lora, request_id="other"))
            answer = _answer(other)
            assert answer["error"] == "over_limit" and answer["request_id"] == "other", answer
            assert "FARM_REALTIME_OWNER_MAX_BYTES" in answer["reason"] and str(OWNER_HELD) in answer["reason"]
            with pytest.raises(TimeoutError):  # the rapid connection was never refused: latest wins
                rapid.recv(timeout=0.5)
            rapid.close()
            for attempt in range(40):  # bounded: the API lets the closed connection's frames go at once
                other.send(_with_lora(tiny_input(), lora, request_id=f"after-{attempt}"))
                answer = _answer(other)
                if answer.get("error") != "over_limit":
                    break
                time.sleep(0.25)
            assert answer["request_id"].startswith("after-") and answer["error"] == "validation_error", answer


def _waiting(stack: ApiStack) -> float:
    """farm_realtime_frames_waiting of the API (its /metrics)."""
    with stack.client(Authorization=f"Bearer {METRICS_TOKEN}") as c:
        reply = c.get("/metrics")
    assert reply.status_code == 200, reply.text
    for line in reply.text.splitlines():
        if line.startswith("farm_realtime_frames_waiting"):
            return float(line.split()[-1])
    raise AssertionError("no farm_realtime_frames_waiting in /metrics")


def _until(stack: ApiStack, value: float) -> float:
    got = _waiting(stack)
    for _ in range(100):  # bounded: 100 scrapes, 0.1 s apart
        if got == value:
            break
        time.sleep(0.1)
        got = _waiting(stack)
    return got


def _lane_length(stack: ApiStack) -> int:
    """Frames in the realtime lane of the model no worker serves (Redis)."""
    import redis

    from farm.realtime.lane import lane_key
    from models.registry import get_model

    client = redis.Redis.from_url(stack.env["FARM_BROKER_URL"])
    try:
        return int(client.llen(lane_key(get_model(IDLE_MODEL).key)))
    finally:
        client.close()


def test_hung_up_connections_leave_no_waiting_frame(rt_guarded: ApiStack) -> None:
    """Findings 13 and 2: a client that hangs up while its frame waits for a worker leaves nothing behind:
    not in the API's hub (its reply future was kept until a reply that never comes), nor in Redis (the
    frame stayed in the lane, whole, until it expired)."""
    key = rt_guarded.make_key("rt-hangup")
    assert _until(rt_guarded, 0) == 0
    with contextlib.ExitStack() as hang_up:
        for _ in range(3):
            ws = hang_up.enter_context(_socket(rt_guarded, key=key))
            ws.send(_with_lora(idle_input(), 10 * KiB))  # waits: no worker serves the model
        assert _until(rt_guarded, 3) == 3
        assert _lane_length(rt_guarded) >= 3
    assert _until(rt_guarded, 0) == 0
    for _ in range(100):  # bounded: 100 reads, 0.1 s apart
        if _lane_length(rt_guarded) == 0:
            break
        time.sleep(0.1)
    assert _lane_length(rt_guarded) == 0


def test_a_frames_data_uri_leaves_no_file_on_the_worker(rt_guarded: ApiStack, api_stack: ApiStack) -> None:
    """Finding 2: the worker's copy of a frame's data URI is deleted once the frame is answered."""
    inputs = Path(api_stack.env["FARM_DATA_DIR"]) / "inputs"
    key = rt_guarded.make_key("rt-files")
    with _socket(rt_guarded, key=key) as ws:
        for i in range(3):
            uri, raw = _data_uri(20 * KiB)
            ws.send(msgpack.packb(tiny_input(loras=[{"path": uri}], request_id=f"file-{i}")))
            answer = _answer(ws)
            # the worker decoded it to a file and read it (random bytes: no weights)
            assert answer["error"] == "validation_error" and answer["reason"].startswith("loras.0.path: "), answer
            assert str(inputs) not in answer["reason"], answer
            assert not list(inputs.glob(f"{hashlib.sha256(raw).hexdigest()}.*")), sorted(inputs.iterdir())


def test_a_worker_fault_is_told_as_a_fixed_sentence(rt_guarded: ApiStack, api_stack: ApiStack) -> None:
    """Finding 14: an OSError on the worker (its input cache is a file, not a folder: FileExistsError naming
    the path) reaches the client as a fixed sentence, never the path."""
    data = Path(api_stack.env["FARM_DATA_DIR"])
    inputs, aside = data / "inputs", data / "inputs.aside"
    key = rt_guarded.make_key("rt-fault")
    if inputs.exists():
        inputs.rename(aside)
    inputs.write_bytes(b"not a folder")
    try:
        with _socket(rt_guarded, key=key) as ws:
            ws.send(_with_lora(tiny_input(), 4 * KiB, request_id="fault"))
            answer = _answer(ws)
    finally:
        inputs.unlink()
        if aside.exists():
            aside.rename(inputs)
    assert answer["type"] == "x-fal-error" and answer["request_id"] == "fault", answer
    assert answer["error"] == "render_error"
    assert answer["reason"] == "the frame could not be rendered (an internal error; the worker's log has the details)"
    assert str(data) not in json.dumps(answer)
