"""fal's upload protocol: ``POST /storage/upload/initiate`` → ``{upload_url, file_url}``, then a
plain ``PUT upload_url`` carrying the bytes and no credentials (what ``fal.storage.upload`` does).

- On S3 storage ``upload_url`` is a presigned PUT straight to the bucket.
- On local storage it is a farm URL, ``PUT /storage/upload/signed/<owner>/<id>/<name>?expires=…&signature=…``,
  signed with HMAC-SHA256 (:func:`signing_key`); the farm checks the signature and the expiry,
  then stores the body.

``file_url`` is the same owner-only URL ``POST /storage/upload`` returns
(``…/storage/files/<owner>/uploads/<id>/<name>``): usable as a LoRA or embedding ``path`` by its
owner only (``farm.inputs``). Limits: one file at most ``max_upload_bytes``, an owner's uploads
together at most ``upload_quota_bytes`` (checked when an upload is initiated and, on local
storage, again when it is stored). A presigned S3 PUT cannot be capped by S3: an object over
the cap is refused when it is used as an input, and it counts against its owner's quota.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
import uuid
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from farm.api.deps import SettingsDep, TenantDep
from farm.api.errors import ERROR_RESPONSES, ErrorBody
from farm.api.files import SPOOL_BYTES, safe_name
from farm.config import Settings
from farm.errors import FarmError
from farm.storage import S3Storage, get_storage

router = APIRouter(tags=["files"])

_ID = re.compile(r"[0-9a-f]{32}")
_CONTENT_TYPE = r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*(\s*;.*)?$"


class UploadTooLargeError(FarmError):
    """Raised when an uploaded file is larger than ``max_upload_bytes``."""

    http_status = 413
    error_type = "upload_too_large"


class UploadQuotaError(FarmError):
    """Raised when an upload would take an owner's uploads past ``upload_quota_bytes``."""

    http_status = 403
    error_type = "upload_quota_exceeded"


class UploadUrlError(FarmError):
    """Raised when a signed upload URL is forged, altered or expired."""

    http_status = 403
    error_type = "invalid_upload_url"


class InitiateUpload(BaseModel):
    content_type: str = Field(
        ..., min_length=3, max_length=255, pattern=_CONTENT_TYPE, description="MIME type, e.g. image/png."
    )
    file_name: str = Field(..., min_length=1, max_length=255, description="Name of the file (sanitised when stored).")


class InitiatedUpload(BaseModel):
    upload_url: str = Field(..., description="PUT the bytes here, without credentials (valid for a limited time).")
    file_url: str = Field(..., description="The file once uploaded: a LoRA/embedding `path` for its owner.")


class StoredUpload(BaseModel):
    file_url: str
    file_size: int


# -- signing (local storage) ----------------------------------------------------------------------


def signing_key(settings: Settings) -> bytes:
    """``upload_signing_key``, or a random key made once and kept in ``<data_dir>/upload-signing.key``."""
    if settings.upload_signing_key:
        return settings.upload_signing_key.encode()
    path = settings.data_dir / "upload-signing.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return _read_key(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    for _ in range(50):  # bounded: a writer finishes its 64 bytes at once
        key = path.read_bytes().strip()
        if key:
            return key
        time.sleep(0.01)
    raise UploadUrlError(f"the upload signing key file {path} is empty")


def sign(settings: Settings, key: str, expires: int) -> str:
    message = f"PUT\n{key}\n{expires}".encode()
    return hmac.new(signing_key(settings), message, hashlib.sha256).hexdigest()


def _upload_key(owner: str, upload_id: str, name: str) -> str:
    return f"{owner}/uploads/{upload_id}/{name}"


# -- quota ----------------------------------------------------------------------------------------


