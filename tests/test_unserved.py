"""A job for a model that no live worker serves: it waits, and the user is told why (issue: first hour)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from datetime import timedelta

from sqlalchemy import create_engine, delete

from db.session import dispose_engines
from tests.api_stack import APP, IDLE_MODEL, idle_input, tiny_input
from tests.services import free_port
from tests.test_stack import _ledger, builtin_dir, stack  # noqa: F401  (fixtures)
from tests.workers import FARM, WorkerProcess, run_farm

SD15 = "runwayml/stable-diffusion-v1-5"


def test_the_submitter_is_told_that_no_live_worker_serves_the_model(stack):  # noqa: F811
    done = run_farm(["generate", "--model", SD15, "a red fox", "--timeout", "2"], stack["env"])
    assert done.returncode != 0  # nobody renders it: the client gives up after 2 s
    assert f"no live worker serves {SD15}" in done.stderr and "none has joined this farm yet" in done.stderr
    (rid,) = [r[0] for r in _ledger(stack, "SELECT id FROM jobs")]
    logs = _ledger(stack, "SELECT level, message FROM job_logs WHERE job_id = :id ORDER BY id", id=rid)
    assert any(level == "WARNING" and f"no live worker serves {SD15}" in message for level, message in logs)
    status = run_farm(["status", rid], stack["env"])
    assert f"no live worker serves {SD15}" in status.stdout, status.stdout


def test_require_live_worker_refuses_the_submit_naming_the_model(stack):  # noqa: F811
    env = dict(stack["env"], FARM_REQUIRE_LIVE_WORKER="true")
    done = run_farm(["generate", "--model", SD15, "a red fox", "--timeout", "5"], env)
    assert done.returncode != 0
    assert f"no live worker serves {SD15}" in done.stderr, done.stderr
    assert _ledger(stack, "SELECT count(*) FROM jobs") == [(0,)]  # refused before anything was recorded


def test_require_live_worker_answers_503_over_http_naming_the_model(api_stack, tmp_path):
    """The same setting on ``farm api``: the queue submit answers 503 ``no_live_worker`` at once."""
    strict = dataclasses.replace(api_stack, env=dict(api_stack.env, FARM_REQUIRE_LIVE_WORKER="true"),
                                 port=free_port(), log_path=tmp_path / "strict-api.log", proc=None, _ssl=None)
    key = api_stack.make_key("unserved-http")
    before = api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'unserved-http'")
    strict.start()
    try:
        with strict.client(key) as c:
            r = c.post(f"/{APP}", json=idle_input())
            served = c.post(f"/{APP}", json=tiny_input())  # a model that a live worker serves is accepted
    finally:
        strict.stop()
    assert r.status_code == 503, r.text
    assert IDLE_MODEL in r.text and "no live worker serves" in r.text, r.text
    assert served.status_code == 200, served.text
    after = api_stack.sql("SELECT count(*) FROM jobs WHERE owner = 'unserved-http'")
    assert after[0][0] == before[0][0] + 1  # only the served job was recorded


def test_the_sweeper_tells_a_queued_job_once_when_its_pool_goes_away(api_stack, monkeypatch):
    """Submitted while a worker of its model was live (no warning then), the job is told by the API's
    sweeper once that worker's heartbeat is gone, with the time it was last seen; in the HTTP status logs."""
    from sqlalchemy.orm import Session

    from db.models import Worker, utcnow
    from farm.config import get_settings, reset_settings
    from farm.lifecycle.pool import log_unserved

    engine = create_engine(api_stack.db_url)
    gone = "sd15@gone.test"  # a worker row only: it beats now, then stops beating (as a killed pool does)
    with Session(engine) as s, s.begin():
        s.add(Worker(name=gone, model_name=IDLE_MODEL, model_key="sd15", device="cuda:0", max_batch=4, loads=1,
                     pid=1, host="gone.test", started_at=utcnow(), heartbeat_at=utcnow()))
    key = api_stack.make_key("unserved-later")
    try:
        with api_stack.client(key) as c:
            rid = c.post(f"/{APP}", json=idle_input()).json()["request_id"]
            assert not _told(c, rid)  # a live worker served the model at submit
            last_seen = utcnow() - timedelta(minutes=2)
            with Session(engine) as s, s.begin():
                s.get(Worker, gone).heartbeat_at = last_seen  # its heartbeat stopped two minutes ago
            deadline = time.monotonic() + 60
            while not (told := _told(c, rid)):
                assert time.monotonic() < deadline, "the sweeper never said that no live worker serves the model"
                time.sleep(0.2)
            # another sweep (here, in this process) writes nothing more for it
            for name, value in api_stack.env.items():
                if name.startswith("FARM_"):
                    monkeypatch.setenv(name, value)
            reset_settings()
            try:
                log_unserved(get_settings())
            finally:
                dispose_engines()
                reset_settings()
            assert _told(c, rid) == told
            c.put(f"/{APP}/requests/{rid}/cancel")  # no queued job left to shift other tests' queue positions
    finally:
        with Session(engine) as s, s.begin():
            s.execute(delete(Worker).where(Worker.name == gone))
        engine.dispose()
    assert [level for level, _ in told] == ["WARNING"], told
    assert told[0][1].startswith(f"no live worker serves {IDLE_MODEL} (none since "
                                 f"{last_seen:%Y-%m-%d %H:%M:%S} UTC): the job waits"), told


