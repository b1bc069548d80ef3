"""Realtime image-to-image and inpainting, as fal's sketch demo sends it: the unmodified
``fal_client.realtime`` at ``fal-ai/fast-lcm-diffusion/image-to-image`` and ``/inpainting`` over TLS
against the session's live API and tiny-model worker (``tests/api_stack.py``), frames carrying raw
``image_bytes`` / ``mask_bytes`` (msgpack bin), or ``image_url`` as a data URI (older demos).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.api_stack import APP, ApiStack, tiny_input
from tests.test_fal_client import run_fal
from tests.test_realtime import _env, _stored_objects

SCRIPT = r'''
import base64, io, json, sys
import fal_client
from PIL import Image

APP, TINY = sys.argv[1], json.loads(sys.argv[2])
TINY.pop("image_size")  # no image_size: the input image's size


def png(size, colour, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def outcome(conn, frame):
    conn.send(frame)
    try:
        result = conn.recv()
    except fal_client.client.RealtimeError as exc:
        return {"error": exc.error, "reason": exc.reason, "field": exc.payload.get("field")}
    image = result["images"][0]
    picture = Image.open(io.BytesIO(image["content"]))
    return {"size": list(picture.size), "seed": result["seed"], "content": base64.b64encode(image["content"]).decode()}


sketch = png((64, 96), (200, 40, 40))
frame = dict(TINY, image_bytes=sketch, num_inference_steps=4, strength=0.5, seed=42)
out = {}
with fal_client.realtime(f"{APP}/image-to-image", use_jwt=False) as conn:
    out["bytes"] = outcome(conn, frame)
    data_uri = "data:image/png;base64," + base64.b64encode(sketch).decode()
    out["data_uri"] = outcome(conn, dict(TINY, image_url=data_uri, num_inference_steps=4, strength=0.5, seed=42))
    out["not_image"] = outcome(conn, dict(frame, image_bytes=b"this is no image"))
    out["missing"] = outcome(conn, dict(TINY, seed=1))
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")  # 25 Mpx in a small file: refused from its header
    out["bomb"] = outcome(conn, dict(frame, image_bytes=buf.getvalue()))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    out["gif"] = outcome(conn, dict(frame, image_bytes=buf.getvalue()))
    out["not_bytes"] = outcome(conn, dict(frame, image_bytes="a string"))
    out["url"] = outcome(conn, dict(TINY, image_url="https://example.com/sketch.png"))
    out["after_bad"] = outcome(conn, dict(frame, seed=7))
with fal_client.realtime(f"{APP}/inpainting", use_jwt=False) as conn:
    mask = png((64, 96), 0, "L")
    out["inpaint"] = outcome(conn, dict(frame, mask_bytes=mask))
    out["bad_mask"] = outcome(conn, dict(frame, mask_bytes=png((32, 32), 255, "L")))
print(json.dumps(out))
'''


def test_fal_client_realtime_image_to_image_and_inpainting_with_image_bytes(api_stack: ApiStack,
                                                                            tmp_path: Path) -> None:
    key = api_stack.make_key("rt-sketch")
    objects_before = _stored_objects(api_stack)
    out = run_fal(api_stack, tmp_path, SCRIPT, _env(api_stack, key, f"{api_stack.host}/run"),
                  "fal-ai/fast-lcm-diffusion", json.dumps(tiny_input()))

    assert out["bytes"].get("size") == [64, 96], out["bytes"]  # the input's size; the seed kept
    assert out["bytes"]["seed"] == 42
    # the same image as a data URI (older demos) renders the same image: same seed, same input
    assert out["data_uri"]["content"] == out["bytes"]["content"]
    assert out["after_bad"]["size"] == [64, 96] and out["after_bad"]["seed"] == 7  # the socket goes on
    assert out["after_bad"]["content"] != out["bytes"]["content"]  # another seed, another image

    bad = out["not_image"]
    assert bad["error"] == "invalid_input" and bad["field"] == "image_bytes", bad
    assert bad["reason"].startswith("image_bytes: ") and "not an image" in bad["reason"]
    assert out["missing"]["field"] == "image_bytes" and "required" in out["missing"]["reason"]
    assert out["bomb"]["field"] == "image_bytes" and "5000x5000" in out["bomb"]["reason"], out["bomb"]
    assert "FARM_MAX_INPUT_PIXELS" in out["bomb"]["reason"]
    assert out["gif"]["field"] == "image_bytes" and "GIF is not supported" in out["gif"]["reason"], out["gif"]
    assert out["not_bytes"]["field"] == "image_bytes" and "bytes" in out["not_bytes"]["reason"], out["not_bytes"]
    assert out["url"]["field"] == "image_url" and "not an https:// URL" in out["url"]["reason"], out["url"]

    assert out["inpaint"].get("size") == [64, 96] and out["inpaint"]["seed"] == 42, out["inpaint"]
    # an all-black mask keeps every pixel: the result is not the image-to-image render of the same frame
    assert out["inpaint"]["content"] != out["bytes"]["content"]
    assert out["bad_mask"]["field"] == "mask_bytes" and "same size" in out["bad_mask"]["reason"], out["bad_mask"]

    # nothing of a frame is stored, no job row written
    assert api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'rt-sketch'") == [(0,)]
    new_objects = _stored_objects(api_stack) - objects_before
    assert not any(k.startswith("rt-sketch/") for k in new_objects), sorted(new_objects)


def _png(size: tuple[int, int], colour: int | tuple[int, int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def test_endpoint_sockets_at_the_root_with_a_token_for_the_endpoint(api_stack: ApiStack) -> None:
    """The queue host's paths (no ``/run``), opened with a token asked for the endpoint's realtime path (what
    fal-js's ``tokenProvider`` gets): inpainting with ``mask_bytes`` and image-to-image with an ``image_url``
    data URI (older demos); an unknown endpoint's socket is not served."""
    key = api_stack.make_key("rt-root-sketch")
    with api_stack.client(key) as c:
        reply = c.post("/tokens/", json={"allowed_apps": [f"{APP}/inpainting/realtime"], "token_expiration": 60})
    assert reply.status_code == 200, reply.text
    token = reply.json()
    frame = dict(tiny_input(), num_inference_steps=2, seed=3)
    del frame["image_size"]
    got = {}
    sketch = "data:image/png;base64," + base64.b64encode(_png((96, 64), (9, 9, 99))).decode()
    cases: list[tuple[str, dict[str, Any]]] = [
        ("inpainting", {"image_bytes": _png((64, 64), (9, 99, 9)), "mask_bytes": _png((64, 64), 255, "L")}),
        ("image-to-image", {"image_url": sketch}),
    ]
    for endpoint, extra in cases:
        url = f"wss://{api_stack.host}/{APP}/{endpoint}/realtime?fal_jwt_token={token}"
        with connect(url, ssl=api_stack.ssl_context, open_timeout=30) as ws:
            ws.send(msgpack.packb({**frame, **extra, "request_id": endpoint}, use_bin_type=True))
            reply_frame = ws.recv(timeout=60)
        assert isinstance(reply_frame, bytes), reply_frame
        result = msgpack.unpackb(reply_frame, raw=False)
        got[endpoint] = (result["request_id"], Image.open(io.BytesIO(result["images"][0]["content"])).size)
    assert got == {"inpainting": ("inpainting", (64, 64)), "image-to-image": ("image-to-image", (96, 64))}
    url = f"wss://{api_stack.host}/{APP}/upscale/realtime?fal_jwt_token={token}"
    with pytest.raises((InvalidStatus, ConnectionClosed)), connect(url, ssl=api_stack.ssl_context,
                                                                    open_timeout=30) as ws:
        ws.recv(timeout=30)


def test_farm_client_realtime_at_the_endpoint(api_stack: ApiStack) -> None:
    """``farm.client`` with the endpoint as its app: a token for it, a sketch frame answered at its size,
    a bad one raising RealtimeError naming ``image_bytes``."""
    from farm.client import RealtimeError, SyncClient

    key = api_stack.make_key("rt-farm-client-sketch")
    frame = dict(tiny_input(), num_inference_steps=2, seed=5, image_bytes=_png((72, 64), (200, 200, 20)))
    del frame["image_size"]
    farm = SyncClient(api_stack.base_url, key=key, app=f"{APP}/image-to-image", verify=api_stack.ssl_context)
    with farm, farm.realtime(use_token=True) as conn:
        conn.send(frame)
        result = conn.recv(timeout=60)
        conn.send({**frame, "image_bytes": b"GIF89a no"})
        with pytest.raises(RealtimeError) as refused:
            conn.recv(timeout=60)
    assert result is not None and result["seed"] == 5
    assert Image.open(io.BytesIO(result["images"][0]["content"])).size == (72, 64)
    assert refused.value.field == "image_bytes", refused.value
