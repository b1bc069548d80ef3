"""The services of one worker process, beside its model: leases, reaper, registry, uploader.

* :class:`LeaseKeeper` (a thread) beats for the claims this process holds, each only while its
  batch makes progress (a hung render stops beating and loses its lease; a batch pulled ahead,
  waiting for its turn, is kept while the render before it makes progress); it keeps the worker's
  registry row fresh (so coordinators count it in the pool) and runs the sweeper
  (farm.lifecycle.sweep) every ``sweep_seconds``.
* :class:`Uploader` (a thread) encodes and stores rendered batches, so the next batch renders
  while the previous one goes over the network (pipelining). At most ``pipeline_depth``
  batches wait for it; a render that would exceed that waits instead.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Celery

from db import batches as ledger_batches
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
            ledger_batches.beat_worker(s, self.name, self.loads(), recompiles=recompiles, cold_renders=cold)
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


class Uploader:
    """Runs store steps in ``depth`` threads, at most ``depth`` more waiting; ``depth`` 0 runs them inline.

    Several threads let the ledger transaction of one batch overlap the uploads of the next
    (batches are independent: each store is its own fenced transaction).
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max(1, depth))
        self._threads = [threading.Thread(target=self._run, name=f"farm-uploader-{i}", daemon=True)
                         for i in range(max(0, depth))]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        if not self._threads:
            work()
        else:
            self._queue.put(work)  # blocks while `depth` batches already wait

    def drain(self) -> None:
        """Wait until every submitted batch is stored."""
        if self._threads:
            self._queue.join()

    def stop(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(60)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            try:
                if work is None:
                    return
                work()
            except Exception:  # store steps handle their own errors; this is a bug
                log.exception("uploader: unhandled error")
            finally:
                self._queue.task_done()


@dataclass
class WorkerServices:
    name: str
    keeper: LeaseKeeper
    uploader: Uploader
    max_batch: int
    realtime: Any = None  # tasks.realtime.RealtimeServer, with a Redis broker


_services: WorkerServices | None = None


def start_services(app: Celery, name: str, renderer: Any, settings: Settings,
                   metrics_url: str | None = None) -> WorkerServices:
    """Register this worker in the pool (with where its metrics are scraped) and start its keeper and
    uploader (once per process)."""
    global _services
    if _services is not None:
        return _services
    # The render thread drives the GPU in short Python steps between kernels; with the uploader
    # thread busy encoding, the default 5 ms GIL switch interval would delay each step's wake-up.
    sys.setswitchinterval(0.001)
    max_batch = int(renderer.find_max_batch())
    renderer.micro_batch = min(renderer.micro_batch, max_batch)  # a listed group may hold more images
    warm_compiled = getattr(renderer, "warm_compiled", None)  # FARM_COMPILE: compile each shape before joining
    if warm_compiled is not None:
        warm_compiled()
    with session_scope() as s:
        ledger_batches.register_worker(
            s, name=name, model_name=renderer.spec.name, model_key=renderer.spec.key, device=renderer.device,
            max_batch=max_batch, loads=renderer.loads, pid=os.getpid(), metrics_url=metrics_url,
        )
    keeper = LeaseKeeper(app=app, name=name, settings=settings, loads=lambda: int(renderer.loads),
                         compiles=lambda: (int(getattr(renderer, "recompiles", 0)),
                                           int(getattr(renderer, "cold_renders", 0))))
    keeper.start()
    realtime = None
    if (settings.broker_url or "").startswith(("redis://", "rediss://", "unix://")):
        from tasks.realtime import RealtimeServer

        realtime = RealtimeServer(renderer, settings, max_batch).start()  # frames ahead of batches
    _services = WorkerServices(name=name, keeper=keeper, uploader=Uploader(settings.pipeline_depth),
                               max_batch=max_batch, realtime=realtime)
    return _services


def get_services() -> WorkerServices:
    if _services is None:
        raise RuntimeError("worker services not started: run `farm worker --model NAME`")
    return _services


def stop_services() -> None:
    """Finish storing what was rendered, leave the pool, stop the threads."""
    global _services
    if _services is None:
        return
    services, _services = _services, None
    if services.realtime is not None:
        services.realtime.stop()  # answers the frames it holds first
    services.uploader.stop()
    services.keeper.stop()
    try:
        with session_scope() as s:
            ledger_batches.stop_worker(s, services.name)
    except Exception as exc:
        log.warning("could not mark %s stopped in the ledger: %s", services.name, exc)
