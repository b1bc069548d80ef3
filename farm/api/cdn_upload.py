"""fal_client's own upload flow (``fal_client.upload``, ``upload_file``, ``upload_image``, 1.0.x).

The Python client does not use ``POST /storage/upload/initiate`` first (fal-js does, and so does
its fallback): it asks ``POST {REST}/storage/auth/token?storage_type=fal-cdn-v3`` for a token
(``{token, token_type, base_url, expires_at}``), then ``POST {CDN}/files/upload`` with the bytes,
``Authorization: <token_type> <token>`` and ``X-Fal-File-Name``, and reads ``access_url`` from
the answer. Files over 100 MB go through ``POST {base_url}/files/upload/multipart`` instead.

Here:

- the token is the owner's and its key's, signed with HMAC-SHA256 by itsdangerous over the upload
  signing key (:func:`farm.api.uploads.signing_key`), valid ``upload_url_expiry_seconds``; a
  revoked key voids its tokens. It is only good for these upload routes, never as an API key;
- the bytes are streamed, capped and counted exactly as a signed upload PUT's
  (:func:`farm.api.uploads.store_streamed`: ``FARM_MAX_UPLOAD_BYTES``, the owner's quota);
- ``access_url`` is a link anyone may fetch until it expires (:data:`LINK_SECONDS`), as fal's CDN
  URLs are: ``/cdn/storage/files/<owner>/uploads/<id>/<name>?expires=…&signature=…`` (the query
  kept out of the logs by farm.api.log_redact). Its path ends as an upload URL's
  (``farm.inputs.refs.upload_key``), so as a job input it is still accepted from its owner only;
- multipart is refused with 413 naming the cap: fal_client sends only files over 100 MB that way,
  past the default cap (64 MiB), and one request carries any file up to the cap.
"""

from __future__ import annotations

import hashlib
import hmac
import mimetypes
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from itsdangerous import BadSignature, URLSafeSerializer
from pydantic import BaseModel, Field

from farm.api.deps import SettingsDep, TenantDep
from farm.api.error_bodies import ERROR_RESPONSES, NOT_FOUND, ErrorBody
from farm.api.files import safe_name, serve_upload, upload_object_key
from farm.api.uploads import public_base, signing_key, store_streamed
from farm.api_keys import active_key
from farm.config import Settings
from farm.errors import FarmError, ObjectNotFound
from farm.inputs.quota import UploadQuotaError, UploadTooLargeError, check_room

router = APIRouter(tags=["files"])

SALT = "lcm-farm fal-cdn-v3 upload token v1"
SIGNER = {"digest_method": hashlib.sha256}  # itsdangerous' default is SHA-1
TOKEN_TYPE = "Bearer"
LINK_SECONDS = 7 * 86400  # how long an access_url may be fetched without a key
CDN_PREFIX = "/files/upload"  # the keyless routes (farm.api.guard): the token is checked before the body
_ID = re.compile(r"[0-9a-f]{32}")


class UploadTokenError(FarmError):
    """Raised when an upload token is missing, forged, expired or its key revoked."""

    http_status = 401
    error_type = "invalid_upload_token"


class CdnToken(BaseModel):
    token: str = Field(..., description="Send as `Authorization: Bearer <token>` to POST /files/upload.")
    token_type: str = Field(TOKEN_TYPE, description="Always `Bearer`.")
    base_url: str = Field(..., description="Where /files/upload/multipart lives (this API).")
    expires_at: str = Field(..., description="ISO 8601 time (UTC) after which the token is refused.")


class CdnUpload(BaseModel):
    access_url: str = Field(..., description="A link to the file, fetchable without a key until it expires; "
                            "a LoRA/embedding `path` for its owner.")  # fmt: skip
    file_size: int


def _serializer(settings: Settings) -> URLSafeSerializer:
    return URLSafeSerializer(signing_key(settings), salt=SALT, signer_kwargs=SIGNER)


def issue_token(settings: Settings, owner: str, key_id: str | None, seconds: int) -> tuple[str, float]:
    """A token for ``owner`` (through key ``key_id``) valid ``seconds``, and when it expires."""
    expires = round(time.time() + seconds, 3)
    token: str = _serializer(settings).dumps({"o": owner, "k": key_id, "e": expires})
    return token, expires


