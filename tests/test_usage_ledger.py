"""The usage table and its upsert (db.usage_counters.record_usage) on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Usage
from db.session import session_scope
from db.usage_counters import UsageEntry, record_usage, today_utc


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if request.param == "sqlite" else str(
        request.getfixturevalue("pg_url"))
    upgrade(url)
    return url


def rows(url: str) -> dict[tuple[str, str, date, str], tuple[int, int, float]]:
    with session_scope(url) as s:
        return {(u.owner, u.model, u.day, u.source): (u.images, u.frames, u.gpu_seconds)
                for u in s.scalars(select(Usage))}


def test_record_usage_adds_to_the_counters(ledger: str) -> None:
    day = date(2026, 11, 30)
    with session_scope(ledger) as s:
        record_usage(s, [
            UsageEntry("alice", "farm/tiny-lcm", "batch", images=3, gpu_seconds=1.5, day=day),
            UsageEntry("alice", "farm/tiny-lcm", "batch", images=1, gpu_seconds=0.5, day=day),  # same key: summed
            UsageEntry("bob", "farm/tiny-lcm", "realtime", frames=7, gpu_seconds=0.25, day=day),
        ])
    with session_scope(ledger) as s:
        record_usage(s, [UsageEntry("alice", "farm/tiny-lcm", "batch", images=2, gpu_seconds=1.0, day=day),
                         UsageEntry("alice", "farm/tiny-lcm", "batch", images=1, gpu_seconds=2.0)])
        record_usage(s, [])
    assert rows(ledger) == {
        ("alice", "farm/tiny-lcm", day, "batch"): (6, 0, 3.0),
        ("alice", "farm/tiny-lcm", today_utc(), "batch"): (1, 0, 2.0),
        ("bob", "farm/tiny-lcm", day, "realtime"): (0, 7, 0.25),
    }


def test_record_usage_is_part_of_the_callers_transaction(ledger: str) -> None:
    with pytest.raises(RuntimeError, match="store failed"), session_scope(ledger) as s:
        record_usage(s, [UsageEntry("alice", "m", "batch", images=5, gpu_seconds=1.0)])
        raise RuntimeError("store failed")
    assert rows(ledger) == {}


def test_concurrent_writers_lose_no_update(ledger: str) -> None:
    def add() -> None:
        for _ in range(10):
            with session_scope(ledger) as s:
                record_usage(s, [UsageEntry("alice", "m", "batch", images=1, gpu_seconds=0.5),
                                 UsageEntry("bob", "m", "batch", images=2, gpu_seconds=1.0)])

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert rows(ledger) == {("alice", "m", today_utc(), "batch"): (40, 0, 20.0),
                            ("bob", "m", today_utc(), "batch"): (80, 0, 40.0)}


def test_bad_entries_are_refused() -> None:
    with pytest.raises(ValueError, match="source 'gpu'"):
        UsageEntry("alice", "m", "gpu")
    with pytest.raises(ValueError, match="must not be negative"):
        UsageEntry("alice", "m", "batch", images=-1)
