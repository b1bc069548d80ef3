"""Realtime over websockets against the live API over TLS (``tests/api_stack.py``: ``farm api`` and a
tiny-model ``farm worker``).

The unmodified ``fal_client.realtime(app, use_jwt=False)`` runs in its own process (it reads
``FAL_RUN_HOST`` when imported); the token cases use the ``websockets`` client directly, since
``fal_client``'s own token request goes to fal's REST host, which cannot be redirected.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from sqlalchemy import create_engine, text
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.api_stack import APP, ApiStack, tiny_input
from tests.services import free_port
from tests.test_fal_client import run_fal
from tests.workers import WorkerProcess

HOLD = "farm/hold"  # the scheduling STAND-IN (models/hold.py): holds FARM_HOLD_MS per image

SCRIPT = r'''
import contextlib, io, json, ssl, sys, time
import fal_client
import websockets.exceptions
from PIL import Image

APP, TINY = sys.argv[1], json.loads(sys.argv[2])
out = {"reconnects": 0}


@contextlib.contextmanager
def realtime(**options):
    """fal_client.realtime, opened again once if the connection breaks before it is open: seen once in
    CI, an ssl 'internal error' while the client sent its upgrade request, which the API never saw;
    a connection that opened and then fails is not retried (that is what the blocks below test)."""
    for attempt in range(2):
        opener = fal_client.realtime(APP, use_jwt=False, **options)
        try:
            conn = opener.__enter__()
        except (ssl.SSLError, websockets.exceptions.ConnectionClosedError, ConnectionError):
            if attempt:
                raise
            out["reconnects"] += 1
            continue
        break
    try:
        yield conn
    except BaseException:
        if not opener.__exit__(*sys.exc_info()):
            raise
    else:
        opener.__exit__(None, None, None)

def decoded(result):
    image = result["images"][0]
    picture = Image.open(io.BytesIO(image["content"]))
    picture.load()
    return {"request_id": result.get("request_id"), "size": list(picture.size), "format": picture.format,
            "width": image["width"], "height": image["height"], "content_type": image["content_type"],
            "seed": result["seed"], "nsfw": result["has_nsfw_concepts"], "timings": result["timings"],
            "count": len(result["images"])}

# several frames on one connection, each answered with its own size
with realtime() as conn:
    frames = []
    for i, (w, h) in enumerate([(64, 64), (128, 64), (64, 96)]):
        conn.send(dict(TINY, image_size={"width": w, "height": h}, seed=10 + i, request_id=f"frame-{i}",
                       format="png" if i == 2 else "jpeg"))
        frames.append(decoded(conn.recv()))
    out["frames"] = frames

# a burst faster than the render: the newest frames win
with realtime(max_buffering=2) as conn:
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
with realtime() as conn:
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
        try:
            conn.send(TINY)
        except websockets.exceptions.ConnectionClosed:
            pass  # the refusal came first: recv() says why
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


def _stored_objects(stack: ApiStack) -> set[str]:
    """Every object in the stack's bucket (its storage, as the farm lists it)."""
    from farm.config import Settings
    from farm.storage import make_storage

    env = stack.env
    settings = Settings(storage_url=env["FARM_STORAGE_URL"], s3_endpoint=env["FARM_S3_ENDPOINT"],
                        s3_access_key=env["FARM_S3_ACCESS_KEY"], s3_secret_key=env["FARM_S3_SECRET_KEY"])  # fmt: skip
    return set(make_storage(settings).list(""))


def test_fal_client_realtime_frames_burst_bad_input_and_wrong_key(api_stack: ApiStack, tmp_path: Path) -> None:
    key = api_stack.make_key("rt-user")
    objects_before = _stored_objects(api_stack)
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

    assert out["reconnects"] <= 1, out["reconnects"]  # a transport flake once, not a pattern
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
    # and no object stored per frame: whatever appeared in the bucket meanwhile is an image of a job row
    # (another test's job still rendering), none of this owner's
    new_objects = _stored_objects(api_stack) - objects_before
    assert not any(k.startswith("rt-user/") for k in new_objects), sorted(new_objects)
    job_images = {row[0] for row in api_stack.sql("SELECT object_key FROM images")}
    assert new_objects <= job_images, sorted(new_objects - job_images)


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


