"""Bulk manifests with an image column (issue 21, item 4), on the real stack: Redis, PostgreSQL, S3, a real
tiny-model worker, the ``farm bulk run`` CLI and, over HTTP, a ``farm bulk worker``. The source images are real
PNGs made here with PIL, the bad one a real text file; one row names a file outside the bulk root, one another
owner's file; URLs are served by a real allow-listed TLS server or by a port nobody listens on; the quota is a
real FARM_UPLOAD_QUOTA_BYTES below the image's size."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.receivers import Receiver
from tests.services import free_port
from tests.test_bulk import TINY, _start_tiny, _stop_bulk_worker
from tests.test_image_to_image import png
from tests.test_stack import _ledger, builtin_dir, stack  # noqa: F401  (fixtures)
from tests.workers import FARM, run_farm


def _mask(size: tuple[int, int]) -> bytes:
    """Left half white (repainted), right half black (kept)."""
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    out = io.BytesIO()
    mask.save(out, "PNG")
    return out.getvalue()


def test_a_manifest_with_an_image_column_renders_image_to_image_and_inpainting(stack, tmp_path):  # noqa: F811
    root = tmp_path / "bulk-root"
    (root / "photos").mkdir(parents=True)
    source, mask = png((64, 64)), _mask((64, 64))
    (root / "photos" / "boat.png").write_bytes(source)
    (root / "photos" / "mask.png").write_bytes(mask)
    (root / "photos" / "notes.png").write_text("not an image")
    (tmp_path / "outside.png").write_bytes(source)
    manifest = root / "augment.jsonl"
    rows = [
        {"prompt": "a red boat", "image": "photos/boat.png", "seed": 7},
        {"prompt": "a red boat", "image": "photos/boat.png", "mask": "photos/mask.png", "strength": 0.9, "seed": 8},
        {"prompt": "a red boat", "image": "photos/notes.png"},
        {"prompt": "a red boat", "image": "photos/boat.png", "seed": 7},  # row 1 again
        {"prompt": "a red boat", "image": "../outside.png"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(stack["env"], FARM_BULK_ROOT=str(root))
    _start_tiny(stack, env, "tiny@bulk-images.test")

    out = tmp_path / "dataset"
    done = run_farm(["bulk", "run", str(manifest), "--out", str(out), "--model", TINY, "--steps", "2",
                     "--strength", "0.6", "--format", "png", "--dataset-format", "imagefolder",
                     "--job-id", "augment1"], env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(done.stdout)
    assert (final["status"], final["done"], final["failed"], final["rows_rejected"]) == ("COMPLETED", 3, 0, 2)
    # the bad rows are rejected with their reason, naming the column and no server path
    assert "row 3: image: is not an image" in done.stderr
    assert "row 5: image: must be a URL or a file under the bulk root" in done.stderr
    [(rejections,)] = _ledger(stack, "SELECT rejections FROM bulk_jobs WHERE id = 'augment1'")
    assert len(rejections) == 2 and str(tmp_path) not in json.dumps(rejections)  # what GET /bulk/{id} shows

    lines = [json.loads(x) for x in (out / "00000" / "metadata.jsonl").read_text().splitlines()]
    assert [x["row"] for x in lines] == [1, 2, 4]  # one sample per good row
    boat, masked = hashlib.sha256(source).hexdigest(), hashlib.sha256(mask).hexdigest()
    assert [(x["image_url"], x["image_sha256"], x["strength"]) for x in lines] == [
        ("photos/boat.png", boat, 0.6), ("photos/boat.png", boat, 0.9), ("photos/boat.png", boat, 0.6)]
    assert (lines[1]["mask_url"], lines[1]["mask_sha256"]) == ("photos/mask.png", masked)
    assert "mask_url" not in lines[0] and "mask_url" not in lines[2]

    images = [Image.open(out / "00000" / x["file_name"]) for x in lines]
    assert all(image.size == (64, 64) for image in images)  # no image_size: the source's size
    files = [(out / "00000" / x["file_name"]).read_bytes() for x in lines]
    assert files[0] == files[2]  # the same row rendered twice: the same bytes
    assert files[0] != files[1]
    # inpainting: the unmasked right half keeps the source's pixels (PNG output; decode noise: 40 per channel)
    kept = images[1].convert("RGB").getpixel((56, 10))
    assert isinstance(kept, tuple) and all(abs(a - b) <= 40 for a, b in zip(kept, (200, 40, 40), strict=True))

    # the files went through the queue's staging: the jobs name stored keys, never the bytes or the path
    inputs = _ledger(stack, "SELECT input->>'image_url', input->>'mask_url' FROM jobs "
                            "WHERE id LIKE 'augment1-%' ORDER BY id")
    assert len(inputs) == 3 and all(image.startswith("farm-stored:") for image, _ in inputs)
    assert sorted(m is not None and m.startswith("farm-stored:") for _, m in inputs) == [False, False, True]


def test_over_http_an_image_column_reads_only_the_owners_folder(api_stack, tmp_path):
    """POST /bulk: image paths resolve in the owner's folder; one naming another owner's file is a rejected row."""
    tenants = Path(api_stack.env["FARM_DATA_DIR"]) / "bulk" / "tenants"
    for owner in ("img-alice", "img-bob"):
        (tenants / owner / "photos").mkdir(parents=True, exist_ok=True)
        (tenants / owner / "photos" / "boat.png").write_bytes(png((64, 64)))
    manifest = ('{"prompt": "a red boat", "image": "photos/boat.png", "seed": 3}\n'
                '{"prompt": "a red boat", "image": "../img-alice/photos/boat.png"}\n')
    body = {"manifest": "data:application/jsonl;base64," + base64.b64encode(manifest.encode()).decode(),
            "manifest_format": "jsonl", "out": "augmented", "model_name": TINY, "format": "imagefolder",
            "defaults": {"num_inference_steps": 2, "strength": 0.5}, "budget_images": 10}
    driver_log = tmp_path / "bulk-worker.log"
    with open(driver_log, "w") as out:
        driver = subprocess.Popen([FARM, "bulk", "worker"], env=api_stack.env, stdout=out,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with api_stack.client(api_stack.make_key("img-bob")) as c:
            started = c.post("/bulk", json=body)
            assert started.status_code == 202, started.text
            bulk_id = started.json()["bulk_id"]
            deadline = time.monotonic() + 180
            while (snap := c.get(f"/bulk/{bulk_id}").json())["status"] != "COMPLETED":
                assert time.monotonic() < deadline, snap
                time.sleep(0.2)
        assert (snap["done"], snap["failed"], snap["rows_rejected"]) == (1, 0, 1)
        stats = json.loads((tenants / "img-bob" / "augmented" / "_stats.json").read_text())
        assert stats["rejections"] == ["row 2: image: must be a URL or a file under the bulk root (FARM_BULK_ROOT)"]
        [meta] = [json.loads(x) for x in (tenants / "img-bob" / "augmented" / "00000" / "metadata.jsonl")
                  .read_text().splitlines()]
        assert (meta["image_url"], meta["strength"], meta["width"]) == ("photos/boat.png", 0.5, 64)
    finally:
        _stop_bulk_worker(driver, driver_log)


def test_source_images_past_the_owners_upload_quota_pause_the_job_with_the_reason(stack, tmp_path):  # noqa: F811
    root = tmp_path / "bulk-root"
    root.mkdir()
    (root / "big.png").write_bytes(png((256, 256)))
    manifest = root / "quota.jsonl"
    manifest.write_text(json.dumps({"prompt": "a red boat", "image": "big.png"}) + "\n")
    env = dict(stack["env"], FARM_BULK_ROOT=str(root), FARM_UPLOAD_QUOTA_BYTES="100")  # less than the image
    _start_tiny(stack, env, "tiny@bulk-quota.test")
    paused = run_farm(["bulk", "run", str(manifest), "--out", str(tmp_path / "ds"), "--model", TINY, "--steps", "1",
                       "--job-id", "quota1"], env, timeout=120)
    final = json.loads(paused.stdout)
    assert (final["status"], final["done"], final["failed"]) == ("PAUSED", 0, 0), paused.stderr[-2000:]
    assert "source images:" in final["error"] and "upload" in final["error"]
    assert _ledger(stack, "SELECT count(*) FROM jobs WHERE id LIKE 'quota1-%'") == [(0,)]  # nothing submitted


def test_an_image_url_row_goes_through_the_fetch_stage(stack, tmp_path):  # noqa: F811
    """A URL is fetched by the fetch stage under the SSRF guard (an allow-listed TLS server here); a URL whose
    server is down fails its sample naming image_url, and the job completes."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    closed = free_port()
    root = tmp_path / "bulk-root"
    root.mkdir()
    with Receiver(tls=ctx) as rx:
        rx.default = (200, {"Content-Type": "image/png"}, png((96, 64)))
        url, down = rx.url("/boat.png", host="localhost"), f"https://localhost:{closed}/boat.png"
        manifest = root / "urls.jsonl"
        manifest.write_text(json.dumps({"prompt": "a red boat", "image": url, "seed": 2}) + "\n"
                            + json.dumps({"prompt": "a red boat", "image": down}) + "\n")
        env = dict(stack["env"], FARM_BULK_ROOT=str(root), SSL_CERT_FILE=str(tmp_path / "ca.pem"),
                   FARM_WEBHOOK_ALLOWLIST=json.dumps([f"localhost:{rx.port}", f"localhost:{closed}"]))
        _start_tiny(stack, env, "tiny@bulk-urls.test")
        out = tmp_path / "ds"
        done = run_farm(["bulk", "run", str(manifest), "--out", str(out), "--model", TINY, "--steps", "2",
                         "--dataset-format", "imagefolder", "--job-id", "urls1"], env, timeout=180)
        assert [r.path for r in rx.requests] == ["/boat.png"]
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(done.stdout)
    assert (final["status"], final["done"], final["failed"]) == ("COMPLETED", 1, 1)
    [meta] = [json.loads(x) for x in (out / "00000" / "metadata.jsonl").read_text().splitlines()]
    assert (meta["image_url"], meta["width"], meta["height"]) == (url, 96, 64)  # the URL as given, its size
    assert "image_sha256" not in meta
    [(error,)] = _ledger(stack, "SELECT error FROM bulk_samples WHERE bulk_id = 'urls1' AND status = 'failed'")
    assert error.startswith("image_url:"), error
