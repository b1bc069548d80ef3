"""Job-change events: a committed change of a job wakes whoever waits on it, instead of polling.

Writers call :func:`notify` inside their transaction wherever a job's state changes
(``db.ledger``: a job starts, finishes, gets a log line). Waiters (the ``run`` routes, the
status stream, ``farm generate``) subscribe to the job, read the ledger, and sleep until a
notification or a fallback timeout, then read the ledger again.

Why PostgreSQL ``LISTEN``/``NOTIFY`` (channel :data:`CHANNEL`, payload the job id):

- It is transactional. A notification is delivered only when the writer's transaction
  commits, after its changes are visible to everyone, and never if it rolls back (nor from a
  rolled-back savepoint). A woken waiter therefore always reads the committed state, never a
  state that is later rolled back. A Redis ``PUBLISH`` from the writer would go out before, or
  regardless of, the commit: a waiter could wake, read the old row and sleep again.
- It works while the Redis broker is down: status reads and streams must be served then, and
  they need nothing but the ledger.
- It needs no extra server or client library: the ledger is already there. Each process holds
  one listening connection (a daemon thread, started lazily), which fans the notifications out
  to any number of waiting threads and event loops.

The ledger stays the source of truth: an event only says "job J changed, read it again", so
it carries no state. Waiters also re-read after ``event_fallback_seconds`` without one, so a
lost notification (the listener reconnecting after a PostgreSQL restart, a notification
sent before the listener was up) costs latency, never correctness. After every (re)connect
the listener wakes all waiters once, for what it may have missed.

SQLite (embedded mode, where API, CLI and worker share one process) has no ``NOTIFY``:
:func:`notify` records the id on the session and the session's ``after_commit`` hook fires
it in-process after the commit, never before; a rollback drops it. (A savepoint that rolls
back inside a committed transaction may leave a spurious wake-up: harmless, the waiter reads
the ledger and finds nothing new.)

No lost wake-ups: interest is registered *before* the ledger is read, and a subscription keeps
a notification that arrives between the read and the wait::

    with events.subscribe(job_id) as sub:
        while True:
            state = read_the_ledger(job_id)
            if finished(state):
                break
            sub.wait(timeout)  # True: woken by a change since subscribe() or the previous wait

The same listener hears ``farm_keys`` (:data:`KEYS_CHANNEL`): a revoked API key
(:func:`notify_key`) makes every process forget the keys it remembers (``farm.keys``), and so
does every (re)connect or loss of the listening connection (:func:`on_key_change`).

Import-light: SQLAlchemy and, only when a PostgreSQL listener starts, psycopg.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, SessionTransaction

log = logging.getLogger("farm.events")

CHANNEL = "farm_jobs"
KEYS_CHANNEL = "farm_keys"  # payload: an API key id that was revoked (farm.keys forgets the keys it remembers)
RECONNECT_MIN_SECONDS = 0.05
RECONNECT_MAX_SECONDS = 2.0
LISTEN_POLL_SECONDS = 0.5  # how often the listener looks at its stop flag
HEALTH_CHECK_SECONDS = 5.0  # an idle listening connection is pinged this often (a dead one is noticed)

_PENDING = "farm.events.pending"
_HOOKED = "farm.events.hooked"


# -- writers -------------------------------------------------------------------------------------


def notify(s: Session, job_id: str) -> None:
    """Wake the waiters of ``job_id`` when the transaction of ``s`` commits (never if it rolls back).

    The ids of one transaction are collected and sent together. PostgreSQL: one ``SELECT
    pg_notify('farm_jobs', id) FROM unnest(:ids)`` just before the commit (PostgreSQL delivers
    the notifications on commit, and not at all on rollback). Other databases: in-process, from
    the session's ``after_commit`` hook, once per id and transaction.
    """
    pending: set[str] = s.info.setdefault(_PENDING, set())
    pending.add(job_id)
    if not s.info.get(_HOOKED):
        s.info[_HOOKED] = True
        if s.get_bind().dialect.name == "postgresql":
            event.listen(s, "before_commit", _send_pg)
        else:
            event.listen(s, "after_commit", _after_commit)
        event.listen(s, "after_transaction_end", _after_transaction_end)


def _send_pg(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint is being released: the transaction goes on
    ids = session.info.pop(_PENDING, None)
    if ids:
        session.execute(text("SELECT pg_notify(:channel, id) FROM unnest(CAST(:ids AS text[])) AS id"),
                        {"channel": CHANNEL, "ids": sorted(ids)})


def _after_commit(session: Session) -> None:
    if session.get_nested_transaction() is not None:
        return  # a savepoint was released: the transaction is not committed yet
    ids = session.info.pop(_PENDING, None)
    if ids:
        _hub.fire(ids)


def notify_key(s: Session, key_id: str) -> None:
    """Tell every process that listens (``farm_keys``) that API key ``key_id`` changed, when ``s`` commits.

    PostgreSQL only (other databases have no cross-process channel; the caller forgets in-process).
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": KEYS_CHANNEL, "payload": key_id})


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


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the real transaction ended; committed ids were fired already
        session.info.pop(_PENDING, None)


