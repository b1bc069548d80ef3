"""The Celery configuration: Redis broker, JSON only, late acks, prefetch 1, bounded publishing.

Import-light (no task bodies, no torch): producers (farm.dispatch) and workers (tasks.celery_app) share it.
"""

from __future__ import annotations

from typing import Any

from farm.config import Settings


def soft_time_limit(hard: int) -> int:
    """The soft limit: a little before the hard one, so a task can record its failure."""
    return max(1, hard - max(1, min(30, hard // 10)))


def celery_config(settings: Settings) -> dict[str, Any]:
    transport: dict[str, Any] = {"queue_order_strategy": "priority"}
    if settings.embedded:
        transport["polling_interval"] = 0.01
    else:
        vt = settings.visibility_timeout
        transport.update(
            visibility_timeout=vt,
            unacked_restore_interval=max(1, min(10, vt // 4)),
            socket_connect_timeout=settings.publish_timeout,
            socket_timeout=max(30.0, settings.publish_timeout),
            max_retries=2,
        )
    return {
        "broker_url": settings.effective_broker_url,
        "result_backend": settings.effective_result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": soft_time_limit(settings.task_time_limit),
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": settings.publish_timeout,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        "task_default_queue": settings.dispatch_queue,
        "task_routes": {"farm.generate": {"queue": settings.dispatch_queue},
                        "farm.bulk": {"queue": settings.bulk_queue}},
        "result_expires": 86400,
        "result_extended": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # the pool child loads the model before it reports up: allow for a cold start
        "worker_proc_alive_timeout": 900,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
