"""The per-process listener of job-change and key-change events (see ``farm.events``), and the hub that
fans them out to this process's waiters.

One daemon thread per ledger URL holds a PostgreSQL connection with ``LISTEN farm_jobs`` and
``LISTEN farm_keys``, reconnecting with bounded backoff; after every (re)connect it wakes every waiter
once and tells the key callbacks to forget. Nothing to do on SQLite (the hub is fired in-process).
Imports SQLAlchemy only, and psycopg when a listener starts; never ``farm.events``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from sqlalchemy.engine import make_url

log = logging.getLogger("farm.events")

CHANNEL = "farm_jobs"
KEYS_CHANNEL = "farm_keys"  # payload: an API key id that was revoked (farm.api_keys forgets the keys it remembers)
RECONNECT_MIN_SECONDS = 0.05
RECONNECT_MAX_SECONDS = 2.0
LISTEN_POLL_SECONDS = 0.5  # how often the listener looks at its stop flag
HEALTH_CHECK_SECONDS = 5.0  # an idle listening connection is pinged this often (a dead one is noticed)


_key_callbacks: list[Callable[[str | None], None]] = []


def on_key_change(callback: Callable[[str | None], None]) -> None:
    """Call ``callback(key_id)`` from the listener when a key changed, and ``callback(None)`` when the
    listener (re)connects or loses its connection (whatever it may have missed)."""
    _key_callbacks.append(callback)


def _keys_changed(key_id: str | None) -> None:
    for callback in list(_key_callbacks):
        try:
            callback(key_id)
        except Exception:  # a callback's failure must not stop the listener
            log.exception("key-change callback %r failed", callback)


class Waiter(Protocol):
    """What the hub wakes: a subscription of ``farm.events``."""

    job_id: str

    def _wake(self) -> None: ...


class _Hub:
    """The subscriptions of this process, by job id."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.subs: dict[str, set[Waiter]] = {}

    def add(self, sub: Waiter) -> None:
        with self.lock:
            self.subs.setdefault(sub.job_id, set()).add(sub)

    def remove(self, sub: Waiter) -> None:
        with self.lock:
            subs = self.subs.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.subs[sub.job_id]

    def fire(self, job_ids: Iterable[str]) -> None:
        with self.lock:
            targets = [sub for job_id in set(job_ids) for sub in self.subs.get(job_id, ())]
        for sub in targets:
            sub._wake()

    def fire_all(self) -> None:
        with self.lock:
            targets = [sub for subs in self.subs.values() for sub in subs]
        for sub in targets:
            sub._wake()


hub = _Hub()


# -- the per-process listener (PostgreSQL) ------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _conninfo(url: str) -> str | None:
    """The libpq URI of a PostgreSQL SQLAlchemy URL (``postgresql+psycopg://…`` → ``postgresql://…``)."""
    u = make_url(url)
    if u.get_backend_name() != "postgresql":
        return None
    return u.set(drivername="postgresql").render_as_string(hide_password=False)


class _Listener:
    """A daemon thread with its own connection, ``LISTEN farm_jobs``, reconnecting with bounded backoff."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm-events-listener", daemon=True)
        self._failures = 0

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = RECONNECT_MIN_SECONDS
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:  # psycopg.Error, OSError: the server went away or is not up yet
                self._failures += 1
                level = logging.WARNING if self._failures == 1 else logging.DEBUG
                log.log(level, "job-change listener disconnected (%s); waiters fall back to re-reading", exc)
            finally:
                if self.connected.is_set():  # it was up: the backoff starts over
                    delay = RECONNECT_MIN_SECONDS
                self.connected.clear()
                _keys_changed(None)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _listen(self) -> None:
        import psycopg

        with psycopg.connect(
            self.conninfo, autocommit=True, connect_timeout=5, application_name="farm-events",
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
        ) as conn:  # fmt: skip
            conn.execute(f"LISTEN {CHANNEL}")
            conn.execute(f"LISTEN {KEYS_CHANNEL}")
            # whatever changed while nobody listened: every waiter re-reads once, remembered keys are forgotten
            hub.fire_all()
            _keys_changed(None)
            self.connected.set()
            if self._failures:
                log.info("job-change listener connected again")
            self._failures = 0
            idle = 0.0
            while not self._stop.is_set():
                got = False
                for note in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                    got = True
                    if note.channel == KEYS_CHANNEL:
                        _keys_changed(note.payload)
                    else:
                        hub.fire((note.payload,))
                idle = 0.0 if got else idle + LISTEN_POLL_SECONDS
                if idle >= HEALTH_CHECK_SECONDS:
                    conn.execute("SELECT 1")
                    idle = 0.0


_listeners_lock = threading.Lock()
_listeners: dict[str, _Listener] = {}


def _resolve(url: str | None) -> str:
    from db.session import resolve_url

    return resolve_url(url)


def start(url: str | None = None) -> None:
    """Start this process's listener for the ledger ``url`` (default: the configured one) if needed.

    Returns at once; nothing to do on SQLite. :func:`farm.events.subscribe` calls it.
    """
    conninfo = _conninfo(_resolve(url))
    if conninfo is None:
        return
    listener = _listeners.get(conninfo)
    if listener is not None and listener.alive():
        return
    with _listeners_lock:
        listener = _listeners.get(conninfo)
        if listener is None or not listener.alive():
            listener = _listeners[conninfo] = _Listener(conninfo)
            listener.start()


def listening(url: str | None = None) -> bool:
    """Whether this process's listener for ``url`` is connected (always False on SQLite)."""
    conninfo = _conninfo(_resolve(url))
    listener = _listeners.get(conninfo) if conninfo else None
    return listener is not None and listener.connected.is_set()


def shutdown() -> None:
    """Stop every listener of this process (tests; a later ``farm.events.subscribe`` starts one again)."""
    with _listeners_lock:
        listeners = list(_listeners.values())
        _listeners.clear()
    for listener in listeners:
        listener.stop()


def _after_fork_in_child() -> None:
    # threads do not survive fork; locks may have been held by one of them
    global _listeners_lock
    hub.reset()
    _listeners_lock = threading.Lock()
    _listeners.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
