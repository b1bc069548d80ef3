"""Announce: the one place where queued batches become render messages, published after their commit.

Submit, the fetch stage and the sweeper all announce through here: :func:`message` builds the message
of a GPU batch's worth of queued batches (the first is named, the rest listed with it), and
:func:`announce` publishes through farm.dispatch; what cannot be sent now is marked unpublished,
and the sweeper sends it when the broker is back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from db import batch_sweep
from db.session import session_scope
from farm import dispatch
from farm.config import Settings


class Queued(Protocol):
    """What a message names of a queued batch (a ``db.models.Batch`` row, or its parts)."""

    @property
    def id(self) -> int: ...
    @property
    def job_id(self) -> str: ...
    @property
    def k(self) -> int: ...
    @property
    def indices(self) -> list[int]: ...
    @property
    def model_key(self) -> str: ...
    @property
    def lane(self) -> str: ...


def message(chunk: Sequence[Queued]) -> dispatch.Message:
    """One message for ``chunk`` (same model and lane): "batch k of the first job, and the rest, are ready"."""
    first, rest = chunk[0], chunk[1:]
    return dispatch.Message(model_key=first.model_key, lane=first.lane, request_id=first.job_id, k=first.k,
                            indices=list(first.indices), batch_ids=[c.id for c in chunk],
                            group=[(c.job_id, c.k) for c in rest])


def messages(rows: Sequence[Queued]) -> list[dispatch.Message]:
    """One message per batch."""
    return [message([b]) for b in rows]


def unpublished(batch_ids: list[int]) -> None:
    """Their messages were not sent: leave them to the sweeper (published when the broker is back)."""
    with session_scope() as s:
        batch_sweep.unpublished(s, batch_ids)


def announce(messages: list[dispatch.Message], settings: Settings, *, background: bool = False) -> list[int]:
    """Publish after the commit; what cannot be sent now is marked unpublished for the sweeper. Returns the
    batch ids not sent (none when ``background``: a thread publishes, and marks what it could not send)."""
    if background:
        dispatch.publish_soon(messages, settings, unpublished)
        return []
    failed = dispatch.publish(messages, settings)
    if failed:
        unpublished(failed)
    return failed
