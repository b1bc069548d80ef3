"""Realtime over websockets against the live API over TLS (``tests/api_stack.py``: ``farm api`` and a
tiny-model ``farm worker``).

The unmodified ``fal_client.realtime(app, use_jwt=False)`` runs in its own process (it reads
``FAL_RUN_HOST`` when imported); the token cases use the ``websockets`` client directly, since
``fal_client``'s own token request goes to fal's REST host, which cannot be redirected.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.api_stack import APP, ApiStack, tiny_input
from tests.test_fal_client import run_fal

SCRIPT = r'''
import io, json, sys, time
import fal_client
from PIL import Image

APP, TINY = sys.argv[1], json.loads(sys.argv[2])
out = {}

def decoded(result):
    image = result["images"][0]
    picture = Image.open(io.BytesIO(image["content"]))
    picture.load()
    return {"request_id": result.get("request_id"), "size": list(picture.size), "format": picture.format,
            "width": image["width"], "height": image["height"], "content_type": image["content_type"],
            "seed": result["seed"], "nsfw": result["has_nsfw_concepts"], "timings": result["timings"],
            "count": len(result["images"])}

# several frames on one connection, each answered with its own size
with fal_client.realtime(APP, use_jwt=False) as conn:
    frames = []
    for i, (w, h) in enumerate([(64, 64), (128, 64), (64, 96)]):
        conn.send(dict(TINY, image_size={"width": w, "height": h}, seed=10 + i, request_id=f"frame-{i}",
                       format="png" if i == 2 else "jpeg"))
        frames.append(decoded(conn.recv()))
    out["frames"] = frames

# a burst faster than the render: the newest frames win
with fal_client.realtime(APP, use_jwt=False, max_buffering=2) as conn:
    heavy = dict(TINY, image_size={"width": 256, "height": 256}, num_inference_steps=8)
    for i in range(20):
        conn.send(dict(heavy, seed=i, request_id=f"burst-{i}"))
    got = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got.append(conn.recv()["request_id"])
        if got[-1] == "burst-19":
            break
    out["burst"] = got

# bad input: an x-fal-error naming the field, then the same connection serves a good frame
with fal_client.realtime(APP, use_jwt=False) as conn:
    conn.send(dict(TINY, num_inference_steps=0, request_id="bad-1"))
    try:
        conn.recv()
        out["bad"] = None
    except fal_client.client.RealtimeError as exc:
        out["bad"] = {"error": exc.error, "reason": exc.reason, "payload": exc.payload}
    conn.send(dict(TINY, image_size={"width": 64, "height": 64}, wrong_field=1))
    try:
        conn.recv()
        out["extra"] = None
    except fal_client.client.RealtimeError as exc:
        out["extra"] = exc.payload
    conn.send(dict(TINY, seed=5, request_id="good-after-bad"))
    out["after_bad"] = decoded(conn.recv())

# a wrong key: the socket is closed with a reason
try:
    with fal_client.SyncClient(key="0123456789abcdef:wrong").realtime(APP, use_jwt=False) as conn:
        conn.send(TINY)
        out["wrong_key"] = {"result": conn.recv()}
except fal_client.client.RealtimeError as exc:
    out["wrong_key"] = {"error": exc.error, "reason": exc.reason}
print(json.dumps(out))
'''

ROOT_SCRIPT = r'''
import json, sys
import fal_client

with fal_client.realtime(sys.argv[1], use_jwt=False) as conn:
    conn.send(dict(json.loads(sys.argv[2]), request_id="at-the-root"))
    result = conn.recv()
print(json.dumps({"request_id": result["request_id"], "bytes": len(result["images"][0]["content"])}))
'''


def _env(stack: ApiStack, key: str, run_host: str) -> dict[str, str]:
    return {"FAL_KEY": key, "FAL_RUN_HOST": run_host, "FAL_QUEUE_RUN_HOST": f"{stack.host}/queue"}


def test_fal_client_realtime_frames_burst_bad_input_and_wrong_key(api_stack: ApiStack, tmp_path: Path) -> None:
    key = api_stack.make_key("rt-user")
    out = run_fal(api_stack, tmp_path, SCRIPT, _env(api_stack, key, f"{api_stack.host}/run"), APP,
                  json.dumps(tiny_input()))

    sizes = [f["size"] for f in out["frames"]]
    assert sizes == [[64, 64], [128, 64], [64, 96]]
    assert [(f["width"], f["height"]) for f in out["frames"]] == [(64, 64), (128, 64), (64, 96)]
    assert [f["request_id"] for f in out["frames"]] == ["frame-0", "frame-1", "frame-2"]
    assert [f["format"] for f in out["frames"]] == ["JPEG", "JPEG", "PNG"]
    assert [f["content_type"] for f in out["frames"]] == ["image/jpeg", "image/jpeg", "image/png"]
    assert [f["seed"] for f in out["frames"]] == [10, 11, 12]
    assert all(f["nsfw"] == [False] and f["timings"]["inference"] > 0 and f["count"] == 1 for f in out["frames"])

    burst = out["burst"]
    assert burst[-2:] == ["burst-18", "burst-19"], burst  # the newest frames are answered
    assert len(burst) < 20, burst  # older ones were dropped while the pool rendered
    numbers = [int(r.split("-")[1]) for r in burst]
    assert numbers == sorted(numbers)

    bad = out["bad"]
    assert bad is not None and bad["error"] == "invalid_input" and bad["payload"]["field"] == "num_inference_steps"
    assert bad["reason"].startswith("num_inference_steps: ") and bad["payload"]["request_id"] == "bad-1"
    assert out["extra"]["field"] == "wrong_field"
    assert out["after_bad"]["request_id"] == "good-after-bad" and out["after_bad"]["size"] == [64, 64]

    assert out["wrong_key"]["error"] == "CONNECTION_CLOSED"
    assert "4001" in out["wrong_key"]["reason"] and "invalid or revoked API key" in out["wrong_key"]["reason"]

    # accounted per owner in the ledger (at close): 3 + burst + 1 frames, GPU seconds; no job rows
    expected = 3 + len(burst) + 1
    for _ in range(100):  # bounded: the API records a connection's usage just after it closed
        rows = api_stack.sql("SELECT source, frames, gpu_seconds FROM usage WHERE owner = 'rt-user'")
        if rows and rows[0][1] >= expected:
            break
        time.sleep(0.1)
    assert len(rows) == 1 and rows[0][0] == "realtime"
    assert rows[0][1] == expected and rows[0][2] > 0
    assert api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'rt-user'") == [(0,)]


def test_fal_client_realtime_at_the_root(api_stack: ApiStack, tmp_path: Path) -> None:
    key = api_stack.make_key("rt-root")
    out = run_fal(api_stack, tmp_path, ROOT_SCRIPT, _env(api_stack, key, api_stack.host), APP,
                  json.dumps(tiny_input()))
    assert out["request_id"] == "at-the-root" and out["bytes"] > 100


def _token(stack: ApiStack, key: str, apps: list[str] | None = None, seconds: int = 120) -> httpx.Response:
    with stack.client(key) as c:
        return c.post("/tokens/", json={"allowed_apps": apps or ["fast-lcm-diffusion"], "token_expiration": seconds})


def _socket(stack: ApiStack, query: str = "", key: str | None = None) -> Any:
    headers = {"Authorization": f"Key {key}"} if key else None
    url = f"wss://{stack.host}/run/{APP}/realtime{query}"
    return connect(url, ssl=stack.ssl_context, additional_headers=headers, open_timeout=30)


def _closed(ws: Any) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=30)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


def test_token_opens_the_socket_for_its_owner_only(api_stack: ApiStack) -> None:
    alice, bob = api_stack.make_key("rt-alice"), api_stack.make_key("rt-bob")
    reply = _token(api_stack, alice)
    assert reply.status_code == 200, reply.text
    token = reply.json()
    assert isinstance(token, str)

    with _socket(api_stack, f"?fal_jwt_token={token}&max_buffering=1") as ws:  # a token alone: alice's socket
        ws.send(msgpack.packb(tiny_input(request_id="by-token")))
        result = msgpack.unpackb(ws.recv(timeout=60))
        assert result["request_id"] == "by-token" and result["images"][0]["content"][:2] == b"\xff\xd8"

    with _socket(api_stack, f"?fal_jwt_token={token}", key=bob) as ws:  # bob's key with alice's token
        code, reason = _closed(ws)
    assert code == 4003 and "another owner" in reason

    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with _socket(api_stack, f"?fal_jwt_token={forged}") as ws:
        code, reason = _closed(ws)
    assert code == 4001 and "bad signature" in reason

    assert _token(api_stack, alice, apps=["fal-ai/some-other-app"]).status_code == 422
    too_long = _token(api_stack, alice, seconds=10**6)
    assert too_long.status_code == 422 and "token_expiration" in too_long.text
    with api_stack.client() as c:
        assert c.post("/tokens/", json={"allowed_apps": ["fast-lcm-diffusion"]}).status_code == 401


def test_revoked_key_and_connection_limit_close_the_socket(api_stack: ApiStack) -> None:
    key = api_stack.make_key("rt-limited", "--max-in-flight", "1")
    with _socket(api_stack, key=key) as first:
        first.send(msgpack.packb(tiny_input(request_id="one")))
        assert msgpack.unpackb(first.recv(timeout=60))["request_id"] == "one"
        with _socket(api_stack, key=key) as second:
            code, reason = _closed(second)
        assert code == 4029 and "limit is 1" in reason
        token = _token(api_stack, key).json()

        done = api_stack.farm("keys", "revoke", key.split(":")[0])
        assert done.returncode == 0, done.stderr
        code, reason = _closed(first)  # the open socket is closed: its key was revoked
    assert code == 4001 and "revoked" in reason
    with _socket(api_stack, f"?fal_jwt_token={token}") as ws:  # and the token it made opens nothing
        code, reason = _closed(ws)
    assert code == 4001 and "revoked" in reason


def test_bad_max_buffering_closes_with_the_field(api_stack: ApiStack) -> None:
    key = api_stack.make_key("rt-buffering")
    with _socket(api_stack, "?max_buffering=0", key=key) as ws:
        code, reason = _closed(ws)
    assert code == 4022 and reason.startswith("max_buffering:")


def test_farm_client_realtime_sync_and_async(api_stack: ApiStack) -> None:
    import asyncio
    import io

    from PIL import Image

    from farm.client import AsyncClient, GenerateInput, RealtimeError, SyncClient

    key = api_stack.make_key("rt-client")
    with SyncClient(api_stack.base_url, key=key, verify=api_stack.ssl_context) as farm:
        with farm.realtime(max_buffering=1) as conn:
            conn.send(GenerateInput(**tiny_input(seed=3, request_id="sync-1")))
            result = conn.recv(timeout=60)
            assert result is not None and result["request_id"] == "sync-1" and result["seed"] == 3
            assert Image.open(io.BytesIO(result["images"][0]["content"])).size == (64, 64)
            conn.send(tiny_input(guidance_scale=-1))
            with pytest.raises(RealtimeError) as bad:
                conn.recv(timeout=60)
            assert bad.value.field == "guidance_scale" and bad.value.error == "invalid_input"
        with farm.realtime(use_token=True) as conn:  # the JavaScript clients' way: a token in the URL
            conn.send(tiny_input(request_id="sync-token"))
            assert (conn.recv(timeout=60) or {}).get("request_id") == "sync-token"
    with SyncClient(api_stack.base_url, key="0123456789abcdef:nope", verify=api_stack.ssl_context) as farm:
        with farm.realtime() as conn, pytest.raises(RealtimeError) as refused:
            conn.recv(timeout=60)
        assert refused.value.code == 4001 and refused.value.error == "closed"

    async def run_async() -> list[str]:
        async with AsyncClient(api_stack.base_url, key=key, verify=api_stack.ssl_context) as farm:
            got = []
            for use_token in (False, True):
                async with farm.realtime(use_token=use_token) as conn:
                    await conn.send(tiny_input(request_id=f"async-{use_token}"))
                    result = await conn.recv(timeout=60)
                    assert result is not None
                    got.append(result["request_id"])
            return got

    assert asyncio.run(run_async()) == ["async-False", "async-True"]


def test_frames_go_ahead_of_a_queued_job(api_stack: ApiStack) -> None:
    """A frame sent while a long job renders is answered before that job ends (it waits one batch at most)."""
    key = api_stack.make_key("rt-priority")
    with _socket(api_stack, key=key) as ws:  # the worker's first render of a shape can be slow: not this one
        ws.send(msgpack.packb(tiny_input(request_id="warm-up")))
        assert isinstance(ws.recv(timeout=120), bytes)
    with api_stack.client(key) as c:
        # four batches of 16 (the tiny model's batch size): each frame waits for one batch at most
        big = c.post(f"/{APP}", json=tiny_input(num_images=64, sync_mode=False))
        assert big.status_code == 200, big.text
        job = big.json()["request_id"]
        for _ in range(600):  # bounded: until the job renders
            if c.get(f"/{APP}/requests/{job}/status").json()["status"] == "IN_PROGRESS":
                break
            time.sleep(0.05)
        with _socket(api_stack, key=key) as ws:
            for i in range(3):
                ws.send(msgpack.packb(tiny_input(request_id=f"ahead-{i}")))
                answer = ws.recv(timeout=60)
                assert isinstance(answer, bytes), answer
                assert msgpack.unpackb(answer)["request_id"] == f"ahead-{i}"
        (done,) = api_stack.sql("SELECT images_done FROM jobs WHERE id = :id", id=job)
        assert done[0] < 64  # the frames did not wait for the job (three frames: three batches at most)
        final = c.get(f"/{APP}/requests/{job}/status")
        for _ in range(1200):
            if final.json()["status"] == "COMPLETED":
                break
            time.sleep(0.05)
            final = c.get(f"/{APP}/requests/{job}/status")
        assert final.json()["status"] == "COMPLETED" and final.json().get("error") is None
