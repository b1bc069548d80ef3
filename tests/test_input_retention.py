"""Staged inputs and uploads leave the owner's quota, for real against a live ``farm api``: the ``guarded``
API of tests/test_abuse.py (upload cap 1 MiB, quota 1.5 MiB) beside the session stack's tiny-model worker,
ledger and S3 server.

- the farm's copy of a job's data-URI input (``<owner>/inputs/<sha256>``) is deleted, and no longer
  counted, once the last live job naming it ends (farm.inputs.retention); never while one still does;
- an owner deletes its own uploads (``DELETE`` on the upload's URL, or ``farm.client``'s
  ``delete_upload``) and has room again; another owner gets 404, as for a file that does not exist.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from farm.client import FarmClientError, SyncClient
from farm.storage import S3Storage
from tests.api_stack import APP, ApiStack, idle_input, tiny_input
from tests.test_abuse import QUOTA, guarded  # noqa: F401
from tests.test_abuse_storage import _counted, _stored, _tiny_lora, _wait_done, bucket  # noqa: F401

KiB, MiB = 2**10, 2**20


def _data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def _until(what: str, check: Callable[[], Any], seconds: float = 30) -> Any:
    """``check()`` once it is truthy, polled for at most ``seconds`` (then the test fails naming ``what``)."""
    deadline = time.monotonic() + seconds
    while True:  # bounded by the deadline
        got = check()
        if got or time.monotonic() > deadline:
            assert got, f"{what}: not so within {seconds} s"
            return got
        time.sleep(0.2)


def _blob(stack: ApiStack, rid: str) -> str:
    (stored,) = stack.sql("SELECT input FROM jobs WHERE id = :rid", rid=rid)[0]
    return str(stored["loras"][0]["path"]).removeprefix("farm-stored:")


def test_a_completed_jobs_staged_input_is_deleted_and_no_longer_counted(
        guarded: ApiStack, bucket: S3Storage, tmp_path: Path) -> None:  # noqa: F811
    """A job with a data-URI LoRA renders on the worker; once it has ended, its blob is gone from the bucket
    and the owner's counter is back to what it was before (0)."""
    owner = "retain-done"
    key = guarded.make_key(owner)
    lora = _tiny_lora(guarded, tmp_path)
    with guarded.client(key) as c:
        reply = c.post(f"/{APP}", json=tiny_input(loras=[{"path": _data_uri(lora), "scale": 1.0}], seed=3))
        assert reply.status_code == 200, reply.text
        rid = reply.json()["request_id"]
        blob = _blob(guarded, rid)
        assert bucket.get(blob) == lora and _counted(guarded, owner) == len(lora)  # staged, counted
        state = _wait_done(c, rid)
        assert state["status"] == "COMPLETED", state
        result = c.get(f"/{APP}/requests/{rid}").json()
    assert len(result.get("images", [])) == 1, result  # it rendered with its input
    _until("the blob deleted after the job ended", lambda: not bucket.exists(blob))
    assert _stored(bucket, owner) == {} and _counted(guarded, owner) == 0


def test_a_blob_two_live_jobs_share_stays_until_the_last_one_ends(
        guarded: ApiStack, bucket: S3Storage) -> None:  # noqa: F811
    """Two queued jobs name the same content-addressed blob: cancelling one keeps it (the other still
    refers to it), cancelling the second deletes it; a later submit of the same bytes stores it again."""
    owner = "retain-shared"
    key = guarded.make_key(owner, "--max-in-flight", "3")
    data = b"a shared lora " * 200
    body = idle_input(loras=[{"path": _data_uri(data)}])  # no worker serves its model: it stays queued
    with guarded.client(key) as c:
        rids = [c.post(f"/{APP}", json={**body, "request_id": f"shared-{i}"}).json()["request_id"] for i in range(2)]
        blob = _blob(guarded, rids[0])
        assert _blob(guarded, rids[1]) == blob and bucket.get(blob) == data
        assert c.put(f"/{APP}/requests/{rids[0]}/cancel").status_code == 202
        assert bucket.get(blob) == data and _counted(guarded, owner) == len(data)  # the other job names it
        assert c.put(f"/{APP}/requests/{rids[1]}/cancel").status_code == 202
        _until("the blob deleted after the last job naming it ended", lambda: not bucket.exists(blob))
        assert _counted(guarded, owner) == 0
        again = c.post(f"/{APP}", json={**body, "request_id": "shared-again"})
        assert again.status_code == 200, again.text
        assert bucket.get(blob) == data and _counted(guarded, owner) == len(data)  # stored again, counted once
        assert c.put(f"/{APP}/requests/{again.json()['request_id']}/cancel").status_code == 202
    _until("the blob deleted again", lambda: not bucket.exists(blob))


def test_an_owner_at_its_quota_deletes_an_upload_and_uploads_again_and_no_one_else_can(
        guarded: ApiStack, bucket: S3Storage) -> None:  # noqa: F811
    """The quota is full: an upload is refused, naming DELETE. Another owner's DELETE of the file is 404,
    like a file that does not exist, and the file stays. Its owner's DELETE is 204: the bytes leave the
    bucket and the counter, and the upload that was refused now fits; ``farm.client`` deletes by URL too."""
    owner = "retain-uploads"
    key, other = guarded.make_key(owner), guarded.make_key("retain-someone-else")
    with guarded.client(key) as c:
        big = c.post("/storage/upload", params={"file_name": "big.bin"}, content=b"b" * MiB)
        small = c.post("/storage/upload", params={"file_name": "small.bin"}, content=b"s" * (QUOTA - MiB))
        assert big.status_code == 200 and small.status_code == 200, (big.text, small.text)
        refused = c.post("/storage/upload", params={"file_name": "more.bin"}, content=b"m" * (256 * KiB))
        assert refused.status_code == 413 and "DELETE" in refused.text, refused.text
        assert owner not in refused.text and bucket.bucket not in refused.text  # names no key or bucket
    path = big.json()["url"].removeprefix(guarded.base_url)
    with guarded.client(other) as c:
        theirs = c.delete(path)
        assert theirs.status_code == 404 and owner not in theirs.text, theirs.text
        missing = c.delete(path.replace("big.bin", "nothing.bin"))
        assert missing.status_code == 404 and missing.json() == theirs.json()  # no existence oracle
    assert _counted(guarded, owner) == QUOTA and len(_stored(bucket, owner)) == 2
    with guarded.client(key) as c:
        gone = c.delete(path)
        assert gone.status_code == 204, gone.text
        assert c.get(path).status_code == 404 and c.delete(path).status_code == 404
        assert _counted(guarded, owner) == QUOTA - MiB and len(_stored(bucket, owner)) == 1
        more = c.post("/storage/upload", params={"file_name": "more.bin"}, content=b"m" * (256 * KiB))
        assert more.status_code == 200, more.text
    with SyncClient(guarded.base_url, key=key, verify=str(guarded.ca_path)) as farm:
        farm.delete_upload(more.json()["url"])
        with pytest.raises(FarmClientError) as err:
            farm.delete_upload(more.json()["url"])
        assert err.value.status_code == 404
        with pytest.raises(ValueError, match="not an upload URL"):
            farm.delete_upload(f"{guarded.base_url}/{APP}/requests/x")
    assert _counted(guarded, owner) == QUOTA - MiB