def _check_room(settings: Settings, owner: str, adding: int = 0, replacing: str | None = None) -> None:
    storage = get_storage(settings)
    used = storage.usage(f"{owner}/uploads/")
    if replacing is not None:
        used -= storage.usage(replacing)
    quota = settings.upload_quota_bytes
    if used + adding > quota or (adding == 0 and used >= quota):
        raise UploadQuotaError(
            f"uploads of owner {owner!r} would hold {used + adding} bytes, over the quota of {quota} bytes "
            "(FARM_UPLOAD_QUOTA_BYTES)"
        )


# -- routes ---------------------------------------------------------------------------------------


def _base(request: Request, settings: Settings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


@router.post(
    "/storage/upload/initiate",
    response_model=InitiatedUpload,
    summary="Start an upload (fal's protocol)",
    responses={**ERROR_RESPONSES, 403: {"model": ErrorBody}},
)
async def initiate(
    body: InitiateUpload,
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    storage_type: Annotated[str | None, Query(description="Accepted and ignored (fal's `fal-cdn-v3`).")] = None,
) -> InitiatedUpload:
    """A URL to PUT the file to, and the URL the file will have. The owner's quota must have room."""
    await run_in_threadpool(_check_room, settings, tenant.owner)
    name, upload_id = safe_name(body.file_name), uuid.uuid4().hex
    key = _upload_key(tenant.owner, upload_id, name)
    base = _base(request, settings)
    owner_q = quote(tenant.owner, safe="")
    file_url = f"{base}/storage/files/{owner_q}/uploads/{upload_id}/{quote(name)}"
    storage = get_storage(settings)
    expiry = settings.upload_url_expiry_seconds
    if isinstance(storage, S3Storage):
        upload_url = await run_in_threadpool(storage.presigned_put, key, expiry)
    else:
        expires = int(time.time()) + expiry
        query = urlencode({"expires": expires, "signature": sign(settings, key, expires)})
        upload_url = f"{base}/storage/upload/signed/{owner_q}/{upload_id}/{quote(name)}?{query}"
    return InitiatedUpload(upload_url=upload_url, file_url=file_url)


@router.put(
    "/storage/upload/signed/{owner}/{upload_id}/{name}",
    response_model=StoredUpload,
    summary="Store the bytes of an initiated upload (local storage)",
    responses={403: {"model": ErrorBody}, 413: {"model": ErrorBody}},
)
async def put_signed(
    owner: str,
    upload_id: str,
    name: str,
    request: Request,
    settings: SettingsDep,
    expires: Annotated[int, Query(description="Unix time after which the URL is refused.")],
    signature: Annotated[str, Query(max_length=64, description="HMAC-SHA256 of the URL's key and expiry.")],
) -> StoredUpload:
    """The URL is its own credential: no Authorization header (fal's client sends none here)."""
    if not _ID.fullmatch(upload_id) or safe_name(name) != name or "/" in owner:
        raise UploadUrlError("not an upload URL made by POST /storage/upload/initiate")
    key = _upload_key(owner, upload_id, name)
    if not hmac.compare_digest(sign(settings, key, expires), signature):
        raise UploadUrlError("the upload URL's signature does not match (altered or made with another key)")
    if time.time() > expires:
        raise UploadUrlError("the upload URL has expired: initiate the upload again")
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    content_type = request.headers.get("content-type", "application/octet-stream")
    # spooled (on disk beyond SPOOL_BYTES) and streamed to storage: never held whole in memory
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            spool.write(chunk)
        spool.seek(0)
        await run_in_threadpool(_check_room, settings, owner, size, key)
        await run_in_threadpool(get_storage(settings).put_file, key, spool, size, content_type)  # type: ignore[arg-type]
    base = _base(request, settings)
    file_url = f"{base}/storage/files/{quote(owner, safe='')}/uploads/{upload_id}/{quote(name)}"
    return StoredUpload(file_url=file_url, file_size=size)


def _too_large(size: int, limit: int) -> UploadTooLargeError:
    return UploadTooLargeError(
        f"the file has {'at least ' if size > limit else ''}{size} bytes, more than the {limit} allowed "
        "(FARM_MAX_UPLOAD_BYTES)"
    )
