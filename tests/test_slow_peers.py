"""Abuse by slow peers, made for real: a LoRA URL and a webhook receiver that trickle one byte every
25 s (``tests/trickle.py``, a server process of its own on loopback) against a live ``farm api`` and
``farm worker`` (real processes on the private Redis / PostgreSQL / S3 servers).

* A trickling LoRA never reaches a GPU worker: the fetch stage holds it while a normal job of the
  same owner is rendered, then fails it at its deadline, naming the field.
* A trickling webhook receiver holds one attempt, not the dispatcher: another owner's webhook is
  delivered while it is pending; the slow attempt is cut at its deadline.
* Data URIs are in storage once the request is accepted, and the ledger row holds the key only.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from farm.config import Settings
from farm.storage import make_storage
from tests.api_stack import APP, ApiStack, _write_certs, idle_input, tiny_input
from tests.receivers import Receiver
from tests.services import free_port
from tests.workers import WorkerProcess, clean_env, run_farm

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 8  # FARM_INPUT_FETCH_DEADLINE_SECONDS and FARM_WEBHOOK_TIMEOUT_SECONDS here


class Trickle:
    """``tests/trickle.py`` in its own process; ``seen`` lists the requests it has got."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.trickle", "25"], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        assert first[:1] == ["port"], first
        self.port = int(first[1])
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.seen.append(line.strip())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture(scope="module")
def stack(redis_server, postgres_server, s3_server, tmp_path_factory) -> Iterator[ApiStack]:
    """``farm api`` and a tiny-model ``farm worker`` with short deadlines, loopback allow-listed."""
    root = tmp_path_factory.mktemp("slow-peers")
    db_url = postgres_server.new_database(f"slow_{uuid.uuid4().hex[:10]}")
    bucket = f"slow-{uuid.uuid4().hex[:10]}"
    env = clean_env(
        FARM_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/9",
        FARM_DATABASE_URL=db_url,
        FARM_STORAGE_URL=f"s3://{bucket}/out",
        FARM_S3_ENDPOINT=s3_server.endpoint,
        FARM_S3_ACCESS_KEY="testing",
        FARM_S3_SECRET_KEY="testing",
        FARM_DATA_DIR=str(root / "data"),
        FARM_WEBHOOK_ALLOWLIST='["127.0.0.1"]',
        FARM_INPUT_FETCH_DEADLINE_SECONDS=str(DEADLINE),
        FARM_INPUT_FETCHES_PER_OWNER="1",
        FARM_INLINE_INPUT_MAX_BYTES="1000",
        FARM_WEBHOOK_TIMEOUT_SECONDS=str(DEADLINE),
        FARM_WEBHOOK_MAX_ATTEMPTS="1",
        FARM_WEBHOOK_POLL_SECONDS="0.1",
        FARM_BATCH_RETRIES="0",  # the unreadable data-URI LoRA fails at once
    )
    done = run_farm(["db", "upgrade"], env)
    assert done.returncode == 0, done.stderr
    api = ApiStack(env=env, db_url=db_url, bucket=bucket, port=free_port(), ca_path=_write_certs(root),
                   log_path=root / "api.log", worker=WorkerProcess(env))
    try:
        api.worker.start()
        api.start()
        yield api
    finally:
        api.stop()
        api.worker.stop()


@pytest.fixture
def trickle() -> Iterator[Trickle]:
    server = Trickle()
    try:
        yield server
    finally:
        server.stop()


def status(c: httpx.Client, rid: str) -> dict[str, Any]:
    return dict(c.get(f"/{APP}/requests/{rid}/status", params={"logs": 1}).json())


def submit(c: httpx.Client, body: dict[str, Any], **params: str) -> str:
    r = c.post(f"/{APP}", json=body, params=params)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def test_a_trickling_lora_url_never_holds_the_farm(stack: ApiStack, trickle: Trickle) -> None:
    with stack.client(stack.make_key("ann")) as c:
        slow = submit(c, tiny_input(loras=[{"path": trickle.url("/slow.safetensors?token=secret")}]))
        second = submit(c, tiny_input(loras=[{"path": trickle.url("/second.safetensors")}]))
        until("the fetch stage to start the first download", lambda: trickle.seen)
        normal = submit(c, tiny_input(seed=3))
        done = until("the normal job", lambda: (s := status(c, normal))["status"] == "COMPLETED" and s)
        # the normal job of the same owner is rendered while the trickle is still being fetched
        assert done.get("error") is None, done
        assert status(c, slow)["status"] == "IN_QUEUE" and status(c, second)["status"] == "IN_QUEUE"
        assert trickle.seen == ["got GET /slow.safetensors?token=secret"]  # one fetch of this owner at a time
        assert stack.sql("SELECT status FROM batches WHERE job_id = :j", j=slow) == [("fetching",)]
        failed = until("the trickling job to fail", lambda: (s := status(c, slow))["status"] == "COMPLETED" and s,
                       timeout=DEADLINE * 4)
        assert failed["error_type"] == "file_download_error"
        assert failed["error"].startswith("loras.0.path: ") and f"within its {DEADLINE} s deadline" in failed["error"]
        logs = " ".join(line["message"] for line in failed["logs"])
        assert "/slow.safetensors" in logs and "secret" not in logs  # the URL is logged without its query
        # the owner's next fetch starts once the first one is over, and meets the same deadline
        until("the second download", lambda: len(trickle.seen) == 2)
        again = until("the second job to fail", lambda: (s := status(c, second))["status"] == "COMPLETED" and s,
                      timeout=DEADLINE * 4)
        assert again["error"].startswith("loras.0.path: ") and "deadline" in again["error"]
        # nothing was ever claimed by a worker, nothing stored
        assert stack.sql("SELECT status, attempts FROM batches WHERE job_id IN (:a, :b)", a=slow, b=second) == [
            ("failed", 0), ("failed", 0)]
        assert stack.sql("SELECT count(*) FROM images WHERE job_id IN (:a, :b)", a=slow, b=second) == [(0,)]


