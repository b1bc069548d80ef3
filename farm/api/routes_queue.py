"""fal's queue API for ``fal-ai/fast-lcm-diffusion``: submit, status, status stream, result, cancel.

Served twice from one process: at the root (``FAL_QUEUE_RUN_HOST=host:port``) and under
``/queue`` (``FAL_QUEUE_RUN_HOST=host:port/queue``). Another owner's request answers 404
on every route, exactly like an unknown one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from db import ledger
from db.session import session_scope
from farm import events
from farm.api import streams
from farm.api.deps import SettingsDep, TenantDep
from farm.api.error_bodies import ERROR_RESPONSES, FAILED, NOT_FOUND, ErrorBody
from farm.api.fal import APP_ID, CancelResult, QueueStatus, QueueSubmitted, fal_status, request_urls, status_payload
from farm.api.job_access import IDEMPOTENCY_HEADER, app_base, get_job, read_output, submit_job
from farm.config import Settings
from farm.errors import JobNotFoundError
from farm.image_schemas import IMAGE_TO_IMAGE, INPAINTING, SUBPATHS, ImageToImageInput, InpaintingInput
from farm.lifecycle import submit as submission
from farm.schemas import REQUEST_ID, GenerateInput, GenerateOutput
from farm.status import Lane

STREAM_PING_SECONDS = 15

RequestId = Annotated[str, Path(description="The id that submit returned.")]
Logs = Annotated[bool, Query(description="Include the request's log lines (`1`/`true`).")]
WebhookUrl = Annotated[
    str | None,
    Query(max_length=2048, description="POST the result here when the request completes (signed like fal's)."),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_HEADER, pattern=r"^[\x21-\x7e]{1,256}$",
        description="A repeated submit with the same key returns the same request (default: the input's request_id).",
    ),
]  # fmt: skip


def _checked(request_id: str) -> str:
    """Ids that cannot exist are not looked up (NUL bytes and the like never reach the ledger)."""
    if not REQUEST_ID.match(request_id):
        raise JobNotFoundError(f"request {request_id!r} not found")
    return request_id


def _status(
    request_id: str, owner: str, base: str, with_logs: bool, after: int | None
) -> tuple[dict[str, Any], int | None]:
    with session_scope() as s:
        job = ledger.get_job(s, _checked(request_id), owner=owner)
        if job is None:
            raise JobNotFoundError(f"request {request_id!r} not found")
        return status_payload(s, job, base, with_logs=with_logs, after_log_id=after)


async def _status_events(
    request_id: str, owner: str, base: str, with_logs: bool, fallback: float
) -> AsyncGenerator[dict[str, str], None]:
    """Each status read from the ledger when the job's change events (``farm.events``) wake the
    stream, or every ``event_fallback_seconds`` without one (queue positions move that way)."""
    last_log: int | None = None
    last_sent: dict[str, Any] | None = None

    async def read() -> dict[str, Any] | None:
        nonlocal last_log
        try:
            payload, last_log = await run_in_threadpool(_status, request_id, owner, base, with_logs, last_log)
        except JobNotFoundError:
            return None
        return payload

    async def wait(changes: events.Subscription, payload: dict[str, Any] | None) -> bool:
        await changes.wait_async(fallback)
        return True

    async with contextlib.aclosing(events.watch_async(request_id, read, wait)) as reads:
        async for payload in reads:
            if payload is None:
                return
            bare = {k: v for k, v in payload.items() if k != "logs"}
            if bare != last_sent or payload["logs"]:
                yield {"data": QueueStatus.model_validate(payload).model_dump_json()}
                last_sent = bare
            if payload["status"] == "COMPLETED":
                return


def queue_router(prefix: str) -> APIRouter:
    """The queue routes of our app under ``prefix`` ("" or "/queue")."""
    tag = "queue" if not prefix else f"queue ({prefix} prefix)"
    router = APIRouter(prefix=f"{prefix}/{APP_ID}", tags=[tag])

    def base_of(request: Request, settings: Settings) -> str:
        return app_base(request, settings, prefix)

    @router.post(
        "",
        response_model=QueueSubmitted,
        summary="Submit a request to the queue",
        responses={**ERROR_RESPONSES, 429: {"model": ErrorBody, "description": "Too many requests in flight, "
                                            "or the daily GPU-seconds spent."}},
    )
    def submit(
        inp: GenerateInput,
        request: Request,
        tenant: TenantDep,
        settings: SettingsDep,
        fal_webhook: WebhookUrl = None,
        idempotency_key: IdempotencyKey = None,
    ) -> dict[str, Any]:
        """Queue a text-to-image request; poll `status_url`, then GET `response_url`."""
        job = submit_job(
            inp, tenant, lane=Lane.QUEUE, idempotency_key=idempotency_key, webhook_url=fal_webhook, settings=settings
        )
        # status, result and cancel live at the app's URLs, without the subpath, as fal's clients build them
        return {**request_urls(base_of(request, settings), job.id), "status": fal_status(job.status)}

    submitted = {**ERROR_RESPONSES, 429: {"model": ErrorBody, "description": "Too many requests in flight."}}

    @router.post(f"/{IMAGE_TO_IMAGE}", response_model=QueueSubmitted, summary="Submit an image-to-image request",
                 responses=submitted)
    def submit_image_to_image(inp: ImageToImageInput, request: Request, tenant: TenantDep, settings: SettingsDep,
                              fal_webhook: WebhookUrl = None, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
        """Queue an image-to-image request; its status, result and cancel are at the app's URLs (no subpath)."""
        return submit(inp, request, tenant, settings, fal_webhook, idempotency_key)

    @router.post(f"/{INPAINTING}", response_model=QueueSubmitted, summary="Submit an inpainting request",
                 responses=submitted)
    def submit_inpainting(inp: InpaintingInput, request: Request, tenant: TenantDep, settings: SettingsDep,
                          fal_webhook: WebhookUrl = None, idempotency_key: IdempotencyKey = None) -> dict[str, Any]:
        """Queue an inpainting request; its status, result and cancel are at the app's URLs (no subpath)."""
        return submit(inp, request, tenant, settings, fal_webhook, idempotency_key)

    @router.get(
        "/requests/{request_id}/status",
        response_model=QueueStatus,
        summary="Get the status of a request",
        responses={**ERROR_RESPONSES, **NOT_FOUND},
    )
    def status(request_id: RequestId, request: Request, tenant: TenantDep, settings: SettingsDep,
               logs: Logs = False) -> dict[str, Any]:  # fmt: skip
        """IN_QUEUE (with `queue_position`), IN_PROGRESS, or COMPLETED (with `metrics`, and `error` if it failed)."""
        return _status(request_id, tenant.owner, base_of(request, settings), logs, None)[0]

    @router.get(
        "/requests/{request_id}/status/stream",
        response_class=EventSourceResponse,
        summary="Stream the status of a request until it completes",
        responses={
            200: {
                "description": "Server-sent events; each `data` is a status (as the status route), "
                "with only new log lines. The stream ends after COMPLETED.",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **ERROR_RESPONSES,
            **NOT_FOUND,
        },
    )
    async def status_stream(request_id: RequestId, request: Request, tenant: TenantDep, settings: SettingsDep,
                            logs: Logs = False) -> EventSourceResponse:  # fmt: skip
        """Server-sent status events, sent when the status, queue position or logs change."""
        await run_in_threadpool(get_job, _checked(request_id), tenant.owner)  # 404 before the stream starts
        streams.take(tenant.owner, settings.max_streams_per_owner)  # 429 beyond the owner's open streams
        updates = _status_events(request_id, tenant.owner, base_of(request, settings), logs,
                                 settings.event_fallback_seconds)  # fmt: skip
        return EventSourceResponse(streams.holding(tenant.owner, updates), ping=STREAM_PING_SECONDS)

    @router.get(
        "/requests/{request_id}",
        response_model=GenerateOutput,
        summary="Get the result of a request",
        responses={
            400: {"model": ErrorBody, "description": "Still in progress, or cancelled."},
            **ERROR_RESPONSES,
            **NOT_FOUND,
            **FAILED,
        },
    )
    def result(request_id: RequestId, tenant: TenantDep, settings: SettingsDep) -> GenerateOutput:
        """The output schema of a completed request; a failed request answers its error."""
        return read_output(_checked(request_id), tenant.owner, settings)

    @router.put(
        "/requests/{request_id}/cancel",
        response_model=CancelResult,
        status_code=202,
        summary="Cancel a request",
        responses={
            400: {"model": CancelResult, "description": "ALREADY_COMPLETED"},
            404: {"model": CancelResult, "description": "NOT_FOUND"},
            401: ERROR_RESPONSES[401],
            422: ERROR_RESPONSES[422],
        },
    )
    def cancel(request_id: RequestId, tenant: TenantDep) -> JSONResponse:
        """A queued request never starts; a running one stops before its next batch of images."""
        outcome = submission.cancel(request_id, tenant.owner) if REQUEST_ID.match(request_id) else "NOT_FOUND"
        if outcome == "CANCELLATION_REQUESTED":
            return JSONResponse({"status": outcome}, status_code=202)
        if outcome == "ALREADY_COMPLETED":
            body = {"status": outcome, "detail": "the request has already completed", "error_type": "already_completed"}
            return JSONResponse(body, status_code=400)
        body = {"status": outcome, "detail": f"request {request_id!r} not found", "error_type": "not_found"}
        return JSONResponse(body, status_code=404)

    @router.post("/{subpath:path}", include_in_schema=False)
    def unknown_endpoint(subpath: str) -> None:
        raise unknown_subpath(subpath)

    return router


def unknown_subpath(subpath: str) -> HTTPException:
    """404 for an endpoint of the app that does not exist, naming those that do."""
    known = ", ".join([APP_ID] + [f"{APP_ID}/{name}" for name in SUBPATHS])
    return HTTPException(404, f"no endpoint {APP_ID}/{subpath[:64]}; the endpoints are {known}")
