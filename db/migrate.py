"""Schema migrations of the ledger (Alembic), usable from any working directory.

``ensure_schema`` is what services call on start: the embedded SQLite ledger is
migrated automatically (zero setup); any other database must already be at head,
which ``farm db upgrade`` does.
"""

from __future__ import annotations

import threading
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from db.session import get_engine, is_sqlite, resolve_url
from farm.errors import LedgerSchemaError

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent

_checked: set[str] = set()
_lock = threading.Lock()


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for the packaged migrations and ``url`` (default: the configured ledger)."""
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates %: URL-encoded passwords carry it.
    cfg.set_main_option("sqlalchemy.url", resolve_url(url).replace("%", "%%"))
    cfg.attributes["skip_logging"] = True  # leave the application's logging alone
    return cfg


def head_revision() -> str | None:
    """The revision the code needs."""
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def _is_known(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision(revision) is not None
    except Exception:  # alembic raises several kinds of resolution errors
        return False


def current(url: str | None = None) -> str | None:
    """The revision the database is at; None when it was never migrated."""
    with get_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None = None, *, revision: str) -> None:
    key = resolve_url(url)
    with _lock:
        _checked.discard(key)
    command.downgrade(alembic_config(key), revision)


def ensure_schema(url: str | None = None) -> None:
    """Make sure the ledger's schema is the code's: migrate SQLite, check anything else.

    Raises :class:`LedgerSchemaError` when a server database is not at head.
    Checked once per URL and process.
    """
    key = resolve_url(url)
    if key in _checked:
        return
    with _lock:
        if key in _checked:
            return
        head = head_revision()
        if is_sqlite(key):
            upgrade(key)
        else:
            at = current(key)
            if at != head:
                if at is not None and not _is_known(at):
                    raise LedgerSchemaError(
                        f"ledger at revision {at}, which this code does not know (needs {head}): "
                        "is the code older than the database?"
                    )
                raise LedgerSchemaError(
                    f"ledger at revision {at or 'none (empty database)'}, code needs {head}: "
                    "run `farm db upgrade`"
                )
        _checked.add(key)