def _told(client, rid: str) -> list[tuple[str, str]]:
    """The (level, message) lines of the request's ``?logs=1`` status that say no live worker serves it."""
    r = client.get(f"/{APP}/requests/{rid}/status", params={"logs": 1})
    assert r.status_code == 200, r.text
    return [(line["level"], line["message"]) for line in r.json()["logs"] or []
            if "no live worker serves" in line["message"]]


def test_bulk_run_warns_of_an_unserved_model_and_require_live_worker_refuses_it(stack, tmp_path):  # noqa: F811
    manifest = tmp_path / "prompts.txt"
    manifest.write_text("a boat\n")
    args = ["bulk", "run", str(manifest), "--out", str(tmp_path / "ds"), "--model", SD15, "--job-id", "waits"]
    refused = run_farm(args, dict(stack["env"], FARM_REQUIRE_LIVE_WORKER="true"))
    assert refused.returncode != 0 and f"no live worker serves {SD15}" in refused.stderr, refused.stderr
    assert _ledger(stack, "SELECT count(*) FROM bulk_jobs") == [(0,)]  # refused before anything was recorded

    log = tmp_path / "bulk.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([FARM, *args], env=stack["env"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while f"warning: no live worker serves {SD15}" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_a_job_whose_last_worker_leaves_mid_job_is_told_and_farm_generate_says_so(stack, tmp_path):  # noqa: F811
    """Issue 17, item 3: the only worker of the model stops (SIGTERM: it finishes its batch and leaves)
    while the job is IN_PROGRESS; the job's log gets the notice and `farm generate`, still waiting, prints it."""
    env = dict(stack["env"], FARM_HOLD_MS="100", FARM_BATCH_SIZE="4", FARM_SWEEP_SECONDS="0.5")
    worker = WorkerProcess(env, model="farm/hold", name="hold@leaves.test")
    stack["workers"].append(worker)
    worker.start()
    out = tmp_path / "generate.log"
    with open(out, "wb") as log:
        proc = subprocess.Popen([FARM, "generate", "--model", "farm/hold", "a long job", "--num-images", "60",
                                 "--image-size", "64x64", "--timeout", "300"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _ledger(stack, "SELECT id FROM jobs WHERE images_done > 0"):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.1)
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)  # the main process: a warm shutdown
        assert worker.wait(60) == 0, worker.output[-3000:]
        expected = "warning: no live worker serves farm/hold (none since "
        deadline = time.monotonic() + 60
        while expected not in out.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.2)
        (rid, status, done), = _ledger(stack, "SELECT id, status, images_done FROM jobs")
        assert status == "IN_PROGRESS" and 0 < done < 60, (status, done)
        told = [(level, message) for level, message in _ledger(
            stack, "SELECT level, message FROM job_logs WHERE job_id = :id ORDER BY id", id=rid)
            if message.startswith("no live worker serves")]
        assert len(told) == 1 and told[0][0] == "WARNING", told  # once, not at submit (a worker was live then)
        assert "the job waits for the rest of its images until one joins" in told[0][1], told
        line = next(ln for ln in out.read_text(errors="replace").splitlines() if expected in ln)
        assert line.startswith(expected) and line.endswith(told[0][1]), line  # one line, unwrapped
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: `farm generate` cancels the job and exits
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert _ledger(stack, "SELECT status FROM jobs") == [("CANCELLED",)]
