"""The API's metrics: requests by route template and status, their latency, ``GET /metrics``, and
``GET /metrics/targets``: where each live worker's exporter is (Prometheus ``http_sd_configs``).

The middleware is plain ASGI: the latency is the time to the response headers (a status stream
or an SSE run would otherwise count its whole life), and the route is the matched template
(``/fal-ai/fast-lcm-diffusion/requests/{request_id}/status``), never the raw path, so that the
label set stays bounded; a path no route matches counts as ``unmatched``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from farm.config import Settings
from farm.metrics import exposition

_lock = threading.Lock()
_ledger_added = False


def api_registry(settings: Settings) -> Any:
    """This process's scrape registry, with the ledger gauges (added once)."""
    global _ledger_added
    reg = exposition.registry()
    with _lock:
        if not _ledger_added:
            from farm.metrics.ledger_gauges import LedgerCollector

            reg.register(LedgerCollector(settings))
            _ledger_added = True
    return reg


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        from farm.metrics.defs import HTTP_LATENCY, HTTP_REQUESTS

        self.requests, self.latency = HTTP_REQUESTS, HTTP_LATENCY

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                self.latency.labels(scope["method"], _route(scope)).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.requests.labels(scope["method"], _route(scope), str(status[0])).inc()


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


def _refused() -> Response:
    return Response(exposition.REFUSED, status_code=401, media_type="text/plain",
                    headers={"WWW-Authenticate": "Bearer"})


def metrics_router() -> APIRouter:
    router = APIRouter(tags=["meta"])

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
                           401: {"description": "The request lacks FARM_METRICS_TOKEN (or none is set and "
                                                  "FARM_METRICS_OPEN is not true)"}})
    async def metrics(request: Request) -> Response:
        """The farm's metrics, for Prometheus: `Authorization: Bearer <FARM_METRICS_TOKEN>` (closed by default)."""
        settings: Settings = request.app.state.settings
        if not exposition.authorized(request.headers.get("authorization"), settings.metrics_token,
                                     settings.metrics_open):
            return _refused()
        body, content_type = await run_in_threadpool(exposition.render, api_registry(settings))
        return Response(body, media_type=content_type)

    @router.get("/metrics/targets", summary="Where to scrape each live worker (Prometheus HTTP service discovery)",
                responses={200: {"description": "Prometheus http_sd target groups, one per live worker"},
                           401: {"description": "The request lacks FARM_METRICS_TOKEN (or none is set and "
                                                  "FARM_METRICS_OPEN is not true)"}})
    async def targets(request: Request) -> Response:
        """The live workers' exporters as Prometheus `http_sd_configs` target groups (`worker` label: its name);
        several workers of one host each have their own port (`workers.metrics_url`)."""
        settings: Settings = request.app.state.settings
        if not exposition.authorized(request.headers.get("authorization"), settings.metrics_token,
                                     settings.metrics_open):
            return _refused()
        return JSONResponse(await run_in_threadpool(worker_targets, settings))

    return router


def worker_targets(settings: Settings) -> list[dict[str, Any]]:
    """One target group per live worker with an exporter, from the ledger's ``workers`` table."""
    from urllib.parse import urlsplit

    from sqlalchemy import select

    from db.models import Worker, utcnow
    from db.session import session_scope

    since = utcnow().timestamp() - settings.lease_seconds
    with session_scope() as s:
        rows = s.execute(select(Worker.name, Worker.metrics_url, Worker.heartbeat_at).where(
            Worker.stopped_at.is_(None), Worker.metrics_url.is_not(None)).order_by(Worker.name)).all()
    groups = []
    for name, url, beat in rows:
        if beat.timestamp() < since:
            continue
        parts = urlsplit(url)
        groups.append({"targets": [parts.netloc], "labels": {
            "worker": name, "__scheme__": parts.scheme or "http", "__metrics_path__": parts.path or "/metrics"}})
    return groups