# -- waiters ---------------------------------------------------------------------------------------


def fallback_seconds() -> float:
    """How long a waiter sleeps without an event before it re-reads the ledger (a setting)."""
    from farm.config import get_settings

    return get_settings().event_fallback_seconds


class Subscription:
    """Interest in one job: create it, read the ledger, then wait; close it when done.

    ``wait``/``wait_async`` return True as soon as a change of the job was committed since the
    subscription was made or since the previous wait returned, False after ``timeout`` seconds
    without one (default ``event_fallback_seconds``). Either way the caller re-reads the ledger.
    One waiter at a time per subscription.
    """

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._lock = threading.Lock()
        self._pending = False
        self._event = threading.Event()
        self._waker: Callable[[], None] | None = None
        self._closed = False

    def _wake(self) -> None:
        with self._lock:
            self._pending = True
            self._event.set()
            waker = self._waker
        if waker is not None:
            waker()

    def _take(self) -> bool:
        with self._lock:
            woken, self._pending = self._pending, False
            self._event.clear()
            return woken

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job changes (True) or ``timeout`` passes (False)."""
        self._event.wait(max(0.0, fallback_seconds() if timeout is None else timeout))
        return self._take()

    async def wait_async(self, timeout: float | None = None) -> bool:
        """Like :meth:`wait`, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        woke = asyncio.Event()
        with self._lock:
            if self._pending:
                self._pending = False
                self._event.clear()
                return True
            self._waker = lambda: _call_soon_threadsafe(loop, woke.set)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woke.wait(), max(0.0, fallback_seconds() if timeout is None else timeout))
        finally:
            with self._lock:
                self._waker = None
        return self._take()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _hub.remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(callback)


def subscribe(job_id: str, url: str | None = None) -> Subscription:
    """Register interest in ``job_id`` (call before reading the ledger); starts the listener if needed.

    ``url`` is the ledger's SQLAlchemy URL (default: the configured one).
    """
    start(url)
    sub = Subscription(job_id)
    _hub.add(sub)
    return sub


def wait_for_change(job_id: str, timeout: float | None = None, *, url: str | None = None) -> bool:
    """Block until ``job_id`` changes (True) or ``timeout`` passes (False; default ``event_fallback_seconds``).

    One-shot: it sees only changes committed after the call. To read, then wait without
    missing a change made in between, use :func:`subscribe`.
    """
    with subscribe(job_id, url) as sub:
        return sub.wait(timeout)


async def wait_for_change_async(job_id: str, timeout: float | None = None, *, url: str | None = None) -> bool:
    """The asyncio twin of :func:`wait_for_change` (same one-shot caveat)."""
    with subscribe(job_id, url) as sub:
        return await sub.wait_async(timeout)


class _Hub:
    """The subscriptions of this process, by job id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.subs: dict[str, set[Subscription]] = {}

    def add(self, sub: Subscription) -> None:
        with self.lock:
            self.subs.setdefault(sub.job_id, set()).add(sub)

    def remove(self, sub: Subscription) -> None:
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


_hub = _Hub()


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
            _hub.fire_all()
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
                        _hub.fire((note.payload,))
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

    Returns at once; nothing to do on SQLite. :func:`subscribe` calls it.
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
    """Stop every listener of this process (tests; a later :func:`subscribe` starts one again)."""
    with _listeners_lock:
        listeners = list(_listeners.values())
        _listeners.clear()
    for listener in listeners:
        listener.stop()


def _after_fork_in_child() -> None:
    # threads do not survive fork; locks may have been held by one of them
    global _hub, _listeners_lock
    _hub = _Hub()
    _listeners_lock = threading.Lock()
    _listeners.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
