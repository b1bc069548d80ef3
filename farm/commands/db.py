"""``farm db``: ledger migrations (Alembic)."""

from __future__ import annotations

import click

from farm.config import get_settings


@click.group()
def db() -> None:
    """Manage the ledger's schema (FARM_DATABASE_URL)."""


@db.command()
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Upgrade the ledger to REVISION (default: head)."""
    from db import migrate

    migrate.upgrade(None, revision)
    click.echo(f"ledger at {migrate.current(None)} ({_where()})")


@db.command()
@click.argument("revision")
def downgrade(revision: str) -> None:
    """Downgrade the ledger to REVISION (e.g. base, or -1)."""
    from db import migrate

    migrate.downgrade(None, revision=revision)
    click.echo(f"ledger at {migrate.current(None)} ({_where()})")


@db.command()
def current() -> None:
    """Print the ledger's current revision."""
    from db import migrate

    click.echo(f"{migrate.current(None)} ({_where()})")


def _where() -> str:
    from sqlalchemy.engine import make_url

    return make_url(get_settings().effective_database_url).render_as_string(hide_password=True)
