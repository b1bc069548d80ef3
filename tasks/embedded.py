"""A real Celery worker in this process, for the embedded mode (no servers configured).

Same tasks, same ledger and storage code as a ``farm worker`` process; only the broker
is in-memory and the pool is ``solo`` in a thread. It is deliberately not a
:class:`tasks.worker_process.WorkerProcess`: that object's states are driven by the Celery
signals of a worker process of its own (registry row, lease keeper, drain on SIGTERM), none of
which an in-process worker of ``farm generate`` has. Both start the same services
(:mod:`tasks.services`: renderer, uploader, realtime server), so the render path is one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.worker import WorkController
from celery.worker import state as worker_state

from farm.config import Settings
from farm.devices import require_device
from farm.queues import model_queues
from models.registry import get_model


class _ThreadWorker(WorkController):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.started = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: Any) -> None:
        self.started.set()


@contextmanager
def embedded_worker(app: Celery, model_name: str, device: str, settings: Settings) -> Iterator[None]:
    """Load the model, run a worker for its queues in a thread, stop it on exit."""
    from tasks.loaded_model import load_renderer
    from tasks.services import start_services, stop_services

    spec = get_model(model_name, settings)
    require_device(device, spec.family)  # this machine has it: a clear error, not a traceback from the load
    renderer = load_renderer(model_name, device, settings)
    start_services(app, f"{spec.key}@embedded", renderer, settings)
    worker = _ThreadWorker(
        app=app,
        hostname=f"{spec.key}@embedded",
        pool="solo",
        concurrency=1,
        queues=[settings.dispatch_queue, *model_queues(spec.key)],
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        ready_callback=None,
    )
    thread = threading.Thread(target=worker.start, name="farm-embedded-worker", daemon=True)
    thread.start()
    if not worker.started.wait(30):
        raise RuntimeError("the in-process worker did not start within 30 s")
    try:
        yield
    finally:
        stop_services()
        worker_state.should_terminate = 0
        thread.join(10)
        worker_state.should_terminate = None
        if thread.is_alive():
            # still inside a render (the job was given up on): torch cannot be interrupted, and
            # interpreter shutdown with that thread in C++ aborts the process
            global busy_at_exit
            busy_at_exit = True


busy_at_exit = False
