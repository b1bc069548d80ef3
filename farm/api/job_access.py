"""What the routes do with jobs: submit with limits and idempotency, look up by owner, read results.

Blocking (ledger, broker, storage): routes call these from a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any
from urllib.parse import urlparse

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db import ledger
from db.locks import lock_owner
from db.models import Job
from db.session import session_scope
from farm import admission
from farm.accounting import check_quota
from farm.api.deps import Tenant
from farm.api.error_bodies import JobFailedError, RequestFieldError, RequestInProgressError, TooManyJobsError
from farm.api.fal import APP_ID
from farm.config import Settings
from farm.errors import InvalidInputError, JobNotFoundError
from farm.lifecycle import submit as submission
from farm.results import build_output
from farm.schemas import GenerateInput, GenerateOutput
from farm.status import ACTIVE, JobStatus, Lane
from farm.storage import get_storage

IDEMPOTENCY_HEADER = "Idempotency-Key"


def app_base(request: Request, settings: Settings, prefix: str) -> str:
    """``https://host[:port][/prefix]/fal-ai/fast-lcm-diffusion`` as the client reaches it."""
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    return f"{base}{prefix}/{APP_ID}"


def get_job(request_id: str, owner: str) -> Job:
    """The owner's job; JobNotFoundError for an unknown id and for another owner's job alike."""
    with session_scope() as s:
        job = ledger.get_job(s, request_id, owner=owner)
    if job is None:
        raise JobNotFoundError(f"request {request_id!r} not found")
    return job


def check_webhook(url: str, settings: Settings) -> None:
    """Refuse a webhook URL that is malformed or names an internal address (farm.netguard). No DNS here: a
    name is looked up when the webhook is delivered (vetted again, under the attempt's deadline and the
    owner's delivery limit), so a name server that never answers holds no request thread."""
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise RequestFieldError("query", "fal_webhook", "must not contain spaces or control characters")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RequestFieldError("query", "fal_webhook", "must be an http(s) URL")
    from farm.netguard import check_url  # a guard fails closed: no fallback if it cannot be imported

    try:
        check_url(url, settings, resolve=False)
    except ValueError as exc:
        raise RequestFieldError("query", "fal_webhook", str(exc)) from None


def _nul_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string holding a NUL character (PostgreSQL cannot store one)."""
    if isinstance(value, str):
        return path or "input" if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _nul_field(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def _canonical(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))


def input_digest(fields: dict[str, Any]) -> str:
    """SHA-256 of the admitted input as the client sent it (canonical JSON): what a repeated idempotency
    key is compared with, since the stored input is rewritten (data URIs and fetched URLs become
    ``farm-stored:`` keys)."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _existing(owner: str, key: str) -> Job | None:
    with session_scope() as s:
        stmt = select(Job).where(Job.owner == owner, Job.idempotency_key == key)
        return s.scalars(stmt).one_or_none()


def _count_in_flight(s: Session, owner: str) -> int:
    stmt = select(func.count()).select_from(Job).where(Job.owner == owner, Job.status.in_(list(ACTIVE)))
    return int(s.scalar(stmt) or 0)


def in_flight(owner: str) -> int:
    """The owner's queued and running jobs."""
    with session_scope() as s:
        return _count_in_flight(s, owner)


def _same_request(job: Job, fields: dict[str, Any], digest: str, key: str, header: str | None) -> Job:
    """The job a repeated idempotency key made; 422 if it was made for a different input (compared by the
    digest of what the client sent; a job recorded without one, by its stored input)."""
    same = (job.input_digest == digest if job.input_digest is not None
            else _canonical(job.input) == _canonical(fields))
    if not same:
        where, field = ("header", IDEMPOTENCY_HEADER) if header else ("body", "request_id")
        raise RequestFieldError(where, field, f"{key!r} was already used for a different request")
    return job


def _check_new(inp: GenerateInput, tenant: Tenant) -> None:
    """What a new request must pass before it is recorded: the key's image limit."""
    if tenant.max_images is not None and inp.num_images > tenant.max_images:
        raise InvalidInputError(
            "num_images", f"must be at most {tenant.max_images} with this API key (got {inp.num_images})"
        )


