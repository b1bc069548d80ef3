"""The services of one worker process beside its model, started when it joins the pool, stopped when it leaves.

:class:`WorkerServices` bundles the loaded renderer, the lease keeper (tasks.lease), the uploader
(tasks.uploader) and, with a Redis broker, the realtime server (tasks.realtime). One per process:
``farm.render`` finds them with :func:`get_services`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery import Celery

from db import worker_registry as ledger_workers
from db.session import session_scope
from farm.config import Settings
from models.protocol import Renderer
from tasks.lease import LeaseKeeper
from tasks.uploader import Uploader

if TYPE_CHECKING:
    from tasks.realtime import RealtimeServer

log = logging.getLogger(__name__)


@dataclass
class WorkerServices:
    name: str
    keeper: LeaseKeeper
    uploader: Uploader
    max_batch: int
    renderer: Renderer
    realtime: RealtimeServer | None = None  # with a Redis broker


_services: WorkerServices | None = None


def start_services(app: Celery, name: str, renderer: Renderer, settings: Settings,
                   metrics_url: str | None = None) -> WorkerServices:
    """Register this worker in the pool (with where its metrics are scraped) and start its keeper and
    uploader (once per process)."""
    global _services
    if _services is not None:
        return _services
    # The render thread drives the GPU in short Python steps between kernels; with the uploader
    # thread busy encoding, the default 5 ms GIL switch interval would delay each step's wake-up.
    sys.setswitchinterval(0.001)
    max_batch = int(renderer.find_max_batch())
    renderer.micro_batch = min(renderer.micro_batch, max_batch)  # a listed group may hold more images
    renderer.warm_compiled()  # FARM_COMPILE: compile each shape before joining
    with session_scope() as s:
        ledger_workers.register_worker(
            s, name=name, model_name=renderer.spec.name, model_key=renderer.spec.key, device=renderer.device,
            max_batch=max_batch, loads=renderer.loads, pid=os.getpid(), metrics_url=metrics_url,
        )
    keeper = LeaseKeeper(app=app, name=name, settings=settings, loads=lambda: int(renderer.loads),
                         compiles=lambda: (renderer.recompiles, renderer.cold_renders))
    keeper.start()
    realtime = None
    if (settings.broker_url or "").startswith(("redis://", "rediss://", "unix://")):
        from tasks.realtime import RealtimeServer

        realtime = RealtimeServer(renderer, settings, max_batch).start()  # frames ahead of batches
    _services = WorkerServices(name=name, keeper=keeper, uploader=Uploader(settings.pipeline_depth),
                               max_batch=max_batch, renderer=renderer, realtime=realtime)
    return _services


def get_services() -> WorkerServices:
    if _services is None:
        raise RuntimeError("worker services not started: run `farm worker --model NAME`")
    return _services


def stop_services() -> None:
    """Finish storing what was rendered, leave the pool, stop the threads."""
    global _services
    if _services is None:
        return
    services, _services = _services, None
    if services.realtime is not None:
        services.realtime.stop()  # answers the frames it holds first
    services.uploader.stop()
    services.keeper.stop()
    try:
        with session_scope() as s:
            ledger_workers.stop_worker(s, services.name)
    except Exception as exc:
        log.warning("could not mark %s stopped in the ledger: %s", services.name, exc)
