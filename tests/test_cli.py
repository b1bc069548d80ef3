"""The `farm` CLI as a newcomer meets it (issue 17): a wrong --device, a bound, a reused request id,
and `farm cancel` for a job that a killed `farm generate` left queued. Real `farm` processes; the
cancel test runs on the private Redis, PostgreSQL and S3 servers."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.test_stack import _bucket_keys, _ledger, _start_worker, builtin_dir, stack  # noqa: F401  (fixtures)
from tests.workers import FARM, clean_env, run_farm

TINY = "farm/tiny-lcm"


def _jobs(data: Path) -> int:
    """Jobs in an embedded farm's ledger (none if it was never created)."""
    if not (data / "ledger.db").exists():
        return 0
    with sqlite3.connect(data / "ledger.db") as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


def test_a_wrong_or_missing_device_is_bad_input_before_anything_runs(tmp_path: Path) -> None:
    """`--device banana`, and a CUDA or MPS device this machine does not have: exit 2 naming --device,
    no traceback, nothing recorded; the same check for `farm generate` and `farm worker`."""
    data = tmp_path / "data"
    env = clean_env(FARM_DATA_DIR=str(data))
    banana = run_farm(["generate", "a red fox", "--model", TINY, "--device", "banana"], env)
    assert banana.returncode == 2, banana.stderr
    assert "error: --device: must be cpu, cuda:N or mps (got 'banana')" in banana.stderr, banana.stderr
    # cuda:99 exists nowhere: on a CPU-only torch it says so, on a GPU host it counts the devices
    for device, why in (("cuda:99", "cuda:99 is not available: "), ("mps", "mps is not available on this machine")):
        done = run_farm(["generate", "a red fox", "--model", TINY, "--device", device], env)
        assert done.returncode == 2, done.stderr
        assert f"error: --device: {why}" in " ".join(done.stderr.split()), done.stderr
        assert "Traceback" not in done.stderr, done.stderr
    assert _jobs(data) == 0
    # a worker says the same, at once (before it connects to anything: this broker does not exist)
    worker_env = dict(env, FARM_BROKER_URL="redis://127.0.0.1:9/0")
    for device, why in (("banana", "must be cpu, cuda:N or mps (got 'banana')"),
                        ("cuda:99", "cuda:99 is not available: ")):  # fmt: skip
        done = run_farm(["worker", "--model", TINY, "--device", device], worker_env, timeout=120)
        assert done.returncode == 2, done.stderr
        assert f"error: --device: {why}" in " ".join(done.stderr.split()), done.stderr


def test_bounds_say_the_value_given_and_a_reused_request_id_exits_2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = clean_env(FARM_DATA_DIR=str(data))
    rescale = run_farm(["generate", "a red fox", "--model", TINY, "--guidance-rescale", "2"], env)
    assert rescale.returncode == 2, rescale.stderr
    assert "error: guidance_rescale: Input should be less than or equal to 1 (got 2)" in rescale.stderr
    args = ["generate", "--model", TINY, "--steps", "1", "--request-id", "mine-1"]
    first = run_farm([*args, "a red fox"], env)
    assert first.returncode == 0, first.stderr
    again = run_farm([*args, "a red fox"], env)  # the same id and input: the same job
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
    other = run_farm([*args, "a blue fox"], env)  # the same id, another input: bad input
    assert other.returncode == 2, other.stderr
    assert "error: request_id: request id 'mine-1' was already used for a different request" in " ".join(
        other.stderr.split()), other.stderr
    assert _jobs(data) == 1


def test_farm_cancel_ends_the_job_a_killed_generate_left_queued(stack, tmp_path: Path) -> None:  # noqa: F811
    """No worker: `farm generate` waits with its job queued and is SIGKILLed. The job stays queued until
    `farm cancel` ends it; then its status says cancelled, and a worker that joins never renders it."""
    log = tmp_path / "generate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([FARM, "generate", "a lighthouse", "--model", TINY, "--num-images", "2"],
                                env=stack["env"], stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "request " not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        rid = log.read_text().split("request ", 1)[1].split()[0]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert _ledger(stack, "SELECT status FROM jobs WHERE id = :id", id=rid) == [("IN_QUEUE",)]

    done = run_farm(["cancel", rid], stack["env"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"cancelled {rid} (it was IN_QUEUE)"
    view = json.loads(run_farm(["status", rid], stack["env"]).stdout)
    assert (view["status"], view["error"], view["error_type"]) == ("CANCELLED", "cancelled with `farm cancel`",
                                                                   "cancelled")
    assert view["logs"][-1]["message"] == "cancelled with `farm cancel`" and view["logs"][-1]["source"] == "cli"
    twice = run_farm(["cancel", rid], stack["env"])
    assert twice.returncode == 1 and f"request {rid} has already ended (CANCELLED): nothing to cancel" in twice.stderr
    unknown = run_farm(["cancel", "no-such-request"], stack["env"])
    assert unknown.returncode == 1 and "no request 'no-such-request' in the ledger" in unknown.stderr

    # a worker joins: it renders a later job, and never the cancelled one
    _start_worker(stack)
    later = run_farm(["generate", "a boat", "--model", TINY, "--steps", "1"], stack["env"])
    assert later.returncode == 0, later.stderr
    assert _ledger(stack, "SELECT DISTINCT status FROM batches WHERE job_id = :id", id=rid) == [("cancelled",)]
    assert _ledger(stack, "SELECT count(*) FROM images WHERE job_id = :id", id=rid) == [(0,)]
    assert _ledger(stack, "SELECT status FROM jobs WHERE id = :id", id=rid) == [("CANCELLED",)]
    assert not [key for key in _bucket_keys(stack) if f"/{rid}/" in key]