def _storage(stack: ApiStack) -> Any:
    env = stack.env
    return make_storage(Settings(storage_url=env["FARM_STORAGE_URL"], s3_endpoint=env["FARM_S3_ENDPOINT"],
                                 s3_access_key="testing", s3_secret_key="testing", data_dir=env["FARM_DATA_DIR"]))


def _data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def test_data_uris_are_in_storage_and_the_ledger_holds_a_key(stack: ApiStack) -> None:
    blob = b"not really a lora " + uuid.uuid4().bytes
    storage = _storage(stack)
    with stack.client(stack.make_key("dan")) as c:
        rid = submit(c, tiny_input(loras=[{"path": _data_uri(blob)}]))
        [(stored,)] = stack.sql("SELECT input->'loras'->0->>'path' FROM jobs WHERE id = :j", j=rid)
        assert stored.startswith("farm-stored:dan/inputs/") and "base64" not in stored
        assert storage.get(stored.removeprefix("farm-stored:")) == blob
        failed = until("the job", lambda: (s := status(c, rid))["status"] == "COMPLETED" and s)
        assert "loras.0.path" in failed["error"] and "dan/inputs" not in failed["error"]  # named by field, not key
        # inline bytes of one request are capped in total (1000 here): refused, naming the field, nothing stored
        two = [{"path": _data_uri(b"a" * 600)}, {"path": _data_uri(b"b" * 600)}]
        r = c.post(f"/{APP}", json=tiny_input(loras=two))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-3:] == ["loras", 1, "path"], r.text
        assert "FARM_INLINE_INPUT_MAX_BYTES" in r.json()["detail"][0]["msg"]
        until("the ended job's blob deleted, nothing of the refused one stored",  # farm.inputs.retention
              lambda: storage.list("dan/inputs/") == [])
    # a submit refused after its data URI was stored (over the in-flight limit) leaves no blob behind
    with stack.client(stack.make_key("eve", "--max-in-flight", "1")) as c:
        waiting = submit(c, idle_input())  # no worker serves its model: it holds eve's one slot
        r = c.post(f"/{APP}", json=tiny_input(loras=[{"path": _data_uri(b"refused" * 10)}]))
        assert r.status_code == 429, r.text
        c.put(f"/{APP}/requests/{waiting}/cancel")
    assert storage.list("eve/") == []


def test_a_trickling_webhook_receiver_delays_nobody_else(stack: ApiStack, trickle: Trickle) -> None:
    with Receiver() as normal, stack.client(stack.make_key("slow-owner")) as slow_c, \
            stack.client(stack.make_key("fast-owner")) as fast_c:
        slow = submit(slow_c, tiny_input(), fal_webhook=trickle.url("/hook?sig=secret"))
        until("the slow receiver to be called", lambda: trickle.seen, timeout=90)
        fast = submit(fast_c, tiny_input(seed=9), fal_webhook=normal.url("/hook"))
        until("the normal webhook", lambda: normal.requests, timeout=90)
        # delivered while the slow attempt is still under way (no attempt recorded, lease held)
        [(state, attempts, leased)] = stack.sql(
            "SELECT status, attempts, leased_until IS NOT NULL FROM webhook_deliveries WHERE job_id = :j", j=slow)
        assert (state, attempts, leased) == ("pending", 0, True)
        assert json.loads(normal.requests[0].body)["request_id"] == fast
        assert stack.sql("SELECT body IS NULL FROM webhook_deliveries WHERE job_id = :j", j=fast) == [(True,)]
        # the slow attempt is cut at its deadline, not after 25 s a byte
        until("the slow attempt to be recorded", lambda: stack.sql(
            "SELECT attempts FROM webhook_deliveries WHERE job_id = :j", j=slow) == [(1,)], timeout=DEADLINE * 4)
        [(state, error)] = stack.sql("SELECT status, last_error FROM webhook_deliveries WHERE job_id = :j", j=slow)
        assert state == "failed" and f"within the {DEADLINE} s deadline" in error
    assert "sig=secret" not in stack.log_tail(400)  # webhook URLs are logged without their query
