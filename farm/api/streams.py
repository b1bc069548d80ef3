"""Open status streams per owner: at most ``max_streams_per_owner`` at once in each API process.

A stream holds a connection and a waiter for as long as its request runs, so one owner could
otherwise open thousands. The slot is taken before the stream starts (429 beyond the limit)
and given back when the stream ends, however it ends (completion, the client hanging up).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import TypeVar

from farm.api.error_bodies import TooManyStreamsError

T = TypeVar("T")

_lock = threading.Lock()
_open: dict[str, int] = {}


def take(owner: str, limit: int) -> None:
    """Take one of the owner's stream slots, or raise TooManyStreamsError (429)."""
    with _lock:
        n = _open.get(owner, 0)
        if n >= limit:
            raise TooManyStreamsError(
                f"{n} status streams are open for this owner; the limit is {limit} (FARM_MAX_STREAMS_PER_OWNER): "
                "close one, or poll the status route"
            )
        _open[owner] = n + 1


def give_back(owner: str) -> None:
    with _lock:
        n = _open.get(owner, 0) - 1
        if n > 0:
            _open[owner] = n
        else:
            _open.pop(owner, None)


class holding(AsyncIterator[T]):  # noqa: N801 (used like a function)
    """``events``, giving the owner's slot (taken by :func:`take`) back once when the stream ends:
    exhausted, failed, closed, or dropped unstarted (a client that hung up before the first event)."""

    def __init__(self, owner: str, events: AsyncIterator[T]) -> None:
        self.owner = owner
        self.events = events
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            give_back(self.owner)

    async def __anext__(self) -> T:
        try:
            return await self.events.__anext__()
        except BaseException:  # StopAsyncIteration, the client gone (CancelledError), a failure
            self.release()
            raise

    async def aclose(self) -> None:
        self.release()
        close = getattr(self.events, "aclose", None)
        if close is not None:
            await close()

    def __del__(self) -> None:
        self.release()
