"""Counting from the lifecycle code: each helper imports the metric definitions when first called, so
that a process that never counts (a CLI run) never imports prometheus-client, and one that does
imports it after ``farm worker`` / ``farm api`` set multiprocess mode up. Counting never fails
the work it counts, and a metric that cannot be updated says so once (a warning with its cause), then
only at debug level."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)
_warned: set[str] = set()  # the helpers whose failure was logged as a warning already


def _safely(action: Any, what: str | None = None) -> None:
    try:
        action()
    except Exception as exc:  # a metric must never fail a store, a sweep or a delivery
        name = what or action.__qualname__.split(".")[0]
        if name in _warned:
            log.debug("metric update %s failed", name, exc_info=True)
        else:
            _warned.add(name)
            log.warning("metric update %s failed (%s: %s); its metric is left out or stale (logged once)",
                        name, type(exc).__name__, exc, exc_info=True)


def jobs_finished(statuses: Iterable[str]) -> None:
    def act() -> None:
        from farm.metrics.defs import JOBS_FINISHED

        for status in statuses:
            JOBS_FINISHED.labels(str(status)).inc()

    _safely(act)


def lease_takeovers(model_keys: Sequence[str]) -> None:
    def act() -> None:
        from farm.metrics.defs import LEASE_TAKEOVERS

        for key in model_keys:
            LEASE_TAKEOVERS.labels(key).inc()

    _safely(act)


def webhook_attempt(outcome: str) -> None:
    def act() -> None:
        from farm.metrics.defs import WEBHOOK_ATTEMPTS

        WEBHOOK_ATTEMPTS.labels(outcome).inc()

    _safely(act)


def rendered(model: str, images: int, seconds: float) -> None:
    def act() -> None:
        from farm.metrics.defs import BATCH_SIZE, RENDER_SECONDS

        if images:
            RENDER_SECONDS.labels(model).observe(seconds)
            BATCH_SIZE.labels(model).observe(images)

    _safely(act)


def stored(model: str, usage: Iterable[Any], lost: int) -> None:
    """A store's images and GPU-seconds per owner (``db.usage_counters.UsageEntry``s), and its lost claims."""
    def act() -> None:
        from farm.metrics.defs import CLAIMS_LOST, GPU_SECONDS, IMAGES

        for e in usage:
            IMAGES.labels(model, e.owner).inc(e.images)
            GPU_SECONDS.labels(model, e.owner).inc(e.gpu_seconds)
        if lost:
            CLAIMS_LOST.labels(model).inc(lost)

    _safely(act)


def model_loaded(model: str, device: str, seconds: float) -> None:
    def act() -> None:
        from farm.metrics.defs import MODEL_LOAD_SECONDS, MODEL_LOADS

        MODEL_LOADS.labels(model, device).inc()
        MODEL_LOAD_SECONDS.labels(model).observe(seconds)

    _safely(act)


def gpu_memory(model: str, device: str) -> None:
    """The CUDA device's memory (allocated and reserved by this process, and the device's total); nothing on
    another device. All three are read before any is set: a device that cannot be read leaves no partial gauge."""
    if not device.startswith("cuda"):
        return

    def act() -> None:
        import torch

        from farm.metrics.defs import GPU_MEMORY

        dev = torch.device(device)
        values = {"allocated": torch.cuda.memory_allocated(dev), "reserved": torch.cuda.memory_reserved(dev),
                  "total": torch.cuda.get_device_properties(dev).total_memory}
        for kind, value in values.items():
            GPU_MEMORY.labels(model, device, kind).set(value)

    _safely(act, "gpu_memory")


def worker_up(name: str, model: str, device: str) -> None:
    """This worker process serves ``model``: its info gauge, and its counters at 0 (a series that exists
    before its first event gives ``rate()`` and ``increase()`` a start)."""
    def act() -> None:
        from farm.metrics.defs import CLAIMS_LOST, JOBS_FINISHED, LEASE_TAKEOVERS, MODEL_LOADS, WORKER_INFO
        from farm.status import TERMINAL

        WORKER_INFO.labels(name, model, device).set(1)
        for counter in (CLAIMS_LOST, LEASE_TAKEOVERS):
            counter.labels(model).inc(0)
        MODEL_LOADS.labels(model, device).inc(0)
        for status in TERMINAL:
            JOBS_FINISHED.labels(str(status)).inc(0)

    _safely(act)


def api_up() -> None:
    """An API process: the counters it may move, at 0."""
    def act() -> None:
        from farm.metrics.defs import JOBS_FINISHED, WEBHOOK_ATTEMPTS
        from farm.status import TERMINAL

        for outcome in ("delivered", "retry", "failed", "gone"):
            WEBHOOK_ATTEMPTS.labels(outcome).inc(0)
        for status in TERMINAL:
            JOBS_FINISHED.labels(str(status)).inc(0)

    _safely(act)
