"""A bad LoRA file, as a newcomer meets it: ``farm generate --lora`` with a real ``farm worker`` of the
tiny model on real Redis and PostgreSQL. The file passes the path checks (it is under the files root) but
is not a LoRA: the job fails once, as an input error naming ``loras.0.path`` and what is wrong with the
file, never retried; the same worker then renders the next job.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.workers import WorkerProcess, clean_env, run_farm

TINY = "farm/tiny-lcm"


@pytest.fixture(scope="module")
def farm(redis_server: Any, postgres_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import redis

    data = tmp_path_factory.mktemp("bad-lora")
    db_url = postgres_server.new_database(f"bl_{uuid.uuid4().hex[:12]}")
    env = clean_env(FARM_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/13", FARM_DATABASE_URL=db_url,
                    FARM_DATA_DIR=str(data), FARM_BATCH_RETRIES="2")
    redis.Redis.from_url(env["FARM_BROKER_URL"]).flushdb()
    done = run_farm(["db", "upgrade"], env)
    assert done.returncode == 0, done.stderr
    loras = data / "files" / "loras"
    loras.mkdir(parents=True)
    (loras / "garbage.safetensors").write_bytes(os.urandom(4096))
    header = json.dumps({"unet.a.lora_A.weight": {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}})
    whole = struct.pack("<Q", len(header)) + header.encode() + bytes(512)
    (loras / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    worker = WorkerProcess(env, model=TINY).start()
    try:
        yield {"env": env, "db_url": db_url, "worker": worker}
    finally:
        worker.stop()


def _ledger(farm: dict, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(farm["db_url"])
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


@pytest.mark.parametrize(("name", "problem"), [
    ("garbage.safetensors", "is not a valid safetensors file (Error while deserializing header: header too large)"),
    ("truncated.safetensors", "is not a valid safetensors file (Error while deserializing header: incomplete "
                              "metadata, file not fully covered)"),
])
def test_a_bad_lora_file_fails_once_as_an_input_error_and_the_worker_renders_on(
        farm: dict, name: str, problem: str) -> None:
    rid = f"bad-lora-{uuid.uuid4().hex[:8]}"
    path = f"loras/{name}"
    done = run_farm(["generate", "a fox", "--model", TINY, "--lora", path, "--request-id", rid, "--timeout", "120"],
                    farm["env"], timeout=180)
    expected = f"loras.0.path: the LoRA file {path!r} {problem}"
    assert done.returncode == 1, done.stderr
    assert f"request {rid} failed" in done.stderr and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    [(status, error, error_type)] = _ledger(farm, "SELECT status, error, error_type FROM jobs WHERE id = :r", r=rid)
    assert (status, error_type) == ("FAILED", "validation_error")
    assert expected in error and "model_not_found" not in error and "Unable to load weights" not in error
    # one attempt, no retry (FARM_BATCH_RETRIES=2 would have allowed two more)
    assert _ledger(farm, "SELECT status, attempts FROM batches WHERE job_id = :r", r=rid) == [("failed", 1)]
    logs = [m for (m,) in _ledger(farm, "SELECT message FROM job_logs WHERE job_id = :r ORDER BY id", r=rid)]
    assert not any("retry" in m for m in logs), logs
    assert sum(expected in m for m in logs) == 1, logs

    ok = run_farm(["generate", "a fox", "--model", TINY, "--json", "--timeout", "120"], farm["env"], timeout=180)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["images"]) == 1
    assert farm["worker"].proc is not None and farm["worker"].proc.poll() is None
