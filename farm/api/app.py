"""The fal-compatible HTTP API: one FastAPI app serving both of fal's hosts.

- queue host: ``FAL_QUEUE_RUN_HOST=127.0.0.1:8443/queue`` (or ``127.0.0.1:8443``), served at
  ``/queue/fal-ai/fast-lcm-diffusion…`` and at ``/fal-ai/fast-lcm-diffusion…``;
- run host: ``FAL_RUN_HOST=127.0.0.1:8443/run``, served at ``/run/fal-ai/fast-lcm-diffusion``.

Import-light: no torch, diffusers or transformers here (the workers render).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from farm import events
from farm.api import error_bodies
from farm.api.guard import BodyGuard
from farm.api.routes_queue import queue_router
from farm.api.routes_run import router as run_router
from farm.config import Settings, get_settings

log = logging.getLogger("farm.api")

DESCRIPTION = """\
fal.ai's queue protocol for `fal-ai/fast-lcm-diffusion`, served by lcm-farm, so that the
unmodified `fal-client` works against it by environment variables only:
`FAL_QUEUE_RUN_HOST=<host:port>/queue`, `FAL_RUN_HOST=<host:port>/run`, `FAL_KEY=<id>:<secret>`.

Authenticate with `Authorization: Key <id>:<secret>` (`farm keys create`). Every error has
`detail` and `error_type`; invalid input is 422 with `detail` naming each bad field.
"""


class Health(BaseModel):
    status: str = "ok"


def _log_dispatcher_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("webhook dispatcher stopped", exc_info=task.exception())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    from db.migrate import ensure_schema
    from farm.webhooks import dispatcher

    settings: Settings = app.state.settings
    await run_in_threadpool(ensure_schema)  # SQLite: migrate; a server database must be at head
    from farm.metrics import count

    count.api_up()
    events.start()  # the job-change listener (PostgreSQL), so that the first waiter finds it connected
    if not settings.auth_enabled:
        log.warning(
            "authentication is OFF (FARM_AUTH_ENABLED=false): every request acts as owner %r",
            settings.default_owner,
        )
    from farm.lifecycle.sweep import Sweeper

    sweeper = Sweeper(settings).start()  # every API process sweeps too: queued work is announced
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run_forever(stop), name="farm-webhook-dispatcher")
    task.add_done_callback(_log_dispatcher_exit)
    try:
        yield
    finally:
        hub = getattr(app.state, "realtime_hub", None)
        if hub is not None:
            await hub.close()
        sweeper.stop()
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        except Exception:  # already logged by the done callback
            pass


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; ``settings`` default to the process's (``FARM_*`` environment)."""
    from farm.api import log_redact
    from farm.api.cdn_upload import router as cdn_upload_router
    from farm.api.docs import router as docs_router
    from farm.api.files import router as files_router
    from farm.api.playground import router as playground_router
    from farm.api.proxy import FalProxy
    from farm.api.routes_bulk import router as bulk_router
    from farm.api.routes_realtime import router as realtime_router
    from farm.api.routes_usage import router as usage_router
    from farm.api.uploads import router as uploads_router
    from farm.webhooks.routes import router as webhook_router

    app = FastAPI(
        title="lcm-farm",
        summary="A render farm for Latent Consistency Models, speaking fal's queue protocol.",
        description=DESCRIPTION,
        version=_version(),
        lifespan=lifespan,
        docs_url=None,  # farm.api.docs serves /docs from the package (offline); /redoc would need a CDN
        redoc_url=None,
    )
    app.state.settings = settings or get_settings()
    log_redact.install()  # realtime tokens and signatures in query strings stay out of uvicorn's log lines
    error_bodies.install(app)
    app.add_middleware(BodyGuard, settings=app.state.settings)  # key and body size before any body is read
    from farm.metrics.http import MetricsMiddleware, metrics_router

    app.add_middleware(MetricsMiddleware)

    @app.get("/health", response_model=Health, summary="Liveness", tags=["meta"])
    def health() -> Health:
        """Answers while the process serves requests (no authentication)."""
        return Health()

    app.include_router(metrics_router())
    app.include_router(usage_router)
    app.include_router(playground_router)
    app.include_router(docs_router)
    app.include_router(uploads_router)  # before files_router: /storage/upload/initiate is not an upload
    app.include_router(files_router)
    app.include_router(cdn_upload_router)  # before the queue routes: /{owner}/{alias} would match /files/upload
    app.include_router(bulk_router)  # before the queue routes: /{owner}/{alias} would match /bulk/…
    app.include_router(webhook_router)
    app.include_router(realtime_router)  # before the queue routes, like bulk
    app.include_router(run_router)
    app.include_router(queue_router("/queue"))
    app.include_router(queue_router(""))
    app.add_middleware(FalProxy)  # /fal/proxy: fal's proxyUrl convention, dispatched to the routes above
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lcm-farm")
    except PackageNotFoundError:
        return "0"
