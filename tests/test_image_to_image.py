"""Image-to-image and inpainting through every face of a live farm (issue 21): the unmodified ``fal_client``
over TLS at the app's subpaths, the HTTP API's refusals of bad images, ``farm generate --image`` and a plain
Celery ``send_task("farm.generate")`` with an ``image_url``. The tiny model renders on the CPU; the images are
real PNGs made here with PIL, the bad ones real bad files (a GIF, a PNG header claiming 100000x100000 pixels).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.api_stack import APP, ApiStack, idle_input, tiny_input
from tests.test_fal_client import run_fal


def png(size: tuple[int, int] = (96, 80), colour: tuple[int, int, int] = (200, 40, 40), mode: str = "RGB",
        fmt: str = "PNG") -> bytes:
    """A real image file: a gradient, so that image-to-image has something to keep."""
    image = Image.new(mode, size, colour if mode == "RGB" else 255)
    for x in range(size[0]):
        image.putpixel((x, x * size[1] // size[0]), (0, 0, 0) if mode == "RGB" else 0)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels over a few bytes of data."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def i2i(**extra: Any) -> dict[str, Any]:
    """An image-to-image request of the tiny model with no image_size: the output takes the input's size."""
    fields = tiny_input(**{"image_url": data_uri(png()), "strength": 0.5, **extra})
    fields.pop("image_size")
    return fields


SCRIPT = r'''
import json, sys, time
import fal_client

APP, I2I, INPAINT, IDLE, UPLOADED = sys.argv[1], *map(json.loads, sys.argv[2:6])
out = {}

# submit to the subpath; status (with and without logs) and result at the app's URLs
handle = fal_client.submit(APP + "/image-to-image", arguments=dict(I2I, seed=11))
plain = fal_client.status(APP + "/image-to-image", handle.request_id)
while True:
    status = fal_client.status(APP + "/image-to-image", handle.request_id, with_logs=True)
    if isinstance(status, fal_client.Completed):
        break
    time.sleep(0.05)
out["submit"] = {"plain_logs": getattr(plain, "logs", None), "logs": status.logs, "error": status.error,
                 "result": fal_client.result(APP + "/image-to-image", handle.request_id)}

# run and stream at the subpaths
out["run"] = fal_client.run(APP + "/inpainting", arguments=dict(INPAINT, seed=12))
out["stream"] = list(fal_client.stream(APP + "/image-to-image", arguments=dict(I2I, seed=13)))
out["uploaded"] = fal_client.run(APP + "/image-to-image", arguments=dict(UPLOADED, seed=14))

# cancel one that no worker takes
queued = fal_client.submit(APP + "/image-to-image", arguments=IDLE)
fal_client.cancel(APP + "/image-to-image", queued.request_id)
after = fal_client.status(APP + "/image-to-image", queued.request_id)
out["cancel"] = {"after": type(after).__name__, "error_type": after.error_type}

# an unknown subpath
try:
    fal_client.submit(APP + "/outpainting", arguments=I2I)
except fal_client.client.FalClientHTTPError as exc:
    out["unknown"] = {"status_code": exc.status_code, "message": str(exc)}
print(json.dumps(out))
'''


def upload(stack: ApiStack, key: str, data: bytes, name: str = "source.png") -> str:
    """The farm's upload route (fal's initiate + PUT): the file's URL."""
    with stack.client(key) as client:
        started = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": name})
        assert started.status_code == 200, started.text
        target = started.json()
        stored = client.put(target["upload_url"], content=data, headers={"Content-Type": "image/png"})
        assert stored.status_code == 200, stored.text
        return str(target["file_url"])


