"""The ledger gauges (farm.metrics.ledger_gauges) and the lease-takeover counter, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from db.migrate import upgrade
from db.models import Batch, Job, WebhookDelivery, Worker, utcnow
from db.session import dispose_engines, session_scope
from farm.config import get_settings, reset_settings
from farm.lifecycle.sweep import reap
from farm.metrics.ledger_gauges import LedgerCollector, read


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, farm_env: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{farm_env / 'ledger.db'}" if request.param == "sqlite" else str(
        request.getfixturevalue("pg_url"))
    monkeypatch.setenv("FARM_DATABASE_URL", url)
    reset_settings()
    dispose_engines()
    upgrade(url)
    return url


def _job(s, job_id: str, model_key: str, status: str = "IN_QUEUE") -> None:  # type: ignore[no-untyped-def]
    s.add(Job(id=job_id, owner="alice", model_name=model_key, model_key=model_key, lane="queue", source="api",
              status=status, input={}, seed=1, num_images=2))


def test_the_snapshot_counts_what_waits_runs_and_serves(ledger: str) -> None:
    now = utcnow()
    with session_scope() as s:
        _job(s, "j1", "sd15")
        _job(s, "j2", "tiny-lcm", status="IN_PROGRESS")
        s.flush()
        s.add_all([
            Batch(job_id="j1", k=0, indices=[0], model_key="sd15", lane="queue", compat="c", status="queued",
                  created_at=now - timedelta(seconds=40)),
            Batch(job_id="j1", k=1, indices=[1], model_key="sd15", lane="bulk", compat="c", status="queued"),
            Batch(job_id="j2", k=0, indices=[0, 1], model_key="tiny-lcm", lane="queue", compat="c", status="claimed",
                  worker="w1", lease_expires_at=now + timedelta(seconds=30)),
            Worker(name="w1", model_name="farm/tiny-lcm", model_key="tiny-lcm", device="cpu", max_batch=8, pid=1,
                   heartbeat_at=now),
            Worker(name="gone", model_name="x", model_key="sd15", device="cpu", max_batch=8, pid=2,
                   heartbeat_at=now - timedelta(hours=1)),
            WebhookDelivery(job_id="j1", owner="alice", url="https://example.org/", body={}, status="pending",
                            created_at=now - timedelta(seconds=5)),
        ])  # fmt: skip
    snap = read(get_settings())
    assert {k: n for k, (n, _) in snap.queued.items()} == {("sd15", "queue"): 1, ("sd15", "bulk"): 1}
    assert (snap.at - snap.queued[("sd15", "queue")][1]).total_seconds() >= 40
    assert snap.running == {"tiny-lcm": 1}
    assert snap.jobs == {"IN_QUEUE": 1, "IN_PROGRESS": 1}
    assert snap.live == {"tiny-lcm": 1}  # the worker that stopped beating an hour ago is not counted
    assert snap.unserved() == {"sd15": 1, "tiny-lcm": 0}
    assert snap.outbox == 1 and snap.outbox_oldest is not None

    families = {f.name: f for f in LedgerCollector(get_settings()).collect()}
    assert [s.value for s in families["farm_ledger_up"].samples] == [1]
    assert {tuple(s.labels.values()): s.value for s in families["farm_model_unserved"].samples} == {
        ("sd15",): 1, ("tiny-lcm",): 0}
    (age,) = [s.value for s in families["farm_queue_oldest_age_seconds"].samples if s.labels["lane"] == "queue"]
    assert age >= 40


def test_an_unreachable_ledger_reports_down_and_no_stale_gauge(farm_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("FARM_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    reset_settings()
    families = {f.name: f for f in LedgerCollector(get_settings()).collect()}
    assert set(families) == {"farm_ledger_up"} and families["farm_ledger_up"].samples[0].value == 0


def test_a_reaped_lease_counts_as_a_takeover(ledger: str) -> None:
    before = REGISTRY.get_sample_value("farm_lease_takeovers_total", {"model": "sdxl"}) or 0.0
    with session_scope() as s:
        _job(s, "j1", "sdxl", status="IN_PROGRESS")
        s.flush()
        s.add(Batch(job_id="j1", k=0, indices=[0, 1], model_key="sdxl", lane="queue", compat="c", status="claimed",
                    worker="stalled", attempts=1, lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert reap(get_settings()) == (1, 0)
    assert REGISTRY.get_sample_value("farm_lease_takeovers_total", {"model": "sdxl"}) == before + 1
    assert reap(get_settings()) == (0, 0)  # nothing left to take: nothing counted
    assert REGISTRY.get_sample_value("farm_lease_takeovers_total", {"model": "sdxl"}) == before + 1
