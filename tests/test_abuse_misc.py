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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.api_stack import ApiStack
from tests.receivers import Receiver
from tests.services import free_port
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
    env = {**api_stack.env, "FARM_DATABASE_URL": db_url, "FARM_BROKER_URL": broker,
           "FARM_DATA_DIR": str(root / "data"),
           "FARM_DNS_SERVERS": json.dumps([f"127.0.0.1:{blackhole.port}"]),
           "FARM_WEBHOOK_ALLOWLIST": json.dumps([f"127.0.0.1:{hook_receiver.port}"]),
           "FARM_WEBHOOK_TIMEOUT_SECONDS": "3", "FARM_WEBHOOK_MAX_ATTEMPTS": "1",
           "FARM_INPUT_FETCH_DEADLINE_SECONDS": "3", "FARM_METRICS_OPEN": "true"}
    done = run_farm(["db", "upgrade"], env)
    assert done.returncode == 0, done.stderr
    stack = ApiStack(env=env, db_url=db_url, bucket=api_stack.bucket, port=free_port(),
                     ca_path=api_stack.ca_path, log_path=root / "api.log", worker=api_stack.worker)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


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
