"""Abuse resistance of the HTTP API's submit path (issue 20, findings 1, 7, 8): each attack made for real
against a live ``farm api`` on loopback (``tests.test_abuse``'s ``guarded`` stack, small limits)."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

from tests import test_abuse
from tests.api_stack import APP, ApiStack, idle_input
from tests.receivers import Receiver

guarded = test_abuse.guarded  # module fixture: a second farm api with small limits (one for this module)

MAX_LIST_ITEMS = 64  # farm.schemas.MAX_LIST_ITEMS, as a client sees it
MAX_FIELD_ERRORS = 20


def _compact(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def test_a_long_lora_list_is_refused_at_its_length_while_another_tenant_reads(guarded: ApiStack) -> None:
    """139,000 LoRA items (1.8 MB, under FARM_MAX_BODY_BYTES) are refused by the list's length before any
    item is validated: a small 422 naming the field and the limit (it used to validate every item on
    the event loop, then answer 'at most 4 LoRAs' after seconds; 600,000 empty items made a 47 MB 422).
    Another tenant's status reads, running all along, are answered while the long requests are."""
    attacker, reader = guarded.make_key("abuse-list"), guarded.make_key("abuse-list-reader")
    with guarded.client(reader) as c:
        rid = c.post(f"/{APP}", json=idle_input()).json()["request_id"]
    bodies = [_compact(idle_input(loras=[{"path": "a"}] * 139_000)), _compact(idle_input(loras=[{}] * 600_000))]
    assert all(len(b) < 2 * 2**20 for b in bodies)
    events: list[str] = []  # in the order they happened (no clock)
    lock = threading.Lock()
    done = threading.Event()
    failures: list[int] = []

    def read() -> None:
        with guarded.client(reader) as c:
            for _ in range(5000):  # bounded; ends when the attack does
                if done.is_set():
                    return
                status = c.get(f"/{APP}/requests/{rid}/status").status_code
                with lock:
                    events.append("read")
                if status != 200:
                    failures.append(status)

    reading = threading.Thread(target=read, daemon=True)
    reading.start()
    answers = []
    try:
        with guarded.client(attacker, **{"Content-Type": "application/json"}) as c:
            for i in range(6):
                with lock:
                    events.append(f"sent {i}")
                answers.append(c.post(f"/{APP}", content=bodies[i % 2]))
                with lock:
                    events.append(f"answered {i}")
    finally:
        done.set()
        reading.join(60)
    for r in answers:
        assert r.status_code == 422, r.text[:300]
        assert len(r.content) < 1000, len(r.content)  # a few hundred bytes, not megabytes
        (err,) = r.json()["detail"]
        assert err["loc"] == ["body", "loras"] and f"at most {MAX_LIST_ITEMS} items" in err["msg"], err
    assert failures == [] and not reading.is_alive()
    during = [events[events.index(f"sent {i}"):events.index(f"answered {i}")].count("read") for i in range(6)]
    assert sum(during) >= 1, during  # the other tenant was answered while a long request was in the API
    assert guarded.sql("SELECT count(*) FROM jobs WHERE owner = 'abuse-list'") == [(0,)]
    with guarded.client(reader) as c:
        c.put(f"/{APP}/requests/{rid}/cancel")


def test_error_bodies_name_a_few_dozen_fields_at_most(guarded: ApiStack) -> None:
    """64 bad LoRAs (the most a list may hold) and 50,000 unknown fields: each answer lists at most
    MAX_FIELD_ERRORS fields, then how many more there were."""
    key = guarded.make_key("abuse-errors")
    with guarded.client(key, **{"Content-Type": "application/json"}) as c:
        bad_items = c.post(f"/{APP}", content=_compact(idle_input(loras=[{"scale": 99}] * MAX_LIST_ITEMS)))
        unknown = c.post(f"/{APP}", content=_compact({**idle_input(), **{f"x{i}": 1 for i in range(50_000)}}))
    assert bad_items.status_code == 422, bad_items.text[:300]
    detail = bad_items.json()["detail"]
    assert len(detail) == MAX_FIELD_ERRORS + 1, len(detail)
    assert detail[0]["loc"][:3] == ["body", "loras", 0]
    assert detail[-1]["type"] == "too_many_errors" and "108 more" in detail[-1]["msg"], detail[-1]
    assert unknown.status_code == 422, unknown.text[:300]
    (err,) = unknown.json()["detail"]
    assert err["loc"] == ["body"] and "50000 unknown fields" in err["msg"], err
    assert len(unknown.content) < 1000


