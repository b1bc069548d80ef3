"""Bulk dataset jobs over HTTP: ``POST /bulk`` starts one, ``GET /bulk/{id}`` reports progress.

The manifest is sent as a base64 data URI or one of the owner's upload URLs (``POST
/storage/upload``), or named by a path inside the owner's folder
``<FARM_BULK_ROOT>/tenants/<owner>``; the dataset goes to ``<FARM_BULK_S3_URL>/<owner>/<out>``
or, without that setting, into the owner's folder. No request reaches another owner's files. The job is driven by a
``farm.bulk`` task on a ``farm bulk worker``. Every route is scoped to the key's owner: another
owner's job answers 404.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.locks import lock_owner
from db.models import BulkJob
from db.session import session_scope
from farm import dispatch
from farm.accounting import check_quota
from farm.api.deps import SettingsDep, TenantDep
from farm.api.error_bodies import ERROR_RESPONSES, NOT_FOUND, ErrorBody, TooManyJobsError
from farm.api_keys import check_owner
from farm.config import Settings
from farm.errors import InvalidInputError, ObjectNotFound
from farm.status import BulkStatus

log = logging.getLogger(__name__)
router = APIRouter(prefix="/bulk", tags=["bulk"])


class BulkRequest(BaseModel):
    manifest: str = Field(..., description="data:…;base64,… or one of your upload URLs, or a path inside "
                          "<FARM_BULK_ROOT>/tenants/<owner>")
    manifest_format: Literal["txt", "csv", "jsonl", "parquet"] | None = Field(
        None, description="Kind of an uploaded/data-URI manifest (a path says it by its suffix)")
    out: str = Field(..., description="A relative name: the dataset goes to <FARM_BULK_S3_URL>/<owner>/<out>, "
                     "or to <FARM_BULK_ROOT>/tenants/<owner>/<out>")
    model_name: str
    format: Literal["webdataset", "imagefolder", "parquet"] = "webdataset"
    shard_size: int = Field(1000, ge=1, le=10000)
    defaults: dict[str, Any] = Field(default_factory=dict, description="Input-field defaults of every sample")
    images_per_prompt: int = Field(1, ge=1, le=10000)
    seed: int = Field(0, ge=0, description="Base seed: a sample without a seed column gets seed + its index")
    expand: Literal["combinatorial", "random", "none"] = "combinatorial"
    variants: int = Field(1, ge=1, le=10000)
    strict: bool = False
    budget_images: int = Field(..., ge=1, description="Required: the most images the job may render "
                               "(at most FARM_MAX_BULK_IMAGES); resume it with a larger budget to go on")
    budget_gpu_seconds: float | None = Field(None, gt=0)


class BulkStarted(BaseModel):
    bulk_id: str
    status_url: str


def _materialise(req: BulkRequest, owner: str, settings: Settings) -> tuple[Path, dict[str, Any], bool]:
    """The manifest's path, the job's options, and whether the manifest is a copy written just now."""
    from farm.bulk.options import inside
    from farm.inputs import quota
    from farm.inputs.refs import decode_data_uri, kind_of, upload_key, upload_owner
    from farm.storage import get_storage

    options = req.model_dump(exclude={"manifest", "manifest_format"})
    # each owner has a folder of its own: another owner's manifests and datasets are out of reach
    # the owner's name as it is (farm.api_keys.OWNER admits only path-safe names: no '/', no leading '.'),
    # so that two owners never share a folder
    own = settings.effective_bulk_root / "tenants" / check_owner(owner)
    own.mkdir(parents=True, exist_ok=True)
    out = req.out.strip("/")
    if not out or req.out.startswith(("/", "s3:")) or any(part in ("", ".", "..") for part in out.split("/")):
        raise InvalidInputError("out", "must be a relative name such as 'datasets/boats-v1' (no '..')")
    if settings.bulk_s3_url:
        options["out"] = f"{settings.bulk_s3_url.rstrip('/')}/{owner}/{out}"
    else:
        options["out"] = str(own / out)
    kind = kind_of(req.manifest)
    if kind is None:
        return inside(own, req.manifest, "manifest"), options, False
    if req.manifest_format is None:
        raise InvalidInputError("manifest_format", "required with a data URI or upload URL manifest")
    if kind == "data":
        try:
            data = decode_data_uri(req.manifest, settings.max_upload_bytes)
        except ValueError as exc:
            raise InvalidInputError("manifest", str(exc)) from None
    else:
        key = upload_key(req.manifest)
        if key is None or upload_owner(key) != owner:
            raise InvalidInputError("manifest", "must be a data URI, one of your upload URLs or a bulk-root path")
        try:  # size and quota from metadata, the read capped: a presigned S3 PUT is not capped
            data = quota.read(get_storage(settings), key, settings)
        except (quota.UploadTooLargeError, quota.UploadQuotaError) as exc:
            raise InvalidInputError("manifest", str(exc)) from None
        except ObjectNotFound:
            raise InvalidInputError("manifest", "no such upload") from None
    folder = own / "manifests"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uuid.uuid4().hex}.{req.manifest_format}"
    path.write_bytes(data)
    return path, options, True


def _admit(s: Session, owner: str, settings: Settings) -> None:
    """A bulk job may start (POST /bulk) or resume running: at most max_bulk_running running per owner,
    counted under the owner's lock, and the owner's daily GPU-second quota not spent (429)."""
    lock_owner(s, owner)
    check_quota(s, owner, settings)
    running = s.scalar(select(func.count()).select_from(BulkJob)
                       .where(BulkJob.owner == owner, BulkJob.status == BulkStatus.RUNNING)) or 0
    if running >= settings.max_bulk_running:
        raise TooManyJobsError(f"{running} bulk jobs are running for this owner; the limit is "
                               f"{settings.max_bulk_running} (FARM_MAX_BULK_RUNNING): wait, pause or cancel one")


def _announce(bulk_id: str, settings: Settings) -> None:
    """Wake a bulk worker; the job is accepted already (its row is committed), so a broker that is
    down only delays it: the sweeper sends ``farm.bulk`` for a running job that has no driver."""
    try:
        dispatch.send_task(dispatch.BULK_TASK, {"bulk_id": bulk_id}, settings.bulk_queue, settings)
    except Exception as exc:  # kombu/redis raise many types for a dead broker
        log.warning("bulk %s recorded; broker unavailable (%s): the sweeper will start it", bulk_id, exc)


@router.post("", status_code=202, response_model=BulkStarted, summary="Start a bulk dataset job",
             responses={**ERROR_RESPONSES, 409: {"model": ErrorBody}, 429: {"model": ErrorBody},
                        502: {"model": ErrorBody}, 503: {"model": ErrorBody}})
async def start(req: BulkRequest, tenant: TenantDep, settings: SettingsDep) -> BulkStarted:
    from farm.bulk.options import create_from_options

    if req.budget_images > settings.max_bulk_images:
        raise InvalidInputError("budget_images", f"must be at most {settings.max_bulk_images} "
                                f"(FARM_MAX_BULK_IMAGES; got {req.budget_images})")

    def _create() -> str:
        manifest, options, written = _materialise(req, tenant.owner, settings)
        try:
            bulk_id = create_from_options(options, settings, owner=tenant.owner, manifest=manifest,
                                          key_max_in_flight=tenant.max_in_flight,
                                          admit=lambda s: _admit(s, tenant.owner, settings),
                                          image_root=f"tenants/{tenant.owner}")
        except BaseException:
            if written:
                manifest.unlink(missing_ok=True)  # refused: nothing is left behind
            raise
        _announce(bulk_id, settings)
        return bulk_id

    bulk_id = await run_in_threadpool(_create)
    return BulkStarted(bulk_id=bulk_id, status_url=f"/bulk/{bulk_id}")


@router.get("/{bulk_id}", summary="Progress of a bulk job", responses={**ERROR_RESPONSES, **NOT_FOUND})
async def progress(bulk_id: str, tenant: TenantDep) -> dict[str, Any]:
    from farm.bulk import driver

    def _read() -> dict[str, Any]:
        with session_scope() as s:
            driver.get(s, bulk_id, tenant.owner)
            return dataclasses.asdict(driver.progress(s, bulk_id))

    return await run_in_threadpool(_read)


@router.post("/{bulk_id}/{action}", summary="Pause, resume or cancel a bulk job",
             responses={**ERROR_RESPONSES, **NOT_FOUND, 429: {"model": ErrorBody}, 503: {"model": ErrorBody}})
async def control(bulk_id: str, action: Literal["pause", "resume", "cancel"], tenant: TenantDep,
                  settings: SettingsDep) -> dict[str, Any]:
    from farm.bulk import driver

    def _act() -> dict[str, Any]:
        if action == "resume":
            with session_scope() as s:
                driver.get(s, bulk_id, tenant.owner)
            driver.set_status(bulk_id, BulkStatus.RUNNING, tenant.owner,
                              admit=lambda s: _admit(s, tenant.owner, settings))
            _announce(bulk_id, settings)
        else:
            driver.set_status(bulk_id, BulkStatus.PAUSED if action == "pause" else BulkStatus.CANCELLED, tenant.owner)
        with session_scope() as s:
            return dataclasses.asdict(driver.progress(s, bulk_id))

    return await run_in_threadpool(_act)
