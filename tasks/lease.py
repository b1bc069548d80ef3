"""The services of one worker process, beside its model: leases, reaper, registry, uploader.

* :class:`LeaseKeeper` (a thread) beats for the batches this process holds, but only while
  the render makes progress (a hung render stops beating and loses its lease); it keeps the
  worker's registry row fresh (so coordinators count it in the pool) and reaps expired
  leases of the whole pool, publishing those batches again.
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
from typing import Any

from celery import Celery

from db import batches as ledger_batches
from db import ledger
from db.session import session_scope
from farm.config import Settings
from farm.status import JobStatus
from tasks.queues import render_queue

log = logging.getLogger(__name__)


@dataclass
class _Msg:
    id: int
    job_id: str
    k: int
    indices: list[int]
    model_key: str
    lane: str
    attempts: int


class BatchAborted(Exception):
    """Every job of the batch being rendered was cancelled or finished: stop rendering it."""


def beat_interval(settings: Settings) -> float:
    return max(0.1, min(5.0, settings.lease_seconds / 4))


def publish_batch(app: Celery, batch: Any, task_id: str, countdown: float | None = None) -> None:
    """Send the message that says "batch ``batch.k`` of ``batch.job_id`` is ready" on its lane."""
    app.send_task(
        "farm.render",
        kwargs={"request_id": batch.job_id, "indices": list(batch.indices), "k": batch.k},
        queue=render_queue(batch.model_key, batch.lane),
        task_id=task_id,
        countdown=countdown,
    )


@dataclass
class LeaseKeeper:
    app: Celery
    name: str
    settings: Settings
    loads: Callable[[], int]
    held: dict[int, str] = field(default_factory=dict)  # batch id → job id
    _last_progress: float = field(default_factory=time.monotonic)
    _abort: bool = False
    _generation: int = 0  # bumped by hold(): an abort decided for an older batch never hits a newer one
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

    def hold(self, batches: dict[int, str]) -> None:
        with self._lock:
            self.held.update(batches)
            self._abort = False
            self._generation += 1
            self._last_progress = time.monotonic()

    def drop(self, batch_ids: list[int]) -> None:
        with self._lock:
            for batch_id in batch_ids:
                self.held.pop(batch_id, None)

    def progress(self) -> None:
        """Called between denoising steps: a sign of life; raises if the batch's jobs were all cancelled."""
        self._last_progress = time.monotonic()
        if self._abort:
            raise BatchAborted("all jobs of this batch were cancelled")

    def progress_quietly(self) -> None:
        """A sign of life that never raises (the uploader's)."""
        self._last_progress = time.monotonic()

    def _run(self) -> None:
        interval = beat_interval(self.settings)
        while not self._stop.wait(interval):
            try:
                self.beat()
                self.reap()
            except Exception as exc:  # the ledger or broker is down: try again next beat
                log.warning("lease keeper: %s", exc)

    def beat(self) -> None:
        with self._lock:
            held = dict(self.held)
            generation = self._generation
            alive = time.monotonic() - self._last_progress < self.settings.lease_seconds
        with session_scope() as s:
            ledger_batches.beat_worker(s, self.name, self.loads())
            if not held:
                return
            if alive:
                kept = ledger_batches.extend(s, list(held), self.name, self.settings.lease_seconds)
                for batch_id in set(held) - kept:
                    log.warning("lease of batch %s lost (reaped or finished elsewhere)", batch_id)
            jobs = {ledger.get_job(s, job_id) for job_id in set(held.values())}
            abort = all(job is None or JobStatus(job.status).is_terminal for job in jobs)
        with self._lock:
            if generation == self._generation:
                self._abort = abort
        if not alive:
            log.error("no render progress for %.0f s: not renewing the leases of %s",
                      self.settings.lease_seconds, sorted(held))

    def reap(self) -> int:
        """Put expired leases of the pool back to queued and publish them again."""
        back: list[Any] = []
        with session_scope() as s:
            rows = ledger_batches.reap(s, self.settings.lease_seconds)
            for row in rows:
                job = ledger.get_job(s, row.job_id)
                if job is None or JobStatus(job.status).is_terminal:
                    row.status = ledger_batches.CANCELLED
                    continue
                what = f"images {row.indices[0]}..{row.indices[-1]}"
                ledger.add_log(s, row.job_id, f"batch {row.k} ({what}): {row.error}; back to the pool",
                               level="WARNING", source="reaper")
                back.append(_Msg(row.id, row.job_id, row.k, list(row.indices), row.model_key, row.lane, row.attempts))
        # published only once the batches are committed and unlocked: a message delivered before
        # the commit would find its batch locked (SKIP LOCKED) and be dropped. Not published (the
        # broker is down, or this process dies now): the fresh lease runs out and a reap retries.
        for msg in back:
            publish_batch(self.app, msg, f"{msg.job_id}.{msg.k}.r{msg.attempts}")
        if rows:
            log.warning("reaper: %d expired batch(es) back to the pool", len(rows))
        if not self.settings.embedded:
            restore_orphans(self.app, self.settings.lease_seconds)
        return len(rows)


