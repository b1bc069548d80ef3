"""The render path on real servers: Redis broker, PostgreSQL ledger, S3 storage, real workers."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest
from celery import Celery
from minio import Minio
from sqlalchemy import create_engine, text

from tests.workers import WorkerProcess, clean_env, run_farm

TINY = "farm/tiny-lcm"


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    """One data dir per module, so the tiny model is written once."""
    return tmp_path_factory.mktemp("farm-data")


@pytest.fixture
def stack(redis_server, postgres_server, s3_server, builtin_dir, request):
    """Environment of a farm on the private servers, with a fresh database and bucket."""
    db_url = postgres_server.new_database(f"farm_{uuid.uuid4().hex[:10]}")
    bucket = f"farm-{uuid.uuid4().hex[:10]}"
    redis_db = str(abs(hash(request.node.name)) % 15 + 1)
    env = clean_env(
        FARM_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/{redis_db}",
        FARM_DATABASE_URL=db_url,
        FARM_STORAGE_URL=f"s3://{bucket}/outputs",
        FARM_S3_ENDPOINT=s3_server.endpoint,
        FARM_S3_ACCESS_KEY="testing",
        FARM_S3_SECRET_KEY="testing",
        FARM_DATA_DIR=str(builtin_dir),
    )
    import redis

    redis.Redis.from_url(env["FARM_BROKER_URL"]).flushdb()  # no messages left by an earlier test
    done = run_farm(["db", "upgrade"], env)
    assert done.returncode == 0, done.stderr
    workers: list[WorkerProcess] = []
    yield {"env": env, "db_url": db_url, "bucket": bucket, "s3": s3_server, "workers": workers}
    for w in workers:
        w.stop()


def _bucket_keys(stack, prefix=""):
    client = Minio(stack["s3"].endpoint, access_key="testing", secret_key="testing", secure=False)
    return sorted(o.object_name for o in client.list_objects(stack["bucket"], prefix=prefix, recursive=True))


def _ledger(stack, sql, **params):
    engine = create_engine(stack["db_url"])
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql), params).all()
    finally:
        engine.dispose()


def _start_worker(stack, **extra):
    env = dict(stack["env"], **extra)
    worker = WorkerProcess(env)
    stack["workers"].append(worker)
    return worker.start()


def test_generate_through_a_worker_process(stack, tmp_path):
    _start_worker(stack)
    out = tmp_path / "out"
    done = run_farm(["generate", "--model", TINY, "a lighthouse at dusk", "--num-images", "3",
                     "--image-size", "64x64", "--steps", "2", "--seed", "7", "--json", "--out", str(out)], stack["env"])
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)
    assert output["seed"] == 7 and output["prompt"] == "a lighthouse at dusk"
    assert output["has_nsfw_concepts"] == [False, False, False]
    assert [(i["width"], i["height"], i["content_type"]) for i in output["images"]] == [(64, 64, "image/jpeg")] * 3
    # presigned URLs on the S3 server serve the very bytes saved to --out
    rid = done.stderr.split("request ", 1)[1].split()[0]
    saved = sorted(out.iterdir())
    assert [p.name for p in saved] == [f"{rid}_{i}.jpg" for i in range(3)]
    with urllib.request.urlopen(output["images"][0]["url"], timeout=10) as resp:
        assert resp.read() == saved[0].read_bytes()
    assert _bucket_keys(stack) == [f"outputs/local/{rid}/{i}.jpg" for i in range(3)]
    rows = _ledger(stack, "SELECT status, num_images, seed FROM jobs WHERE id = :id", id=rid)
    assert rows == [("COMPLETED", 3, 7)]
    images = _ledger(stack, 'SELECT "index", seed, object_key FROM images WHERE job_id = :id ORDER BY 1', id=rid)
    assert images == [(i, 7 + i, f"local/{rid}/{i}.jpg") for i in range(3)]
    status = run_farm(["status", rid], stack["env"])
    assert json.loads(status.stdout)["status"] == "COMPLETED"
    assert "3/3 images" in status.stdout


def test_plain_celery_client_send_task(stack):
    _start_worker(stack)
    broker = stack["env"]["FARM_BROKER_URL"]
    client = Celery("plain", broker=broker, backend=broker)  # knows nothing of lcm-farm
    kwargs = {"model_name": TINY, "prompt": "a red fox", "image_size": {"width": 64, "height": 64},
              "num_inference_steps": 2, "num_images": 2, "seed": 11, "sync_mode": True, "format": "png"}
    result = client.send_task("farm.generate", kwargs=kwargs)
    output = result.get(timeout=120)
    assert output["seed"] == 11 and len(output["images"]) == 2
    assert all(i["url"].startswith("data:image/png;base64,") for i in output["images"])
    assert output["has_nsfw_concepts"] == [False, False]
    rows = _ledger(stack, "SELECT status, source, owner FROM jobs WHERE id = :id", id=result.id)
    assert rows == [("COMPLETED", "celery", "local")]

    bad = client.send_task("farm.generate", kwargs={"model_name": TINY, "prompt": ""})
    with pytest.raises(Exception, match="prompt: must not be empty"):
        bad.get(timeout=60, propagate=True)
    assert _ledger(stack, "SELECT id FROM jobs WHERE id = :id", id=bad.id) == []
    client.close()


def test_bad_input_leaves_no_job_behind(stack):
    cases = [
        (["generate", ""], "prompt: must not be empty"),
        (["generate", "x", "--image-size", "513x512"], "image_size.width: must be a multiple of 8"),
        (["generate", "x", "--steps", "0"], "num_inference_steps: must be between 1 and 50"),
        (["generate", "x", "--model", "nope/model"], "model_name: unknown model"),
        (["generate", "x", "--num-images", "10000"], "num_images: must be between 1 and 64"),
    ]
    for args, message in cases:
        done = run_farm(args, stack["env"])
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr
    assert _ledger(stack, "SELECT count(*) FROM jobs") == [(0,)]


def test_broker_down_at_submit_accepts_the_job_and_keeps_it_in_the_ledger(stack, redis_server):
    env = dict(stack["env"], FARM_BROKER_URL="redis://127.0.0.1:1/0", FARM_PUBLISH_TIMEOUT="1")
    done = run_farm(["generate", "--model", TINY, "x", "--image-size", "64x64", "--timeout", "3"], env)
    assert done.returncode != 0, done.stderr  # no worker can reach it: the client gives up after 3 s
    assert "broker_unavailable" not in done.stderr
    rows = _ledger(stack, "SELECT j.status, j.error_type, b.status, b.published_at FROM jobs j "
                   "JOIN batches b ON b.job_id = j.id")
    # accepted (never FAILED by the broker), its batch left unpublished for the sweeper; the client cancelled it
    assert rows == [("CANCELLED", "cancelled", "cancelled", None)]


def test_sigkilled_worker_task_is_redelivered_and_each_image_stored_once(stack):
    # short visibility timeout so the dead worker's unacked task comes back quickly
    fast = {"FARM_VISIBILITY_TIMEOUT": "25", "FARM_TASK_TIME_LIMIT": "20", "FARM_BATCH_SIZE": "2"}
    stack["env"].update(fast)
    first = _start_worker(stack)
    n = 24
    broker = stack["env"]["FARM_BROKER_URL"]
    client = Celery("plain", broker=broker, backend=broker)
    kwargs = {"model_name": TINY, "prompt": "a busy harbour", "image_size": {"width": 128, "height": 128},
              "num_inference_steps": 4, "num_images": n, "seed": 1, "sync_mode": False}
    result = client.send_task("farm.generate", kwargs=kwargs)
    rid = result.id
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        count = _ledger(stack, "SELECT count(*) FROM images WHERE job_id = :id", id=rid)[0][0]
        if count >= 4 and _unfinished_tasks(first.output):  # kill it while it holds a task
            break
        time.sleep(0.005)
    assert 4 <= count < n, "the worker must be killed in the middle of the job"
    first.kill()
    in_flight = _unfinished_tasks(first.output)
    assert len(in_flight) == 1, first.output[-3000:]
    second = _start_worker(stack)
    output = result.get(timeout=120)
    assert len(output["images"]) == n
    # the dead worker's unacked task comes back after the visibility timeout, even if the job
    # completed meanwhile (its images may have been stored just before the kill)
    _wait_for(second, f"farm.render[{in_flight[0]}] received", 60)  # delivered again
    _wait_for(second, f"farm.render[{in_flight[0]}] succeeded", 60)
    rows = _ledger(stack, 'SELECT "index" FROM images WHERE job_id = :id ORDER BY 1', id=rid)
    assert [r[0] for r in rows] == list(range(n))
    keys = _bucket_keys(stack, prefix=f"outputs/local/{rid}/")
    assert keys == sorted(f"outputs/local/{rid}/{i}.jpg" for i in range(n))
    status = _ledger(stack, "SELECT status FROM jobs WHERE id = :id", id=rid)
    assert status == [("COMPLETED",)]
    client.close()


def _wait_for(worker: WorkerProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.output:
        assert time.monotonic() < deadline, f"{text!r} not in the worker's log:\n{worker.output[-3000:]}"
        time.sleep(0.2)


def _unfinished_tasks(log: str) -> list[str]:
    """farm.render task ids a worker received but never finished."""
    import re

    received = re.findall(r"farm\.render\[([^\]]+)\] received", log)
    finished = set(re.findall(r"farm\.render\[([^\]]+)\] (?:succeeded|retry|raised)", log))
    return [t for t in received if t not in finished]


def test_worker_without_its_model_stops_and_says_where_it_looked(stack, tmp_path):
    env = dict(stack["env"], FARM_MODEL_DIR=str(tmp_path / "weights"), HF_HUB_OFFLINE="1")
    done = run_farm(["worker", "--model", "runwayml/stable-diffusion-v1-5"], env, timeout=120)
    assert done.returncode == 1
    message = " ".join((done.stdout + done.stderr).split())
    assert "cannot load runwayml/stable-diffusion-v1-5" in message
    assert str(tmp_path / "weights") in message and "offline" in message


def test_hold_stand_in_through_worker_processes(stack):
    """farm/hold on the real stack: a job split over two workers, flat images, stand-in in the log."""
    for i in range(2):
        env = dict(stack["env"], FARM_HOLD_MS="5")
        worker = WorkerProcess(env, model="farm/hold", name=f"hold{i}@cpu.%h")  # names are unique among live ones
        stack["workers"].append(worker)
        worker.start()
    done = run_farm(["generate", "--model", "farm/hold", "a flat square", "--num-images", "20",
                     "--image-size", "64x64", "--seed", "3", "--json"], dict(stack["env"], FARM_BATCH_SIZE="4"))
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)
    assert [(i["width"], i["height"]) for i in output["images"]] == [(64, 64)] * 20
    assert output["has_nsfw_concepts"] == [False] * 20
    rid = _ledger(stack, "SELECT id FROM jobs")[0][0]
    assert len(_bucket_keys(stack)) == 20
    logs = [m for (m,) in _ledger(stack, "SELECT message FROM job_logs WHERE job_id = :id", id=rid)]
    assert any("farm/hold stand-in, held not rendered" in m for m in logs)
    assert all("torch" not in w.output for w in stack["workers"])


def test_a_plain_celery_caller_gets_an_answer_when_its_job_is_cancelled(stack, monkeypatch):
    """farm.generate's result is written by the one finish function for every outcome, not only completion."""
    _start_worker(stack)  # serves the dispatch queue; no worker serves SD1.5, so the job waits queued
    broker = stack["env"]["FARM_BROKER_URL"]
    client = Celery("plain", broker=broker, backend=broker)
    result = client.send_task("farm.generate", kwargs={"model_name": "runwayml/stable-diffusion-v1-5",
                                                       "prompt": "a red fox", "num_images": 2})
    deadline = time.monotonic() + 60
    while not _ledger(stack, "SELECT status FROM jobs WHERE id = :id", id=result.id):
        assert time.monotonic() < deadline, "farm.generate never recorded its job"
        time.sleep(0.05)
    done = run_farm(["status", result.id], stack["env"])
    assert done.returncode == 0 and "IN_QUEUE" in done.stdout, done.stdout + done.stderr
    for name, value in stack["env"].items():
        if name.startswith("FARM_"):
            monkeypatch.setenv(name, value)
    from db.session import dispose_engines
    from farm.config import reset_settings
    from farm.lifecycle import submit as submission

    reset_settings()
    dispose_engines()
    try:
        assert submission.cancel(result.id) == "CANCELLATION_REQUESTED"
        with pytest.raises(Exception, match="cancelled by request"):
            result.get(timeout=30)  # an answer, not a timeout
        assert result.state == "FAILURE"
    finally:
        dispose_engines()
        reset_settings()
    rows = _ledger(stack, "SELECT status, error_type FROM jobs WHERE id = :id", id=result.id)
    assert rows == [("CANCELLED", "cancelled")]
    assert _ledger(stack, "SELECT status FROM batches WHERE job_id = :id", id=result.id) == [("cancelled",)]