def test_a_frame_waits_at_most_one_batch_of_a_rendering_job(api_stack: ApiStack) -> None:
    """A frame sent while a big job renders is answered after at most the batch being rendered.

    A ``farm/hold`` worker (the STAND-IN: holds FARM_HOLD_MS per image) pins the batch time: batches
    of ``batch`` images, ``batch`` × 120 ms each. Each frame is sent just after a batch of the job was
    stored (so the next one is rendering); while it waits, at most ``batch`` more images of the job may
    be stored (image rows are written with images_done; their times are compared with when the
    frame was sent and answered, so a slow read of the ledger after the answer counts nothing more).
    """
    batch, images = 4, 32
    worker = WorkerProcess({**api_stack.env, "FARM_HOLD_MS": "120", "FARM_BATCH_SIZE": str(batch)}, model=HOLD,
                           name="hold@rt-priority.test")  # fmt: skip
    key = api_stack.make_key("rt-priority")
    engine = create_engine(api_stack.db_url)

    def stored(job: str) -> list[datetime]:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT created_at FROM images WHERE job_id = :id"), {"id": job}).all()
        return [row[0] for row in rows]

    try:
        worker.start()
        with api_stack.client(key) as c, _socket(api_stack, key=key) as ws:
            ws.send(msgpack.packb(tiny_input(model_name=HOLD, request_id="warm-up")))
            assert msgpack.unpackb(ws.recv(timeout=60))["request_id"] == "warm-up"
            big = c.post(f"/{APP}", json=tiny_input(model_name=HOLD, num_images=images, sync_mode=False))
            assert big.status_code == 200, big.text
            job = big.json()["request_id"]
            for i in range(3):
                before = now = len(stored(job))
                for _ in range(3000):  # bounded (60 s at least): until the next batch of the job is stored
                    now = len(stored(job))
                    if now > before:
                        break
                    time.sleep(0.01)
                sent = datetime.now(UTC)
                ws.send(msgpack.packb(tiny_input(model_name=HOLD, request_id=f"ahead-{i}")))
                answer = ws.recv(timeout=60)
                answered = datetime.now(UTC)
                assert before < now < images, f"frame {i}: the job was not rendering ({now} of {images} stored)"
                assert isinstance(answer, bytes), answer
                assert msgpack.unpackb(answer)["request_id"] == f"ahead-{i}"
                meanwhile = [t for t in stored(job) if sent < t <= answered]
                assert len(meanwhile) <= batch, f"frame {i} waited while {len(meanwhile)} images were stored"
            for _ in range(1200):  # bounded (60 s at least): the job itself completes
                final = c.get(f"/{APP}/requests/{job}/status").json()
                if final["status"] == "COMPLETED":
                    break
                time.sleep(0.05)
        assert final["status"] == "COMPLETED" and final.get("error") is None
        assert len(stored(job)) == images
    finally:
        engine.dispose()
        worker.stop()


def test_spent_quota_closes_the_socket_and_refuses_new_ones(api_stack: ApiStack, tmp_path: Path) -> None:
    """An owner over its daily GPU-second quota: an open socket is closed, a new one refused (4029).

    A second ``farm api`` on the same servers gives the owner a tiny quota and checks it every 0.2 s
    (``FARM_REALTIME_USAGE_SECONDS``, the interval at which usage is recorded and the quota read).
    """
    key = api_stack.make_key("rt-quota")
    env = {**api_stack.env, "FARM_OWNER_DAILY_GPU_SECONDS": json.dumps({"rt-quota": 1e-6}),
           "FARM_REALTIME_USAGE_SECONDS": "0.2"}  # fmt: skip
    capped = ApiStack(env=env, db_url=api_stack.db_url, bucket=api_stack.bucket, port=free_port(),
                      ca_path=api_stack.ca_path, log_path=tmp_path / "api.log", worker=api_stack.worker)  # fmt: skip
    try:
        capped.start()
        with _socket(capped, key=key) as ws:  # nothing used yet: the socket opens and renders
            ws.send(msgpack.packb(tiny_input(request_id="within-quota")))
            assert msgpack.unpackb(ws.recv(timeout=60))["request_id"] == "within-quota"
            code, reason = _closed(ws)  # its GPU seconds are recorded and spend the quota: closed
        assert code == 4029 and reason.startswith("daily GPU-second quota spent"), (code, reason)
        with _socket(capped, key=key) as ws:  # a new socket is refused at once
            code, reason = _closed(ws)
        assert code == 4029 and reason.startswith("daily GPU-second quota spent"), (code, reason)
        rows = capped.sql("SELECT source, frames, gpu_seconds FROM usage WHERE owner = 'rt-quota'")
        assert len(rows) == 1 and rows[0][:2] == ("realtime", 1) and rows[0][2] > 1e-6
        with _socket(api_stack, key=key) as ws:  # the shared API has no quota for the owner
            ws.send(msgpack.packb(tiny_input(request_id="no-quota")))
            assert msgpack.unpackb(ws.recv(timeout=60))["request_id"] == "no-quota"
    finally:
        capped.stop()


def test_without_redis_the_socket_closes_1013(tmp_path: Path) -> None:
    """The realtime lane is Redis: a farm with the in-process broker refuses the socket, saying so."""
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from farm.api.app import create_app
    from farm.config import Settings

    settings = Settings(data_dir=tmp_path, auth_enabled=False, broker_url=None)
    client = TestClient(create_app(settings))  # no lifespan: the refusal needs no ledger
    with client.websocket_connect(f"/run/{APP}/realtime") as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_bytes()
    assert closed.value.code == 1013
    assert closed.value.reason == "realtime is unavailable: it needs a Redis broker (FARM_BROKER_URL=redis://…) " \
        "and this farm has none"
