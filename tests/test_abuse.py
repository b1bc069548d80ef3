"""Abuse resistance (issue 10): each attack made for real against a live ``farm api`` on loopback.

One API process of its own, with small limits, beside the session stack's worker, ledger and S3.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_stack import APP, ApiStack, idle_input
from tests.services import free_port

GiB = 2**30
MiB = 2**20
UPLOAD_CAP = MiB
QUOTA = MiB + MiB // 2


@pytest.fixture(scope="module")
def guarded(api_stack: ApiStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    """A second ``farm api`` on the same ledger and storage, with small limits."""
    root = tmp_path_factory.mktemp("abuse")
    env = {**api_stack.env, "FARM_MAX_UPLOAD_BYTES": str(UPLOAD_CAP), "FARM_UPLOAD_QUOTA_BYTES": str(QUOTA),
           "FARM_MAX_STREAMS_PER_OWNER": "2", "FARM_MAX_BULK_RUNNING": "1", "FARM_MAX_BULK_IMAGES": "1000"}
    stack = ApiStack(env=env, db_url=api_stack.db_url, bucket=api_stack.bucket, port=free_port(),
                     ca_path=api_stack.ca_path, log_path=root / "api.log", worker=api_stack.worker)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _rss(pid: int) -> int:
    """Resident set size of a process, bytes (/proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _raw_request(stack: ApiStack, head: str, body: bytes = b"") -> bytes:
    """Send a request's head (and maybe a few body bytes) over TLS, then read what comes back."""
    with (socket.create_connection(("127.0.0.1", stack.port), timeout=20) as raw,
          stack.ssl_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
        tls.sendall(head.encode() + body)
        chunks = []
        for _ in range(1000):  # bounded: an answer is a few KB; each read waits at most 20 s
            try:
                data = tls.recv(65536)
            except (TimeoutError, ConnectionError, OSError):
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_huge_bodies_without_a_key_are_refused_before_they_are_read(guarded: ApiStack) -> None:
    """Ten parallel 1 GiB bodies without a key: 401/413 (or the connection cut early), RSS grows < 50 MB."""
    assert guarded.proc is not None
    pid = guarded.proc.pid
    before = _rss(pid)
    peak = [before]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss(pid))
            time.sleep(0.02)

    sent = [0] * 10
    deadline = time.monotonic() + 60  # bounded: a server that read it all would be caught by `sent`

    def body(i: int) -> Iterator[bytes]:
        block = b"{" + b" " * (MiB - 1)
        while sent[i] < GiB and time.monotonic() < deadline:
            sent[i] += len(block)
            yield block

    def attack(i: int) -> tuple[int | None, int]:
        headers = {"Content-Type": "application/json"}
        if i % 2:
            headers["Content-Length"] = str(GiB)  # declared; the others are chunked
        path = f"/{APP}" if i % 3 else "/storage/upload"
        try:
            with guarded.client(**headers) as c:
                return c.post(path, content=body(i)).status_code, sent[i]
        except httpx.TransportError:  # the server answered and hung up while we were still sending
            return None, sent[i]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(attack, range(10)))
    finally:
        stop.set()
        watcher.join(5)
    peak[0] = max(peak[0], _rss(pid))
    for status, n in results:
        assert status in (None, 401, 413), results
        assert n < GiB, f"a 1 GiB body was sent whole: {results}"  # cut off early
    assert peak[0] - before < 50 * 10**6, f"API RSS grew from {before} to {peak[0]} bytes"
    assert guarded.proc.poll() is None

    # the key is checked before a byte of the body is sent: the answer comes to the head alone
    head = f"POST /{APP} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {GiB}\r\n\r\n"
    answer = _raw_request(guarded, head)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"unauthorized" in answer


