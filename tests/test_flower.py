"""``farm flower`` on the private Redis, watching a real ``farm worker`` process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import httpx
import pytest

from tests.services import free_port
from tests.workers import FARM, WorkerProcess, clean_env, run_farm

TINY = "farm/tiny-lcm"
USER = "watcher"
PASSWORD = "s3cret:with-colon"
REDIS_DB = "14"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.fixture(scope="module")
def flower_stack(redis_server, tmp_path_factory):
    """A worker of the tiny model and Flower on the same Redis database; yields Flower's base URL."""
    data = tmp_path_factory.mktemp("flower-farm")
    env = clean_env(
        FARM_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}",
        FARM_DATABASE_URL=f"sqlite:///{data / 'ledger.db'}",
        FARM_DATA_DIR=str(data),
        FARM_FLOWER_USER=USER,
        FARM_FLOWER_PASSWORD=PASSWORD,
    )
    done = run_farm(["db", "upgrade"], env)
    assert done.returncode == 0, done.stderr
    worker = WorkerProcess(env, model=TINY)
    port = free_port()
    log = data / "flower.log"
    flower: subprocess.Popen[bytes] | None = None
    try:
        worker.start()
        with open(log, "wb") as out:
            flower = subprocess.Popen(
                [FARM, "flower", "--port", str(port), "--address", "127.0.0.1"], env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if flower.poll() is not None:
                pytest.fail(f"farm flower exited with {flower.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"farm flower did not come up:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        if flower is not None:
            _stop(flower)
        worker.stop()


def test_flower_lists_the_running_worker_with_its_queues(flower_stack):
    name = f"tiny-lcm@cpu.{socket.gethostname()}"
    deadline = time.monotonic() + 60
    workers: dict = {}
    while time.monotonic() < deadline:
        reply = httpx.get(f"{flower_stack}/api/workers", params={"refresh": "1"}, auth=(USER, PASSWORD), timeout=10)
        assert reply.status_code == 200, reply.text
        workers = reply.json()
        if workers.get(name, {}).get("active_queues"):
            break
        time.sleep(0.5)
    assert name in workers, f"{name} not among {sorted(workers)}"
    queues = {q["name"] for q in workers[name]["active_queues"]}
    assert {"render.tiny-lcm.queue", "render.tiny-lcm.realtime", "celery"} <= queues
    assert {"farm.generate", "farm.render"} <= set(workers[name]["registered"])


def test_flower_api_needs_the_password(flower_stack):
    assert httpx.get(f"{flower_stack}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{flower_stack}/api/workers", auth=(USER, "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{flower_stack}/workers", timeout=10).status_code == 401


def test_flower_exposes_prometheus_metrics(flower_stack):
    reply = httpx.get(f"{flower_stack}/metrics", timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    metric_lines = [line for line in reply.text.splitlines() if line.startswith("# TYPE flower_")]
    assert metric_lines, reply.text[:2000]


def test_flower_refuses_without_password_or_broker(redis_server, tmp_path):
    broker = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
    done = run_farm(["flower", "--port", str(free_port())], clean_env(FARM_BROKER_URL=broker,
                                                                      FARM_DATA_DIR=str(tmp_path)), timeout=60)
    assert done.returncode == 1
    assert "FARM_FLOWER_PASSWORD" in done.stderr and "--no-auth" in done.stderr
    done = run_farm(["flower"], clean_env(FARM_DATA_DIR=str(tmp_path), FARM_FLOWER_PASSWORD="x"), timeout=60)
    assert done.returncode == 1
    assert "FARM_BROKER_URL" in done.stderr


def test_flower_broker_shows_the_backlog_of_a_model_with_no_worker(flower_stack, redis_server):
    """SD1.5 jobs sent as a plain Celery client does, with only a tiny-lcm worker live: the tiny worker
    records them and fans them out to render.sd15.queue, where they wait; Flower's Broker page and its
    queue API list that queue with its 4 messages (Flower alone knows only the live workers' queues)."""
    from celery import Celery
    from redis import Redis

    broker = f"redis://127.0.0.1:{redis_server.port}/{REDIS_DB}"
    producer = Celery("client", broker=broker, set_as_current=False)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    backlog = "render.sd15.queue"
    redis = Redis.from_url(broker)
    try:
        for n in range(4):
            producer.send_task("farm.generate", queue="celery", kwargs={
                "prompt": f"a lighthouse {n}", "model_name": "runwayml/stable-diffusion-v1-5", "num_images": 1})
        deadline = time.monotonic() + 60
        lengths: dict[str, int] = {}
        while time.monotonic() < deadline:
            reply = httpx.get(f"{flower_stack}/api/queues/length", auth=(USER, PASSWORD), timeout=10)
            assert reply.status_code == 200, reply.text
            lengths = {q["name"]: q["messages"] for q in reply.json()["active_queues"]}
            if lengths.get(backlog) == 4:
                break
            time.sleep(0.3)
        assert lengths.get(backlog) == 4, lengths
        # every lane of every model is listed, with or without a worker, and the farm's other queues
        expected = {"render.sdxl.realtime", "render.sd15.bulk", "render.tiny-lcm.sync", "celery", "farm.bulk"}
        assert expected <= set(lengths)
        page = httpx.get(f"{flower_stack}/broker", auth=(USER, PASSWORD), timeout=10)
        assert page.status_code == 200
        row = re.search(r'<tr id="render\.sd15\.queue">\s*<td>render\.sd15\.queue</td>\s*<td[^>]*>\s*(\d+)\s*</td>',
                        page.text)
        assert row is not None, page.text[-3000:]
        assert row.group(1) == "4"
    finally:
        producer.close()
        redis.delete(*(f"render.sd15.{lane}" for lane in ("realtime", "sync", "queue", "bulk")))
        redis.close()
