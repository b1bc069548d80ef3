"""The lease keeper of one worker process (its other services: tasks.services, tasks.uploader).

:class:`LeaseKeeper` (a thread) beats for the claims this process holds, each only while its
  batch makes progress (a hung render stops beating and loses its lease; a batch pulled ahead,
  waiting for its turn, is kept while the render before it makes progress); it keeps the worker's
  registry row fresh (so coordinators count it in the pool) and runs the sweeper
  (farm.lifecycle.sweep) every ``sweep_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from celery import Celery

from db import batches as ledger_batches
from db import worker_registry as ledger_workers
from db.session import session_scope
from farm.config import Settings
from farm.lifecycle.sweep import sweep

if TYPE_CHECKING:
    from farm.lifecycle.claim import Claimed

log = logging.getLogger(__name__)


class BatchAborted(Exception):
    """Every claim of the batch being rendered was lost (its jobs ended, or it was taken over): stop."""


def beat_interval(settings: Settings) -> float:
    return max(0.1, min(5.0, settings.lease_seconds / 4))


@dataclass
class _Hold:
    job_id: str
    token: int
    generation: int
    last_progress: float = field(default_factory=time.monotonic)
    lost: bool = False
    started: bool = False  # its render (or store) gave a sign of life; until then it waits for its turn


@dataclass
class LeaseKeeper:
    """Beats for the claims this process holds, each while *its* batch makes progress, and sweeps.

    Progress is tracked per batch: the render's step callback marks the batches being rendered,
    the uploader the ones being stored, so a hung render loses its lease even while the uploader
    is busy. A batch that has not started yet (pulled ahead, waiting behind the render in
    progress) lives on this worker's latest progress: it waits while the render before it moves,
    and loses its lease with a stalled one. The heartbeat is fenced by each claim's token; a claim
    it finds lost (taken over, or closed because its job ended) is logged once, and a render whose
    claims are all lost is aborted at its next step.
    """

    app: Celery
    name: str
    settings: Settings
    loads: Callable[[], int]
    compiles: Callable[[], tuple[int, int]] = lambda: (0, 0)  # (recompiles, cold renders): see models.speed
    held: dict[int, _Hold] = field(default_factory=dict)  # batch id → claim
    _generation: int = 0  # bumped by hold(): an abort decided for an older batch never hits a newer one
    _aborted: set[int] = field(default_factory=set)  # generations whose claims are all lost
    _next_sweep: float = 0.0
    _recompiles_seen: int = 0
    _last_progress: float = field(default_factory=time.monotonic)  # this worker's latest sign of life, any batch
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="farm-lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def hold(self, claimed: list[Claimed]) -> None:
        with self._lock:
            self._generation += 1
            for c in claimed:
                self.held[c.batch_id] = _Hold(c.job_id, c.token, self._generation)

    def drop(self, batch_ids: list[int]) -> None:
        with self._lock:
            for batch_id in batch_ids:
                hold = self.held.pop(batch_id, None)
                if hold is not None:
                    self._aborted.discard(hold.generation)

    def progress(self, batch_ids: list[int]) -> None:
        """Called between denoising steps: a sign of life; raises if every claim of the render was lost."""
        now = time.monotonic()
        with self._lock:
            holds = [self.held[i] for i in batch_ids if i in self.held]
            for hold in holds:
                hold.last_progress, hold.started = now, True
            self._last_progress = now
            aborted = bool(holds) and all(h.generation in self._aborted for h in holds)
        if aborted:
            raise BatchAborted("every claim of this batch was lost (its jobs ended, or it was taken over)")

    def progress_quietly(self, batch_ids: list[int]) -> None:
        """A sign of life that never raises (the uploader's)."""
        now = time.monotonic()
        with self._lock:
            for i in batch_ids:
                if i in self.held:
                    self.held[i].last_progress, self.held[i].started = now, True
            self._last_progress = now

    def _run(self) -> None:
        interval = beat_interval(self.settings)
        failing = False
        while not self._stop.wait(interval):
            try:
                self.beat()
                if time.monotonic() >= self._next_sweep:
                    self._next_sweep = time.monotonic() + self.settings.sweep_seconds
                    sweep(self.settings)
                failing = False
            except Exception as exc:  # the ledger is down: logged once per outage, tried again next beat
                if not failing:
                    log.warning("lease keeper: %s", exc)
                failing = True

    def beat(self) -> None:
        now = time.monotonic()
        with self._lock:
            lease = self.settings.lease_seconds
            alive = {i: h for i, h in self.held.items()
                     if now - (h.last_progress if h.started else max(h.last_progress, self._last_progress)) < lease}
            stuck = sorted(set(self.held) - set(alive))
        recompiles, cold = self.compiles()
        if recompiles > self._recompiles_seen:
            log.warning("torch.compile built %d graph(s) after warm-up (%d uncompiled render(s))", recompiles, cold)
            self._recompiles_seen = recompiles
        with session_scope() as s:
            ledger_workers.beat_worker(s, self.name, self.loads(), recompiles=recompiles, cold_renders=cold)
            kept = ledger_batches.extend(s, [(i, h.token) for i, h in alive.items()], self.name,
                                         self.settings.lease_seconds) if alive else set()
            missing = [(i, h.token) for i, h in alive.items() if i not in kept]
            # stored by this very claim a moment ago, and not dropped yet: not lost
            kept |= ledger_batches.stored_by_holder(s, missing) if missing else set()
        with self._lock:
            for i, hold in alive.items():
                if i not in kept and not hold.lost:
                    hold.lost = True
                    log.warning("claim of batch %s (%s, token %d) lost: taken over or closed; its writes will be "
                                "refused", i, hold.job_id, hold.token)
            for generation in {h.generation for h in self.held.values()}:
                members = [h for h in self.held.values() if h.generation == generation]
                if members and all(h.lost for h in members):
                    self._aborted.add(generation)
        if stuck:
            log.error("no render progress for %.0f s: not renewing the leases of batches %s",
                      self.settings.lease_seconds, stuck)