def decoded(url: str) -> Image.Image:
    assert url.startswith("data:image/")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_fal_client_at_the_subpaths(api_stack: ApiStack, tmp_path: Path) -> None:
    key = api_stack.make_key("i2i-user")
    env = {"FAL_KEY": key, "FAL_RUN_HOST": f"{api_stack.host}/run", "FAL_QUEUE_RUN_HOST": f"{api_stack.host}/queue"}
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (0, 0, 48, 80))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    inpaint = dict(i2i(), mask_url=data_uri(buf.getvalue()), strength=1.0)
    uploaded = dict(i2i(), image_url=upload(api_stack, key, png((72, 104))))
    idle = idle_input(image_url=data_uri(png()))
    out = run_fal(api_stack, tmp_path, SCRIPT, env, APP, *(json.dumps(x) for x in (i2i(), inpaint, idle, uploaded)))

    submitted = out["submit"]
    assert submitted["error"] is None and submitted["plain_logs"] is None
    assert submitted["logs"] and submitted["logs"][-1]["message"] == "completed 1 image(s)"
    result = submitted["result"]
    assert result["seed"] == 11
    assert (result["images"][0]["width"], result["images"][0]["height"]) == (96, 80)  # the input's size
    assert decoded(result["images"][0]["url"]).size == (96, 80)

    run = out["run"]
    assert run["seed"] == 12 and decoded(run["images"][0]["url"]).size == (96, 80)
    painted = decoded(run["images"][0]["url"]).convert("RGB")
    pixel = painted.getpixel((80, 10))
    assert isinstance(pixel, tuple)
    # right half unmasked: the source's pixels back (JPEG output: a tolerance of 40 per channel)
    assert all(abs(a - b) <= 40 for a, b in zip(pixel, (200, 40, 40), strict=True))

    assert out["stream"][-1]["seed"] == 13 and decoded(out["stream"][-1]["images"][0]["url"]).size == (96, 80)
    assert out["uploaded"]["seed"] == 14 and decoded(out["uploaded"]["images"][0]["url"]).size == (72, 104)
    assert out["cancel"] == {"after": "Completed", "error_type": "cancelled"}
    assert out["unknown"]["status_code"] == 404 and f"{APP}/image-to-image" in out["unknown"]["message"]

    rows = api_stack.sql("SELECT input->>'image_url' FROM jobs WHERE owner = 'i2i-user'")
    assert rows and all(not r[0].startswith("data:") for r in rows)  # data URIs went to storage at submit


def test_bad_images_are_refused_naming_the_field(api_stack: ApiStack) -> None:
    key = api_stack.make_key("i2i-bad")
    other = upload(api_stack, api_stack.make_key("i2i-other"), png())
    gif = png(fmt="GIF")
    cases: list[tuple[dict[str, Any], str, str]] = [
        (i2i(image_url=data_uri(b"not an image at all")), "image_url", "is not an image"),
        (i2i(image_url=data_uri(gif, "image/gif")), "image_url", "GIF is not supported"),
        (i2i(image_url=data_uri(bomb_png())), "image_url", "pixels"),
        (i2i(image_url="/etc/passwd"), "image_url", "must be an https:// URL"),
        (i2i(image_url="https://127.0.0.1/x.png"), "image_url", ""),
        (i2i(image_url=other), "image_url", "no such upload for this owner"),
        (i2i(strength=0), "strength", "greater than 0"),
        (i2i(strength=0.01), "strength", "too small"),
        (dict(i2i(), mask_url=data_uri(png((64, 64)))), "mask_url", "must be the same size"),
    ]
    with api_stack.client(key) as client:
        for fields, field, words in cases:
            path = f"/{APP}/inpainting" if "mask_url" in fields else f"/{APP}/image-to-image"
            reply = client.post(path, json=fields)
            assert reply.status_code == 422, (field, words, reply.text)
            body = json.dumps(reply.json())
            assert field in body and words in body, (field, words, body)
            assert "i2i-other" not in body and "uploads/" not in body  # no key, path or owner of another
        missing = client.post(f"/run/{APP}/image-to-image", json=tiny_input())
        assert missing.status_code == 422 and "image_url" in missing.text
        unknown = client.post(f"/run/{APP}/sketch", json=i2i())
        assert unknown.status_code == 404 and f"{APP}/inpainting" in unknown.text
    assert api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'i2i-bad'") == [(0,)]


def test_an_uploaded_file_that_is_not_an_image_is_refused_at_submit(api_stack: ApiStack) -> None:
    """An upload's bytes are here at submit: read once, refused before anything is recorded."""
    key = api_stack.make_key("i2i-upl")
    with api_stack.client(key) as client:
        bad = client.post(f"/{APP}/image-to-image", json=i2i(image_url=upload(api_stack, key, b"just text", "a.png")))
    assert bad.status_code == 422 and "image_url" in bad.text and "is not an image" in bad.text
    assert api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'i2i-upl'") == [(0,)]


