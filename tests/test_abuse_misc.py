"""Abuse resistance (issue 20, findings 9 and 11), each attack made for real against live processes.

* 9: a name server that never answers. ``lonely`` is a ``farm api`` of its own ledger and broker database
  whose resolver (``FARM_DNS_SERVERS``) is a UDP socket on loopback that reads every query and answers
  none. A tenant's webhooks and URL inputs naming hosts under it must fail with a clear error, while
  another tenant's submits, reads and webhook go through.
* 11: ``/metrics`` is closed by default. The session API (no ``FARM_METRICS_TOKEN``) and a worker's exporter
  (the real ``serve_metrics`` of ``farm worker``, in a process of its own) refuse a scrape without the
  token; with it, or with ``FARM_METRICS_OPEN=true`` (``lonely`` sets it), a scrape works.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.api_stack import APP, ApiStack, idle_input
from tests.receivers import Receiver
from tests.workers import clean_env

OTHER_BROKER_DB = "12"  # a Redis database of its own: the session worker never sees lonely's messages


class Blackhole:
    """A DNS server that never answers: a UDP socket on loopback that reads each query and drops it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        while not self._stop.is_set():  # bounded by the fixture's life; each wait at most 0.2 s
            try:
                self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self.queries += 1

    def __enter__(self) -> Blackhole:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def blackhole() -> Iterator[Blackhole]:
    with Blackhole() as hole:
        yield hole


@pytest.fixture(scope="module")
def hook_receiver() -> Iterator[Receiver]:
    with Receiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def lonely(api_stack: ApiStack, postgres_server: Any, blackhole: Blackhole, hook_receiver: Receiver,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    """A second ``farm api`` on a ledger and broker database of its own (its webhook dispatcher is the only
    one reading its outbox), resolving names through the blackhole; metrics opened on purpose."""
    from tests.workers import run_farm

    root = tmp_path_factory.mktemp("abuse-misc")
    db_url = postgres_server.new_database(f"misc_{uuid.uuid4().hex[:10]}")
    broker = api_stack.env["FARM_BROKER_URL"].rsplit("/", 1)[0] + f"/{OTHER_BROKER_DB}"
    env = {"FARM_DATABASE_URL": db_url, "FARM_BROKER_URL": broker,
           "FARM_DATA_DIR": str(root / "data"),
           "FARM_DNS_SERVERS": json.dumps([f"127.0.0.1:{blackhole.port}"]),
           "FARM_WEBHOOK_ALLOWLIST": json.dumps([f"127.0.0.1:{hook_receiver.port}"]),
           "FARM_WEBHOOK_TIMEOUT_SECONDS": "3", "FARM_WEBHOOK_MAX_ATTEMPTS": "1",
           "FARM_INPUT_FETCH_DEADLINE_SECONDS": "3", "FARM_METRICS_OPEN": "true"}
    done = run_farm(["db", "upgrade"], {**api_stack.env, **env})
    assert done.returncode == 0, done.stderr
    with api_stack.beside(root / "api.log", db_url, **env) as stack:
        yield stack


# -- 9: a name server that never answers ----------------------------------------------------------------

SILENT = "tenant-a.example"  # any name: lonely asks the blackhole, which answers nothing


def _until(what: str, check: Any, seconds: float = 90) -> Any:
    """Poll ``check`` (bounded: at most ``seconds``, every 0.2 s) until it returns something true."""
    end = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < end, f"{what}: not within {seconds:g} s"
        time.sleep(0.2)


def test_webhooks_to_a_silent_name_server_hold_no_one_else(lonely: ApiStack, blackhole: Blackhole,
                                                           hook_receiver: Receiver) -> None:
    """Tenant A's webhooks name hosts whose name server never answers. Its submits are answered at once
    (no lookup on the request path), its deliveries fail with a clear error at their deadline, and
    meanwhile tenant B's submit, status reads and webhook go through."""
    a_key, b_key = lonely.make_key("dns-a"), lonely.make_key("dns-b")
    hooks = [f"http://hook{i}.{SILENT}:{hook_receiver.port}/a{i}" for i in range(10)]
    with lonely.client(a_key) as a, ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda hook: a.post(f"/{APP}", json=idle_input(), params={"fal_webhook": hook}),
                                hooks))
        assert [r.status_code for r in answers] == [200] * 10, [r.text[:300] for r in answers]
        assert blackhole.queries == 0  # nothing was looked up to answer them
        a_ids = [r.json()["request_id"] for r in answers]
        for rid in a_ids:  # each ends CANCELLED: its webhook is due now
            assert a.put(f"/{APP}/requests/{rid}/cancel").status_code == 202
    _until("A's first lookups", lambda: blackhole.queries > 0)
    with lonely.client(b_key) as b:
        r = b.post(f"/{APP}", json=idle_input(), params={"fal_webhook": hook_receiver.url("/b")})
        assert r.status_code == 200, r.text
        b_id = r.json()["request_id"]
        assert b.get(f"/{APP}/requests/{b_id}/status").json()["status"] == "IN_QUEUE"
        assert b.put(f"/{APP}/requests/{b_id}/cancel").status_code == 202
        _until("B's webhook", lambda: any(req.path == "/b" for req in hook_receiver.requests))
        assert b.get(f"/{APP}/requests/{b_id}/status").status_code == 200
    # B was delivered while A's deliveries (two at a time, each up to its deadline) were still going on
    pending = lonely.sql("SELECT count(*) FROM webhook_deliveries WHERE owner = 'dns-a' AND status = 'pending'")
    assert pending[0][0] > 0, pending

    def settled() -> list[Any]:
        rows = lonely.sql("SELECT d.status, a.error FROM webhook_deliveries d JOIN webhook_attempts a "
                          "ON a.delivery_id = d.id WHERE d.owner = 'dns-a'")
        return rows if len(rows) == 10 and all(status == "failed" for status, _ in rows) else []

    rows = _until("A's deliveries to fail", settled, 180)
    for _, error in rows:
        assert "did not resolve before the deadline" in error and SILENT in error, error
    assert not [req.path for req in hook_receiver.requests if req.path.startswith("/a")]
    assert lonely.sql("SELECT status FROM webhook_deliveries WHERE owner = 'dns-b'") == [("delivered",)]