def _data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def _stored_inputs(stack: ApiStack, owner: str) -> list[str]:
    """The objects under the owner's stored inputs (``<owner>/inputs/`` of the stack's bucket), read from S3."""
    s3 = Minio(stack.env["FARM_S3_ENDPOINT"], access_key="testing", secret_key="testing", secure=False)
    prefix = f"outputs/{owner}/inputs/"
    return sorted(str(o.object_name) for o in s3.list_objects(stack.bucket, prefix=prefix, recursive=True))


def test_an_idempotent_retry_with_a_data_uri_lora_is_the_same_request(guarded: ApiStack) -> None:
    """The stored input names the data URI's storage key, not the URI: a retry with the same key and the
    same body is compared with the digest of what the client sent, and answers the same request_id."""
    key = guarded.make_key("abuse-idem")
    body = idle_input(loras=[{"path": _data_uri(b"idempotent lora " * 64), "scale": 0.5}])
    with guarded.client(key, **{"Idempotency-Key": "retry-1"}) as c:
        first = c.post(f"/{APP}", json=body)
        again = c.post(f"/{APP}", json=body)
        other = c.post(f"/{APP}", json={**body, "loras": [{"path": _data_uri(b"another lora " * 64)}]})
    with guarded.client(key) as c:  # the input's request_id is the key when no header is given
        by_id = [c.post(f"/{APP}", json={**body, "request_id": "rid-retry-1"}) for _ in range(2)]
        c.put(f"/{APP}/requests/{first.json()['request_id']}/cancel")
        c.put(f"/{APP}/requests/{by_id[0].json()['request_id']}/cancel")
    assert first.status_code == 200 and again.status_code == 200, again.text
    assert again.json()["request_id"] == first.json()["request_id"]
    assert other.status_code == 422 and "already used for a different request" in other.text, other.text
    assert [r.status_code for r in by_id] == [200, 200] and by_id[0].json() == by_id[1].json(), by_id[1].text
    stored = guarded.sql("SELECT input FROM jobs WHERE id = :id", id=first.json()["request_id"])[0][0]
    assert stored["loras"][0]["path"].startswith("farm-stored:")  # the row holds a key, the retry a URI
    assert guarded.sql("SELECT count(*) FROM jobs WHERE owner = 'abuse-idem'") == [(2,)]


def test_a_burst_of_identical_submits_with_a_data_uri_at_the_in_flight_limit(guarded: ApiStack) -> None:
    """An owner one job under its in-flight limit sends 40 identical requests at once, each with the same
    data-URI LoRA, then 40 with a LoRA each of its own: one of each burst is admitted (no extra job), and
    the stored inputs left are exactly the admitted jobs' (none of a refused submit is orphaned, and
    the one an admitted job names is there)."""
    owner = "abuse-burst"
    key = guarded.make_key(owner, "--max-in-flight", "2")
    with guarded.client(key) as c:
        first = c.post(f"/{APP}", json=idle_input(prompt="the one before"))
        assert first.status_code == 200, first.text

    def submit(body: dict[str, Any]) -> int:
        with guarded.client(key) as c:
            return c.post(f"/{APP}", json=body).status_code

    same = idle_input(loras=[{"path": _data_uri(b"the same lora " * 100)}])
    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(submit, [same] * 40))
    assert sorted(codes) == [200] + [429] * 39, codes
    with guarded.client(key) as c:  # a slot again: the next burst races for it
        c.put(f"/{APP}/requests/{first.json()['request_id']}/cancel")
    own = [idle_input(loras=[{"path": _data_uri(f"lora {i} ".encode() * 100)}]) for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(submit, own))
    assert sorted(codes) == [200] + [429] * 39, codes
    rows = guarded.sql("SELECT id, input FROM jobs WHERE owner = :o AND status = 'IN_QUEUE'", o=owner)
    assert len(rows) == 2
    named = sorted("outputs/" + inp["loras"][0]["path"].removeprefix("farm-stored:") for _, inp in rows)
    assert _stored_inputs(guarded, owner) == named
    with guarded.client(key) as c:
        for rid, _ in rows:
            c.put(f"/{APP}/requests/{rid}/cancel")


CACHE_CAP = 250_000
LORA = 100_000


