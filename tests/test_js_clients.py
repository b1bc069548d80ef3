"""fal's JavaScript clients from npm, unmodified, under Node against the live API over TLS.

``@fal-ai/client`` 1.x through fal's proxy convention (``proxyUrl``, ``x-fal-target-url``);
``@fal-ai/serverless-client`` 0.15 through a ``requestMiddleware``. Both open the realtime socket
at ``wss://fal.run``, which the script points at the farm. The script is ``tests/js/clients.mjs``.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.api_stack import APP, ApiStack, idle_input, tiny_input
from tests.node import node_project, run_node

PNG, JPEG = [0x89, 0x50, 0x4E, 0x47], [0xFF, 0xD8, 0xFF]


@pytest.fixture(scope="module")
def js() -> Path:
    return node_project()


def _sketch() -> str:
    """A 64x96 PNG, base64: the sketch the scripts send as image bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 96), (30, 30, 160)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _env(api_stack: ApiStack, key: str) -> dict[str, str]:
    return {"FARM_URL": api_stack.base_url, "FAL_KEY": key, "APP": APP, "NODE_EXTRA_CA_CERTS": str(api_stack.ca_path),
            "TINY": json.dumps(tiny_input()), "IDLE": json.dumps(idle_input()), "SKETCH": _sketch()}  # fmt: skip


def _check_images(output: Any, count: int = 1) -> None:
    assert isinstance(output, dict) and "error" not in output, output
    assert len(output["images"]) == count, output
    for image in output["images"]:
        assert image["width"] == 64 and image["height"] == 64 and image["url"], image


def _check_queue_calls(out: dict[str, Any], owner: str, api_stack: ApiStack) -> None:
    sub = out["subscribe"]
    assert "error" not in sub, sub
    _check_images(sub["result"])
    assert sub["enqueued"] and sub["updates"][-1] == "COMPLETED", sub
    queue = out["queue"]
    assert "error" not in queue, queue
    assert queue["seen"][-1] == "COMPLETED" and queue["logs"], queue
    _check_images(queue["result"], 2)
    rows = api_stack.sql("SELECT owner, status FROM jobs WHERE id = :id", id=queue["requestId"])
    assert [tuple(r) for r in rows] == [(owner, "COMPLETED")]
    assert out["cancel"] == {"before": "IN_QUEUE", "after": "COMPLETED", "error_type": "cancelled"}, out["cancel"]
    _check_images(out["run"])
    stream = out["stream"]
    assert "error" not in stream, stream
    _check_images(stream["done"])
    assert stream["events"], stream
    invalid = out["invalid"]
    assert invalid["status"] == 422, invalid
    assert invalid["body"]["detail"][0]["loc"] == ["body", "num_inference_steps"], invalid


def _check_upload(url: Any, api_stack: ApiStack, key: str) -> None:
    assert isinstance(url, str) and url.startswith(api_stack.base_url + "/storage/files/"), url
    with api_stack.client(key) as c:
        got = c.get(url)
        assert got.status_code == 200 and got.content == bytes([0, 1, 2, 3, 250, 251, 252, 253])
    with api_stack.client(api_stack.make_key("js-stranger")) as c:
        assert c.get(url).status_code == 404


def test_fal_client_through_proxy_url(api_stack: ApiStack, js: Path) -> None:
    key = api_stack.make_key("js-client")
    out = run_node(["clients.mjs", "client"], _env(api_stack, key))
    _check_queue_calls(out, "js-client", api_stack)
    _check_upload(out["upload"], api_stack, key)
    token = out["token"]
    assert isinstance(token, str) and token.count(".") >= 1, token  # a JSON string, as fal's REST API gives
    # image-to-image through the queue at the subpath, status and result at the app's URLs
    i2i = out["imageToImage"]
    assert "error" not in i2i and i2i["seen"][-1] == "COMPLETED", i2i
    (image,) = i2i["result"]["images"]
    assert (image["width"], image["height"]) == (64, 96) and i2i["result"]["seed"] == 16, i2i  # the input's size
    rows = api_stack.sql("SELECT owner, status FROM jobs WHERE id = :id", id=i2i["requestId"])
    assert [tuple(r) for r in rows] == [("js-client", "COMPLETED")]