def test_a_keyed_body_over_the_limit_is_413_naming_the_setting(guarded: ApiStack) -> None:
    key = guarded.make_key("abuse-big")
    head = (f"POST /{APP} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Key {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {600 * MiB}\r\n\r\n")
    answer = _raw_request(guarded, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"FARM_MAX_BODY_BYTES" in answer and b"payload_too_large" in answer
    # chunked (no length declared): counted as it streams, refused once past the limit
    sent = [0]

    def chunks() -> Iterator[bytes]:
        while sent[0] < 256 * MiB:
            sent[0] += 64 * 1024
            yield b" " * (64 * 1024)

    try:
        with guarded.client(key, **{"Content-Type": "application/json"}) as c:
            r = c.post(f"/{APP}", content=chunks())
        assert r.status_code == 413 and "FARM_MAX_BODY_BYTES" in r.text
    except httpx.TransportError:
        pass  # answered and cut while we were sending
    assert sent[0] < 256 * MiB
    with guarded.client(key) as c:  # an ordinary request still works
        ok = c.post(f"/{APP}", json=idle_input())
        assert ok.status_code == 200, ok.text
        c.put(f"/{APP}/requests/{ok.json()['request_id']}/cancel")


def test_in_flight_limit_holds_under_200_parallel_submits(guarded: ApiStack) -> None:
    key = guarded.make_key("abuse-race", "--max-in-flight", "5")

    def submit(i: int) -> int:
        with guarded.client(key) as c:
            return c.post(f"/{APP}", json=idle_input(prompt=f"race {i}")).status_code

    with ThreadPoolExecutor(200) as pool:
        codes = list(pool.map(submit, range(200)))
    assert codes.count(200) == 5, sorted(set(codes))
    assert set(codes) == {200, 429}
    rows = guarded.sql("SELECT id FROM jobs WHERE owner = 'abuse-race' AND status IN ('IN_QUEUE', 'IN_PROGRESS')")
    assert len(rows) == 5
    with guarded.client(key) as c:
        for (rid,) in rows:
            c.put(f"/{APP}/requests/{rid}/cancel")


def test_uploads_have_a_cap_and_a_quota_and_are_served_as_attachments(guarded: ApiStack) -> None:
    key = guarded.make_key("abuse-upload")
    with guarded.client(key) as c:
        big = c.post("/storage/upload", params={"file_name": "big.bin"}, content=b"x" * (UPLOAD_CAP + 1))
        assert big.status_code == 413 and "FARM_MAX_UPLOAD_BYTES" in big.text
        first = c.post("/storage/upload", params={"file_name": "page.html"},
                       content=b"<script>alert(1)</script>" + b" " * (UPLOAD_CAP - 100),
                       headers={"Content-Type": "text/html"})
        assert first.status_code == 200, first.text
        second = c.post("/storage/upload", files={"file": ("b.bin", b"y" * (UPLOAD_CAP - 10))})
        assert second.status_code == 413 and "FARM_UPLOAD_QUOTA_BYTES" in second.text
        served = c.get(first.json()["url"].removeprefix(guarded.base_url))
        assert served.status_code == 200 and served.content.startswith(b"<script>")
        assert served.headers["content-disposition"].startswith("attachment")
        assert served.headers["x-content-type-options"] == "nosniff"
    # another owner has a quota of its own
    with guarded.client(guarded.make_key("abuse-upload2")) as c:
        assert c.post("/storage/upload", files={"file": ("c.bin", b"z" * 1000)}).status_code == 200


def test_status_streams_are_capped_per_owner(guarded: ApiStack) -> None:
    key = guarded.make_key("abuse-streams", "--max-in-flight", "10")
    with guarded.client(key) as c:
        rids = [c.post(f"/{APP}", json=idle_input(prompt=f"stream {i}")).json()["request_id"] for i in range(3)]
        opened = [c.stream("GET", f"/{APP}/requests/{rid}/status/stream") for rid in rids[:2]]
        responses = [cm.__enter__() for cm in opened]
        try:
            assert [r.status_code for r in responses] == [200, 200]
            third = c.get(f"/{APP}/requests/{rids[2]}/status/stream")
            assert third.status_code == 429 and "FARM_MAX_STREAMS_PER_OWNER" in third.text
            with guarded.client(guarded.make_key("abuse-streams2")) as other:  # another owner is not affected
                theirs = other.post(f"/{APP}", json=idle_input()).json()["request_id"]
                with other.stream("GET", f"/{APP}/requests/{theirs}/status/stream") as r:
                    assert r.status_code == 200
                other.put(f"/{APP}/requests/{theirs}/cancel")
        finally:
            opened[0].__exit__(None, None, None)
        # the slot comes back when a stream ends (the client hung up)
        deadline = time.monotonic() + 20
        while True:
            with c.stream("GET", f"/{APP}/requests/{rids[2]}/status/stream") as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "a closed stream's slot never came back"
            time.sleep(0.2)
        opened[1].__exit__(None, None, None)
        for rid in rids:
            c.put(f"/{APP}/requests/{rid}/cancel")


def _manifests(stack: ApiStack, owner: str) -> list[str]:
    folder = Path(stack.env["FARM_DATA_DIR"]) / "bulk" / "tenants" / owner / "manifests"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_bulk_needs_a_budget_caps_running_jobs_and_leaves_no_manifest_behind(guarded: ApiStack) -> None:
    manifest = "data:text/plain;base64," + base64.b64encode(b"a boat\n").decode()
    body: dict[str, Any] = {"manifest": manifest, "manifest_format": "txt", "out": "ds",
                            "model_name": "runwayml/stable-diffusion-v1-5"}
    # owners 'acme' and 'acme_' get folders of their own (names are used as they are)
    with guarded.client(guarded.make_key("acme_")) as c:
        assert c.post("/bulk", json={**body, "budget_images": 5}).status_code == 202
    key = guarded.make_key("acme")
    with guarded.client(key) as c:
        missing = c.post("/bulk", json=body)
        assert missing.status_code == 422 and "budget_images" in missing.text
        over = c.post("/bulk", json={**body, "budget_images": 10**6})
        assert over.status_code == 422 and "FARM_MAX_BULK_IMAGES" in over.text
        bad = c.post("/bulk", json={**body, "budget_images": 5, "defaults": {"num_inference_steps": 10**6}})
        assert bad.status_code == 422, bad.text
        assert _manifests(guarded, "acme") == []  # the manifest copied for the refused request is gone
        first = c.post("/bulk", json={**body, "budget_images": 5})
        assert first.status_code == 202, first.text
        second = c.post("/bulk", json={**body, "out": "ds2", "budget_images": 5})
        assert second.status_code == 429 and "FARM_MAX_BULK_RUNNING" in second.text
        assert len(_manifests(guarded, "acme")) == 1
        assert c.post(f"/bulk/{first.json()['bulk_id']}/cancel").status_code == 200
    rows = guarded.sql("SELECT owner, dest FROM bulk_jobs WHERE owner IN ('acme', 'acme_')")
    dests = {owner: dest for owner, dest in rows}
    assert dests["acme"].endswith("/tenants/acme/ds") and dests["acme_"].endswith("/tenants/acme_/ds")


def test_local_paths_give_no_file_existence_oracle_and_no_server_path(guarded: ApiStack) -> None:
    key = guarded.make_key("abuse-paths")
    answers = []
    with guarded.client(key) as c:
        for path in ("/etc/passwd", "/etc/no-such-file-here", "/proc/self/environ"):
            r = c.post(f"/{APP}", json=idle_input(loras=[{"path": path}]))
            assert r.status_code == 422
            (err,) = r.json()["detail"]
            assert err["loc"] == ["body", "loras", 0, "path"]
            answers.append(err["msg"])
        for manifest in ("/etc/passwd", "no-such-manifest.txt"):
            r = c.post("/bulk", json={"manifest": manifest, "out": "x", "model_name": "farm/tiny-lcm",
                                      "budget_images": 1})
            assert r.status_code == 422
            assert guarded.env["FARM_DATA_DIR"] not in r.text, r.text
    assert len(set(answers)) == 1, answers
    assert guarded.env["FARM_DATA_DIR"] not in answers[0]
