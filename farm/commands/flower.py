"""``farm flower``: Flower, the Celery monitor, on the farm's broker, behind basic auth.

Flower 2.x registers itself as a ``celery flower`` sub-command (entry point group
``celery.commands``), so it runs through the farm's own Celery app
(:func:`tasks.celery_app.get_app`): same broker, same transport options, same task names.
The credentials are handed to Flower's option object directly, never on a command
line, so they do not show in the process list. ``/metrics`` (Prometheus text) and
``/healthcheck`` are Flower's own routes and answer without authentication.

Flower's Broker page (and ``/api/queues/length``) measures only the queues that live workers
consume, falling back to the app's ``task_queues`` when no worker answers. A model with no
worker would hide its backlog, so :func:`learn_configured_queues` adds every queue the farm's
configuration names: each model's ``render.<key>.<lane>``, the dispatch queue and the bulk queue.
"""

from __future__ import annotations

import logging

import click

from farm.config import Settings, get_settings
from farm.errors import FarmError

log = logging.getLogger("farm.flower")


def configured_queues(settings: Settings) -> list[str]:
    """Every queue the farm publishes to: dispatch, bulk, and each model's lanes (sorted)."""
    from farm.queues import model_queues
    from models.registry import all_models

    names = {settings.dispatch_queue, settings.bulk_queue}
    for key in {spec.key for spec in all_models(settings).values()}:
        names.update(model_queues(key))
    return sorted(names)


def learn_configured_queues(names: list[str]) -> None:
    """Make Flower measure ``names`` as well as the queues its live workers consume.

    Flower 2.x reads the app's ``task_queues`` only while no worker answers, so its handlers'
    ``get_active_queue_names`` (used by the Broker page and ``/api/queues/length``) is widened
    to the union. Called once, by ``farm flower``, before Flower starts.
    """
    from flower.views import BaseHandler

    from_workers = BaseHandler.get_active_queue_names

    def get_active_queue_names(self: BaseHandler) -> list[str]:
        return sorted(set(from_workers(self)) | set(names))

    BaseHandler.get_active_queue_names = get_active_queue_names  # type: ignore[method-assign]


@click.command()
@click.option("--port", type=int, default=5555, show_default=True, help="Port of the web UI and API.")
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--no-auth", is_flag=True, default=False,
              help="Serve without basic auth (only on a trusted network; the API is then off).")
def flower(port: int, address: str, no_auth: bool) -> None:
    """Watch the farm's workers, queues and tasks in Flower (needs FARM_BROKER_URL)."""
    settings = get_settings()
    if settings.embedded:
        raise FarmError(
            "farm flower needs FARM_BROKER_URL (redis://…): an embedded farm has no broker that "
            "Flower could watch"
        )
    credentials: list[str] = []
    if no_auth:
        log.warning("farm flower: --no-auth given: anyone who reaches %s:%d can see and control workers",
                    address, port)
    else:
        if not settings.flower_password:
            raise FarmError(
                "farm flower needs a password: set FARM_FLOWER_PASSWORD (user FARM_FLOWER_USER, "
                "default admin), or pass --no-auth explicitly"
            )
        if not settings.flower_user or ":" in settings.flower_user:
            raise FarmError("FARM_FLOWER_USER must be non-empty and must not contain ':'")
        credentials = [f"{settings.flower_user}:{settings.flower_password}"]

    from flower.command import flower as _flower_command  # noqa: F401  (defines Flower's options)
    from tornado.options import options

    from tasks.celery_app import get_app

    # Read by Flower's handlers at request time; argv and FLOWER_* variables may still add to it.
    options.basic_auth = credentials
    app = get_app(settings)
    learn_configured_queues(configured_queues(settings))
    click.echo(f"farm flower on http://{address}:{port} (API under /api, Prometheus metrics at /metrics)",
               err=True)
    argv = ["flower", f"--port={port}", f"--address={address}", "--persistent=False"]
    code = app.start(argv)
    if code:
        raise FarmError(f"flower stopped with status {code}")
