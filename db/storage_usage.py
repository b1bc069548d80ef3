"""Bytes each owner keeps in storage (uploads and stored inputs): a counter kept with the writes.

Every write or delete of an owner's upload or stored input changes the counter in the same transaction,
under the owner's storage lock (:func:`hold`), so the upload quota is one row read: no LIST of the owner's
objects per upload, download or read. An owner with no row yet (objects stored before the counter
existed) is counted once, by the ``count`` the caller gives, the first time it is held.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from db.locks import lock_owner
from db.models import StorageUsage


def storage_lock(owner: str) -> str:
    """The name of the owner's storage lock: a lock of its own ('/' is in no owner's name), so that a
    file being stored never holds up the owner's submits that store nothing."""
    return f"{owner}/storage"


def hold(s: Session, owner: str, count: Callable[[], int]) -> int:
    """Take the owner's storage lock until ``s``'s transaction ends; the bytes the owner keeps.
    ``count()`` gives them when the owner has no row yet (its one LIST), and the row is made."""
    lock_owner(s, storage_lock(owner))
    held = used(s, owner)
    if held is None:
        held = count()
        s.add(StorageUsage(owner=owner, bytes=held))
        s.flush()
    return held


def add(s: Session, owner: str, delta: int) -> None:
    """Count ``delta`` more bytes (fewer if negative) for an owner :func:`hold` holds, in ``s``'s transaction."""
    if delta:  # never below 0: a deleted object the counter never knew (put in the bucket by hand) is no credit
        after = StorageUsage.bytes + delta
        s.execute(update(StorageUsage).where(StorageUsage.owner == owner)
                  .values(bytes=case((after < 0, 0), else_=after)))


def used(s: Session, owner: str) -> int | None:
    """The bytes counted for the owner; None when nothing has been counted yet."""
    return s.scalar(select(StorageUsage.bytes).where(StorageUsage.owner == owner))


__all__ = ["add", "hold", "storage_lock", "used"]
