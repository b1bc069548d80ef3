"""``farm worker``: one process per device, one model, loaded once and kept."""

from __future__ import annotations

import sys

import click

from farm.config import get_settings
from farm.devices import check_device, require_device
from farm.errors import FarmError
from models.registry import all_models, get_model


def log_level_option(log_level: str | None, deprecated: str | None) -> str | None:
    """``--log-level``, or its deprecated spelling ``--loglevel`` (with a notice on stderr)."""
    if deprecated is not None:
        click.echo("warning: --loglevel is deprecated: use --log-level", err=True)
    return log_level or deprecated


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

    from db.migrate import ensure_schema
    from tasks.celery_app import get_app
    from tasks.worker_names import node_name
    from tasks.worker_process import WorkerProcess, serve_metrics

    ensure_schema()
    node = node_name(name, spec.key, device, settings)
    metrics_url = serve_metrics(settings, port) if port else None
    process = WorkerProcess(get_app(settings), spec, device, node, settings, metrics_url)
    reason = process.run(level or settings.log_level)
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
