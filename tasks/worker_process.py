"""One GPU worker (``farm worker``) as an object with explicit states: loading → joined → draining → stopped.

Celery runs it as two processes: the main one (the consumer, which takes messages from the broker) and
one pool process (prefork, concurrency 1), forked from it, which loads the model and renders. The same
:class:`WorkerProcess` lives in both (the pool process inherits it at the fork); Celery's signals call its
methods in the process they fire in, the way dramatiq's middleware hooks or cog's ``Worker`` are called:

=============================  ============  ==========================================================
signal                         process       method
=============================  ============  ==========================================================
``worker_before_create_process``  main       :meth:`before_pool_process` (no second try after a failed load)
``worker_process_init``        pool          :meth:`join` (load the model, start the services, register)
``worker_ready``               main          :meth:`consuming` (says "farm worker ready" once joined too)
``worker_shutting_down``       main          :meth:`shutting_down` (says once what it still does)
``worker_process_shutdown``    pool          :meth:`leave` (store what was rendered, leave the pool)
=============================  ============  ==========================================================

The two halves talk over two pipes and a file: pool → main "max_batch loads" once joined; main → pool
"a warm shutdown began: pull no further batch"; and the pool's reason to give up, read when Celery returns.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

from celery import Celery

from farm.config import Settings
from farm.errors import FarmError, WorkerNameTakenError
from models.protocol import Renderer
from models.registry import ModelSpec
from tasks.services import WorkerServices

log = logging.getLogger("farm.worker")


class WorkerState(StrEnum):
    LOADING = "loading"  # the pool process loads the model (main: not yet told it joined)
    JOINED = "joined"  # registered in the pool, taking batches
    DRAINING = "draining"  # a shutdown began: finishing what it holds, pulling nothing new
    STOPPED = "stopped"  # left the pool (pool process) or Celery returned (main)


class _DropCeleryReady(logging.Filter):
    """Celery's "<node> ready." comes before the model has loaded (and for one whose load then fails):
    the farm's own "farm worker ready" line, logged once both are true, replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "%s ready."


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, FarmError) else f"{type(exc).__name__}: {exc}"


def held_batches(name: str) -> str:
    """The batches worker ``name`` holds in the ledger, in words: "batch 2 of job J and batch 0 of job K"."""
    from sqlalchemy import select

    from db.models import Batch
    from db.session import session_scope
    from farm.status import BatchStatus

    with session_scope() as s:
        rows = s.execute(select(Batch.job_id, Batch.k).where(Batch.worker == name, Batch.status == BatchStatus.CLAIMED)
                         .order_by(Batch.job_id, Batch.k)).all()
    by_job: dict[str, list[int]] = {}
    for job_id, k in rows:
        by_job.setdefault(job_id, []).append(k)
    return " and ".join(f"batch{'es' if len(ks) > 1 else ''} {', '.join(map(str, ks))} of job {job_id}"
                        for job_id, ks in by_job.items())


def serve_metrics(settings: Settings, port: int) -> str | None:
    """Start this worker's exporter (another port if ``port`` is taken); where to scrape it, or None."""
    from farm.metrics import exposition

    exposition.setup("worker")  # the pool process writes its values there; the main process exports them
    server = exposition.serve(settings.metrics_host, port, settings.metrics_token, settings.metrics_open)
    if server is None:
        return None
    url = exposition.scrape_url(settings.metrics_host, server.server_port)
    print(f"metrics on {url} (listening on {settings.metrics_host}:{server.server_port})", file=sys.stderr,
          flush=True)
    return url


