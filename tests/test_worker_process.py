"""``farm worker`` as a user meets it: a true ready line, a missing-weights error that says how to fix
it, one live worker per name, a clean leave on Ctrl-C/SIGTERM, one spelling of ``--log-level``.

Real processes on real servers: Redis (broker), PostgreSQL (ledger), local image storage. The
``farm/hold`` stand-in keeps the workers torch-free, so they start in seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.services import free_port
from tests.workers import FARM, WorkerProcess, clean_env, run_farm

HOLD = "farm/hold"
SD15 = "runwayml/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("farm-data")


@pytest.fixture
def farm(redis_server: Any, postgres_server: Any, data_dir: Path, request: pytest.FixtureRequest) -> Iterator[dict]:
    """A farm on the private Redis and a fresh PostgreSQL database; ``workers`` are stopped afterwards."""
    import redis

    db_url = postgres_server.new_database(f"w_{uuid.uuid4().hex[:12]}")
    env = clean_env(FARM_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/{abs(hash(request.node.name)) % 15 + 1}",
                    FARM_DATABASE_URL=db_url, FARM_DATA_DIR=str(data_dir))
    redis.Redis.from_url(env["FARM_BROKER_URL"]).flushdb()
    done = run_farm(["db", "upgrade"], env)
    assert done.returncode == 0, done.stderr
    workers: list[WorkerProcess] = []
    yield {"env": env, "db_url": db_url, "workers": workers}
    for w in workers:
        w.stop()


def _worker(farm: dict, name: str | None = None, model: str = HOLD, **extra: str) -> WorkerProcess:
    w = WorkerProcess(dict(farm["env"], **extra), model=model, name=name)
    farm["workers"].append(w)
    return w


def _ledger(farm: dict, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(farm["db_url"])
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ready_lines(w: WorkerProcess) -> list[str]:
    return [line for line in w.output.splitlines() if "farm worker ready" in line]


# -- item 2: ready means consuming and joined ------------------------------------------------------


def test_a_worker_whose_broker_is_down_never_says_ready(farm: dict) -> None:
    w = _worker(farm, "hold@nobroker.test", FARM_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0").launch()
    # the pool process joins (the ledger is up) while the consumer retries the broker
    _until(lambda: _ledger(farm, "SELECT pid FROM workers WHERE name = 'hold@nobroker.test'"), 60, "the pool to join")
    w.wait_for("(2/100)", 60)  # Celery's second connection retry
    assert _ready_lines(w) == []
    assert w.proc is not None
    w.proc.send_signal(signal.SIGTERM)  # a worker that never got its broker still stops
    assert w.wait(60) == 0
    assert _ready_lines(w) == [], w.output


def test_ready_is_said_once_at_info_after_the_broker_and_the_model(farm: dict) -> None:
    w = _worker(farm, "hold@once.test").start()
    time.sleep(1)  # nothing more comes later either
    lines = _ready_lines(w)
    assert len(lines) == 1, w.output
    assert "INFO/MainProcess] farm worker ready: hold@once.test model=farm/hold device=cpu max_batch=" in lines[0]
    out = w.output
    assert out.index("Connected to redis://") < out.index("farm worker ready")
    assert out.index("farm/hold loaded") < out.index("farm worker ready")  # the pool process's model
    assert not re.search(r"@\S+ ready\.", out), "Celery's own early ready line is not shown"
    assert "WARNING" not in lines[0]
    assert _ledger(farm, "SELECT name, stopped_at FROM workers") == [("hold@once.test", None)]


# -- item 5: missing weights ----------------------------------------------------------------------


def test_missing_weights_say_where_and_how_to_download_and_the_pool_tries_once(farm: dict, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    env = dict(farm["env"], FARM_MODEL_DIR=str(weights), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    done = run_farm(["worker", "--model", SD15], env, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert out.count(f"loading {SD15} on cpu") == 1, out  # one attempt: the pool did not start a second process
    assert out.count("worker stopped: cannot load") == 1, out
    assert f"{weights / SD15} (FARM_MODEL_DIR)" in out
    assert f"the Hugging Face cache {tmp_path / 'hf' / 'hub'}" in out
    assert f"{SD15} needs {SD15} (the base model) and latent-consistency/lcm-lora-sdv1-5 (its LCM-LoRA)" in out
    lines = [line.strip() for line in out.splitlines()]
    assert (f'hf download {SD15} --include "model_index.json" --include "*/*.json" --include "*/*.txt" '
            f'--include "*/*.safetensors" --local-dir {weights / SD15}') in lines
    lora = "latent-consistency/lcm-lora-sdv1-5"
    assert f"hf download {lora} --local-dir {weights / lora}" in lines
    assert "HF_HUB_OFFLINE is set here" in out
    for internal in ("local_files_only", "stacktrace", "Traceback"):
        assert internal not in out, internal
    assert "farm worker ready" not in out, out  # never said for a model that did not load
    assert _ledger(farm, "SELECT count(*) FROM workers") == [(0,)]


def test_download_help_without_a_model_dir_points_at_the_hub_cache(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from farm.config import Settings
    from models.loading import download_help, hf_cache_dir
    from models.registry import SDXL_BASE, get_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings(data_dir=tmp_path / "data")
    text_ = download_help(get_model(SDXL_BASE, settings), settings)
    lines = [line.strip() for line in text_.splitlines()]
    assert lines[0] == (f"{SDXL_BASE} needs {SDXL_BASE} (the base model) and latent-consistency/lcm-lora-sdxl "
                        "(its LCM-LoRA); download both with:")
    assert lines[1].startswith(f"hf download {SDXL_BASE} --include ") and "--local-dir" not in lines[1]
    assert lines[2] == "hf download latent-consistency/lcm-lora-sdxl"
    assert f"into the Hugging Face cache ({hf_cache_dir()})" in text_


# -- item 9: one live worker per name ---------------------------------------------------------------


def test_a_second_live_worker_with_the_same_name_is_refused_and_the_first_keeps_its_row(farm: dict) -> None:
    first = _worker(farm, "hold@same.test").start()
    (pid, host), = _ledger(farm, "SELECT pid, host FROM workers WHERE name = 'hold@same.test'")
    assert host == socket.gethostname()
    second = _worker(farm, "hold@same.test").launch()
    assert second.wait(60) == 1
    message = " ".join(second.output.split())
    assert f"worker name 'hold@same.test' is taken by a live worker: pid {pid} on {host}, serving farm/hold" in message
    assert "give this one another --name" in message
    assert _ready_lines(second) == []
    beat = _ledger(farm, "SELECT heartbeat_at FROM workers")[0][0]
    _until(lambda: _ledger(farm, "SELECT heartbeat_at FROM workers")[0][0] > beat, 30, "the first worker to beat")
    assert _ledger(farm, "SELECT pid, stopped_at FROM workers") == [(pid, None)]  # still the first one's, live
    assert first.proc is not None and first.proc.poll() is None


def test_a_worker_that_lost_its_name_never_touches_the_new_holders_row(farm: dict) -> None:
    """A frozen worker's row expires and a namesake takes it; the old one wakes, beats and stops: the row
    stays the new one's."""
    lease = {"FARM_LEASE_SECONDS": "2"}
    old = _worker(farm, "hold@frozen.test", **lease).start()
    (old_pid,), = _ledger(farm, "SELECT pid FROM workers")
    assert old.proc is not None
    os.killpg(old.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(3)  # past its lease: its row is no longer live
        new = _worker(farm, "hold@frozen.test", **lease).start()
        (new_pid, stopped), = _ledger(farm, "SELECT pid, stopped_at FROM workers")
        assert new_pid != old_pid and stopped is None
    finally:
        os.killpg(old.proc.pid, signal.SIGCONT)
    time.sleep(2)  # the old one beats again (refused: not its row)
    old.proc.send_signal(signal.SIGTERM)
    assert old.wait(60) == 0
    assert "left the pool" in old.output
    assert _ledger(farm, "SELECT pid, stopped_at FROM workers") == [(new_pid, None)]
    beat = _ledger(farm, "SELECT heartbeat_at FROM workers")[0][0]
    _until(lambda: _ledger(farm, "SELECT heartbeat_at FROM workers")[0][0] > beat, 30, "the new worker to beat")
    assert new.proc is not None
    new.proc.send_signal(signal.SIGTERM)
    assert new.wait(60) == 0
    (pid, stopped), = _ledger(farm, "SELECT pid, stopped_at FROM workers")
    assert pid == new_pid and stopped is not None  # its own stop marks its own row


def test_a_crashed_workers_name_is_free_again_at_once(farm: dict) -> None:
    crashed = _worker(farm, "hold@crash.test").start()
    crashed.kill()  # SIGKILL: no stop mark, a fresh heartbeat, but its process is gone
    (stopped,), = _ledger(farm, "SELECT stopped_at FROM workers")
    assert stopped is None
    _worker(farm, "hold@crash.test").start()  # same host: the dead pid gives the name back
    assert _ledger(farm, "SELECT count(*), min(stopped_at) FROM workers") == [(1, None)]


def test_register_worker_refuses_a_live_namesake_and_stop_marks_only_its_own_row(pg_url: str) -> None:
    from db import worker_registry as batches
    from db.migrate import upgrade
    from db.session import session_scope
    from farm.errors import WorkerNameTakenError

    upgrade(pg_url)

    def register(name: str = "w@same", **who: Any) -> None:
        with session_scope(pg_url) as s:
            batches.register_worker(s, name=name, model_name=HOLD, model_key="hold", device="cpu", max_batch=4,
                                    loads=1, **{"live_within": 30, **who})

    me, host, far = os.getpid(), socket.gethostname(), 2**22 + 1
    register(pid=me)  # this (live) process
    with pytest.raises(WorkerNameTakenError, match=f"pid {me} on {host}"):
        register(pid=1)  # another live process of this host
    with pytest.raises(WorkerNameTakenError, match=f"pid {me} on {host}"):
        register(pid=me, host="elsewhere")  # a process of another host
    register("w@far", pid=far, host="elsewhere")
    with pytest.raises(WorkerNameTakenError, match=f"pid {far} on elsewhere"):
        register("w@far", pid=me)  # another host's row: only its heartbeat tells
    register("w@far", pid=me, live_within=0)  # ... and once it is older than live_within, the name is free
    with session_scope(pg_url) as s:
        batches.stop_worker(s, "w@same", pid=me + 1)  # not its row: nothing changes
        batches.beat_worker(s, "w@same", loads=5, pid=me + 1)
    with session_scope(pg_url) as s:
        live = [(w.name, w.pid, w.loads, w.stopped_at) for w in batches.live_workers(s, "hold", 30)]
        assert live == [("w@far", me, 1, None), ("w@same", me, 1, None)]
        batches.stop_worker(s, "w@same")  # its own
        batches.stop_worker(s, "w@far")
    with session_scope(pg_url) as s:
        assert batches.live_workers(s, "hold", 30) == []
    register(pid=me + 1)  # a stopped row is free
    with session_scope(pg_url) as s:
        assert [w.pid for w in batches.live_workers(s, "hold", 30)] == [me + 1]


# -- item 10: Ctrl-C and SIGTERM during a batch ------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGTERM to the worker", "Ctrl-C in its terminal"])
def test_a_stopped_worker_says_which_batch_it_finishes_then_stores_it_and_leaves(farm: dict, how: str) -> None:
    w = _worker(farm, "hold@leave.test", FARM_HOLD_MS="1500", FARM_BATCH_SIZE="2").start()
    gen = subprocess.Popen([FARM, "generate", "--model", HOLD, "a flat square", "--num-images", "2", "--json"],
                           env=dict(farm["env"], FARM_BATCH_SIZE="2"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        (rid, k), = _until(lambda: _ledger(farm, "SELECT job_id, k FROM batches WHERE status = 'claimed'"), 60,
                           "the batch to be claimed")
        assert w.proc is not None
        if how.startswith("SIGTERM"):
            w.proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(w.proc.pid, signal.SIGINT)  # a terminal sends it to the whole foreground group
        code = w.wait(60)
        out, err = gen.communicate(timeout=60)
    finally:
        gen.kill()
    notice = f"finishing batch {k} of job {rid}, then leaving the pool"
    assert w.output.count(notice) == 1, w.output
    assert "INFO/MainProcess] " + notice in w.output
    assert w.output.index(notice) < w.output.index("left the pool")
    assert code == 0, w.output
    assert gen.returncode == 0, err
    assert len(json.loads(out)["images"]) == 2
    assert _ledger(farm, "SELECT status FROM batches") == [("done",)]
    assert _ledger(farm, "SELECT count(*) FROM images WHERE job_id = :id", id=rid) == [(2,)]
    assert _ledger(farm, "SELECT count(*) FROM workers WHERE stopped_at IS NOT NULL") == [(1,)]


# -- item 11: one spelling of --log-level -----------------------------------------------------------


def test_every_command_takes_log_level_and_the_workers_still_take_loglevel() -> None:
    env = clean_env()
    for args in (["--help"], ["api", "--help"], ["worker", "--help"], ["bulk", "worker", "--help"]):
        done = run_farm(args, env, timeout=60)
        assert done.returncode == 0 and "--log-level" in done.stdout, (args, done.stdout)
        assert "--loglevel" not in done.stdout, args  # the old spelling is hidden
    import click

    from farm.commands.generate import generate

    options = [p for p in generate.params if isinstance(p, click.Option)]
    assert len(options) >= 20
    assert [p.opts[0] for p in options if not p.help] == []  # every farm generate option says what it does
    # the deprecated spelling still parses (then the worker stops on the missing broker)
    done = run_farm(["worker", "--model", HOLD, "--loglevel", "info"], env, timeout=60)
    assert "--loglevel is deprecated: use --log-level" in done.stderr
    assert "needs FARM_BROKER_URL" in done.stderr