def restore_orphans(app: Celery, older_than: float) -> int:
    """Put back on their queue render messages that a dead worker took but never claimed.

    Between taking a message from Redis and claiming its batch in the ledger, a worker holds a
    message for a batch that is still *queued*; if it dies then, no lease exists to expire and
    Redis would only restore the message after its visibility timeout (an hour). So: a message
    unacknowledged for longer than the lease whose batch is still queued goes back to its queue
    now (kombu's own ``restore_by_tag``). If its taker was merely slow, the batch is claimed
    once and the spare message is dropped.
    """
    import base64
    import json

    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        qos = channel.qos
        client = channel.client
        cutoff = time.time() - older_than
        tags = client.zrangebyscore(channel.unacked_index_key, "-inf", cutoff, start=0, num=500)
        candidates: dict[bytes, list[tuple[str, int]]] = {}
        for tag in tags:
            raw = client.hget(channel.unacked_key, tag)
            if raw is None:
                continue
            try:
                payload = json.loads(raw)[0]
                if payload.get("headers", {}).get("task") != "farm.render":
                    continue
                body = json.loads(base64.b64decode(payload["body"]))
                kwargs = body[1]
                candidates[tag] = [(str(kwargs["request_id"]), int(kwargs["k"]))] + [
                    (str(rid), int(k)) for rid, k in kwargs.get("group") or []]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
        if not candidates:
            return 0
        with session_scope() as s:
            waiting = {
                (b.job_id, b.k)
                for job_id in {rid for listed in candidates.values() for rid, _ in listed}
                for b in ledger_batches.get_batches(s, job_id)
                if b.status == ledger_batches.QUEUED or (b.status == ledger_batches.CLAIMED and b.worker is None)
            }
        restored = 0
        for tag, listed in candidates.items():
            if any(batch in waiting for batch in listed):
                qos.restore_by_tag(tag, client)
                restored += 1
    if restored:
        log.warning("reaper: %d render message(s) taken by a dead worker put back on their queue", restored)
    return restored


class Uploader:
    """Runs store steps in a thread, at most ``depth`` waiting; ``depth`` 0 runs them inline."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max(1, depth))
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, name="farm-uploader", daemon=True)
            self._thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        if self._thread is None:
            work()
        else:
            self._queue.put(work)  # blocks while `depth` batches already wait

    def drain(self) -> None:
        """Wait until every submitted batch is stored."""
        if self._thread is not None:
            self._queue.join()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(60)
            self._thread = None

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


_services: WorkerServices | None = None


def start_services(app: Celery, name: str, renderer: Any, settings: Settings) -> WorkerServices:
    """Register this worker in the pool and start its keeper and uploader (once per process)."""
    global _services
    if _services is not None:
        return _services
    # The render thread drives the GPU in short Python steps between kernels; with the uploader
    # thread busy encoding, the default 5 ms GIL switch interval would delay each step's wake-up.
    sys.setswitchinterval(0.001)
    max_batch = int(renderer.find_max_batch())
    renderer.micro_batch = min(renderer.micro_batch, max_batch)  # a listed group may hold more images
    with session_scope() as s:
        ledger_batches.register_worker(
            s, name=name, model_name=renderer.spec.name, model_key=renderer.spec.key, device=renderer.device,
            max_batch=max_batch, loads=renderer.loads, pid=os.getpid(),
        )
    keeper = LeaseKeeper(app=app, name=name, settings=settings, loads=lambda: int(renderer.loads))
    keeper.start()
    _services = WorkerServices(name=name, keeper=keeper, uploader=Uploader(settings.pipeline_depth),
                               max_batch=max_batch)
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
    services.uploader.stop()
    services.keeper.stop()
    try:
        with session_scope() as s:
            ledger_batches.stop_worker(s, services.name)
    except Exception as exc:
        log.warning("could not mark %s stopped in the ledger: %s", services.name, exc)
