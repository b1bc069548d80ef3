"""What an owner may keep in storage, and how much of a stored file the farm will read.

- An owner's uploads (``<owner>/uploads/``) and stored inputs (``<owner>/inputs/``: data URIs and
  fetched LoRA / embedding files) count together against ``upload_quota_bytes``.
- A file is stored only under the owner's storage lock (:func:`db.locks.lock_owner` on
  ``<owner>/storage``: a PostgreSQL advisory lock, so it holds across API processes), with the check,
  so that concurrent uploads cannot pass the quota together.
- A presigned S3 PUT cannot be capped by S3: before any read of a stored upload its size is taken
  from the metadata (HEAD / stat) and checked against ``max_upload_bytes`` (an object over it is
  deleted), and the owner's total against the quota; the read itself stops past the cap, so an
  object replaced meanwhile is no hole.

The second stage of ``farm.inputs``: imports none of it. Import-light: no FastAPI.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import BinaryIO

from farm.config import Settings
from farm.errors import FarmError
from farm.storage import Storage

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


def used(storage: Storage, owner: str) -> int:
    """Bytes the owner keeps in storage: uploads and stored inputs."""
    return sum(storage.usage(f"{owner}/{prefix}") for prefix in PREFIXES)


def _quota_error(owner: str, total: int, settings: Settings) -> UploadQuotaError:
    return UploadQuotaError(f"this owner's uploads and stored inputs would take {total} bytes, more than the "
                            f"{settings.upload_quota_bytes} bytes allowed (FARM_UPLOAD_QUOTA_BYTES): delete some "
                            "uploads first")


def check_room(storage: Storage, owner: str, settings: Settings, adding: int = 0, replacing: str | None = None) -> None:
    """Raise UploadQuotaError unless ``adding`` more bytes fit in the owner's quota (0: unless it is full)."""
    total = used(storage, owner)
    if replacing is not None:
        total -= storage.usage(replacing)
    quota = settings.upload_quota_bytes
    if total + adding > quota or (adding == 0 and total >= quota):
        raise _quota_error(owner, total + adding, settings)


def store_within_quota(storage: Storage, owner: str, key: str, fh: BinaryIO, size: int, content_type: str,
                       settings: Settings, replacing: str | None = None) -> None:
    """Check the quota and store the file as one step under the owner's lock (this process's and the ledger's)."""
    from db.locks import lock_owner
    from db.session import session_scope

    with _locks_guard:
        lock = _locks.setdefault(owner, threading.Lock())
    with lock, session_scope() as s:
        # held until this transaction ends, across API processes; a lock of its own ('/' is in no owner's
        # name), so that an upload being stored never holds up the owner's submits
        lock_owner(s, f"{owner}/storage")
        check_room(storage, owner, settings, size, replacing)
        storage.put_file(key, fh, size, content_type)


def check_stored(storage: Storage, key: str, settings: Settings) -> int:
    """The size of a stored upload, from its metadata, once it is known to be readable: at most
    ``max_upload_bytes`` and its owner within the quota (UploadTooLargeError / UploadQuotaError).
    An object over the cap can never be used: it is deleted, so that its owner's quota has room again."""
    size = storage.size(key)
    cap = settings.max_upload_bytes
    if size > cap:
        with contextlib.suppress(Exception):
            storage.delete(key)
        raise too_large(size, cap, "; it has been deleted")
    owner = key.split("/", 1)[0]
    total = used(storage, owner)
    if total > settings.upload_quota_bytes:
        raise _quota_error(owner, total, settings)
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
