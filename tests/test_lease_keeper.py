"""The lease keeper's rule (issue 17, item 3), on a real (embedded SQLite) ledger: a batch pulled ahead
lives on the render before it; only a stalled render loses the leases, its own and those waiting behind it.
(With real workers: tests/test_pool.py, test_a_batch_pulled_ahead_keeps_its_lease_while_the_render_before_it_moves.)"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest

from farm.config import Settings
from tasks.lease import LeaseKeeper

LEASE = 2.0


def _stuck(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no render progress" in r.getMessage()]


def test_only_a_stalled_render_loses_the_leases_of_the_batches_waiting_behind_it(farm_env, caplog) -> None:
    from db.migrate import ensure_schema

    ensure_schema()
    keeper = LeaseKeeper(app=None, name="keeper@test", settings=Settings(lease_seconds=LEASE),  # type: ignore[arg-type]
                         loads=lambda: 1)
    claim: Any = lambda batch_id: SimpleNamespace(batch_id=batch_id, job_id=f"job-{batch_id}", token=1)  # noqa: E731
    keeper.hold([claim(1)])  # rendering
    keeper.hold([claim(2)])  # pulled ahead: waits for its turn
    caplog.set_level(logging.ERROR, logger="tasks.lease")
    until = time.monotonic() + 1.5 * LEASE  # longer than the lease: the waiting batch would have lost it
    while time.monotonic() < until:
        keeper.progress([1])  # the render moves, a step at a time
        time.sleep(0.1)
    keeper.beat()
    assert _stuck(caplog) == []  # both renewed
    time.sleep(1.25 * LEASE)  # the render stalls past the lease
    keeper.beat()
    assert _stuck(caplog) == [f"no render progress for {LEASE:.0f} s: not renewing the leases of batches [1, 2]"]