def verify_token(settings: Settings, authorization: str | None) -> str:
    """The owner of the ``Authorization: Bearer <token>`` header's token (a blocking call: ledger)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != TOKEN_TYPE.lower() or not token.strip():
        raise UploadTokenError("send `Authorization: Bearer <token>` with a token from "
                               "POST /storage/auth/token?storage_type=fal-cdn-v3")  # fmt: skip
    try:
        payload = _serializer(settings).loads(token.strip())
        owner, key_id, expires = str(payload["o"]), payload["k"], float(payload["e"])
    except (BadSignature, KeyError, TypeError, ValueError):
        raise UploadTokenError("invalid upload token (bad signature)") from None
    if expires <= time.time():
        raise UploadTokenError("the upload token has expired: get a new one from POST /storage/auth/token")
    if key_id is not None and active_key(str(key_id)) is None:
        raise UploadTokenError("the upload token's API key has been revoked")
    return owner


def link_signature(settings: Settings, key: str, expires: int) -> str:
    """HMAC-SHA256 of a GET link (``GET`` in the message: an upload URL's signature is not a link's)."""
    return hmac.new(signing_key(settings), f"GET\n{key}\n{expires}".encode(), hashlib.sha256).hexdigest()


def access_url(base: str, settings: Settings, owner: str, upload_id: str, name: str) -> str:
    expires = int(time.time()) + LINK_SECONDS
    query = urlencode({"expires": expires,
                       "signature": link_signature(settings, upload_object_key(owner, upload_id, name), expires)})
    return f"{base}/cdn/storage/files/{quote(owner, safe='')}/uploads/{upload_id}/{quote(name)}?{query}"


# -- routes ---------------------------------------------------------------------------------------


@router.post(
    "/storage/auth/token",
    response_model=CdnToken,
    summary="A token for fal_client's uploads (fal's fal-cdn-v3 protocol)",
    responses={**ERROR_RESPONSES, 413: {"model": ErrorBody}},
)
async def token(
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    storage_type: Annotated[Literal["fal-cdn-v3"], Query(description="Only fal's `fal-cdn-v3` is served.")] = (
        "fal-cdn-v3"
    ),
) -> CdnToken:
    """The owner's quota must have room; the token is good for ``upload_url_expiry_seconds``."""
    await run_in_threadpool(check_room, tenant.owner, settings)
    value, expires = await run_in_threadpool(issue_token, settings, tenant.owner, tenant.key_id,
                                             settings.upload_url_expiry_seconds)  # fmt: skip
    return CdnToken(token=value, base_url=public_base(request, settings),
                    expires_at=datetime.fromtimestamp(expires, UTC).isoformat())  # fmt: skip


@router.post(
    CDN_PREFIX,
    response_model=CdnUpload,
    summary="Store a file (fal's fal-cdn-v3 protocol)",
    responses={401: {"model": ErrorBody}, 413: {"model": ErrorBody}},
)
async def upload(
    request: Request,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
    x_fal_file_name: Annotated[str | None, Header(max_length=255)] = None,
) -> CdnUpload:
    """The token is checked before a byte of the body is read; the body is capped as it streams."""
    owner = await run_in_threadpool(verify_token, settings, authorization)
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    ext = mimetypes.guess_extension(content_type) or ".bin"
    name, upload_id = safe_name(x_fal_file_name or f"upload{ext}"), uuid.uuid4().hex
    size = await store_streamed(request, settings, owner, upload_object_key(owner, upload_id, name))
    return CdnUpload(access_url=access_url(public_base(request, settings), settings, owner, upload_id, name),
                     file_size=size)  # fmt: skip


@router.post(
    CDN_PREFIX + "/multipart",
    summary="Multipart uploads: refused (one request takes any file up to the cap)",
    responses={401: {"model": ErrorBody}, 413: {"model": ErrorBody}},
)
async def multipart(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    await run_in_threadpool(verify_token, settings, authorization)
    raise UploadTooLargeError(
        f"multipart uploads are not served: fal_client sends only files over 100 MB in parts, and one file "
        f"may have at most {settings.max_upload_bytes} bytes here (FARM_MAX_UPLOAD_BYTES)"
    )


@router.get(
    "/cdn/storage/files/{owner}/uploads/{upload_id}/{name}",
    summary="Fetch an uploaded file by its signed link (no key)",
    responses={**NOT_FOUND, 403: {"model": ErrorBody}, 200: {"content": {"application/octet-stream": {}}}},
    response_class=Response,
)
async def fetch(
    owner: str,
    upload_id: str,
    name: str,
    settings: SettingsDep,
    expires: Annotated[int, Query(description="Unix time after which the link is refused.")],
    signature: Annotated[str, Query(max_length=64, description="HMAC-SHA256 of the file's key and expiry.")],
) -> Response:
    """The link is its own credential until it expires; a bad or expired one answers 403."""
    if not _ID.fullmatch(upload_id) or safe_name(name) != name or "/" in owner:
        raise HTTPException(404, "no such file")
    key = upload_object_key(owner, upload_id, name)
    if not hmac.compare_digest(link_signature(settings, key, expires).encode(), signature.encode()):
        raise HTTPException(403, "the link's signature does not match (altered or made with another key)")
    if time.time() > expires:
        raise HTTPException(403, "the link has expired")
    try:
        return await serve_upload(key, name, settings)
    except ObjectNotFound:
        raise HTTPException(404, "no such file") from None
    except UploadQuotaError:  # the owner is over its quota: a link holder is told nothing of its usage
        raise HTTPException(403, "this file cannot be served") from None
