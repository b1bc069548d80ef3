"""fal's run host: ``POST /run/fal-ai/fast-lcm-diffusion`` answers the output directly.

The job goes on the ``sync`` lane (ahead of queued work) and the request waits for it
without holding a thread: woken by the job's change events (``farm.events``), it re-reads
the ledger, and re-reads anyway every ``event_fallback_seconds``. ``X-Fal-Request-Timeout`` (fal_client's
``start_timeout``) bounds the wait for the job to start; the task time limit bounds the
whole wait. A caller that hangs up cancels its job.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse

from db import ledger
from db.session import session_scope
from farm import events
from farm.api.deps import SettingsDep, Tenant, TenantDep
from farm.api.error_bodies import ERROR_RESPONSES, FAILED, ErrorBody, RequestTimeoutError
from farm.api.fal import APP_ID, fal_status
from farm.api.job_access import outcome as job_outcome
from farm.api.job_access import read_output, submit_job
from farm.api.routes_queue import IdempotencyKey, unknown_subpath
from farm.config import Settings
from farm.errors import FarmError, JobNotFoundError
from farm.image_schemas import IMAGE_TO_IMAGE, INPAINTING, ImageToImageInput, InpaintingInput
from farm.lifecycle import submit as submission
from farm.schemas import GenerateInput, GenerateOutput
from farm.status import JobStatus, Lane

DISCONNECT_CHECK_SECONDS = 0.25
DEADLINE_SLACK_SECONDS = 0.001  # wake just past a time limit, so that it has passed

StartTimeout = Annotated[
    float | None,
    Header(alias="X-Fal-Request-Timeout", gt=0, le=86400,
           description="Seconds the request may wait for a worker to start it; then it is cancelled (504)."),
]  # fmt: skip

router = APIRouter(prefix=f"/run/{APP_ID}", tags=["run"])


@dataclass
class Outcome:
    """What a run answers, taken from the read that found its job terminal (no second read)."""

    owner: str
    settings: Settings
    value: GenerateOutput | FarmError | None = None

    def result(self, request_id: str) -> GenerateOutput:
        """The output, or raise the job's error (JobFailedError, JobNotFoundError …)."""
        if self.value is None:  # the wait ended before the job did (the caller hung up)
            return read_output(request_id, self.owner, self.settings)
        if isinstance(self.value, FarmError):
            raise self.value
        return self.value


def _job_state(request_id: str, outcome: Outcome | None) -> tuple[JobStatus, GenerateOutput | FarmError | None]:
    """One read of the job: its status and, with ``outcome``, once it is terminal, what to answer (same session)."""
    with session_scope() as s:
        job = ledger.get_job(s, request_id, owner=outcome.owner if outcome is not None else None)
        if job is None:
            return JobStatus.CANCELLED, JobNotFoundError(f"request {request_id!r} not found")
        status = JobStatus(job.status)
        if outcome is None or not status.is_terminal:
            return status, None
        try:
            return status, job_outcome(s, job, outcome.settings)
        except FarmError as exc:
            return status, exc


async def wait_for_job(
    request_id: str,
    request: Request | None,
    settings: Settings,
    start_timeout: float | None,
    outcome: Outcome | None = None,
) -> AsyncGenerator[JobStatus, None]:
    """Yield the job's status each time it changes, until it is terminal.

    Cancels the job when a time limit passes (RequestTimeoutError) or, given ``request``,
    when the caller disconnects. Given ``outcome``, the read that finds the job terminal also
    reads what to answer (the output, or the error) into it: one ledger read per wake-up.
    """
    started = time.monotonic()
    last: JobStatus | None = None
    next_disconnect_check = started + DISCONNECT_CHECK_SECONDS

    async def read() -> JobStatus:
        status, value = await run_in_threadpool(_job_state, request_id, outcome)
        if outcome is not None:
            outcome.value = value
        return status

    async def wait(changes: events.Subscription, status: JobStatus) -> bool:
        """Sleep until the job changes, the fallback re-read or a time limit; look for a hang-up meanwhile
        (False: the caller hung up, the job is cancelled)."""
        nonlocal next_disconnect_check
        now = time.monotonic()
        read_again = min(now + settings.event_fallback_seconds,
                         started + settings.task_time_limit + DEADLINE_SLACK_SECONDS)  # fmt: skip
        if start_timeout is not None and status == JobStatus.IN_QUEUE:
            read_again = min(read_again, started + start_timeout + DEADLINE_SLACK_SECONDS)
        while True:
            now = time.monotonic()
            if request is not None and now >= next_disconnect_check:
                next_disconnect_check = now + DISCONNECT_CHECK_SECONDS
                if await request.is_disconnected():
                    reason = "the caller hung up before the request finished; cancelled"
                    await run_in_threadpool(submission.cancel, request_id, reason=reason)
                    return False
            if now >= read_again:
                return True
            until = read_again if request is None else min(read_again, next_disconnect_check)
            if await changes.wait_async(until - now):
                return True

    async with contextlib.aclosing(events.watch_async(request_id, read, wait)) as statuses:
        async for status in statuses:
            if status != last:
                yield status
                last = status
            if status.is_terminal:
                return
            now = time.monotonic()
            waited = now - started
            if start_timeout is not None and status == JobStatus.IN_QUEUE and waited > start_timeout:
                # the ledger records the real reason, as the caller is told it
                reason = f"did not start within {start_timeout:g} s (X-Fal-Request-Timeout); cancelled"
                await run_in_threadpool(submission.cancel, request_id, reason=reason)
                raise RequestTimeoutError(f"request {request_id} {reason}")
            if waited > settings.task_time_limit:
                reason = f"did not finish within {settings.task_time_limit} s; cancelled"
                await run_in_threadpool(submission.cancel, request_id, reason=reason)
                raise RequestTimeoutError(f"request {request_id} {reason}")


