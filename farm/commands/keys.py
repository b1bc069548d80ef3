"""``farm keys``: API keys of the HTTP API (stored hashed in the ledger)."""

from __future__ import annotations

import click

from farm.errors import FarmError


def _ready() -> None:
    from db.migrate import ensure_schema

    ensure_schema()


@click.group()
def keys() -> None:
    """Create, list and revoke API keys (`Authorization: Key <id>:<secret>`)."""


@keys.command()
@click.option("--owner", required=True, help="The tenant the key's jobs belong to.")
@click.option("--name", default="", help="A label for the key.")
@click.option("--max-in-flight", type=int, default=None,
              help="Queued + running jobs allowed to the owner with this key (default: FARM_MAX_JOBS_IN_FLIGHT).")
@click.option("--max-images", type=int, default=None, help="Largest num_images per request with this key.")
def create(owner: str, name: str, max_in_flight: int | None, max_images: int | None) -> None:
    """Create a key and print it (once: only its hash is stored)."""
    from farm.api_keys import create_key

    _ready()
    info, secret = create_key(owner, name=name, max_in_flight=max_in_flight, max_images=max_images)
    click.echo(f"created key {info.id} for owner {info.owner}; store it now, it is not shown again:", err=True)
    click.echo(secret)


@keys.command("list")
@click.option("--owner", default=None, help="Only this owner's keys.")
def list_(owner: str | None) -> None:
    """List keys (never their secrets)."""
    from farm.api_keys import list_keys

    _ready()
    rows = list_keys(owner)
    click.echo("id\towner\tname\tmax_in_flight\tmax_images\tcreated\tlast_used\trevoked")
    for k in rows:
        cells = [k.id, k.owner, k.name or "-", k.max_in_flight or "-", k.max_images or "-",
                 k.created_at.isoformat(timespec="seconds"),
                 k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "-",
                 k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-"]  # fmt: skip
        click.echo("\t".join(str(c) for c in cells))


@keys.command()
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke the key KEY_ID (the part before the colon); it stops working at once."""
    from farm.api_keys import revoke_key

    _ready()
    if not revoke_key(key_id):
        raise FarmError(f"no active key {key_id!r}")
    click.echo(f"revoked key {key_id}")
