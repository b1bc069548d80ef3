"""Gauges read from the ledger when the API is scraped: what waits, what runs, who serves.

One short read per scrape (cached for ``CACHE_SECONDS``, so several scrapers, or several API
processes' scrapes, cost one read each per period); every API process reports the same values,
so a dashboard takes ``max`` over them. The ledger unreachable: ``farm_ledger_up`` 0 and no
other of these gauges (never stale values).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from db.models import Batch, Job, WebhookDelivery, Worker, utcnow
from db.session import session_scope
from farm.config import Settings
from farm.metrics.defs import LEDGER_GAUGES
from farm.status import ACTIVE, BatchStatus, DeliveryStatus

log = logging.getLogger(__name__)
CACHE_SECONDS = 2.0


@dataclass
class Snapshot:
    queued: dict[tuple[str, str], tuple[int, datetime]] = field(default_factory=dict)  # (model, lane) → n, oldest
    running: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    live: dict[str, int] = field(default_factory=dict)
    outbox: int = 0
    outbox_oldest: datetime | None = None
    at: datetime = field(default_factory=utcnow)

    def unserved(self) -> dict[str, int]:
        """Per model with queued work or live workers: 1 if work waits and no live worker serves it."""
        waiting = {m for m, _ in self.queued}
        return {m: int(m in waiting and not self.live.get(m)) for m in sorted(waiting | set(self.live))}


def read(settings: Settings) -> Snapshot:
    """One snapshot of the ledger (four grouped reads, each on an index)."""
    snap = Snapshot()
    with session_scope() as s:
        rows = s.execute(select(Batch.model_key, Batch.lane, Batch.status, func.count(), func.min(Batch.created_at))
                         .where(Batch.status.in_([BatchStatus.QUEUED, BatchStatus.CLAIMED]))
                         .group_by(Batch.model_key, Batch.lane, Batch.status))
        for model, lane, status, n, oldest in rows:
            if status == BatchStatus.QUEUED:
                snap.queued[(model, lane)] = (int(n), _aware(oldest))
            else:
                snap.running[model] = snap.running.get(model, 0) + int(n)
        snap.jobs = {str(st): int(n) for st, n in s.execute(
            select(Job.status, func.count()).where(Job.status.in_(list(ACTIVE))).group_by(Job.status))}
        since = snap.at - timedelta(seconds=settings.lease_seconds)
        snap.live = {m: int(n) for m, n in s.execute(
            select(Worker.model_key, func.count()).where(Worker.stopped_at.is_(None), Worker.heartbeat_at >= since)
            .group_by(Worker.model_key))}
        n, oldest = s.execute(select(func.count(), func.min(WebhookDelivery.created_at))
                              .where(WebhookDelivery.status == DeliveryStatus.PENDING)).one()
        snap.outbox, snap.outbox_oldest = int(n), _aware(oldest) if oldest is not None else None
    return snap


def _aware(value: Any) -> datetime:
    """``func.min`` bypasses the column type: SQLite gives naive text, PostgreSQL aware datetimes."""
    from db.models import UTCDateTime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    result = UTCDateTime().process_result_value(value, None)  # type: ignore[arg-type]
    assert result is not None
    return result


class LedgerCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._cached: tuple[float, Snapshot | None] = (0.0, None)
        self._failing = False

    def describe(self) -> Iterator[Any]:
        for name, text in LEDGER_GAUGES.items():
            yield GaugeMetricFamily(name, text)

    def snapshot(self) -> Snapshot | None:
        with self._lock:
            at, snap = self._cached
            if time.monotonic() - at < CACHE_SECONDS:
                return snap
            try:
                snap = read(self.settings)
                self._failing = False
            except Exception as exc:  # the ledger is down: reported as farm_ledger_up 0, logged once per outage
                if not self._failing:
                    log.warning("metrics: cannot read the ledger: %s", exc)
                self._failing, snap = True, None
            self._cached = (time.monotonic(), snap)
            return snap

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot()
        up = GaugeMetricFamily("farm_ledger_up", LEDGER_GAUGES["farm_ledger_up"])
        up.add_metric([], 1 if snap is not None else 0)
        yield up
        if snap is None:
            return
        g = {name: GaugeMetricFamily(name, text, labels=labels) for name, text, labels in (
            ("farm_queue_depth", LEDGER_GAUGES["farm_queue_depth"], ["model", "lane"]),
            ("farm_queue_oldest_age_seconds", LEDGER_GAUGES["farm_queue_oldest_age_seconds"], ["model", "lane"]),
            ("farm_batches_running", LEDGER_GAUGES["farm_batches_running"], ["model"]),
            ("farm_jobs", LEDGER_GAUGES["farm_jobs"], ["status"]),
            ("farm_live_workers", LEDGER_GAUGES["farm_live_workers"], ["model"]),
            ("farm_model_unserved", LEDGER_GAUGES["farm_model_unserved"], ["model"]),
            ("farm_webhook_outbox_depth", LEDGER_GAUGES["farm_webhook_outbox_depth"], []),
            ("farm_webhook_outbox_oldest_age_seconds", LEDGER_GAUGES["farm_webhook_outbox_oldest_age_seconds"], []),
        )}  # fmt: skip
        for (model, lane), (n, oldest) in sorted(snap.queued.items()):
            g["farm_queue_depth"].add_metric([model, lane], n)
            g["farm_queue_oldest_age_seconds"].add_metric([model, lane], max(0.0, (snap.at - oldest).total_seconds()))
        for model, n in sorted(snap.running.items()):
            g["farm_batches_running"].add_metric([model], n)
        for status in sorted(ACTIVE):
            g["farm_jobs"].add_metric([str(status)], snap.jobs.get(str(status), 0))
        for model, n in sorted(snap.live.items()):
            g["farm_live_workers"].add_metric([model], n)
        for model, flag in snap.unserved().items():
            g["farm_model_unserved"].add_metric([model], flag)
        g["farm_webhook_outbox_depth"].add_metric([], snap.outbox)
        age = (snap.at - snap.outbox_oldest).total_seconds() if snap.outbox_oldest is not None else 0.0
        g["farm_webhook_outbox_oldest_age_seconds"].add_metric([], max(0.0, age))
        yield from g.values()
