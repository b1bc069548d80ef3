"""Storage abuse (issue 20, findings 3, 6 and 12), each attack made for real against a live ``farm api``:
the ``guarded`` API of tests/test_abuse.py (upload cap 1 MiB, quota 1.5 MiB) beside the session stack's
tiny-model worker, ledger and S3 server.

- 3: an upload initiated over fal's protocol is capped by the farm as it is written (S3 cannot cap a
  presigned PUT): past the cap or the owner's quota it is refused and nothing stays in the bucket.
- 6: a burst of identical submits with one data-URI LoRA, all but one refused by the in-flight limit:
  the admitted job renders (its blob was there), then its blob goes with it (farm.inputs.retention).
- 12: the quota is the ledger's counter (``storage_usage``), kept with the writes, not a LIST per read.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from farm.config import Settings
from farm.storage import S3Storage, make_storage
from tests.api_stack import APP, ApiStack, tiny_input
from tests.test_abuse import QUOTA, UPLOAD_CAP, guarded  # noqa: F401

KiB, MiB = 2**10, 2**20


@pytest.fixture(scope="module")
def bucket(guarded: ApiStack, tmp_path_factory: pytest.TempPathFactory) -> S3Storage:  # noqa: F811
    """The stack's bucket, read and written straight (as someone holding the S3 credentials would)."""
    env = guarded.env
    storage = make_storage(Settings(data_dir=tmp_path_factory.mktemp("bucket"), storage_url=env["FARM_STORAGE_URL"],
                                    s3_endpoint=env["FARM_S3_ENDPOINT"], s3_access_key=env["FARM_S3_ACCESS_KEY"],
                                    s3_secret_key=env["FARM_S3_SECRET_KEY"]))
    assert isinstance(storage, S3Storage)
    return storage


def _stored(bucket: S3Storage, owner: str) -> dict[str, int]:
    """The owner's uploads and stored inputs in the bucket (what the quota counts), by size."""
    return {key: bucket.size(key) for part in ("uploads", "inputs") for key in bucket.list(f"{owner}/{part}/")}


def _counted(stack: ApiStack, owner: str) -> int | None:
    rows = stack.sql("SELECT bytes FROM storage_usage WHERE owner = :owner", owner=owner)
    return rows[0][0] if rows else None


def _initiate(c: httpx.Client, name: str) -> dict[str, str]:
    reply = c.post("/storage/upload/initiate", json={"content_type": "application/octet-stream", "file_name": name})
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // (64 * KiB)):
        yield b"c" * (64 * KiB)


def test_an_initiated_upload_past_the_cap_or_the_quota_is_refused_and_nothing_stays(
        guarded: ApiStack, bucket: S3Storage) -> None:  # noqa: F811
    """fal's clients PUT to ``upload_url`` with no key. It is the farm's URL, on S3 storage too, so that the
    farm counts the bytes as they come: 2 MiB declared or streamed (chunked, no length) past the 1 MiB cap,
    and eight parallel 256 KiB PUTs past the 1.5 MiB quota, are refused; the bucket holds exactly what
    was accepted."""
    owner = "abuse-s3-cap"
    key = guarded.make_key(owner)
    with guarded.client(key) as c:
        targets = [_initiate(c, f"{i}.bin") for i in range(11)]
    assert all(urlsplit(t["upload_url"]).netloc == guarded.host for t in targets), targets[0]  # never S3's
    with httpx.Client(verify=guarded.ssl_context, timeout=60) as plain:  # no key, as fal's clients
        declared = plain.put(targets[0]["upload_url"], content=b"x" * (2 * MiB))
        assert declared.status_code == 413 and "FARM_MAX_UPLOAD_BYTES" in declared.text, declared.text
        streamed = plain.put(targets[1]["upload_url"], content=_chunks(2 * MiB))
        assert streamed.status_code == 413 and "FARM_MAX_UPLOAD_BYTES" in streamed.text, streamed.text
        assert _stored(bucket, owner) == {}
        first = plain.put(targets[2]["upload_url"], content=b"a" * (512 * KiB))
        assert first.status_code == 200, first.text

        def put(target: dict[str, str]) -> int:
            return plain.put(target["upload_url"], content=b"p" * (256 * KiB)).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(put, targets[3:]))
    assert sorted(codes) == [200] * 4 + [413] * 4, codes  # 512 KiB + 4 x 256 KiB = 1.5 MiB, the quota
    stored = _stored(bucket, owner)
    assert sorted(stored.values()) == [256 * KiB] * 4 + [512 * KiB], stored  # nothing refused stays
    assert sum(stored.values()) == QUOTA == _counted(guarded, owner)
    with guarded.client(key) as c:  # the quota is full: a new upload is refused when initiated, and chunked
        full = c.post("/storage/upload/initiate", json={"content_type": "a/b", "file_name": "z"})
        assert full.status_code == 413 and full.json()["error_type"] == "upload_quota_exceeded", full.text
        assert owner not in full.text and bucket.bucket not in full.text  # names no key or bucket


