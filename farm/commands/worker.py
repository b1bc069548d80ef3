"""``farm worker``: one process per device, one model, loaded once and kept."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, NoReturn

import click

from farm.config import Settings, get_settings
from farm.devices import check_device, require_device
from farm.errors import FarmError, WorkerNameTakenError
from models.registry import all_models, get_model

log = logging.getLogger("farm.worker")


def device_label(device: str) -> str:
    return device.replace("cuda:", "gpu") if device.startswith("cuda:") else device


def log_level_option(log_level: str | None, deprecated: str | None) -> str | None:
    """``--log-level``, or its deprecated spelling ``--loglevel`` (with a notice on stderr)."""
    if deprecated is not None:
        click.echo("warning: --loglevel is deprecated: use --log-level", err=True)
    return log_level or deprecated


class _DropCeleryReady(logging.Filter):
    """Celery's "<node> ready." comes before the model has loaded (and for one whose load then fails):
    the farm's own "farm worker ready" line, logged once both are true, replaces it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "%s ready."


def _failed(failure: Path) -> bool:
    try:
        return failure.stat().st_size > 0
    except OSError:
        return False


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, FarmError) else f"{type(exc).__name__}: {exc}"


def _refuse_a_live_namesake(name: str, settings: Settings) -> None:
    """Refuse at once a name that a live worker holds (the registration in the pool checks it again)."""
    from db.models import Worker, utcnow
    from db.session import session_scope

    with session_scope() as s:
        row = s.get(Worker, name)
        now = utcnow()
        if row is not None and row.live_other_than(socket.gethostname(), None, settings.lease_seconds, now):
            raise row.name_taken(now)


NAMES_TRIED = 64  # <key>@<device>.<host>, then <key>@<device>-2.<host> … -64


