"""``farm usage``: images, realtime frames and GPU-seconds per owner and model, from the ledger."""

from __future__ import annotations

import json
from datetime import date, datetime

import click

from farm.errors import InvalidInputError


def _day(value: str | None, option: str) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInputError(option, f"must be a date as YYYY-MM-DD (got {value!r})") from None


@click.command()
@click.option("--owner", default=None, help="Only this owner (default: every owner).")
@click.option("--since", default=None, metavar="DATE", help="First UTC day, YYYY-MM-DD (default: all recorded).")
@click.option("--until", default=None, metavar="DATE", help="Last UTC day, YYYY-MM-DD (default: today).")
@click.option("--daily", is_flag=True, help="One line per day.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
def usage(owner: str | None, since: str | None, until: str | None, daily: bool, as_json: bool) -> None:
    """Show what each owner used: images, realtime frames and GPU-seconds per model (UTC days)."""
    from db.migrate import ensure_schema
    from db.session import session_scope
    from farm.accounting import usage_rows
    from farm.api_keys import check_owner

    first, last = _day(since, "--since"), _day(until, "--until")
    if first and last and first > last:
        raise InvalidInputError("--since", f"must not be after --until ({last.isoformat()})")
    if owner is not None:
        check_owner(owner)
    ensure_schema()
    with session_scope() as s:
        rows = usage_rows(s, owner=owner, since=first, until=last, daily=daily)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r.as_dict()))
        return
    span = f"since {first.isoformat()}" if first else "all recorded days"
    if not rows:
        click.echo(f"no usage recorded ({span}{f' for owner {owner}' if owner else ''})", err=True)
        return
    head = ["owner", "model", "source", *(["day"] if daily else []), "images", "frames", "gpu_seconds"]
    table = [[r.owner, r.model, r.source, *([r.day.isoformat() if r.day else ""] if daily else []),
              str(r.images), str(r.frames), f"{r.gpu_seconds:.3f}"] for r in rows]
    table.append(["total", "", "", *([""] if daily else []), str(sum(r.images for r in rows)),
                  str(sum(r.frames for r in rows)), f"{sum(r.gpu_seconds for r in rows):.3f}"])
    widths = [max(len(line[i]) for line in [head, *table]) for i in range(len(head))]
    numeric = {"images", "frames", "gpu_seconds"}
    for line in [head, *table]:
        click.echo("  ".join(cell.rjust(w) if h in numeric else cell.ljust(w)
                             for cell, w, h in zip(line, widths, head, strict=True)).rstrip())
    click.echo(f"({span}{f' to {last.isoformat()}' if last else ''}; UTC; as of "
               f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z})", err=True)
