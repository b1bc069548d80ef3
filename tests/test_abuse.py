"""Abuse resistance (issue 10): each attack made for real against a live ``farm api`` on loopback.

One API process of its own, with small limits, beside the session stack's worker, ledger and S3.
"""

from __future__ import annotations

import base64
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from db.usage_counters import today_utc
from tests.api_stack import APP, ApiStack, _write_certs, idle_input, tiny_input
from tests.services import free_port
from tests.workers import WorkerProcess, clean_env, run_farm

GiB = 2**30
MiB = 2**20
UPLOAD_CAP = MiB
QUOTA = MiB + MiB // 2


@pytest.fixture(scope="module")
def guarded(api_stack: ApiStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    """A second ``farm api`` on the same ledger and storage, with small limits."""
    root = tmp_path_factory.mktemp("abuse")
    with api_stack.beside(root / "api.log", FARM_MAX_UPLOAD_BYTES=str(UPLOAD_CAP), FARM_UPLOAD_QUOTA_BYTES=str(QUOTA),
                          FARM_MAX_STREAMS_PER_OWNER="2", FARM_MAX_BULK_RUNNING="1", FARM_MAX_BULK_IMAGES="1000",
                          FARM_OWNER_DAILY_GPU_SECONDS='{"abuse-spent": 1}') as stack:
        yield stack


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


def _answer_of(tls: socket.socket, data: bytes = b"") -> bytes:
    """Read one HTTP answer: its head and a body of its Content-Length (or up to the connection's end)."""
    for _ in range(1000):  # bounded: an answer is a few KB; each read waits at most 20 s
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                break
        try:
            chunk = tls.recv(65536)
        except (TimeoutError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


def _early(tls: ssl.SSLSocket, wait: float) -> bytes | None:
    """What the server has sent already (b"" if it hung up), or None: nothing within ``wait`` seconds.
    A readable socket alone says nothing: TLS 1.3 sends session tickets after the handshake."""
    end = time.monotonic() + wait
    while True:
        if tls.pending() or select.select([tls], [], [], max(0.0, end - time.monotonic()))[0]:
            tls.settimeout(0.0)
            try:
                return tls.recv(65536)
            except ssl.SSLWantReadError:  # a ticket, no answer yet
                pass
            finally:
                tls.settimeout(20)
        if time.monotonic() >= end:
            return None


def _push(stack: ApiStack, head: str, chunked: bool, deadline: float) -> tuple[bytes, int]:
    """Send a request's head, then up to 1 GiB of body in 1 MiB blocks, looking for the server's answer
    before each block (so that an answer followed by a hang-up is read, not lost); (answer, bytes sent)."""
    block = b"{" + b" " * (MiB - 1)
    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block
    sent = 0
    with (socket.create_connection(("127.0.0.1", stack.port), timeout=20) as raw,
          stack.ssl_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
        tls.sendall(head.encode())
        first = None
        while sent < GiB and time.monotonic() < deadline:
            # the first wait gives an answer to the head alone its chance; later ones only look
            first = _early(tls, 0.5 if sent == 0 else 0.0)
            if first is not None:
                break
            try:
                tls.sendall(frame)
            except OSError:  # the server hung up (after answering: read below)
                break
            sent += len(block)
        return _answer_of(tls, first or b""), sent


def _status(answer: bytes) -> int | None:
    first = answer.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[0].startswith(b"HTTP/") and first[1].isdigit() else None


def test_huge_bodies_without_a_key_are_refused_before_they_are_read(guarded: ApiStack) -> None:
    """Ten parallel 1 GiB bodies without a key, each answered: 401 (or 413 / 403 on the signed upload
    route, whose URL is its credential), read before the body is; the API's RSS grows < 50 MB."""
    assert guarded.proc is not None
    pid = guarded.proc.pid
    before = _rss(pid)
    peak = [before]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss(pid))
            time.sleep(0.02)

    deadline = time.monotonic() + 60  # bounded: a server that read it all would be caught by `sent`
    expires = int(time.time()) + 600
    signed = f"/storage/upload/signed/abuse/{uuid.uuid4().hex}/x.bin?expires={expires}&signature={'0' * 64}"
    paths = [f"/{APP}", "/storage/upload", signed]

    def attack(i: int) -> tuple[str, bool, int | None, int]:
        path, chunked = paths[i % 3], bool(i % 2)
        length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {GiB}"
        head = (f"{'PUT' if path == signed else 'POST'} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/json\r\n{length}\r\n\r\n")
        answer, sent = _push(guarded, head, chunked, deadline)
        return path, chunked, _status(answer), sent

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(attack, range(10)))
    finally:
        stop.set()
        watcher.join(5)
    peak[0] = max(peak[0], _rss(pid))
    for path, chunked, status, n in results:
        if path != signed:
            assert status == 401, results  # the key first, whatever the body
        else:  # no key needed: a declared length over the cap is 413 at the door, a bad signature 403
            assert status == (403 if chunked else 413), results
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
    head = (f"POST /{APP} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Key {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    answer, sent = _push(guarded, head, True, time.monotonic() + 60)
    assert _status(answer) == 413 and b"FARM_MAX_BODY_BYTES" in answer, answer[:300]
    assert sent < 256 * MiB
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


def _execute(stack: ApiStack, query: str, **params: Any) -> None:
    engine = create_engine(stack.db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(query), params)
    finally:
        engine.dispose()


def test_inline_inputs_count_against_the_upload_quota(guarded: ApiStack) -> None:
    """Data URIs stored under <owner>/inputs/ count with the owner's uploads (FARM_UPLOAD_QUOTA_BYTES)."""
    key = guarded.make_key("abuse-inline", "--max-in-flight", "10")
    with guarded.client(key) as c:
        assert c.post("/storage/upload", params={"file_name": "a.bin"}, content=b"u" * MiB).status_code == 200
        lora = "data:application/octet-stream;base64," + base64.b64encode(b"l" * (MiB // 2 + 1)).decode()
        over = c.post(f"/{APP}", json=idle_input(loras=[{"path": lora}]))
        assert over.status_code == 413, over.text
        assert over.json()["error_type"] == "upload_quota_exceeded" and "FARM_UPLOAD_QUOTA_BYTES" in over.text
        small = "data:application/octet-stream;base64," + base64.b64encode(b"s" * 1000).decode()
        ok = c.post(f"/{APP}", json=idle_input(loras=[{"path": small}]))
        assert ok.status_code == 200, ok.text
        # the stored input counts too, while its job lives: the upload that fitted beside the first one no longer does
        full = c.post("/storage/upload", params={"file_name": "b.bin"}, content=b"v" * (QUOTA - MiB))
        assert full.status_code == 413 and full.json()["error_type"] == "upload_quota_exceeded", full.text
        c.put(f"/{APP}/requests/{ok.json()['request_id']}/cancel")


def test_bulk_resume_keeps_the_running_cap_and_the_daily_quota(guarded: ApiStack) -> None:
    """FARM_MAX_BULK_RUNNING is 1 here: two paused jobs cannot both be resumed. An owner whose daily
    GPU-seconds are spent (its usage row written here: a day of rendering is not reproduced) gets 429."""
    manifest = "data:text/plain;base64," + base64.b64encode(b"a boat\n").decode()
    body: dict[str, Any] = {"manifest": manifest, "manifest_format": "txt", "budget_images": 5,
                            "model_name": "runwayml/stable-diffusion-v1-5"}
    for owner in ("abuse-resume", "abuse-spent"):
        with guarded.client(guarded.make_key(owner)) as c:
            ids = []
            for out in ("one", "two"):
                started = c.post("/bulk", json={**body, "out": out})
                assert started.status_code == 202, started.text
                ids.append(started.json()["bulk_id"])
                assert c.post(f"/bulk/{ids[-1]}/pause").status_code == 200
            if owner == "abuse-spent":
                _execute(guarded, "INSERT INTO usage (owner, model, day, source, images, frames, gpu_seconds) "
                         "VALUES ('abuse-spent', 'x', :day, 'batch', 1, 0, 5)", day=today_utc())
                for refused in (c.post(f"/bulk/{ids[0]}/resume"), c.post("/bulk", json={**body, "out": "three"})):
                    assert refused.status_code == 429, refused.text
                    assert refused.json()["error_type"] == "quota_exceeded"
            else:
                assert c.post(f"/bulk/{ids[0]}/resume").status_code == 200
                second = c.post(f"/bulk/{ids[1]}/resume")
                assert second.status_code == 429 and "FARM_MAX_BULK_RUNNING" in second.text, second.text
                assert c.get(f"/bulk/{ids[1]}").json()["status"] == "PAUSED"
            for bulk_id in ids:
                assert c.post(f"/bulk/{bulk_id}/cancel").status_code == 200


@pytest.fixture
def local_farm(redis_server, postgres_server, tmp_path: Path) -> Iterator[ApiStack]:
    """``farm api`` on local storage (a folder) with a ledger of its own; its worker is started by the test."""
    db_url = postgres_server.new_database(f"leak_{uuid.uuid4().hex[:10]}")
    env = clean_env(FARM_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/13", FARM_DATABASE_URL=db_url,
                    FARM_STORAGE_URL=f"file://{tmp_path / 'store'}", FARM_DATA_DIR=str(tmp_path / "data"),
                    FARM_BATCH_SIZE="4", FARM_BATCH_RETRIES="0", FARM_MAX_UPLOAD_BYTES=str(UPLOAD_CAP),
                    FARM_UPLOAD_QUOTA_BYTES=str(QUOTA))
    done = run_farm(["db", "upgrade"], env)
    assert done.returncode == 0, done.stderr
    stack = ApiStack(env=env, db_url=db_url, bucket="", port=free_port(), ca_path=_write_certs(tmp_path),
                     log_path=tmp_path / "api.log", worker=WorkerProcess(env))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        stack.worker.stop()


def test_a_shared_batch_storage_error_names_no_other_owners_objects(local_farm: ApiStack, tmp_path: Path) -> None:
    """Two owners' requests in one GPU batch; storing fails (each owner's storage folder is a regular
    file: a real fault, even for root). Neither owner's error or log names the other's objects."""
    owners = ("leak-alpha", "leak-bravo")
    keys = {owner: local_farm.make_key(owner) for owner in owners}
    rids = {}
    for owner in owners:  # queued before the worker starts, so that one batch takes both
        with local_farm.client(keys[owner]) as c:
            rids[owner] = c.post(f"/{APP}", json=tiny_input()).json()["request_id"]
    for owner in owners:
        (tmp_path / "store" / owner).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "store" / owner).write_text("not a folder")
    local_farm.worker.start()
    seen = {}
    for owner in owners:
        with local_farm.client(keys[owner]) as c:
            deadline = time.monotonic() + 120
            while (state := c.get(f"/{APP}/requests/{rids[owner]}/status", params={"logs": 1}).json())["status"] \
                    != "COMPLETED":
                assert time.monotonic() < deadline, state
                time.sleep(0.2)
            seen[owner] = str(state) + c.get(f"/{APP}/requests/{rids[owner]}").text
    failed = local_farm.worker.wait_for("failed:", 10)  # the worker's log has the details
    assert rids["leak-alpha"] in failed and rids["leak-bravo"] in failed, failed  # one batch held both
    for owner, other in (owners, owners[::-1]):
        assert "could not be stored" in seen[owner], seen[owner]
        assert other not in seen[owner] and rids[other] not in seen[owner], seen[owner]
        assert str(tmp_path) not in seen[owner], seen[owner]


def test_the_upload_quota_holds_across_api_processes(local_farm: ApiStack, tmp_path: Path) -> None:
    """Twenty-four 128 KiB uploads at once, through two API processes and both upload routes (raw POST
    and fal's signed PUT, local storage): the quota (1.5 MiB here) admits twelve, whatever the interleaving."""
    second = ApiStack(env=local_farm.env, db_url=local_farm.db_url, bucket="", port=free_port(),
                      ca_path=local_farm.ca_path, log_path=tmp_path / "api2.log", worker=local_farm.worker)
    second.start()
    try:
        key = local_farm.make_key("abuse-quota-race")
        size, n = 128 * 1024, 24
        with local_farm.client(key) as c:
            urls = [c.post("/storage/upload/initiate", json={"content_type": "a/b", "file_name": f"{i}.bin"}).json()
                    ["upload_url"].removeprefix(local_farm.base_url) for i in range(n // 2)]

        def upload(i: int) -> int:
            api = (local_farm, second)[i % 2]
            with api.client(key if i >= n // 2 else None) as c:
                if i >= n // 2:
                    return c.post("/storage/upload", params={"file_name": f"p{i}.bin"}, content=b"p" * size).status_code
                return c.put(urls[i], content=b"s" * size).status_code

        with ThreadPoolExecutor(n) as pool:
            codes = list(pool.map(upload, range(n)))
        assert sorted(codes) == [200] * 12 + [413] * (n - 12), codes
        stored = sum(p.stat().st_size for p in (tmp_path / "store" / "abuse-quota-race").rglob("*") if p.is_file())
        assert stored == 12 * size <= QUOTA
    finally:
        second.stop()