async def _submit(
    inp: GenerateInput, tenant: Tenant, settings: Settings, idempotency_key: str | None
) -> str:
    job = await run_in_threadpool(
        submit_job, inp, tenant, lane=Lane.SYNC, idempotency_key=idempotency_key, webhook_url=None,
        settings=settings,
    )  # fmt: skip
    return job.id


_RUN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    **FAILED,
    400: {"model": ErrorBody, "description": "The request was cancelled."},
    429: {"model": ErrorBody, "description": "Too many requests in flight, or the daily GPU-seconds spent."},
    504: {"model": ErrorBody, "description": "Did not start (X-Fal-Request-Timeout) or finish in time."},
}


@router.post("", response_model=GenerateOutput, summary="Run a request and wait for its output",
             responses=_RUN_RESPONSES)
async def run(
    inp: GenerateInput,
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
    start_timeout: StartTimeout = None,
) -> GenerateOutput:
    """Render and answer the output schema (or the job's error) in one call."""
    request_id = await _submit(inp, tenant, settings, idempotency_key)
    outcome = Outcome(tenant.owner, settings)
    async for _ in wait_for_job(request_id, request, settings, start_timeout, outcome):
        pass
    if outcome.value is None:
        return await run_in_threadpool(outcome.result, request_id)
    return outcome.result(request_id)


async def _run_events(
    request_id: str, owner: str, settings: Settings, start_timeout: float | None
) -> AsyncIterator[dict[str, str]]:
    finished = False
    outcome = Outcome(owner, settings)
    try:
        # sse-starlette cancels this generator when the caller hangs up: the job is cancelled below
        async for status in wait_for_job(request_id, None, settings, start_timeout, outcome):
            yield {"event": "status", "data": json.dumps({"request_id": request_id, "status": fal_status(status)})}
        finished = True
        if outcome.value is None:
            output = await run_in_threadpool(outcome.result, request_id)
        else:
            output = outcome.result(request_id)
    except FarmError as exc:
        finished = True
        yield {"event": "error", "data": json.dumps({"detail": str(exc), "error_type": exc.error_type})}
        return
    finally:
        if not finished:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(submission.cancel, request_id,
                                        reason="the caller hung up before the request finished; cancelled")
    yield {"event": "output", "data": output.model_dump_json()}


_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-sent events: `status` events ({request_id, status}), then one `output` "
        "event (the output schema) or one `error` event ({detail, error_type}).",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **ERROR_RESPONSES,
    429: {"model": ErrorBody, "description": "Too many requests in flight, or the daily GPU-seconds spent."},
}


@router.post("/stream", response_class=EventSourceResponse, responses=_STREAM_RESPONSES,
             summary="Run a request and stream its progress, then its output")
async def run_stream(
    inp: GenerateInput,
    request: Request,
    tenant: TenantDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
    start_timeout: StartTimeout = None,
) -> EventSourceResponse:
    """Like run, as server-sent events (fal_client's `stream()`)."""
    request_id = await _submit(inp, tenant, settings, idempotency_key)
    return EventSourceResponse(_run_events(request_id, tenant.owner, settings, start_timeout), ping=15)


@router.post(f"/{IMAGE_TO_IMAGE}", response_model=GenerateOutput, summary="Run an image-to-image request",
             responses=_RUN_RESPONSES)
async def run_image_to_image(inp: ImageToImageInput, request: Request, tenant: TenantDep, settings: SettingsDep,
                             idempotency_key: IdempotencyKey = None,
                             start_timeout: StartTimeout = None) -> GenerateOutput:
    """Render from an image and answer the output schema (or the job's error) in one call."""
    return await run(inp, request, tenant, settings, idempotency_key, start_timeout)


@router.post(f"/{INPAINTING}", response_model=GenerateOutput, summary="Run an inpainting request",
             responses=_RUN_RESPONSES)
async def run_inpainting(inp: InpaintingInput, request: Request, tenant: TenantDep, settings: SettingsDep,
                         idempotency_key: IdempotencyKey = None, start_timeout: StartTimeout = None) -> GenerateOutput:
    """Inpaint and answer the output schema (or the job's error) in one call."""
    return await run(inp, request, tenant, settings, idempotency_key, start_timeout)


@router.post(f"/{IMAGE_TO_IMAGE}/stream", response_class=EventSourceResponse, responses=_STREAM_RESPONSES,
             summary="Run an image-to-image request and stream its progress, then its output")
async def run_stream_image_to_image(inp: ImageToImageInput, request: Request, tenant: TenantDep,
                                    settings: SettingsDep, idempotency_key: IdempotencyKey = None,
                                    start_timeout: StartTimeout = None) -> EventSourceResponse:
    """Like run, as server-sent events (fal_client's `stream()`)."""
    return await run_stream(inp, request, tenant, settings, idempotency_key, start_timeout)


@router.post(f"/{INPAINTING}/stream", response_class=EventSourceResponse, responses=_STREAM_RESPONSES,
             summary="Run an inpainting request and stream its progress, then its output")
async def run_stream_inpainting(inp: InpaintingInput, request: Request, tenant: TenantDep, settings: SettingsDep,
                                idempotency_key: IdempotencyKey = None,
                                start_timeout: StartTimeout = None) -> EventSourceResponse:
    """Like run, as server-sent events (fal_client's `stream()`)."""
    return await run_stream(inp, request, tenant, settings, idempotency_key, start_timeout)


@router.post("/{subpath:path}", include_in_schema=False)
def unknown_endpoint(subpath: str) -> None:
    raise unknown_subpath(subpath)

