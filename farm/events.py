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
(:func:`notify_key`) makes every process forget the keys it remembers (``farm.api_keys``), and so
does every (re)connect or loss of the listening connection (:func:`on_key_change`).

The listener and the hub it fires are in ``farm.event_listener`` (re-exported here: :func:`start`,
:func:`listening`, :func:`shutdown`, :func:`on_key_change`); this module holds the writers and the waiters.
Import-light: SQLAlchemy and, only when a PostgreSQL listener starts, psycopg.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy import event, text
from sqlalchemy.orm import Session, SessionTransaction

from farm import event_listener as listener
from farm.event_listener import CHANNEL, KEYS_CHANNEL, listening, on_key_change, shutdown, start

__all__ = ["CHANNEL", "KEYS_CHANNEL", "Subscription", "listening", "notify", "notify_key", "on_key_change", "shutdown",
           "start", "subscribe", "wait_for_change", "wait_for_change_async", "watch", "watch_async"]

T = TypeVar("T")
log = logging.getLogger("farm.events")

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
        listener.hub.fire(ids)


def notify_key(s: Session, key_id: str) -> None:
    """Tell every process that listens (``farm_keys``) that API key ``key_id`` changed, when ``s`` commits.

    PostgreSQL only (other databases have no cross-process channel; the caller forgets in-process).
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": KEYS_CHANNEL, "payload": key_id})


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
            listener.hub.remove(self)

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
    listener.start(url)
    sub = Subscription(job_id)
    listener.hub.add(sub)
    return sub


def wait_for_change(job_id: str, timeout: float | None = None, *, url: str | None = None) -> bool:
    """Block until ``job_id`` changes (True) or ``timeout`` passes (False; default ``event_fallback_seconds``).

    One-shot: it sees only changes committed after the call. To read, then wait without
    missing a change made in between, use :func:`subscribe`.
    """
    with subscribe(job_id, url) as sub:
        return sub.wait(timeout)


def watch(job_id: str, read: Callable[[], T], wait: Callable[[Subscription, T], bool]) -> Generator[T, None, None]:
    """The one "subscribe, read, wait" loop: subscribed before the first read (a change committed between a
    read and the wait still wakes it), yield each ``read()``, then ``wait(subscription, what was read)``, until
    the caller stops iterating or ``wait`` returns False. Close it (``contextlib.closing``) when leaving early."""
    with subscribe(job_id) as changes:
        while True:
            state = read()
            yield state
            if not wait(changes, state):
                return


async def watch_async(job_id: str, read: Callable[[], Awaitable[T]],
                      wait: Callable[[Subscription, T], Awaitable[bool]]) -> AsyncGenerator[T, None]:
    """The asyncio twin of :func:`watch` (close it with ``contextlib.aclosing`` when leaving early)."""
    with subscribe(job_id) as changes:
        while True:
            state = await read()
            yield state
            if not await wait(changes, state):
                return


async def wait_for_change_async(job_id: str, timeout: float | None = None, *, url: str | None = None) -> bool:
    """The asyncio twin of :func:`wait_for_change` (same one-shot caveat)."""
    with subscribe(job_id, url) as sub:
        return await sub.wait_async(timeout)
