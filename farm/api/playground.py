"""``/playground``: a small realtime page (key, prompt, seed; the image follows the typing; in sketch mode it
follows the strokes drawn on a canvas, sent as ``image_bytes`` to ``…/image-to-image``, as fal's sketch demo).

It runs fal's own JavaScript client (``@fal-ai/client``, bundled for the browser into
``static/fal-client.js`` by ``npm run build:playground`` in ``tests/js``; nothing comes from a
CDN), which takes its realtime token from this farm's ``POST /tokens/`` (the page's own
``tokenProvider``) and opens the realtime socket on this host. ``GET /playground/models`` tells the
page which models have live workers (public: model names, default sizes and worker counts only).
"""

from __future__ import annotations

import time
from datetime import timedelta
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from farm.config import Settings

STATIC = Path(__file__).parent / "static"
router = APIRouter(tags=["playground"], include_in_schema=False)
# the page's own scripts and styles only, no other origin; sockets and fetches to this host
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'")  # fmt: skip
MODELS_CACHE_SECONDS = 2.0  # a public route: at most one ledger read per this many seconds per process


class PlaygroundModel(BaseModel):
    model_name: str
    width: int
    height: int
    live_workers: int


class PlaygroundModels(BaseModel):
    models: list[PlaygroundModel]


@cache
def read_static(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("/playground", response_class=HTMLResponse)
async def page() -> Response:
    return Response(read_static("playground.html"), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})  # fmt: skip


@router.get("/playground/fal-client.js")
async def client_bundle() -> Response:
    return Response(read_static("fal-client.js"), media_type="text/javascript; charset=utf-8",
                    headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})  # fmt: skip


def _live_models(settings: Settings) -> PlaygroundModels:
    """Every model a realtime frame may name (stand-ins left out), with its default size and how many
    workers serve its pool now (beat within ``FARM_LEASE_SECONDS``, not stopped)."""
    from sqlalchemy import func, select

    from db.models import Worker, utcnow
    from db.session import session_scope
    from models.registry import all_models

    since = utcnow() - timedelta(seconds=settings.lease_seconds)
    with session_scope() as s:
        live = dict(s.execute(select(Worker.model_key, func.count()).where(
            Worker.heartbeat_at >= since, Worker.stopped_at.is_(None)).group_by(Worker.model_key)).tuples().all())
    return PlaygroundModels(models=[
        PlaygroundModel(model_name=spec.name, width=spec.default_size[0], height=spec.default_size[1],
                        live_workers=int(live.get(spec.key, 0)))
        for spec in all_models(settings).values() if not spec.extra.get("stand_in")])  # fmt: skip


@router.get("/playground/models", response_model=PlaygroundModels)
async def models(request: Request) -> PlaygroundModels:
    """The models, their default sizes and live worker counts (no hosts, no names of workers)."""
    state = request.app.state
    cached: tuple[float, PlaygroundModels] | None = getattr(state, "playground_models", None)
    now = time.monotonic()
    if cached is None or now - cached[0] > MODELS_CACHE_SECONDS:
        cached = (now, await run_in_threadpool(_live_models, state.settings))
        state.playground_models = cached
    return cached[1]
