"""Prometheus metrics and usage per owner, on a live farm: ``farm api`` and a real ``farm worker`` (Celery
prefork pool), scraped over HTTP; usage in the ledger, ``GET /usage``, ``farm usage`` and the quota."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.metrics_stack import APP, TOKEN, MetricsStack, tiny, value
from tests.services import free_port
from tests.workers import run_farm

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "farm.json"


def running(stack: MetricsStack) -> MetricsStack:
    if stack.worker.proc is None:
        stack.worker.start()
    return stack


def test_a_shared_gpu_batch_is_split_by_image_in_the_ledger_and_the_metrics(metrics_stack: MetricsStack) -> None:
    stack = metrics_stack
    assert stack.worker.proc is None, "this test starts the worker: it must run first"
    # both requests wait before any worker joins, so the first claim takes the other as a companion
    a = stack.submit("alice", num_images=2)
    b = stack.submit("bob", num_images=3)
    _, api = stack.scrape_api()
    assert value(api, "farm_queue_depth", model="tiny-lcm", lane="queue") == 2
    assert value(api, "farm_model_unserved", model="tiny-lcm") == 1  # queued work, no live worker
    assert value(api, "farm_jobs", status="IN_QUEUE") == 2
    assert (value(api, "farm_queue_oldest_age_seconds", model="tiny-lcm", lane="queue") or -1) >= 0
    assert value(api, "farm_ledger_up") == 1

    stack.worker.start()
    stack.wait_done("alice", a)
    stack.wait_done("bob", b)
    logs = [m for (m,) in stack.sql("SELECT message FROM job_logs WHERE job_id IN (:a, :b)", a=a, b=b)]
    shared = [m for m in logs if "batched with 1 other request" in m]
    assert shared, logs  # the premise: one GPU batch for both
    render = float(re.search(r"in (\d+\.\d+) s", shared[0]).group(1))  # type: ignore[union-attr]

    rows = {o: (m, src, i, f, g) for o, m, src, i, f, g in stack.sql(
        "SELECT owner, model, source, images, frames, gpu_seconds FROM usage")}
    assert set(rows) == {"alice", "bob"}
    assert rows["alice"][:4] == ("farm/tiny-lcm", "batch", 2, 0) and rows["bob"][:4] == ("farm/tiny-lcm", "batch", 3, 0)
    assert rows["alice"][4] * 3 == pytest.approx(rows["bob"][4] * 2)  # split by image: 2 : 3
    assert rows["alice"][4] + rows["bob"][4] == pytest.approx(render, abs=0.002)

    names, worker = stack.scrape_worker()
    assert value(worker, "farm_images_total", model="tiny-lcm", owner="alice") == 2
    assert value(worker, "farm_images_total", model="tiny-lcm", owner="bob") == 3
    assert value(worker, "farm_gpu_seconds_total", model="tiny-lcm", owner="bob") == pytest.approx(rows["bob"][4])
    assert value(worker, "farm_batch_size_sum", model="tiny-lcm") == 5
    assert value(worker, "farm_batch_size_count", model="tiny-lcm") == 1
    assert value(worker, "farm_render_seconds_count", model="tiny-lcm") == 1
    assert value(worker, "farm_model_loads_total", model="tiny-lcm", device="cpu") == 1
    assert value(worker, "farm_jobs_finished_total", status="COMPLETED") == 2
    assert value(worker, "farm_worker_info", name="metrics-worker", model="tiny-lcm", device="cpu") == 1

    _, api = stack.scrape_api()
    assert value(api, "farm_model_unserved", model="tiny-lcm") == 0
    assert value(api, "farm_live_workers", model="tiny-lcm") == 1
    assert value(api, "farm_queue_depth", model="tiny-lcm", lane="queue") is None  # nothing waits
    assert (value(api, "farm_http_requests_total", method="POST", route=f"/{APP}", status="200") or 0) >= 2
    status_route = f"/{APP}/requests/{{request_id}}/status"
    assert (value(api, "farm_http_request_duration_seconds_count", method="GET", route=status_route) or 0) >= 2


def test_metrics_need_the_token_when_one_is_set(metrics_stack: MetricsStack) -> None:
    stack = running(metrics_stack)
    for url in (f"{stack.base_url}/metrics", f"http://127.0.0.1:{stack.metrics_port}/metrics"):
        assert httpx.get(url, timeout=30).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401


def test_the_api_lists_where_each_live_worker_is_scraped(metrics_stack: MetricsStack) -> None:
    """Issue 17, item 1: Prometheus finds workers through the API (http_sd): the target the `workers` row
    names answers the scrape; the list needs the metrics token like /metrics."""
    stack = running(metrics_stack)
    url = f"{stack.base_url}/metrics/targets"
    assert httpx.get(url, timeout=30).status_code == 401
    r = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200, r.text
    (row,) = stack.sql("SELECT metrics_url FROM workers WHERE name = 'metrics-worker'")
    assert row[0] == f"http://{socket.gethostname()}:{stack.metrics_port}/metrics"
    groups = [g for g in r.json() if g["labels"]["worker"] == "metrics-worker"]
    assert groups == [{"targets": [f"{socket.gethostname()}:{stack.metrics_port}"],
                       "labels": {"worker": "metrics-worker", "__scheme__": "http", "__metrics_path__": "/metrics"}}]
    scraped = httpx.get(row[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert scraped.status_code == 200 and 'name="metrics-worker"' in scraped.text
    assert f"metrics={row[0]}" in stack.worker.output  # its ready line says so too


def test_usage_shows_an_owner_its_own_and_the_cli_shows_all(metrics_stack: MetricsStack) -> None:
    stack = running(metrics_stack)
    rid = stack.submit("carol", num_images=4)
    stack.wait_done("carol", rid)
    with stack.client("carol") as c:
        body = c.get("/usage").json()
        assert body["owner"] == "carol"
        assert [(u["model"], u["source"], u["images"]) for u in body["usage"]] == [("farm/tiny-lcm", "batch", 4)]
        assert body["total_images"] == 4 and body["total_gpu_seconds"] > 0
        assert body["quota"] == {"daily_gpu_seconds": None, "used_today": body["total_gpu_seconds"],
                                 "remaining_today": None}
        daily = c.get("/usage", params={"daily": "true"}).json()["usage"]
        assert len(daily) == 1 and daily[0]["day"] == time.strftime("%Y-%m-%d", time.gmtime())
        bad = c.get("/usage", params={"since": "2030-01-02", "until": "2030-01-01"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "since"]
        assert c.get("/usage", params={"since": "yesterday"}).status_code == 422
    assert httpx.get(f"{stack.base_url}/usage", timeout=30).status_code == 401

    done = run_farm(["usage", "--owner", "carol", "--json"], stack.env)
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines()]
    assert line["owner"] == "carol" and line["images"] == 4
    assert line["gpu_seconds"] == pytest.approx(body["total_gpu_seconds"], abs=1e-5)
    table = run_farm(["usage"], stack.env)
    assert table.returncode == 0, table.stderr
    owners = {ln.split()[0] for ln in table.stdout.splitlines()[1:]}
    assert {"carol", "total"} <= owners
    future = run_farm(["usage", "--since", "2999-01-01"], stack.env)
    assert future.returncode == 0 and future.stdout == "" and "no usage recorded" in future.stderr
    bad_cli = run_farm(["usage", "--since", "01/02/2026"], stack.env)
    assert bad_cli.returncode == 2 and "--since" in bad_cli.stderr and "YYYY-MM-DD" in bad_cli.stderr


def test_a_spent_daily_quota_answers_429_until_midnight(metrics_stack: MetricsStack) -> None:
    stack = running(metrics_stack)
    rid = stack.submit("capped")  # nothing used yet today: accepted
    stack.wait_done("capped", rid)
    with stack.client("capped") as c:
        r = c.post(f"/{APP}", json=tiny())
        assert r.status_code == 429, r.text
        assert r.json()["error_type"] == "quota_exceeded" and "daily GPU-second quota" in r.json()["detail"]
        assert 0 < int(r.headers["Retry-After"]) <= 86400
        quota = c.get("/usage").json()["quota"]
        assert quota["daily_gpu_seconds"] == 1e-6 and quota["remaining_today"] == 0
    assert stack.sql("SELECT count(*) FROM jobs WHERE owner = 'capped'") == [(1,)]  # the refused one left nothing
    stack.wait_done("dave", stack.submit("dave"))  # other owners are not limited


def test_a_failed_webhook_is_counted_and_the_outbox_is_watched(metrics_stack: MetricsStack) -> None:
    stack = running(metrics_stack)
    closed = free_port()  # nothing listens there: the attempt fails, and with one attempt allowed, for good
    with stack.client("erin") as c:
        r = c.post(f"/{APP}", params={"fal_webhook": f"http://127.0.0.1:{closed}/hook"}, json=tiny())
        assert r.status_code == 200, r.text
    stack.wait_done("erin", r.json()["request_id"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, api = stack.scrape_api()
        if value(api, "farm_webhook_attempts_total", outcome="failed"):
            break
        time.sleep(0.3)
    assert value(api, "farm_webhook_attempts_total", outcome="failed") == 1
    assert value(api, "farm_webhook_attempts_total", outcome="delivered") == 0
    deadline = time.monotonic() + 10  # the ledger gauges are cached for a moment
    while value(api, "farm_webhook_outbox_depth") != 0 and time.monotonic() < deadline:
        time.sleep(0.3)
        _, api = stack.scrape_api()
    assert value(api, "farm_webhook_outbox_depth") == 0  # given up: no longer pending
    assert stack.sql("SELECT status FROM webhook_deliveries") == [("failed",)]


@pytest.mark.slow
def test_a_killed_pool_child_loses_no_count(metrics_stack: MetricsStack) -> None:
    """Prefork: the pool child renders and counts, the worker's main process exports; a SIGKILLed child is
    replaced (the model loaded again) and what the dead one counted is still exported."""
    stack = running(metrics_stack)
    stack.wait_done("frank", stack.submit("frank", num_images=3))
    _, before = stack.scrape_worker()
    assert value(before, "farm_images_total", model="tiny-lcm", owner="frank") == 3
    loads = value(before, "farm_model_loads_total", model="tiny-lcm", device="cpu")
    assert stack.worker.proc is not None
    children = Path(f"/proc/{stack.worker.proc.pid}/task/{stack.worker.proc.pid}/children").read_text().split()
    assert len(children) == 1, children  # one pool child (concurrency 1)
    os.kill(int(children[0]), signal.SIGKILL)
    deadline = time.monotonic() + 90
    after = before
    while time.monotonic() < deadline:
        _, after = stack.scrape_worker()
        if value(after, "farm_model_loads_total", model="tiny-lcm", device="cpu") == (loads or 0) + 1:
            break
        time.sleep(0.3)
    assert value(after, "farm_model_loads_total", model="tiny-lcm", device="cpu") == (loads or 0) + 1
    stack.wait_done("frank", stack.submit("frank", num_images=2), timeout=120)
    _, after = stack.scrape_worker()
    assert value(after, "farm_images_total", model="tiny-lcm", owner="frank") == 5  # 3 of the dead child + 2
    infos = [k for k in after if k[0] == "farm_worker_info"]
    assert len(infos) == 1  # the dead child's live gauge is gone, the new one's is there


def test_every_metric_the_dashboard_queries_is_exported(metrics_stack: MetricsStack) -> None:
    from farm.metrics.defs import GPU_ONLY

    stack = running(metrics_stack)
    stack.wait_done("gina", stack.submit("gina"))
    api_names, api = stack.scrape_api()
    worker_names, worker = stack.scrape_worker()
    exported = api_names | worker_names | {name for name, _ in api} | {name for name, _ in worker}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    queried = {m for e in exprs for m in re.findall(r"\bfarm_[a-z0-9_]+", e)}
    missing = {m for m in queried - exported if m not in GPU_ONLY}
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"
    for panel in ("Queue depth", "Images/s per model", "GPU-seconds per owner"):
        assert any(p.get("title") == panel for p in dashboard["panels"]), panel
