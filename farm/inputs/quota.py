"""What an owner may keep in storage, and how much of a stored file the farm will read.

- An owner's uploads (``<owner>/uploads/``) and stored inputs (``<owner>/inputs/``: data URIs and
  fetched LoRA / embedding files) count together against ``upload_quota_bytes``.
- The bytes they take are a counter in the ledger (:mod:`db.storage_usage`), changed in the transaction
  that stores or deletes the file, under the owner's storage lock (a PostgreSQL advisory lock, so it
  holds across API processes), with the check: concurrent uploads cannot pass the quota together, and a
  check reads one row, never a LIST of the owner's objects.
- Every upload goes through the farm (a presigned S3 PUT cannot be capped): its size is capped as it
  is written. A stored upload is still checked by its size (HEAD / stat) before a read, against
  ``max_upload_bytes`` (an object over it, e.g. after the cap was lowered, is deleted), and the read
  itself stops past the cap.

The second stage of ``farm.inputs``: imports none of it. Import-light: no FastAPI.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from farm.config import Settings
from farm.errors import FarmError, ObjectNotFound
from farm.storage import Storage

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

PREFIXES = ("uploads/", "inputs/")


class UploadTooLargeError(FarmError):
    """Raised when an uploaded file is larger than ``max_upload_bytes``."""

    http_status = 413
    error_type = "upload_too_large"


class UploadQuotaError(FarmError):
    """Raised when an owner's uploads and stored inputs would pass ``upload_quota_bytes``."""

    http_status = 413
    error_type = "upload_quota_exceeded"


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def used(owner: str) -> int:
    """Bytes the owner keeps in storage (uploads and stored inputs): the ledger's counter, one row."""
    from db import storage_usage
    from db.session import session_scope

    with session_scope() as s:
        return storage_usage.used(s, owner) or 0


def listed(storage: Storage, owner: str) -> int:
    """The owner's bytes by a LIST: only to start the counter of an owner that has none yet."""
    return sum(storage.usage(f"{owner}/{prefix}") for prefix in PREFIXES)


def _quota_error(total: int, settings: Settings) -> UploadQuotaError:
    return UploadQuotaError(f"this owner's uploads and stored inputs would take {total} bytes, more than the "
                            f"{settings.upload_quota_bytes} bytes allowed (FARM_UPLOAD_QUOTA_BYTES): delete some "
                            "uploads first (DELETE on an upload's URL); inputs the farm stored for jobs go when "
                            "the jobs end")


def room(owner: str, settings: Settings, storage: Storage | None = None, replacing: str | None = None) -> int:
    """Bytes the owner may still store (an object at ``replacing`` given back); UploadQuotaError when none."""
    total = used(owner) - (_size_or_zero(storage, replacing) if storage is not None and replacing else 0)
    if total >= settings.upload_quota_bytes:
        raise _quota_error(total, settings)
    return settings.upload_quota_bytes - total


def check_room(owner: str, settings: Settings) -> None:
    """Raise UploadQuotaError when the owner's quota is full."""
    room(owner, settings)


def _size_or_zero(storage: Storage, key: str) -> int:
    try:
        return storage.size(key)
    except ObjectNotFound:
        return 0


def store_held(s: Session, storage: Storage, owner: str, key: str, fh: BinaryIO, size: int, content_type: str,
               settings: Settings) -> None:
    """Store the file if it fits in the owner's quota, and count it, in ``s``'s transaction under the
    owner's storage lock (held until it ends). An object already at ``key`` is replaced: its bytes are
    no longer counted."""
    from db import storage_usage

    total = storage_usage.hold(s, owner, lambda: listed(storage, owner))
    old = _size_or_zero(storage, key)
    if total - old + size > settings.upload_quota_bytes:
        raise _quota_error(total - old + size, settings)
    storage.put_file(key, fh, size, content_type)
    storage_usage.add(s, owner, size - old)


def delete_held(s: Session, storage: Storage, owner: str, key: str) -> None:
    """Delete a stored file of the owner's and stop counting it, in ``s``'s transaction under the lock."""
    from db import storage_usage

    storage_usage.hold(s, owner, lambda: listed(storage, owner))
    size = _size_or_zero(storage, key)
    storage.delete(key)
    storage_usage.add(s, owner, -size)


def delete_upload(storage: Storage, owner: str, key: str) -> bool:
    """Delete one of the owner's uploads in a transaction of its own, under its storage lock; False when
    there is none at ``key``."""
    from db.session import session_scope

    with session_scope() as s:
        from db import storage_usage

        storage_usage.hold(s, owner, lambda: listed(storage, owner))
        if not storage.exists(key):
            return False
        delete_held(s, storage, owner, key)
        return True


def store_within_quota(storage: Storage, owner: str, key: str, fh: BinaryIO, size: int, content_type: str,
                       settings: Settings) -> None:
    """:func:`store_held` in a transaction of its own, under this process's lock of the owner too."""
    from db.session import session_scope

    with _locks_guard:
        lock = _locks.setdefault(owner, threading.Lock())
    with lock, session_scope() as s:
        store_held(s, storage, owner, key, fh, size, content_type, settings)


def check_stored(storage: Storage, key: str, settings: Settings) -> int:
    """The size of a stored upload, from its metadata, once it is known to be readable: at most
    ``max_upload_bytes`` and its owner within the quota (UploadTooLargeError / UploadQuotaError).
    An object over the cap can never be used: it is deleted, so that its owner's quota has room again."""
    from db.session import session_scope

    size = storage.size(key)
    cap = settings.max_upload_bytes
    owner = key.split("/", 1)[0]
    if size > cap:
        try:
            with session_scope() as s:
                delete_held(s, storage, owner, key)
        except Exception as exc:  # best effort: the object is refused either way
            log.warning("an upload over the cap could not be deleted (it stays, unserved): %s", exc)
        raise too_large(size, cap, "; it has been deleted")
    total = used(owner)
    if total > settings.upload_quota_bytes:
        raise _quota_error(total, settings)
    return size


def too_large(size: int, limit: int, note: str = "") -> UploadTooLargeError:
    return UploadTooLargeError(
        f"the file has {'at least ' if size > limit and not note else ''}{size} bytes, more than the {limit} "
        f"allowed (FARM_MAX_UPLOAD_BYTES){note}"
    )


def stream(storage: Storage, key: str, settings: Settings) -> Iterator[bytes]:
    """A checked stored upload's bytes in pieces; cut past ``max_upload_bytes`` (replaced after the check)."""
    check_stored(storage, key, settings)
    return _upto(storage.chunks(key, settings.max_upload_bytes), settings.max_upload_bytes)


def _upto(chunks: Iterator[bytes], cap: int) -> Iterator[bytes]:
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > cap:
            raise too_large(seen, cap)
        yield chunk


def read(storage: Storage, key: str, settings: Settings) -> bytes:
    """A checked stored upload, whole (at most ``max_upload_bytes``): for a manifest or an input file."""
    return b"".join(stream(storage, key, settings))