def test_a_url_input_on_a_silent_name_server_fails_its_job_by_its_deadline(lonely: ApiStack,
                                                                         blackhole: Blackhole) -> None:
    """The fetch stage looks a LoRA URL's host up within the download's deadline: the job fails naming the
    field and the cause, and another tenant's reads go through meanwhile."""
    lora = {"path": f"https://weights.{SILENT}/style.safetensors", "scale": 1.0}
    with lonely.client(lonely.make_key("dns-fetch")) as a, lonely.client(lonely.make_key("dns-reader")) as b:
        r = a.post(f"/{APP}", json=idle_input(loras=[lora]))
        assert r.status_code == 200, r.text
        rid = r.json()["request_id"]
        other = b.post(f"/{APP}", json=idle_input())
        assert other.status_code == 200, other.text
        assert b.get(f"/{APP}/requests/{other.json()['request_id']}/status").json()["status"] == "IN_QUEUE"
        _until("the job to fail", lambda: lonely.sql("SELECT 1 FROM jobs WHERE id = :i AND status = 'FAILED'",
                                                     i=rid), 120)
    ((error, error_type),) = lonely.sql("SELECT error, error_type FROM jobs WHERE id = :i", i=rid)
    assert error_type == "file_download_error", (error, error_type)
    assert error.startswith("loras.0.path") and "did not resolve before the deadline" in error, error
    assert blackhole.queries > 0  # it was asked, and never answered


# -- 11: metrics are closed by default ------------------------------------------------------------------


def test_api_metrics_refuse_a_scrape_when_no_token_is_set(api_stack: ApiStack) -> None:
    """The session API sets no FARM_METRICS_TOKEN and does not open its metrics: nobody reads them."""
    assert "FARM_METRICS_TOKEN" not in api_stack.env and "FARM_METRICS_OPEN" not in api_stack.env
    key = api_stack.make_key("scraper")
    with api_stack.client(key) as c:  # a tenant's own key is no metrics token either
        for path in ("/metrics", "/metrics/targets"):
            for headers in ({}, {"Authorization": "Bearer x"}, {"Authorization": f"Bearer {key}"}):
                r = c.get(path, headers=headers)
                assert r.status_code == 401, (path, r.text[:300])
                assert "FARM_METRICS_TOKEN" in r.text and "farm_" not in r.text
                assert r.headers["www-authenticate"] == "Bearer"


def test_api_metrics_open_only_when_the_operator_says_so(lonely: ApiStack) -> None:
    with httpx.Client(base_url=lonely.base_url, verify=lonely.ssl_context, timeout=60) as c:
        r = c.get("/metrics")
        assert r.status_code == 200, r.text[:300]
        assert "farm_http_requests_total" in r.text


@contextmanager
def exporter(**farm_vars: str) -> Iterator[str]:
    """A worker's exporter as ``farm worker`` starts it (tasks.worker_process.serve_metrics), in a process
    of its own with ``farm_vars``, holding one sample that names an owner; its URL. The process ends when its
    stdin closes."""
    script = ("import sys\nfrom farm.config import get_settings\nfrom tasks.worker_process import serve_metrics\n"
              "url = serve_metrics(get_settings(), 0)\nfrom farm.metrics.defs import IMAGES\n"
              "IMAGES.labels('tiny-lcm', 'alice').inc()\nprint(url, flush=True)\nsys.stdin.read()\n")
    env = clean_env(FARM_METRICS_HOST="127.0.0.1", **farm_vars)
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_worker_exporter_is_closed_without_a_token() -> None:
    with exporter() as url:
        r = httpx.get(url, timeout=30)
        assert r.status_code == 401 and "FARM_METRICS_TOKEN" in r.text and "alice" not in r.text
        assert httpx.get(url, headers={"Authorization": "Bearer x"}, timeout=30).status_code == 401


def test_worker_exporter_needs_its_token_or_the_open_setting() -> None:
    with exporter(FARM_METRICS_TOKEN="scrape-me") as url:
        assert httpx.get(url, timeout=30).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
        r = httpx.get(url, headers={"Authorization": "Bearer scrape-me"}, timeout=30)
        assert r.status_code == 200 and 'owner="alice"' in r.text
    with exporter(FARM_METRICS_TOKEN="scrape-me", FARM_METRICS_OPEN="true") as url:  # a set token still counts
        assert httpx.get(url, timeout=30).status_code == 401
    with exporter(FARM_METRICS_OPEN="true") as url:
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200 and 'owner="alice"' in r.text
