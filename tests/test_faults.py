"""Fault tests for "The ledger decides what runs": one fault in the middle of a job, and the job still
completes with every image stored exactly once, as object and as row.

Each test runs on the private servers of :mod:`tests.faults` with two ``farm worker --model farm/hold``
processes (farm/hold is the scheduling STAND-IN: it holds ``FARM_HOLD_MS`` per image instead of
rendering) and a real ``farm api``. No test asserts a timing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import httpx
import pytest

from tests.api_stack import APP
from tests.faults import FaultFarm, N, fault_farm_fixture, fault_servers_fixture, frozen, wait_until  # noqa: F401
from tests.workers import FARM

pytestmark = pytest.mark.slow

LEASE = 3.0  # FARM_LEASE_SECONDS of tests.faults.BASE_ENV


def _claimed_by(ff: FaultFarm, rid: str, worker: str) -> dict[int, list[int]]:
    rows = ff.sql("SELECT k, indices FROM batches WHERE job_id = :id AND worker = :w AND status = 'claimed'",
                  id=rid, w=worker)
    return {int(k): list(indices) for k, indices in rows}


def _stored(ff: FaultFarm, rid: str) -> set[int]:
    return {int(i) for (i,) in ff.sql('SELECT "index" FROM images WHERE job_id = :id', id=rid)}


def test_worker_sigkilled_mid_job(ff: FaultFarm) -> None:
    """A worker SIGKILLed mid-job: its batches are reaped after the lease and finished by the other."""
    victim, other = ff.start()
    rid = ff.submit("row 1: a worker killed mid-job")

    def victim_holds() -> dict[int, list[int]]:
        return _claimed_by(ff, rid, victim.name) if ff.count(rid) >= 16 else {}

    wait_until(victim_holds, 60, "the victim to hold a batch mid-job", lambda: ff.diagnose(rid), interval=0.01)
    victim.kill()
    lost = _claimed_by(ff, rid, victim.name)
    assert ff.count(rid) < N, "the worker must die in the middle of the job"
    ff.assert_completed(rid)
    for k in lost:
        worker, status = ff.sql("SELECT worker, status FROM batches WHERE job_id = :id AND k = :k", id=rid, k=k)[0]
        assert (worker, status) == (other.name, "done"), (k, worker, status, ff.diagnose(rid))


def test_worker_frozen_past_its_lease_then_woken(ff: FaultFarm) -> None:
    """A worker SIGSTOPped longer than its lease, then SIGCONTed: the job completes, its batches were finished
    by the other worker, and once it is alive again its late writes are refused (asserted on rows)."""
    victim, other = ff.start()
    assert victim.proc is not None
    rid = ff.submit("row 2: a worker frozen past its lease")

    def victim_renders() -> bool:
        """The victim holds a batch of which nothing is stored yet (it is rendering it)."""
        if ff.count(rid) < 16:
            return False
        stored = _stored(ff, rid)
        return any(not set(ix) & stored for ix in _claimed_by(ff, rid, victim.name).values())

    held: dict[int, list[int]] = {}
    fresh: list[int] = []
    stored_at_freeze: set[int] = set()
    for _ in range(5):  # bounded: the victim may finish its batch between the look and the SIGSTOP
        wait_until(victim_renders, 60, "the victim to render a batch mid-job", lambda: ff.diagnose(rid),
                   interval=0.01)
        with frozen(victim.proc.pid, group=True):
            time.sleep(0.3)  # anything the victim had in flight has landed
            held = _claimed_by(ff, rid, victim.name)
            stored_at_freeze = _stored(ff, rid)
            fresh = [k for k, ix in held.items() if not set(ix) & stored_at_freeze]
            if not fresh:
                continue  # woken at once; look again
            assert len(stored_at_freeze) < N, "the worker must freeze in the middle of the job"
            frozen_at = time.monotonic()

            def taken_over(held: dict[int, list[int]] = held, frozen_at: float = frozen_at) -> bool:
                rows = ff.sql("SELECT k, worker FROM batches WHERE job_id = :id AND k = ANY(:ks)", id=rid,
                              ks=list(held))
                return time.monotonic() - frozen_at > LEASE + 1 and all(w not in (None, victim.name)
                                                                       for _, w in rows)

            wait_until(taken_over, 60, "the frozen worker's batches to be taken over", lambda: ff.diagnose(rid),
                       interval=0.1)
        break
    assert held and fresh, f"the victim never froze holding a batch it was rendering\n{ff.diagnose(rid)}"
    woken_at = ff.now()
    ff.assert_completed(rid)

    def alive_again() -> bool:
        rows = ff.sql("SELECT heartbeat_at FROM workers WHERE name = :w", w=victim.name)
        return bool(rows) and rows[0][0] > woken_at

    wait_until(alive_again, 30, "the woken worker to beat again", lambda: ff.diagnose(rid), interval=0.1)
    time.sleep(1.5)  # let whatever the woken worker still wanted to write reach the ledger (or be refused)
    ff.assert_stored_once(rid)
    fenced = ff.has_column("batches", "token") and ff.has_column("images", "worker")
    columns = "worker, token, status" if fenced else "worker, NULL, status"
    print(f"fenced columns: {fenced}; held at the freeze: {held}; of which rendering: {fresh}")
    for k, indices in held.items():
        worker, token, status = ff.sql(f"SELECT {columns} FROM batches WHERE job_id = :id AND k = :k",
                                       id=rid, k=k)[0]
        assert (worker, status) == (other.name, "done"), (k, worker, status, ff.diagnose(rid))
        if not fenced:
            continue  # before the core rework: no fencing token, no writer of an image row to check
        assert token >= 2, (k, token)
        writers = dict(ff.sql('SELECT "index", worker FROM images WHERE job_id = :id AND "index" = ANY(:ix)',
                              id=rid, ix=indices))
        # images the victim stored before it froze were its to store; every other one is the other worker's
        late = {i: w for i, w in writers.items() if i not in stored_at_freeze and w != other.name}
        assert not late, f"batch {k}: rows written by a worker whose lease was gone: {late}"
        if k in fresh:
            assert set(writers.values()) == {other.name}, (k, writers)


def test_api_sigkilled_right_after_submit(ff: FaultFarm) -> None:
    """The API dies (SIGKILL) right after it answered a submit: the job completes; a new API serves the result."""
    ff.start()
    rid = ff.submit("row 3: the API killed after the submit")
    ff.kill_api()
    ff.assert_completed(rid)
    assert ff.api is not None
    ff.api.start()  # a new API process on the same ledger
    with ff.client() as c:
        status = c.get(f"/{APP}/requests/{rid}/status")
        result = c.get(f"/{APP}/requests/{rid}")
    assert status.status_code == 200 and status.json()["status"] == "COMPLETED", status.text
    assert result.status_code == 200, result.text
    assert len(result.json()["images"]) == N


def test_redis_frozen_mid_job(ff: FaultFarm) -> None:
    """Redis SIGSTOPped for 10 s mid-job, then SIGCONTed: the job completes."""
    ff.start()
    rid = ff.submit("row 4: Redis frozen")
    assert ff.wait_running(rid) < N
    proc = ff.servers.redis.proc
    assert proc is not None
    with frozen(proc.pid):
        time.sleep(10)
    ff.assert_completed(rid)


def test_s3_frozen_mid_job(ff: FaultFarm) -> None:
    """The S3 server (SeaweedFS) SIGSTOPped for 15 s mid-job, then SIGCONTed: the job completes."""
    ff.start()
    rid = ff.submit("row 5: S3 frozen")
    assert ff.wait_running(rid) < N
    proc = ff.servers.s3.proc
    assert proc is not None
    with frozen(proc.pid):
        time.sleep(15)
    ff.assert_completed(rid, timeout=180)


def test_postgres_stopped_and_restarted_mid_job(ff: FaultFarm) -> None:
    """PostgreSQL stopped with ``pg_ctl stop -m immediate`` mid-job and started again: the job completes."""
    ff.start()
    rid = ff.submit("row 6: PostgreSQL down")
    assert ff.wait_running(rid) < N
    try:
        ff.servers.stop_postgres_immediately()
        time.sleep(3)
    finally:
        ff.servers.postgres.start()
    ff.assert_completed(rid, timeout=180)


def test_300_concurrent_one_image_submits(ff: FaultFarm) -> None:
    """300 one-image submits at once over HTTP (a key allowing 1000 in flight): no 5xx, all 300 complete."""
    ff.start()
    assert ff.api is not None
    count = 300
    answers: list[tuple[int, str]] = []
    errors: list[str] = []
    gate = threading.Barrier(count, timeout=60)
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    with httpx.Client(base_url=ff.api.base_url, verify=ff.api.ssl_context, limits=limits, timeout=120,
                      headers={"Authorization": f"Key {ff.key}"}) as client:

        def submit(i: int) -> None:
            try:
                gate.wait()
                response = client.post(f"/{APP}", json=ff.job_input(f"row 7: burst {i}", 1))
                answers.append((response.status_code, response.text))
            except Exception as exc:
                errors.append(f"{i}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=submit, args=(i,), daemon=True) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    assert not errors, errors[:5]
    bad = [(code, body[:200]) for code, body in answers if code not in (200, 201)]
    assert len(answers) == count and not bad, (len(answers), bad[:5], ff.api_tail())
    rids = [json.loads(body)["request_id"] for _, body in answers]
    assert len(set(rids)) == count

    def all_done() -> bool:
        rows = ff.sql("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status IN ('COMPLETED', 'FAILED', "
                      "'CANCELLED')", ids=rids)
        return bool(rows[0][0] == count)

    wait_until(all_done, 180, "all 300 jobs to finish",
               lambda: str(ff.sql("SELECT status, count(*) FROM jobs GROUP BY 1")) + "\n" + ff.diagnose(), 0.2)
    statuses = ff.sql("SELECT status, error_type, count(*) FROM jobs WHERE id = ANY(:ids) GROUP BY 1, 2", ids=rids)
    assert [tuple(r) for r in statuses] == [("COMPLETED", None, count)], statuses
    images = ff.sql('SELECT job_id, "index" FROM images WHERE job_id = ANY(:ids)', ids=rids)
    assert sorted(images) == sorted((rid, 0) for rid in rids)
    keys = sorted(str(o.object_name) for o in ff.minio.list_objects(ff.bucket, prefix="outputs/", recursive=True))
    assert keys == sorted(f"outputs/faults/{rid}/0.jpg" for rid in rids)


def test_redis_killed_mid_job_and_restarted_empty(ff: FaultFarm) -> None:
    """Redis SIGKILLed mid-job and started again WITHOUT its data (no AOF, no save: every message is lost):
    the sweeper republishes the queued batches and the job completes."""
    ff.start()
    rid = ff.submit("row 8: Redis killed and restarted empty")
    assert ff.wait_running(rid) < N
    server = ff.servers.redis
    assert server.proc is not None
    try:
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    finally:
        server.start()
    ff.assert_completed(rid, timeout=180)


def test_redis_down_when_submitted(ff: FaultFarm) -> None:
    """Redis down when a job is submitted, over HTTP and with ``farm generate``; started again 5 s later.

    The HTTP submit answers 200/201 with a request id (not 503), the CLI exits 0, and neither job is ever
    FAILED with broker_unavailable: both complete.
    """
    ff.start()
    server = ff.servers.redis
    cli: subprocess.Popen[str] | None = None
    try:
        server.stop()
        rid = ff.submit("row 9: submitted while Redis is down")
        submitted = time.monotonic()
        cli = subprocess.Popen([FARM, "generate", "row 9: generated while Redis is down", "--model", "farm/hold",
                                "--num-images", str(N), "--image-size", "64x64", "--timeout", "150"],
                               env=ff.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def cli_job() -> str | None:
            assert cli is not None
            rows = ff.sql("SELECT id FROM jobs WHERE source = 'cli'")
            if not rows and cli.poll() is not None:
                pytest.fail(f"farm generate exited {cli.returncode} before recording its job: "
                            f"{cli.communicate()[1][-2000:]}")
            return str(rows[0][0]) if rows else None

        cli_rid = wait_until(cli_job, 60, "farm generate to record its job", ff.diagnose)
        while time.monotonic() - submitted < 5:  # down for 5 s after the submit; neither job may fail meanwhile
            assert ff.status(rid) != "FAILED" and ff.status(cli_rid) != "FAILED", ff.diagnose(rid)
            time.sleep(0.2)
    finally:
        server.start()
    assert cli is not None
    try:
        out, err = cli.communicate(timeout=180)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
    ff.assert_completed(rid)
    assert cli.returncode == 0, f"farm generate exited {cli.returncode}:\n{err[-3000:]}\n{ff.diagnose(cli_rid)}"
    assert f"request {cli_rid}" in err
    ff.assert_completed(cli_rid, owner="local")


def test_workers_with_a_lower_image_limit_than_the_submitter(ff: FaultFarm) -> None:
    """The API takes up to 200 images per request, the workers were started with the default 64: a 160-image
    job (validated by its submitter) completes."""
    ff.start(worker_env={"FARM_MAX_NUM_IMAGES": "64"}, api_env={"FARM_MAX_NUM_IMAGES": "200"})
    rid = ff.submit("row 10: more images than the workers' own limit")
    ff.assert_completed(rid)


POISON = "row 11: a poison pill"


def test_batch_that_kills_its_worker_fails_its_job_after_bounded_retries(ff: FaultFarm) -> None:
    """A batch that SIGKILLs its worker process on every attempt: its job ends FAILED after FARM_BATCH_RETRIES
    retries, the error naming the failing indices; a job submitted meanwhile on the same pool completes.

    The kill is the TEST-ONLY fault hook (a fake, not a farm feature): ``FARM_FAULT_KILL_PROMPT=<text>`` on the
    workers makes a worker process SIGKILL itself when it starts rendering a batch with an image of that prompt.
    The poison job has another image size, so it never shares a GPU batch with the good one, and uploads are
    inline (FARM_PIPELINE_DEPTH=0), so a worker dies holding only the poison batch.
    """
    retries = 1
    ff.start(worker_env={"FARM_FAULT_KILL_PROMPT": POISON, "FARM_BATCH_RETRIES": str(retries),
                         "FARM_PIPELINE_DEPTH": "0"},
             api_env={"FARM_BATCH_RETRIES": str(retries)})
    poison = ff.submit(POISON, 4, image_size={"width": 72, "height": 72})
    wait_until(lambda: ff.sql("SELECT 1 FROM batches WHERE job_id = :id AND attempts >= 1", id=poison), 60,
               "the poison batch to be taken", lambda: ff.diagnose(poison))
    good = ff.submit("row 11: a good job beside the poison")
    assert ff.wait_finished(poison, 120) == "FAILED", ff.diagnose(poison)
    error, error_type = ff.sql("SELECT error, error_type FROM jobs WHERE id = :id", id=poison)[0]
    batches = ff.sql("SELECT k, indices, status, attempts FROM batches WHERE job_id = :id ORDER BY k", id=poison)
    failed = [(list(ix), attempts) for _, ix, status, attempts in batches if status == "failed"]
    assert failed, (batches, ff.diagnose(poison))
    assert any(str(ix) in (error or "") for ix, _ in failed), (error, batches)
    assert all(attempts == retries + 1 for _, attempts in failed), batches
    assert all(attempts <= retries + 1 for *_, attempts in batches), batches
    assert ff.count(poison) == 0
    print(f"poison job: {error_type}: {error}")
    ff.assert_completed(good)
    assert all(w.proc is not None and w.proc.poll() is None for w in ff.workers), "a worker did not survive"
