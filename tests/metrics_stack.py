"""A farm for the metrics and usage tests: ``farm api`` (plain HTTP) and one ``farm worker`` of the tiny
model with its exporter on a free port, on the private Redis / PostgreSQL / S3 servers."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from tests.services import free_port
from tests.workers import FARM, WorkerProcess, clean_env, run_farm

APP = "fal-ai/fast-lcm-diffusion"
REDIS_DB = "11"  # a database of its own: no other test's messages
TOKEN = "scrape-secret"


def tiny(**extra: Any) -> dict[str, Any]:
    return {"model_name": "farm/tiny-lcm", "prompt": "a lighthouse", "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 2, **extra}  # fmt: skip


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: str) -> tuple[set[str], Samples]:
    """Family names and samples ``(name, labels) → value`` of a scrape."""
    names, samples = set(), {}
    for family in text_string_to_metric_families(body):
        names.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return names, samples


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


@dataclass
class MetricsStack:
    env: dict[str, str]
    db_url: str
    port: int
    metrics_port: int
    log_path: Path
    worker: WorkerProcess
    keys: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, owner: str | None = None) -> httpx.Client:
        headers = {}
        if owner is not None:
            if owner not in self.keys:
                done = run_farm(["keys", "create", "--owner", owner], self.env)
                assert done.returncode == 0, done.stderr
                self.keys[owner] = done.stdout.strip()
            headers["Authorization"] = f"Key {self.keys[owner]}"
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def scrape_api(self) -> tuple[set[str], Samples]:
        r = httpx.get(f"{self.base_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 200, r.text
        return parse(r.text)

    def scrape_worker(self) -> tuple[set[str], Samples]:
        r = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=30)
        assert r.status_code == 200, r.text
        return parse(r.text)

    def submit(self, owner: str, **extra: Any) -> str:
        with self.client(owner) as c:
            r = c.post(f"/{APP}", json=tiny(**extra))
            assert r.status_code == 200, r.text
            return str(r.json()["request_id"])

    def wait_done(self, owner: str, rid: str, timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client(owner) as c:
            while time.monotonic() < deadline:
                body: dict[str, Any] = c.get(f"/{APP}/requests/{rid}/status").json()
                if body["status"] == "COMPLETED":
                    return body
                time.sleep(0.1)
        raise TimeoutError(f"{rid} not done in {timeout} s:\n{self.worker.output[-3000:]}")

    def sql(self, query: str, **params: Any) -> list[Any]:
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(query), params).all())
        finally:
            engine.dispose()

    def start_api(self, timeout: float = 60) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([FARM, "api", "--host", "127.0.0.1", "--port", str(self.port)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"farm api exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"farm api did not come up:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.worker.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def metrics_stack(redis_server, postgres_server, s3_server, tmp_path_factory) -> Iterator[MetricsStack]:
    """The API is up; the worker is not started yet (the first test starts it)."""
    import redis

    root = tmp_path_factory.mktemp("metrics-stack")
    db_url = postgres_server.new_database(f"metrics_{uuid.uuid4().hex[:10]}")
    metrics_port = free_port()
    env = clean_env(
        FARM_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}",
        FARM_DATABASE_URL=db_url,
        FARM_STORAGE_URL=f"s3://metrics-{uuid.uuid4().hex[:10]}/outputs",
        FARM_S3_ENDPOINT=s3_server.endpoint,
        FARM_S3_ACCESS_KEY="testing",
        FARM_S3_SECRET_KEY="testing",
        FARM_DATA_DIR=str(root / "data"),
        FARM_METRICS_TOKEN=TOKEN,
        FARM_BATCH_WAIT_MS="200",
        FARM_WEBHOOK_ALLOWLIST=json.dumps(["127.0.0.1"]),
        FARM_WEBHOOK_MAX_ATTEMPTS="1",
        FARM_WEBHOOK_TIMEOUT_SECONDS="2",
        FARM_OWNER_DAILY_GPU_SECONDS=json.dumps({"capped": 1e-6}),
    )
    redis.Redis.from_url(env["FARM_BROKER_URL"]).flushdb()
    done = run_farm(["db", "upgrade"], env)
    assert done.returncode == 0, done.stderr
    worker_env = dict(env, FARM_METRICS_PORT=str(metrics_port))
    stack = MetricsStack(env=env, db_url=db_url, port=free_port(), metrics_port=metrics_port,
                         log_path=root / "api.log", worker=WorkerProcess(worker_env, name="metrics-worker"))
    try:
        stack.start_api()
        yield stack
    finally:
        stack.stop()