def submit_job(
    inp: GenerateInput,
    tenant: Tenant,
    *,
    lane: Lane,
    idempotency_key: str | None,
    webhook_url: str | None,
    settings: Settings,
    request_id: str | None = None,
) -> Job:
    """Submit ``inp`` for the tenant; a repeated idempotency key returns the job it made before.

    The key is the ``Idempotency-Key`` header, else the input's ``request_id``. A key reused
    with a different input is refused (422) rather than answered with an unrelated job.
    ``request_id`` is the id of a new job (default: a fresh one).

    One transaction on the common path: the job row is inserted (a repeated key finds the job
    already there instead), then checked (the key's image limit, the owner's jobs in flight,
    counted with the new row under the owner's lock, so that no number of concurrent
    submits passes the limit) before its batches are recorded; a refused submit rolls
    back and records nothing. Admission (farm.admission: bounds, file references, upload
    owners) comes first, in the caller's thread (routes run this off the event loop).
    An owner whose daily GPU-second quota is spent gets 429 (farm.accounting).
    A webhook URL is vetted (no DNS: a name is checked when delivered) before the transaction, and only
    for a new request, so that request looks its key up first.
    """
    inp = admission.admit(inp, tenant.owner, settings)  # FastAPI parsed only the shape
    fields = inp.model_dump(mode="json")
    bad = _nul_field(fields)
    if bad:
        raise InvalidInputError(bad, "must not contain NUL characters")
    key = idempotency_key or inp.request_id or None
    digest = input_digest(fields)
    if webhook_url is not None:
        if key is not None:
            job = _existing(tenant.owner, key)
            if job is not None:
                return _same_request(job, fields, digest, key, idempotency_key)
        _check_new(inp, tenant)
        check_webhook(webhook_url, settings)
    recorded: list[Job] = []

    def admit(s: Session, job: Job, created: bool) -> bool:
        recorded.append(job)
        if not created:  # the key was used before (by this owner: the key is per owner)
            _same_request(job, fields, digest, key or "", idempotency_key)
            return False
        job.input_digest = digest  # recorded with the row, in its transaction
        if webhook_url is None:
            _check_new(inp, tenant)
        lock_owner(s, tenant.owner)  # the count below sees every admitted job of this owner (committed)
        check_quota(s, tenant.owner, settings)  # 429 once the owner's daily GPU-seconds are spent
        running = _count_in_flight(s, tenant.owner) - 1  # not this one
        if running >= tenant.max_in_flight:
            raise TooManyJobsError(
                f"{running} requests in flight (queued or running) for this owner; the limit is "
                f"{tenant.max_in_flight}: wait for some to complete"
            )
        return True

    submission.submit(
        inp, owner=tenant.owner, lane=lane, source="api", request_id=request_id or uuid.uuid4().hex,
        idempotency_key=key, webhook_url=webhook_url, background=True, settings=settings, admit=admit,
    )  # fmt: skip
    return recorded[-1]


def outcome(s: Session, job: Job, settings: Settings) -> GenerateOutput:
    """The output of ``job`` (its images read in ``s``); an error if it failed, was cancelled or is not done."""
    status = JobStatus(job.status)
    if status == JobStatus.COMPLETED:
        return build_output(s, job, get_storage(settings), settings)
    if not status.is_terminal:
        raise RequestInProgressError("Request is still in progress")
    default = "cancelled" if status == JobStatus.CANCELLED else "render_error"
    raise JobFailedError(job.error or f"request {status.value.lower()}", job.error_type or default)


def read_output(request_id: str, owner: str, settings: Settings) -> GenerateOutput:
    """The output of a completed job; an error for one that failed, was cancelled or is not done."""
    with session_scope() as s:
        job = ledger.get_job(s, request_id, owner=owner)
        if job is None:
            raise JobNotFoundError(f"request {request_id!r} not found")
        return outcome(s, job, settings)