def _tiny_lora(stack: ApiStack, folder: Path) -> bytes:
    """A real LoRA of the stack's tiny model (tests/test_models.py makes it), written under ``folder``."""
    from tests.test_models import _make_lora

    settings = Settings(data_dir=Path(stack.env["FARM_DATA_DIR"]), files_root=folder)
    return (settings.effective_files_root / _make_lora(settings)).read_bytes()


def _wait_done(c: httpx.Client, rid: str, seconds: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while True:  # bounded by the deadline
        state = c.get(f"/{APP}/requests/{rid}/status").json()
        if state["status"] == "COMPLETED" or time.monotonic() > deadline:
            return dict(state)
        time.sleep(0.2)


def test_a_burst_of_identical_submits_never_deletes_the_admitted_jobs_blob(
        guarded: ApiStack, bucket: S3Storage, tmp_path: Path) -> None:  # noqa: F811
    """Twelve identical submits at once, one data-URI LoRA, a key allowing one request in flight: one is
    admitted, eleven are refused (429) after staging the same content-addressed blob. The refused ones
    delete nothing the admitted job uses: it renders, and its blob is still in the bucket afterwards."""
    owner = "abuse-blob-burst"
    key = guarded.make_key(owner, "--max-in-flight", "1")
    lora = _tiny_lora(guarded, tmp_path)
    body = tiny_input(loras=[{"path": "data:application/octet-stream;base64," + base64.b64encode(lora).decode(),
                              "scale": 1.0}], seed=7)

    def submit(_: int) -> httpx.Response:
        with guarded.client(key) as c:
            return c.post(f"/{APP}", json=body)

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(submit, range(12)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] + [429] * 11, [r.text for r in replies]
    rid = next(r.json()["request_id"] for r in replies if r.status_code == 200)
    with guarded.client(key) as c:
        state = _wait_done(c, rid)
        assert state["status"] == "COMPLETED", state
        result = c.get(f"/{APP}/requests/{rid}").json()
    assert len(result.get("images", [])) == 1, result  # rendered, not failed for a missing input
    (stored_input,) = guarded.sql("SELECT input FROM jobs WHERE id = :rid", rid=rid)[0]
    blob = stored_input["loras"][0]["path"].removeprefix("farm-stored:")
    assert blob.startswith(f"{owner}/inputs/")  # rendered from it; the job has ended, so it goes too
    deadline = time.monotonic() + 30  # (farm.inputs.retention, after the finishing commit on the worker)
    while bucket.exists(blob) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _stored(bucket, owner) == {} and _counted(guarded, owner) == 0


def test_the_quota_is_a_counter_kept_with_the_writes_not_a_list_per_read(
        guarded: ApiStack, bucket: S3Storage) -> None:  # noqa: F811
    """An object put straight into the bucket under the owner's folder (by someone with the S3 credentials)
    is not LISTed on each read: it does not count, the owner's downloads and uploads go on. Uploads and a
    data-URI input move the owner's counter in step with what the farm stored. An object over the cap
    (there before the cap was lowered) is refused at its first read and deleted."""
    owner = "abuse-counter"
    key = guarded.make_key(owner, "--max-in-flight", "5")
    with guarded.client(key) as c:
        up = c.post("/storage/upload", params={"file_name": "a.bin"}, content=b"u" * (300 * KiB))
        assert up.status_code == 200, up.text
        # two objects the farm never stored: one over the quota's room, one over the 1 MiB cap
        bucket.put(f"{owner}/uploads/{'0' * 32}/foreign.bin", b"f" * (1200 * KiB), "application/octet-stream")
        over = f"{owner}/uploads/{'1' * 32}/old.bin"
        bucket.put(over, b"o" * (UPLOAD_CAP + 1), "application/octet-stream")
        served = c.get(up.json()["url"].removeprefix(guarded.base_url))  # a read LISTs nothing
        assert served.status_code == 200 and served.content == b"u" * (300 * KiB), served.text
        lora = "data:application/octet-stream;base64," + base64.b64encode(b"l" * (100 * KiB)).decode()
        job = c.post(f"/{APP}", json=tiny_input(model_name="runwayml/stable-diffusion-v1-5", loras=[{"path": lora}]))
        assert job.status_code == 200, job.text
        c.put(f"/{APP}/requests/{job.json()['request_id']}/cancel")
        more = c.post("/storage/upload", params={"file_name": "b.bin"}, content=b"v" * (500 * KiB))
        assert more.status_code == 200, more.text
        assert _counted(guarded, owner) == 800 * KiB  # 300 + 500 KiB: the cancelled job's 100 KiB input went
        old = c.get(f"/storage/files/{owner}/uploads/{'1' * 32}/old.bin")
        assert old.status_code == 413 and "FARM_MAX_UPLOAD_BYTES" in old.text, old.text
        assert not bucket.exists(over)
        assert 0 <= (_counted(guarded, owner) or 0) <= 900 * KiB  # it never counted: the counter stays sane
