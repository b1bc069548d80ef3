"""Uploads: ``POST /storage/upload`` stores a file and returns a URL usable as a LoRA or
embedding input by the same owner; ``GET /storage/files/…`` reads it back, ``DELETE`` on the same URL
deletes it (its bytes leave the owner's quota).

The body is either ``multipart/form-data`` with one file field (``file``), or the raw bytes
with their ``Content-Type`` (name them with ``?file_name=``). Objects are kept under
``<owner>/uploads/<uuid>/<safe name>``; more than ``max_upload_bytes`` answers 413, as does an
upload beyond the owner's ``upload_quota_bytes`` (farm.inputs.quota: checked and stored under the
owner's lock). The returned URL is resolved from storage directly when used as an input
(``farm.inputs``). A download is streamed, after its size and owner's quota are checked.
"""

from __future__ import annotations

import mimetypes
import re
import tempfile
import uuid
from collections.abc import AsyncGenerator
from typing import Annotated, Any, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from farm.api.deps import SettingsDep, TenantDep
from farm.api.error_bodies import ERROR_RESPONSES, NOT_FOUND, ErrorBody
from farm.api.guard import MULTIPART_SLACK
from farm.config import Settings
from farm.errors import ObjectNotFound
from farm.inputs.quota import delete_upload, store_within_quota, stream
from farm.storage import get_storage

router = APIRouter(tags=["files"])

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
SPOOL_BYTES = 1 << 20  # an upload is kept in memory up to this, then spooled to a temporary file


class UploadResult(BaseModel):
    url: str = Field(..., description="Where the file is; pass it as a LoRA/embedding `path`.")
    content_type: str = Field(..., description="The content type it was stored with.")
    file_name: str = Field(..., description="The stored (sanitised) file name.")
    file_size: int = Field(..., description="Size in bytes.")


def safe_name(name: str | None) -> str:
    """A file name that is safe as one path segment: letters, digits, '.', '_', '-'."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")[:128].strip("_") or "file"
    return cleaned if cleaned not in (".", "..") else "file"


def _too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"the file is larger than the {limit} bytes allowed (FARM_MAX_UPLOAD_BYTES)")


async def _capped(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        yield chunk


async def _spool(chunks: AsyncGenerator[bytes, None], limit: int) -> tuple[BinaryIO, int]:
    """The bytes of ``chunks`` in a spooled temporary file (on disk beyond SPOOL_BYTES), and their size."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (closed by the caller)
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool, size  # type: ignore[return-value]


async def _read_multipart(request: Request, limit: int) -> tuple[BinaryIO, int, str | None, str | None]:
    """The file part of a multipart body: starlette spools it to disk as it is parsed."""
    parser = MultiPartParser(request.headers, _capped(request, limit + MULTIPART_SLACK), max_files=1, max_fields=8,
                             max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise HTTPException(400, f"bad multipart body: {exc.message}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        upload = next((v for _, v in form.multi_items() if isinstance(v, UploadFile)), None)
    if upload is None:
        await form.close()
        raise HTTPException(400, "the multipart body has no file part (name it 'file')")
    size = upload.size if upload.size is not None else 0
    if size > limit:
        await form.close()
        raise _too_large(limit)
    upload.file.seek(0)
    return upload.file, size, upload.filename, upload.content_type


UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "string", "format": "binary"}}},
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/storage/upload",
    response_model=UploadResult,
    summary="Upload a file (LoRA, embedding)",
    responses={**ERROR_RESPONSES, 400: {"model": ErrorBody}, 413: {"model": ErrorBody}},
    openapi_extra=UPLOAD_BODY,
)
async def upload(
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    file_name: Annotated[str | None, Query(max_length=255, description="Name of a raw-body upload.")] = None,
) -> UploadResult:
    """Store the body (multipart `file` field, or raw bytes) and return its URL.

    The body is spooled (to disk beyond 1 MiB) and streamed to storage, never held whole; the
    owner's uploads may take at most ``upload_quota_bytes`` (413 beyond it).
    """
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    content_type = request.headers.get("content-type", "application/octet-stream")
    multipart = content_type.lower().startswith("multipart/form-data")
    if declared.isdigit() and int(declared) > limit + (MULTIPART_SLACK if multipart else 0):
        raise _too_large(limit)
    if multipart:
        fh, size, part_name, part_type = await _read_multipart(request, limit)
        file_name = file_name or part_name
        content_type = part_type or "application/octet-stream"
    else:
        fh, size = await _spool(_capped(request, limit), limit)
    try:
        if not size:
            raise HTTPException(400, "the file is empty")
        name = safe_name(file_name)
        upload_id = uuid.uuid4().hex
        key = upload_object_key(tenant.owner, upload_id, name)
        await run_in_threadpool(store_within_quota, get_storage(settings), tenant.owner, key, fh, size, content_type,
                                settings)
    finally:
        fh.close()
    url = file_url((settings.public_url or str(request.base_url)).rstrip("/"), tenant.owner, upload_id, name)
    return UploadResult(url=url, content_type=content_type, file_name=name, file_size=size)