class WorkerProcess:
    """One model on one device, served from Celery's prefork pool of one process; see the module docstring."""

    def __init__(self, app: Celery, spec: ModelSpec, device: str, node: str, settings: Settings,
                 metrics_url: str | None = None) -> None:
        self.app, self.spec, self.device, self.settings = app, spec, device, settings
        self.node = node  # Celery's node name, %h for the host
        self.name = node.replace("%h", _hostname())  # as in the workers table and the logs
        self.metrics_url = metrics_url
        self.state = WorkerState.LOADING
        self.renderer: Renderer | None = None  # pool process, once loaded
        self.services: WorkerServices | None = None  # pool process, once joined: keeper, uploader, realtime
        self._failure = Path(tempfile.mkstemp(prefix="farm-worker-")[1])  # the pool process's reason to give up
        self._joined_r, self._joined_w = os.pipe()  # pool → main: model loaded, row registered
        self._leaving_r, self._leaving_w = os.pipe()  # main → pool: a warm shutdown began
        self._said: set[str] = set()  # the shutdown notices already given (each once)

    # -- main process ---------------------------------------------------------------------------------------

    def run(self, log_level: str) -> str:
        """Serve until Celery stops; the pool process's reason to give up, or "" after a clean stop."""
        from celery.signals import (
            worker_before_create_process,
            worker_process_init,
            worker_process_shutdown,
            worker_ready,
            worker_shutting_down,
        )

        from farm.queues import model_queues

        worker_process_init.connect(self.join, weak=False)
        worker_process_shutdown.connect(self.leave, weak=False)
        worker_ready.connect(self.consuming, weak=False)
        worker_before_create_process.connect(self.before_pool_process, weak=False)
        worker_shutting_down.connect(self.shutting_down, weak=False)
        logging.getLogger("celery.apps.worker").addFilter(_DropCeleryReady())
        queues = [self.settings.dispatch_queue, *model_queues(self.spec.key)]
        argv = ["worker", "--pool", "prefork", "--concurrency", "1", "--queues", ",".join(queues),
                "--hostname", self.node, "--loglevel", log_level.upper(), "--task-events"]
        print(f"starting {self.name} for {self.spec.name} on {self.device}; queues: {', '.join(queues)}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        try:
            self.app.worker_main(argv)
            return self._failure.read_text()
        finally:
            self.state = WorkerState.STOPPED
            self._failure.unlink(missing_ok=True)

    def before_pool_process(self, **_: Any) -> None:
        """Before the pool starts a process: after a failed load a new one would only fail the same way, after
        loading again; stop instead (SystemExit passes Celery's signal dispatch)."""
        from celery.exceptions import WorkerShutdown

        if self._failed():
            raise WorkerShutdown(1)

    def consuming(self, **_: Any) -> None:
        """The consumer takes messages from the broker; ready once the pool process joined too."""
        threading.Thread(target=self._announce, name="farm-ready", daemon=True).start()

    def _announce(self) -> None:
        line = os.read(self._joined_r, 256).decode().split()  # the pool process joined
        if len(line) == 2:
            if self.state is WorkerState.LOADING:
                self.state = WorkerState.JOINED
            log.info("farm worker ready: %s model=%s device=%s max_batch=%s loads=%s metrics=%s", self.name,
                     self.spec.name, self.device, *line, self.metrics_url or "none")

    def shutting_down(self, how: str = "Warm", **_: Any) -> None:
        """In the signal handler: say once what this worker still does before it goes."""
        if self._failed() or how in self._said:
            return
        self._said.add(how)
        self.state = WorkerState.DRAINING
        if how == "Warm":
            os.write(self._leaving_w, b"x")
        threading.Thread(target=self._say_leaving, args=(how,), name="farm-leaving", daemon=True).start()

    def _say_leaving(self, how: str) -> None:
        try:
            held = held_batches(self.name)
        except Exception as exc:  # the ledger is down: say what is known
            held, note = "", f" (ledger unreadable: {exc})"
        else:
            note = ""
        if how != "Warm":
            log.info("stopping now%s: %s", note, f"{held} will go back to the pool when the lease runs out"
                     if held else "no batch in progress")
        elif held:
            log.info("finishing %s, then leaving the pool%s", held, note)
        else:
            log.info("no batch in progress%s: leaving the pool", note)

    def _failed(self) -> bool:
        try:
            return self._failure.stat().st_size > 0
        except OSError:
            return False

    # -- pool process ---------------------------------------------------------------------------------------

    def join(self, **_: Any) -> None:
        """After the fork: fresh DB connections, then the model (once), the services, the registry row."""
        from db.session import dispose_engines
        from farm.metrics import count, exposition
        from tasks.loaded_model import load_renderer
        from tasks.services import start_services

        dispose_engines(close=False)
        exposition.child_started()
        log.info("loading %s on %s", self.spec.name, self.device)
        try:
            self.renderer = load_renderer(self.spec.name, self.device, self.settings)  # loaded and warmed up
        except Exception as exc:
            self._give_up(f"cannot load {self.spec.name} on {self.device}: {_reason(exc)}")
        try:  # in the pool process, with its batch size
            self.services = start_services(self.app, self.name, self.renderer, self.settings, self.metrics_url)
        except Exception as exc:
            self._give_up(_reason(exc) if isinstance(exc, WorkerNameTakenError)
                          else f"cannot join the pool: {_reason(exc)}")
        self.state = WorkerState.JOINED
        count.worker_up(self.name, self.spec.key, self.device)
        os.write(self._joined_w, f"{self.services.max_batch} {self.renderer.loads}\n".encode())
        threading.Thread(target=self._drain_when_told, name="farm-leaving", daemon=True).start()

    def _drain_when_told(self) -> None:
        if os.read(self._leaving_r, 1):
            from celery.worker import state

            self.state = WorkerState.DRAINING
            state.should_stop = True  # farm.render pulls no further batch from the ledger

    def leave(self, **_: Any) -> None:
        """Store what was rendered, leave the pool, stop the threads (nothing to do if it never joined)."""
        from db.session import dispose_engines
        from farm.metrics import exposition
        from tasks.services import stop_services

        if self.services is None:
            return  # never joined
        stop_services()
        self.services = None
        self.state = WorkerState.STOPPED
        dispose_engines()
        exposition.child_exiting()
        log.info("%s left the pool", self.name)

    def _give_up(self, reason: str) -> NoReturn:
        """A worker that cannot serve must not take tasks: stop the whole worker, once (see before_pool_process)."""
        self._failure.write_text(reason)
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(1)


def _hostname() -> str:
    import socket

    return socket.gethostname()
