"""``farm cancel``: end a request that is queued or rendering, the way the API's cancel does."""

from __future__ import annotations

import click

from db import ledger
from db.migrate import ensure_schema
from db.session import session_scope
from farm.errors import FarmError, JobNotFoundError
from farm.lifecycle import submit as submission

REASON = "cancelled with `farm cancel`"


@click.command()
@click.argument("request_id")
def cancel(request_id: str) -> None:
    """Cancel REQUEST_ID: a queued request never starts; a running one stops before its next batch.

    Any owner's request, as `farm status` reads any (the CLI works on the ledger itself).
    """
    ensure_schema()
    with session_scope() as s:
        job = ledger.get_job(s, request_id)
        was = job.status if job is not None else None
    outcome = submission.cancel(request_id, source="cli", reason=REASON)
    if outcome == "NOT_FOUND":
        raise JobNotFoundError(f"no request {request_id!r} in the ledger")
    if outcome == "ALREADY_COMPLETED":
        with session_scope() as s:
            job = ledger.get_job(s, request_id)
            ended = job.status if job is not None else "ended"
        raise FarmError(f"request {request_id} has already ended ({ended}): nothing to cancel")
    click.echo(f"cancelled {request_id} (it was {was})")