def test_serverless_client_through_request_middleware(api_stack: ApiStack, js: Path) -> None:
    key = api_stack.make_key("js-serverless")
    out = run_node(["clients.mjs", "serverless"], _env(api_stack, key))
    _check_queue_calls(out, "js-serverless", api_stack)
    _check_upload(out["upload"], api_stack, key)


@pytest.mark.parametrize("mode", ["realtime-client", "realtime-serverless"])
def test_realtime_from_both_clients(api_stack: ApiStack, js: Path, mode: str) -> None:
    key = api_stack.make_key(f"js-{mode}")
    out_all = run_node(["--experimental-websocket", "clients.mjs", mode], _env(api_stack, key))
    out = out_all["realtime"]
    assert "error" not in out, out
    assert out["sockets"] == ["closed"], out  # one socket for the whole session, closed by close()
    assert [e["status"] for e in out["afterClose"]] in ([], [1005]), out  # the echo of a code-less close
    results, errors = out["results"], out["errors"]
    assert [r["request_id"] for r in results] == ["js-0", "js-1", "js-2", "js-after-bad"], out
    for result, (width, height) in zip(results, [(64, 64), (96, 64), (64, 128), (64, 64)], strict=True):
        (image,) = result["images"]
        assert (image["width"], image["height"]) == (width, height), result
        assert image["size"] > 100 and image["head"][:3] in (PNG[:3], JPEG), result
    assert [r["seed"] for r in results] == [20, 21, 22, 30]
    (bad,) = errors
    assert bad["body"]["type"] == "x-fal-error" and "num_inference_steps" in json.dumps(bad["body"]), bad
    if mode == "realtime-client":  # fal's sketch demo: image_bytes at image-to-image
        sketch = out_all["sketch"]
        assert "error" not in sketch, sketch
        # three strokes within the throttle: the first and the latest are sent (fal's leading throttle)
        assert 1 <= len(sketch["results"]) <= 2 and sketch["results"][-1]["prompt"].endswith(" 2"), sketch
        for drawn in sketch["results"]:
            (image,) = drawn["images"]
            assert (image["width"], image["height"]) == (64, 96) and drawn["seed"] == 6252023, drawn
            assert image["size"] > 100 and image["head"][:3] in (PNG[:3], JPEG), drawn
        (bad,) = sketch["errors"][:1]
        assert bad["body"]["type"] == "x-fal-error" and bad["body"]["field"] == "image_bytes", bad
        assert api_stack.sql("SELECT count(*) FROM jobs WHERE owner = :o", o=f"js-{mode}") == [(0,)]


def test_proxy_refuses_what_it_cannot_serve(api_stack: ApiStack) -> None:
    key = api_stack.make_key("js-proxy")
    cases = [
        (None, 400, "missing the x-fal-target-url header"),
        ("https://example.com/fal-ai/fast-lcm-diffusion", 412, "one of fal's hosts"),
        ("http://queue.fal.run/fal-ai/fast-lcm-diffusion", 412, "https://"),
        ("https://api.fal.ai/v1/models", 404, "lcm-farm serves"),
        ("https://queue.fal.run/fal-ai/../storage/upload/initiate", 400, "'..'"),
    ]
    with api_stack.client(key) as c:
        for target, status, words in cases:
            headers = {} if target is None else {"x-fal-target-url": target}
            reply = c.post("/fal/proxy", json=tiny_input(), headers=headers)
            assert reply.status_code == status and words in reply.json()["detail"], (target, reply.text)
        # a proxied request is the request itself: the caller's key still decides
        proxied = {"x-fal-target-url": f"https://queue.fal.run/{APP}"}
        with api_stack.client() as anonymous:
            assert anonymous.post("/api/fal/proxy", json=tiny_input(), headers=proxied).status_code == 401
        assert c.post("/api/fal/proxy", json=tiny_input(), headers=proxied).json()["request_id"]