def _free_name(base: str, settings: Settings) -> tuple[str, int]:
    """The first of ``<base>.%h``, ``<base>-2.%h``, … that no live worker holds and no worker of this host
    is starting under for the same ledger (a lock file held for this process's life, so two started at
    once differ too); the node name and the lock's file descriptor. Refuses if all are held."""
    from db.models import Worker, utcnow
    from db.session import session_scope

    host = socket.gethostname()
    farm = hashlib.sha256(settings.effective_database_url.encode()).hexdigest()[:12]  # names are per ledger
    for n in range(1, NAMES_TRIED + 1):
        node = f"{base}{'' if n == 1 else f'-{n}'}.%h"
        shown = node.replace("%h", host)
        try:
            fd = os.open(Path(tempfile.gettempdir()) / f"farm-worker-{farm}-{shown}.lock",
                         os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            continue  # another user's lock file: that user's worker may hold the name
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a worker of this host is starting (or runs) under it
        with session_scope() as s:
            row = s.get(Worker, shown)
            now = utcnow()
            if row is None or not row.live_other_than(host, None, settings.lease_seconds, now):
                return node, fd
        os.close(fd)
    _refuse_a_live_namesake(f"{base}.{host}", settings)
    raise WorkerNameTakenError(f"worker names {base}.{host} to {base}-{NAMES_TRIED}.{host} are all taken by "
                               "live workers of this host: give this one a --name")


def _serve_metrics(settings: Settings, port: int) -> str | None:
    """Start this worker's exporter (another port if ``port`` is taken); where to scrape it, or None."""
    from farm.metrics import exposition

    exposition.setup("worker")  # the pool child writes its values there; this process exports them
    server = exposition.serve(settings.metrics_host, port, settings.metrics_token)
    if server is None:
        return None
    url = exposition.scrape_url(settings.metrics_host, server.server_port)
    click.echo(f"metrics on {url} (listening on {settings.metrics_host}:{server.server_port})", err=True)
    return url


def _held(name: str) -> str:
    """The batches this worker holds in the ledger, in words: "batch 2 of job J and batch 0 of job K"."""
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


@click.command()
@click.option("--model", "model_name", required=True, help="The one model this worker serves.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda:N or mps.")
@click.option("--name", default=None,
              help="Node name, unique among live workers (default: <model-key>@<device>.<host>, or "
                   "<model-key>@<device>-2.<host> … while a live worker of this host has it).")
@click.option("--log-level", "log_level", default=None, help="Worker log level (default: FARM_LOG_LEVEL).")
@click.option("--loglevel", "old_log_level", default=None, hidden=True, help="Deprecated: use --log-level.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Port of this worker's Prometheus exporter (default: FARM_METRICS_PORT, 9808); taken (another "
                   "worker of this host): the next free one, as logged and in the workers table; 0: none.")
def worker(model_name: str, device: str, name: str | None, log_level: str | None, old_log_level: str | None,
           metrics_port: int | None) -> None:
    """Serve MODEL's queues on DEVICE (FARM_BROKER_URL must point at Redis)."""
    level = log_level_option(log_level, old_log_level)
    settings = get_settings()
    port = settings.metrics_port if metrics_port is None else metrics_port
    if settings.embedded:
        raise FarmError(
            "farm worker needs FARM_BROKER_URL (redis://…); with no broker configured, "
            "`farm generate` runs its own worker in-process"
        )
    check_device(device)
    spec = get_model(model_name, settings)
    require_device(device, spec.family)  # in this process, before the pool process forks and loads

    from celery.exceptions import WorkerShutdown
    from celery.signals import (
        worker_before_create_process,
        worker_process_init,
        worker_process_shutdown,
        worker_ready,
        worker_shutting_down,
    )

    from db.migrate import ensure_schema
    from db.session import dispose_engines
    from farm.queues import model_queues
    from tasks.app import get_app

    ensure_schema()
    if name:  # a name given is this worker's or none: refused if a live worker holds it
        node = name
        _refuse_a_live_namesake(node.replace("%h", socket.gethostname()), settings)
    else:  # several workers of one model and device on one host: the second is <key>@<device>-2.<host>
        node, _lock = _free_name(f"{spec.key}@{device_label(device)}", settings)  # held until this process exits
    shown = node.replace("%h", socket.gethostname())
    metrics_url = _serve_metrics(settings, port) if port else None
    app = get_app(settings)

    failure = Path(tempfile.mkstemp(prefix="farm-worker-")[1])  # the pool process's reason to give up
    joined_r, joined_w = os.pipe()  # pool process → main: model loaded, row registered ("max_batch loads")
    leaving_r, leaving_w = os.pipe()  # main → pool process: a warm shutdown began, pull no further batch
    said: set[str] = set()  # the shutdown notices already given (each once)

    def _give_up(reason: str) -> NoReturn:
        # a worker that cannot serve must not take tasks: stop the whole worker, once (see _no_second_try)
        failure.write_text(reason)
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(1)

    def _load(**_: Any) -> None:
        # in the pool process, after fork: fresh DB connections, then the model, once
        dispose_engines(close=False)
        from farm.metrics import count, exposition
        from tasks.lease import start_services

        exposition.child_started()
        from tasks.loaded_model import load_renderer

        log.info("loading %s on %s", spec.name, device)
        try:
            renderer = load_renderer(spec.name, device, settings)  # loaded and warmed up
        except Exception as exc:
            _give_up(f"cannot load {spec.name} on {device}: {_reason(exc)}")
        try:
            services = start_services(app, shown, renderer, settings, metrics_url)  # in the pool, with its batch size
        except Exception as exc:
            _give_up(_reason(exc) if isinstance(exc, WorkerNameTakenError) else f"cannot join the pool: {_reason(exc)}")
        count.worker_up(shown, spec.key, device)
        os.write(joined_w, f"{services.max_batch} {renderer.loads}\n".encode())
        threading.Thread(target=_stop_pulling_when_told, name="farm-leaving", daemon=True).start()

    def _stop_pulling_when_told() -> None:
        if os.read(leaving_r, 1):
            from celery.worker import state

            state.should_stop = True  # farm.render pulls no further batch from the ledger

    def _unload(**_: Any) -> None:
        from tasks.lease import get_services, stop_services

        try:
            get_services()
        except RuntimeError:
            return  # never joined
        stop_services()  # stores what was rendered, leaves the pool
        dispose_engines()
        from farm.metrics import exposition

        exposition.child_exiting()
        log.info("%s left the pool", shown)

    def _announce() -> None:
        line = os.read(joined_r, 256).decode().split()  # the pool process joined
        if len(line) == 2:
            log.info("farm worker ready: %s model=%s device=%s max_batch=%s loads=%s metrics=%s", shown, spec.name,
                     device, *line, metrics_url or "none")

    def _consuming(**_: Any) -> None:
        # main process: the consumer takes messages from the broker; ready once the pool process joined too
        threading.Thread(target=_announce, name="farm-ready", daemon=True).start()

    def _no_second_try(**_: Any) -> None:
        # main process, before the pool starts a process: after a failed load a new one would only fail the
        # same way, after loading again; stop instead (SystemExit passes Celery's signal dispatch)
        if _failed(failure):
            raise WorkerShutdown(1)

    def _leaving(how: str = "Warm", **_: Any) -> None:
        # main process, in the signal handler: say once what this worker still does before it goes
        if _failed(failure) or how in said:
            return
        said.add(how)
        if how == "Warm":
            os.write(leaving_w, b"x")
        threading.Thread(target=_say_leaving, args=(how,), name="farm-leaving", daemon=True).start()

    def _say_leaving(how: str) -> None:
        try:
            held = _held(shown)
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

    worker_process_init.connect(_load, weak=False)
    worker_process_shutdown.connect(_unload, weak=False)
    worker_ready.connect(_consuming, weak=False)
    worker_before_create_process.connect(_no_second_try, weak=False)
    worker_shutting_down.connect(_leaving, weak=False)
    logging.getLogger("celery.apps.worker").addFilter(_DropCeleryReady())
    queues = [settings.dispatch_queue, *model_queues(spec.key)]
    argv = ["worker", "--pool", "prefork", "--concurrency", "1", "--queues", ",".join(queues),
            "--hostname", node, "--loglevel", (level or settings.log_level).upper(), "--task-events"]
    click.echo(f"starting {shown} for {spec.name} on {device}; queues: {', '.join(queues)}", err=True)
    sys.stdout.flush()
    try:
        app.worker_main(argv)
        reason = failure.read_text()
    finally:
        failure.unlink(missing_ok=True)
    if reason:
        # printed whole (not wrapped): the download commands in it must stay copyable
        click.echo(f"{click.style('error:', fg='red')} worker stopped: {reason}", err=True)
        sys.exit(1)


@click.command()
def models() -> None:
    """List the model names this farm knows."""
    for name, spec in sorted(all_models().items()):
        line = f"{name}\tqueue key {spec.key}\t{spec.kind}\t{spec.default_size[0]}x{spec.default_size[1]}"
        if spec.family == "hold":
            line += "\tSTAND-IN for scheduling work: holds FARM_HOLD_MS per image, renders flat images"
        click.echo(line)