def test_farm_generate_with_image_and_mask(api_stack: ApiStack, tmp_path: Path) -> None:
    source, mask = tmp_path / "source.png", tmp_path / "mask.png"
    source.write_bytes(png((88, 72)))
    Image.new("L", (88, 72), 255).save(mask)
    out = tmp_path / "out"
    done = api_stack.farm("generate", "a red fox", "--model", "farm/tiny-lcm", "--steps", "2", "--seed", "5",
                          "--image", str(source), "--strength", "0.5", "--out", str(out), "--format", "png")
    assert done.returncode == 0, done.stderr
    saved = [Path(line) for line in done.stdout.split()]
    assert len(saved) == 1 and Image.open(saved[0]).size == (88, 72)  # no --image-size: the input's size
    painted = api_stack.farm("generate", "a red fox", "--model", "farm/tiny-lcm", "--steps", "2", "--image",
                             str(source), "--mask", str(mask), "--image-size", "64x64", "--json")
    assert painted.returncode == 0, painted.stderr
    output = json.loads(painted.stdout)
    assert (output["images"][0]["width"], output["images"][0]["height"]) == (64, 64)

    missing = api_stack.farm("generate", "a red fox", "--model", "farm/tiny-lcm", "--image", str(tmp_path / "nope.png"))
    assert missing.returncode != 0 and "image_url" in missing.stderr and "cannot read" in missing.stderr
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    bad = api_stack.farm("generate", "a red fox", "--model", "farm/tiny-lcm", "--image", str(text))
    assert bad.returncode != 0 and "image_url" in bad.stderr and "is not an image" in bad.stderr
    alone = api_stack.farm("generate", "a red fox", "--model", "farm/tiny-lcm", "--mask", str(mask))
    assert alone.returncode != 0 and "--mask and --strength need --image" in alone.stderr


def test_plain_celery_send_task_with_an_image_url(api_stack: ApiStack) -> None:
    from celery import Celery

    broker = api_stack.env["FARM_BROKER_URL"]
    client = Celery("plain", broker=broker, backend=broker)  # knows nothing of lcm-farm
    try:
        kwargs = dict(i2i(image_url=data_uri(png((80, 96))), seed=21), sync_mode=True, format="png")
        result = client.send_task("farm.generate", kwargs=kwargs)
        output = result.get(timeout=120)
        assert output["seed"] == 21 and (output["images"][0]["width"], output["images"][0]["height"]) == (80, 96)
        assert decoded(output["images"][0]["url"]).size == (80, 96)
        rows = api_stack.sql("SELECT status, source, input->>'strength' FROM jobs WHERE id = :id", id=result.id)
        assert rows == [("COMPLETED", "celery", "0.5")]

        bad = client.send_task("farm.generate", kwargs=dict(i2i(), mask_url=data_uri(png((8, 8)))))
        with pytest.raises(Exception, match="mask_url: mask is 8x8, the image is 96x80"):  # rebuilt by Celery
            bad.get(timeout=60, propagate=True)
        assert api_stack.sql("SELECT count(*) FROM jobs WHERE id = :id", id=bad.id) == [(0,)]
    finally:
        client.close()


def test_farm_client_subscribe_and_run_at_the_subpaths(api_stack: ApiStack) -> None:
    from farm.client import Completed, SyncClient

    key = api_stack.make_key("i2i-client")
    with SyncClient(api_stack.base_url, key=key, verify=str(api_stack.ca_path), app=f"{APP}/image-to-image") as farm:
        updates: list[object] = []
        polled = farm.subscribe(i2i(seed=31), with_logs=True, on_queue_update=updates.append, poll_interval=0.02)
        assert polled.seed == 31 and (polled.images[0].width, polled.images[0].height) == (96, 80)
        assert isinstance(updates[-1], Completed) and updates[-1].logs
        streamed = farm.subscribe(i2i(seed=32), use_stream=True)
        assert streamed.seed == 32 and decoded(streamed.images[0].url).size == (96, 80)
        source = farm.upload(png((64, 80)), content_type="image/png", file_name="source.png")
        ran = farm.run(i2i(image_url=source, seed=33))
        assert ran.seed == 33 and decoded(ran.images[0].url).size == (64, 80)


def test_images_do_not_depend_on_how_a_job_is_split(api_stack: ApiStack) -> None:
    """Image i of a request uses seed + i whatever batch renders it: the second image of a two-image job is the
    only image of a one-image job at the next seed (PNG, compared pixel for pixel)."""
    key = api_stack.make_key("i2i-split")
    with api_stack.client(key) as client:
        both = client.post(f"/run/{APP}/image-to-image", json=i2i(seed=40, num_images=2, format="png"))
        second = client.post(f"/run/{APP}/image-to-image", json=i2i(seed=41, format="png"))
    assert both.status_code == 200 and second.status_code == 200, (both.text, second.text)
    assert both.json()["seed"] == 40 and second.json()["seed"] == 41
    pair = [decoded(image["url"]) for image in both.json()["images"]]
    alone = decoded(second.json()["images"][0]["url"])
    assert pair[0].tobytes() != pair[1].tobytes()  # the seeds differ, so do the images
    assert pair[1].tobytes() == alone.tobytes()
