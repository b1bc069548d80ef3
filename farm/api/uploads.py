"""fal's upload protocol: ``POST /storage/upload/initiate`` → ``{upload_url, file_url}``, then a
plain ``PUT upload_url`` carrying the bytes and no credentials (what ``fal.storage.upload`` and
fal's JS client do).

``upload_url`` is a farm URL, ``PUT /storage/upload/signed/<owner>/<id>/<name>?expires=…&signature=…``,
signed with HMAC-SHA256 (:func:`signing_key`), on S3 storage too: the farm checks the signature and
the expiry, then streams the body to storage, cut off past the cap. A presigned S3 PUT signs no
length, and fal's clients PUT (a presigned POST's ``content-length-range`` policy needs a form
POST), so the farm, not the client, caps every upload when it is written.

``file_url`` is the same owner-only URL ``POST /storage/upload`` returns
(``…/storage/files/<owner>/uploads/<id>/<name>``): usable as a LoRA or embedding ``path`` by its
owner only (``farm.inputs``). Limits: one file at most ``max_upload_bytes``, an owner's uploads
together with the owner's stored inputs at most ``upload_quota_bytes`` (checked when an upload is
initiated, as the body streams in, and when it is stored, under the owner's lock: farm.inputs.quota).
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
from farm.api.error_bodies import ERROR_RESPONSES, ErrorBody
from farm.api.files import SPOOL_BYTES, file_url, safe_name, upload_object_key
from farm.config import Settings
from farm.errors import FarmError
from farm.inputs.quota import UploadQuotaError, check_room, room, store_within_quota, too_large
from farm.storage import get_storage

router = APIRouter(tags=["files"])

_ID = re.compile(r"[0-9a-f]{32}")
_CONTENT_TYPE = r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*(\s*;.*)?$"


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


# -- routes ---------------------------------------------------------------------------------------


def public_base(request: Request, settings: Settings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


@router.post(
    "/storage/upload/initiate",
    response_model=InitiatedUpload,
    summary="Start an upload (fal's protocol)",
    responses={**ERROR_RESPONSES, 413: {"model": ErrorBody}},
)
async def initiate(
    body: InitiateUpload,
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    storage_type: Annotated[str | None, Query(description="Accepted and ignored (fal's `fal-cdn-v3`).")] = None,
) -> InitiatedUpload:
    """A URL to PUT the file to, and the URL the file will have. The owner's quota must have room."""
    await run_in_threadpool(check_room, tenant.owner, settings)
    name, upload_id = safe_name(body.file_name), uuid.uuid4().hex
    key = upload_object_key(tenant.owner, upload_id, name)
    base = public_base(request, settings)
    expires = int(time.time()) + settings.upload_url_expiry_seconds
    query = urlencode({"expires": expires, "signature": await run_in_threadpool(sign, settings, key, expires)})
    upload_url = f"{base}/storage/upload/signed/{quote(tenant.owner, safe='')}/{upload_id}/{quote(name)}?{query}"
    return InitiatedUpload(upload_url=upload_url, file_url=file_url(base, tenant.owner, upload_id, name))


@router.put(
    "/storage/upload/signed/{owner}/{upload_id}/{name}",
    response_model=StoredUpload,
    summary="Store the bytes of an initiated upload",
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
    key = upload_object_key(owner, upload_id, name)
    if not hmac.compare_digest(sign(settings, key, expires).encode(), signature.encode()):  # any text: no 500
        raise UploadUrlError("the upload URL's signature does not match (altered or made with another key)")
    if time.time() > expires:
        raise UploadUrlError("the upload URL has expired: initiate the upload again")
    size = await store_streamed(request, settings, owner, key)
    base = public_base(request, settings)
    return StoredUpload(file_url=file_url(base, owner, upload_id, name), file_size=size)


async def store_streamed(request: Request, settings: Settings, owner: str, key: str) -> int:
    """Store the request's body at ``key`` for ``owner``, capped as it streams; its size.

    Refused with 413 past ``max_upload_bytes`` or the owner's room (an object already at ``key``
    given back), before storing anything: the body is spooled (on disk beyond SPOOL_BYTES, never
    held whole in memory), and stored under the owner's lock only once it is whole.
    """
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit)
    storage = get_storage(settings)
    left = await run_in_threadpool(room, owner, settings, storage, key)  # this URL's earlier PUT given back
    if declared.isdigit() and int(declared) > left:
        raise _over_quota(int(declared), left)
    content_type = request.headers.get("content-type", "application/octet-stream")
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(size, limit)
            if size > left:  # cut off as it comes: the quota's exact check is at the store, under the lock
                raise _over_quota(size, left)
            spool.write(chunk)
        spool.seek(0)
        await run_in_threadpool(store_within_quota, storage, owner, key, spool, size,  # type: ignore[arg-type]
                                content_type, settings)
    return size


def _over_quota(size: int, left: int) -> UploadQuotaError:
    return UploadQuotaError(f"the file has at least {size} bytes, more than the {left} bytes left of this owner's "
                            "upload quota (FARM_UPLOAD_QUOTA_BYTES): delete some uploads first (DELETE on an "
                            "upload's URL)")
