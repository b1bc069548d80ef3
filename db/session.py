"""Engines (one per URL and process) and the unit-of-work context manager.

SQLite (the embedded ledger) runs in WAL mode with a busy timeout and foreign
keys on; every transaction starts with ``BEGIN IMMEDIATE`` so that concurrent
writers wait for each other instead of failing on a lock upgrade, and SAVEPOINTs
work. PostgreSQL engines ping connections before use.

Celery prefork children must not share their parent's connections: call
:func:`dispose_engines` (``close=False``) in the child after a fork.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

from farm.config import get_settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def resolve_url(url: str | None = None) -> str:
    """The given URL, or the configured ledger URL."""
    return url or get_settings().effective_database_url


def is_sqlite(url: str | URL) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def is_memory_sqlite(url: str | URL) -> bool:
    u = make_url(url)
    return u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:")


def build_engine(url: str, *, foreign_keys: bool = True, pooled: bool = True) -> Engine:
    """A new engine configured for the ledger (not cached: see :func:`get_engine`).

    ``foreign_keys=False`` is for SQLite migrations, where a batch table copy must
    not fire ``ON DELETE CASCADE``; ``pooled=False`` gives a NullPool engine.
    """
    u = make_url(url)
    kwargs: dict[str, Any] = {}
    if u.get_backend_name() != "sqlite":
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = _postgres_timeouts(get_settings().ledger_session_timeout)
        if not pooled:
            kwargs["poolclass"] = NullPool
        return create_engine(u, **kwargs)

    kwargs["connect_args"] = {"check_same_thread": False}
    if is_memory_sqlite(u):
        kwargs["poolclass"] = StaticPool  # one shared connection, or each would see its own database
    else:
        assert u.database is not None
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        if not pooled:
            kwargs["poolclass"] = NullPool
    engine = create_engine(u, **kwargs)
    _configure_sqlite(engine, foreign_keys=foreign_keys, wal=not is_memory_sqlite(u))
    return engine


def _postgres_timeouts(seconds: float) -> dict[str, Any]:
    """libpq parameters that bound how long a session of a cut-off host can hold its locks.

    A worker host whose link is cut in the middle of a transaction keeps its row locks on the server until the
    server drops the session; TCP alone takes hours to notice. The server ends a session idle in a transaction
    (``idle_in_transaction_session_timeout``) or whose sent data stays unacknowledged (``tcp_user_timeout``)
    after ``seconds``; on the client side the same ``tcp_user_timeout`` and keepalives end the dead connection.
    """
    if seconds <= 0:
        return {}
    ms = int(seconds * 1000)
    idle = max(1, int(seconds / 3))
    return {
        "options": f"-c idle_in_transaction_session_timeout={ms} -c tcp_user_timeout={ms}",
        "tcp_user_timeout": ms, "keepalives": 1, "keepalives_idle": idle, "keepalives_interval": idle,
        "keepalives_count": 3,
    }


def _configure_sqlite(engine: Engine, *, foreign_keys: bool, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite (it would not BEGIN before a SAVEPOINT).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            if wal:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine(url: str | None = None) -> Engine:
    """The engine of ``url`` (default: the configured ledger), created once per process."""
    key = resolve_url(url)
    engine = _engines.get(key)
    if engine is None:
        with _lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _engines[key] = build_engine(key)
    return engine


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    key = resolve_url(url)
    maker = _sessionmakers.get(key)
    if maker is None:
        engine = get_engine(key)
        with _lock:
            maker = _sessionmakers.setdefault(key, sessionmaker(engine, expire_on_commit=False))
    return maker


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises.

    Objects stay usable after the block (``expire_on_commit=False``).
    """
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
    for action in session.info.pop(AFTER_COMMIT, []):
        try:
            action()
        except Exception:  # the transaction stands; its follow-up is best effort and logged here
            log.exception("after-commit action %r failed", action)


AFTER_COMMIT = "farm_after_commit"


def after_commit(s: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the :func:`session_scope` transaction of ``s`` has committed (never on rollback)."""
    s.info.setdefault(AFTER_COMMIT, []).append(action)


def dispose_engines(*, close: bool = True) -> None:
    """Forget every cached engine and its pool.

    Tests call it to release connections; a forked child (Celery prefork) calls it
    with ``close=False`` so that it drops the parent's pooled connections without
    closing them under the parent, and opens its own on next use.
    """
    with _lock:
        engines = list(_engines.values())
        _engines.clear()
        _sessionmakers.clear()
    for engine in engines:
        engine.dispose(close=close)
