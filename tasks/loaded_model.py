"""The renderer of this worker process: loaded once when the process starts, kept."""

from __future__ import annotations

import logging
import time

from farm.config import Settings, get_settings
from models.protocol import Renderer

log = logging.getLogger(__name__)
_renderer: Renderer | None = None


def load_renderer(
    model_name: str, device: str, settings: Settings | None = None
) -> Renderer:
    """Load and warm the model of this process (once; a second call returns the same one).

    The ``hold`` family (``farm/hold``, a scheduling stand-in) gets a ``HoldRenderer``, which
    imports no torch; every other model gets the diffusers ``models.renderer.DiffusersRenderer``
    (both are a ``models.protocol.Renderer``).
    """
    global _renderer
    if _renderer is not None and _renderer.spec.name == model_name:
        return _renderer
    from models.registry import get_model

    settings = settings or get_settings()
    started = time.perf_counter()
    if get_model(model_name, settings).family == "hold":
        from models.hold import HoldRenderer

        _renderer = HoldRenderer.load(model_name, device, settings)
    else:
        from models.renderer import DiffusersRenderer

        _renderer = DiffusersRenderer.load(model_name, device, settings)
    took = time.perf_counter() - started
    log.info("model %s loaded on %s in %.1f s", model_name, device, took)
    from farm.metrics import count

    count.model_loaded(_renderer.spec.key, device, took)
    count.gpu_memory(_renderer.spec.key, device)
    return _renderer


def get_renderer() -> Renderer:
    if _renderer is None:
        raise RuntimeError("no model is loaded in this process: start it with `farm worker --model NAME`")
    return _renderer
