"""Publishing: the one place where producers talk to the broker.

The API, the CLI, the coordinator, the bulk driver and the sweeper publish through here. It
knows the task and queue names and never imports a task body (so no producer pulls in the
worker code, and there is no import cycle through ``tasks``). A message only wakes a worker:
the ledger says what must run, so a message that is lost, late or sent twice changes nothing
but latency (the claim decides, and the sweeper republishes what may be gone).

Publishing never raises: a broker that is down or slow makes :func:`publish` return the
batches it could not announce, which the caller marks unpublished for the sweeper. After a
failure the broker is not tried again for a moment (``sweep_seconds``), so a submit during an
outage answers at once instead of waiting on timeouts. :func:`publish_soon` hands the work to a
background thread: an HTTP submit answers as soon as its rows are committed.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery

from farm.celery_config import celery_config
from farm.config import Settings, get_settings
from farm.queues import render_queue

log = logging.getLogger(__name__)

RENDER_TASK = "farm.render"
GENERATE_TASK = "farm.generate"
BULK_TASK = "farm.bulk"
EPOCH_KEY = "farm:broker-epoch"  # absent: the broker lost its data (or is new), so its messages are gone

_apps: dict[tuple[str, str], Celery] = {}
_apps_lock = threading.Lock()
_down_until = 0.0


@dataclass
class Message:
    """One render message: "batch ``k`` of ``request_id`` (and the ``group`` listed with it) is ready"."""

    model_key: str
    lane: str
    request_id: str
    k: int
    indices: list[int]
    batch_ids: list[int]
    group: list[tuple[str, int]] = field(default_factory=list)

    @property
    def queue(self) -> str:
        return render_queue(self.model_key, self.lane)


def broker_app(settings: Settings | None = None) -> Celery:
    """This process's Celery app for the configured broker and backend, with no task bodies.

    Workers register their bodies on this same instance (tasks.celery_app.get_app), so the embedded
    in-process worker and the producers share one app.
    """
    settings = settings or get_settings()
    ident = (settings.effective_broker_url, settings.effective_result_backend)
    app = _apps.get(ident)
    if app is None:
        with _apps_lock:
            app = _apps.get(ident)
            if app is None:
                app = Celery("farm", set_as_current=False)
                app.conf.update(celery_config(settings))
                _apps[ident] = app
    return app


def broker_down() -> bool:
    """Whether a publish failed a moment ago (then producers do not wait on the broker again yet)."""
    return time.monotonic() < _down_until


def _mark_down(settings: Settings, exc: BaseException) -> None:
    global _down_until
    if not broker_down():
        log.warning("broker unavailable (%s): jobs stay queued in the ledger and are published when it is back",
                    exc)
    _down_until = time.monotonic() + max(1.0, settings.sweep_seconds)


def publish(messages: Sequence[Message], settings: Settings) -> list[int]:
    """Send ``messages``; returns the batch ids of those that could not be sent (empty: all sent)."""
    if not messages:
        return []
    if broker_down():
        return [i for m in messages for i in m.batch_ids]
    app = broker_app(settings)
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            for m in messages:
                app.send_task(
                    RENDER_TASK, queue=m.queue, producer=producer, ignore_result=True,
                    task_id=f"{m.request_id}.{m.k}.{uuid.uuid4().hex[:8]}",
                    kwargs={"request_id": m.request_id, "k": m.k, "indices": m.indices,
                            "group": [list(g) for g in m.group]},
                )  # fmt: skip
                sent += 1
    except Exception as exc:  # kombu/redis raise many types for a dead or frozen broker
        _mark_down(settings, exc)
        return [i for m in messages[sent:] for i in m.batch_ids]
    return []


def send_task(name: str, kwargs: dict[str, Any], queue_name: str, settings: Settings) -> None:
    """Send a public task (``farm.bulk``) by name; raises if the broker does not take it."""
    broker_app(settings).send_task(name, kwargs=kwargs, queue=queue_name)


def store_result(task_id: str, value: Any, state: str, settings: Settings) -> None:
    """Write the Celery result of a ``farm.generate`` task (its caller's ``AsyncResult.get()``)."""
    broker_app(settings).backend.store_result(task_id, value, state)


FLUSH_UPTIME = 60  # seconds: a Redis up longer than this without the epoch key was flushed (or is new to us)


def broker_epoch_reset(settings: Settings) -> datetime | None:
    """When the broker last started, if it lost its data since the last look (restarted empty, flushed).

    The epoch key lives beside the messages: if it is gone, so are they. The first sweeper to
    notice sets it again (``SET NX``) and answers the broker's start time (now less its uptime,
    a second early for clock skew), or now after a flush: every queued batch published before that
    is republished. A new broker holds nothing published before it started, so a fresh farm
    republishes nothing, and neither does a new farm on an old Redis once a render queue holds its
    messages (a flush would have emptied them). The other sweepers see the key set and answer None.
    Only Redis brokers have one; others answer None (the dispatch timeout covers them).
    """
    url = settings.effective_broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    import redis

    client = redis.Redis.from_url(url, socket_timeout=settings.publish_timeout,
                                  socket_connect_timeout=settings.publish_timeout)
    try:
        if not client.set(EPOCH_KEY, uuid.uuid4().hex, nx=True):
            return None
        uptime = float(client.info("server").get("uptime_in_seconds", 0))  # type: ignore[union-attr]
        # up a while with no key: flushed, or a new farm on a Redis that served other things before. A
        # flush empties every queue; a render queue holding messages means this farm's messages are there
        holding = uptime > FLUSH_UPTIME and next(iter(client.scan_iter(match="render.*", count=1000)), None)
    finally:
        client.close()
    if holding:
        return None
    now = datetime.now(UTC)
    started = now - timedelta(seconds=uptime) + timedelta(seconds=1)
    return now if uptime > FLUSH_UPTIME else min(started, now)  # flushed: everything queued is republished


def queue_depths(queues: Sequence[str], settings: Settings) -> dict[str, int]:
    """Messages waiting on each queue (kombu's passive declare); raises if the broker is unreachable."""
    if not queues:
        return {}
    depths = {}
    with broker_app(settings).connection_for_write() as conn:
        channel: Any = conn.default_channel
        for name in queues:
            try:
                depths[name] = int(channel.queue_declare(queue=name, passive=True).message_count)
            except Exception:  # a queue never declared holds nothing
                depths[name] = 0
    return depths


class _Publisher:
    """A background thread that publishes and, on failure, hands the batch ids to ``on_failure``."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[list[Message], Settings, Callable[[list[int]], None]]] = queue.Queue(10_000)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, messages: list[Message], settings: Settings, on_failure: Callable[[list[int]], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="farm-publisher", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait((messages, settings, on_failure))
        except queue.Full:  # the broker is far behind: leave them to the sweeper
            on_failure([i for m in messages for i in m.batch_ids])

    def _run(self) -> None:
        while True:
            messages, settings, on_failure = self._queue.get()
            try:
                failed = publish(messages, settings)
                if failed:
                    on_failure(failed)
            except Exception:  # on_failure talks to the ledger; the sweeper covers what is lost here
                log.exception("publisher: could not record a failed publish")


_publisher = _Publisher()


def publish_soon(messages: list[Message], settings: Settings, on_failure: Callable[[list[int]], None]) -> None:
    """Publish from a background thread; ``on_failure(batch_ids)`` runs there for what was not sent."""
    if messages:
        _publisher.submit(messages, settings, on_failure)
