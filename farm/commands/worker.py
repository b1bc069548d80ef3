"""``farm worker``: one process per device, one model, loaded once and kept."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from farm.config import get_settings
from farm.errors import FarmError, InvalidInputError
from models.registry import all_models, get_model

log = logging.getLogger("farm.worker")
DEVICE = re.compile(r"^(cpu|cuda:\d+|mps)$")


def device_label(device: str) -> str:
    return device.replace("cuda:", "gpu") if device.startswith("cuda:") else device


@click.command()
@click.option("--model", "model_name", required=True, help="The one model this worker serves.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--name", default=None, help="Node name (default: <model-key>@<device>.<host>).")
@click.option("--loglevel", default=None, help="Worker log level (default: FARM_LOG_LEVEL).")
def worker(model_name: str, device: str, name: str | None, loglevel: str | None) -> None:
    """Serve MODEL's queues on DEVICE (FARM_BROKER_URL must point at Redis)."""
    settings = get_settings()
    if settings.embedded:
        raise FarmError(
            "farm worker needs FARM_BROKER_URL (redis://…); with no broker configured, "
            "`farm generate` runs its own worker in-process"
        )
    if not DEVICE.match(device):
        raise InvalidInputError("--device", f"must be cpu or cuda:N (got {device!r})")
    spec = get_model(model_name, settings)

    from celery.signals import worker_process_init, worker_process_shutdown

    from db.migrate import ensure_schema
    from db.session import dispose_engines
    from tasks.app import get_app
    from tasks.queues import model_queues

    ensure_schema()
    app = get_app(settings)

    failure = Path(tempfile.mkstemp(prefix="farm-worker-")[1])
    node = name or f"{spec.key}@{device_label(device)}.%h"
    shown = node.replace("%h", socket.gethostname())

    def _load(**_: Any) -> None:
        # in the pool child, after fork: fresh DB connections, then the model, once
        dispose_engines(close=False)
        from tasks.lease import start_services
        from tasks.loaded_model import load_renderer

        try:
            renderer = load_renderer(spec.name, device, settings)  # loaded and warmed up
            services = start_services(app, shown, renderer, settings)  # in the pool, with its batch size
        except Exception as exc:
            # a worker without its model must not take tasks: stop the whole worker
            failure.write_text(f"{type(exc).__name__}: {exc}")
            os.kill(os.getppid(), signal.SIGTERM)
            os._exit(1)
        print(f"farm worker ready: {shown} model={spec.name} device={device} max_batch={services.max_batch} "
              f"loads={renderer.loads}", flush=True)

    def _unload(**_: Any) -> None:
        from tasks.lease import stop_services

        stop_services()  # stores what was rendered, leaves the pool
        dispose_engines()

    worker_process_init.connect(_load, weak=False)
    worker_process_shutdown.connect(_unload, weak=False)
    queues = [settings.dispatch_queue, *model_queues(spec.key)]
    argv = ["worker", "--pool", "prefork", "--concurrency", "1", "--queues", ",".join(queues),
            "--hostname", node, "--loglevel", (loglevel or settings.log_level).upper(), "--task-events"]
    click.echo(f"starting {shown} for {spec.name} on {device}; queues: {', '.join(queues)}", err=True)
    sys.stdout.flush()
    try:
        app.worker_main(argv)
        reason = failure.read_text()
    finally:
        failure.unlink(missing_ok=True)
    if reason:
        raise FarmError(f"worker stopped: cannot load {spec.name} on {device}: {reason}")


@click.command()
def models() -> None:
    """List the model names this farm knows."""
    for name, spec in sorted(all_models().items()):
        line = f"{name}\tqueue key {spec.key}\t{spec.kind}\t{spec.default_size[0]}x{spec.default_size[1]}"
        if spec.family == "hold":
            line += "\tSTAND-IN for scheduling work: holds FARM_HOLD_MS per image, renders flat images"
        click.echo(line)