def upload_object_key(owner: str, upload_id: str, name: str) -> str:
    """The storage key of an upload (``<owner>/uploads/<id>/<name>``)."""
    return f"{owner}/uploads/{upload_id}/{name}"


def file_url(base: str, owner: str, upload_id: str, name: str) -> str:
    """The URL an upload is read (and deleted) at, and named by as an input: ``{base}/storage/files/…``."""
    return f"{base}/storage/files/{quote(owner, safe='')}/uploads/{upload_id}/{quote(name)}"


async def serve_upload(key: str, name: str, settings: Settings) -> StreamingResponse:
    """An upload's bytes, streamed (size and the owner's quota checked from its metadata first) as a download
    that a browser never renders as a page of this origin; ObjectNotFound (and UploadQuotaError) the caller's."""
    chunks = await run_in_threadpool(stream, get_storage(settings), key, settings)
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return StreamingResponse(chunks, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="{name}"', "X-Content-Type-Options": "nosniff"})


def _own_key(owner: str, upload_id: str, name: str, tenant_owner: str) -> str:
    """The storage key of the tenant's own upload; 404 for anyone else's (no existence oracle) or a bad name."""
    if owner != tenant_owner or not re.fullmatch(r"[0-9a-f]{32}", upload_id) or safe_name(name) != name:
        raise HTTPException(404, "no such file")
    return upload_object_key(owner, upload_id, name)


@router.get(
    "/storage/files/{owner}/uploads/{upload_id}/{name}",
    summary="Download an uploaded file",
    responses={**ERROR_RESPONSES, **NOT_FOUND, 413: {"model": ErrorBody},
               200: {"content": {"application/octet-stream": {}}}},
    response_class=Response,
)
async def download(owner: str, upload_id: str, name: str, tenant: TenantDep, settings: SettingsDep) -> Response:
    """The bytes of an upload; only its owner may read it (anyone else gets 404)."""
    key = _own_key(owner, upload_id, name, tenant.owner)
    try:
        return await serve_upload(key, name, settings)
    except ObjectNotFound:
        raise HTTPException(404, "no such file") from None


@router.delete(
    "/storage/files/{owner}/uploads/{upload_id}/{name}",
    summary="Delete an uploaded file",
    status_code=204,
    responses={**ERROR_RESPONSES, **NOT_FOUND},
    response_class=Response,
)
async def delete(owner: str, upload_id: str, name: str, tenant: TenantDep, settings: SettingsDep) -> Response:
    """Delete an upload; only its owner may (anyone else gets 404). Its bytes no longer count against the
    owner's ``upload_quota_bytes``. A job already holding its URL fails if it has not read it yet."""
    key = _own_key(owner, upload_id, name, tenant.owner)
    if not await run_in_threadpool(delete_upload, get_storage(settings), owner, key):
        raise HTTPException(404, "no such file")
    return Response(status_code=204)
