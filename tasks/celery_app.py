"""The workers' Celery app: the producers' app (farm.dispatch) with the task bodies registered.

Import-light: no torch here. Task bodies live in ``tasks/generate_task.py``, ``tasks/render_batch.py``
and ``tasks/bulk_task.py``; they are registered on the first :func:`get_app` call of a process. Producers
never need them: they send by name through :func:`farm.dispatch.broker_app`.
"""

from __future__ import annotations

import threading

from celery import Celery

from farm.celery_config import celery_config, soft_time_limit
from farm.config import Settings, get_settings

__all__ = ["celery_config", "get_app", "make_app", "soft_time_limit"]
_registered: set[int] = set()
_lock = threading.Lock()


def make_app(settings: Settings) -> Celery:
    """A new app with the task bodies registered (not cached: see :func:`get_app`)."""
    app = Celery("farm", set_as_current=False)
    app.conf.update(celery_config(settings))
    _register(app)
    return app


def _register(app: Celery) -> None:
    from tasks import bulk_task, generate_task, render_batch

    generate_task.register(app)
    render_batch.register(app)
    bulk_task.register(app)


def get_app(settings: Settings | None = None) -> Celery:
    """This process's app for the broker/backend pair (the producers' one), with the task bodies."""
    from farm.dispatch import broker_app

    app = broker_app(settings or get_settings())
    with _lock:
        if id(app) not in _registered:
            _register(app)
            _registered.add(id(app))
    return app