@pytest.fixture(scope="module")
def fetching(api_stack: ApiStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiStack, Receiver]]:
    """A ``farm api`` that fetches https:// file inputs from a loopback server it trusts (allow-listed, its
    CA in SSL_CERT_FILE), with a small input cache and upload quota and a data_dir of its own (the cache
    measured is its alone); on the session stack's ledger and S3."""
    trustme = pytest.importorskip("trustme")
    root = tmp_path_factory.mktemp("abuse-fetch")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "files-ca.pem"))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(tls)
    with Receiver(tls=tls) as files, api_stack.beside(root / "api.log", FARM_DATA_DIR=str(root / "data"),
                          SSL_CERT_FILE=str(root / "files-ca.pem"),
                          FARM_WEBHOOK_ALLOWLIST=json.dumps([f"localhost:{files.port}"]),
                          FARM_INPUT_CACHE_MAX_BYTES=str(CACHE_CAP),
                          FARM_UPLOAD_QUOTA_BYTES=str(4 * LORA)) as stack:
        yield stack, files


def _fetched(stack: ApiStack, rid: str) -> str:
    """The job's status once the fetch stage is done with it (bounded wait)."""
    for _ in range(600):  # 60 s at most
        (status, waiting), = stack.sql("SELECT j.status, count(b.id) FILTER (WHERE b.status = 'fetching') FROM jobs j "
                                       "JOIN batches b ON b.job_id = j.id WHERE j.id = :id GROUP BY j.status", id=rid)
        if status != "IN_QUEUE" or waiting == 0:
            return str(status)
        time.sleep(0.1)
    raise AssertionError(f"{rid} was never fetched")


def _cache(stack: ApiStack) -> dict[str, bytes]:
    folder = Path(stack.env["FARM_DATA_DIR"]) / "inputs"
    return {p.name: p.read_bytes() for p in folder.glob("*") if p.is_file() and not p.name.startswith(".tmp-")}


def test_the_input_cache_is_bounded_and_written_only_within_the_quota(fetching: tuple[ApiStack, Receiver]) -> None:
    """Eight URLs of one file (``?n=1`` … ``?n=8``) each cost a download, but the API's cache keeps at most
    FARM_INPUT_CACHE_MAX_BYTES (it kept a full copy per URL); a download that does not fit in its owner's
    quota fails the job and leaves no copy in the cache (it was cached before the quota check)."""
    stack, files = fetching
    lora = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"c" * (LORA - 16)
    files.default = (200, {"Content-Type": "application/octet-stream"}, lora)
    key = stack.make_key("abuse-cache", "--max-in-flight", "20")
    rids = []
    with stack.client(key) as c:
        for n in range(1, 9):
            url = files.url(f"/lora.safetensors?n={n}", host="localhost")
            r = c.post(f"/{APP}", json=idle_input(loras=[{"path": url}]))
            assert r.status_code == 200, r.text
            rids.append(r.json()["request_id"])
            assert _fetched(stack, rids[-1]) == "IN_QUEUE"  # fetched, stored, queued (no worker serves it)
    assert len(files.requests) == 8
    cached = _cache(stack)
    assert 0 < sum(map(len, cached.values())) <= CACHE_CAP, {k: len(v) for k, v in cached.items()}
    assert all(v == lora for v in cached.values())

    # an owner whose quota is nearly full: the download is refused by the quota, and never cached
    full = stack.make_key("abuse-cache-full")
    other = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"d" * (LORA - 16)
    files.default = (200, {"Content-Type": "application/octet-stream"}, other)
    with stack.client(full) as c:
        assert c.post("/storage/upload", params={"file_name": "f.bin"}, content=b"f" * (4 * LORA - 1000)).is_success
        r = c.post(f"/{APP}", json=idle_input(loras=[{"path": files.url("/other.safetensors", host="localhost")}]))
        assert r.status_code == 200, r.text
        assert _fetched(stack, r.json()["request_id"]) == "FAILED"
        state = c.get(f"/{APP}/requests/{r.json()['request_id']}/status").json()
    assert "FARM_UPLOAD_QUOTA_BYTES" in state["error"] and "loras.0.path" in state["error"], state
    assert stack.bucket not in state["error"] and "abuse-cache-full/" not in state["error"], state
    assert other not in _cache(stack).values()
    with stack.client(key) as c:
        for rid in rids:
            c.put(f"/{APP}/requests/{rid}/cancel")
