"""Alembic environment of the ledger.

The URL is ``sqlalchemy.url`` from the Alembic config when set (``db.migrate`` sets
it), else the farm settings. A connection handed in as ``config.attributes["connection"]``
is used as is. SQLite runs in batch mode with foreign keys off, so that a table copy
never fires ``ON DELETE CASCADE``, and in one transaction.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from db.models import Base
from db.session import build_engine, get_engine, is_memory_sqlite, resolve_url

config = context.config

if config.config_file_name is not None and not config.attributes.get("skip_logging"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    return resolve_url(config.get_main_option("sqlalchemy.url") or None)


def run_migrations_offline() -> None:
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        transactional_ddl=True if sqlite else None,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = _url()
    if is_memory_sqlite(url):
        # An in-memory database lives in the cached engine's one connection.
        with get_engine(url).connect() as conn:
            _run(conn)
        return
    engine = build_engine(url, foreign_keys=False, pooled=False)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
