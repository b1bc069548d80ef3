"""The worker's model: load once, render many (cog's ``setup()`` / ``predict()``).

    renderer = Renderer.load("farm/tiny-lcm", device="cpu")
    result = renderer.render(params, seed=42, indices=[0, 1, 2, 3])

``load`` builds the pipeline (fp16 on CUDA, fp32 on CPU, ``LCMScheduler``), loads the safety
checkers and warms everything up with one tiny render, so the first request pays no
first-call costs. ``render`` is serialised by a lock: one pipeline serves one request at a
time (request LoRAs and embeddings are applied to the shared pipeline).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from farm.config import Settings, get_settings
from farm.schemas import GenerateInput
from models.loading import load_pipeline
from models.registry import ModelSpec, get_model
from models.render import RenderedImage, RenderResult, render
from models.safety import SafetyCheckers

__all__ = ["RenderResult", "RenderedImage", "Renderer"]

log = logging.getLogger(__name__)

WARMUP_SIDE = 64  # smallest side every supported UNet accepts


class Renderer:
    """One model's pipeline and safety checkers, loaded once and pinned to one device."""

    spec: ModelSpec
    device: str
    loads: int  # how many times a pipeline was loaded (stays 1 in steady state)

    def __init__(self, spec: ModelSpec, device: str, settings: Settings, pipe: Any,
                 safety: SafetyCheckers) -> None:
        self.spec = spec
        self.device = device
        self.settings = settings
        self.pipe = pipe
        self.safety = safety
        self.loads = 1
        # byte-identical to solo renders on CPU (see models.render); full batches on GPUs
        self.micro_batch = spec.max_batch if device.startswith("cuda") else 1
        self.load_seconds = 0.0
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_name: str, device: str = "cpu", settings: Settings | None = None) -> Renderer:
        """Load the pipeline once (fp16 on CUDA, fp32 on CPU), LCMScheduler, safety checkers; warm up."""
        settings = settings or get_settings()
        spec = get_model(model_name, settings)
        t0 = time.perf_counter()
        pipe = load_pipeline(spec, device, settings)
        safety = SafetyCheckers.load(spec, device, settings)
        renderer = cls(spec, device, settings, pipe, safety)
        renderer.warm_up()
        renderer.load_seconds = time.perf_counter() - t0
        log.info("%s ready on %s in %.2fs", spec.name, device, renderer.load_seconds)
        return renderer

    def warm_up(self) -> None:
        """One tiny render (and one pass of each loaded safety checker)."""
        with self._lock:
            out = self.pipe(
                prompt="warm-up",
                height=WARMUP_SIDE,
                width=WARMUP_SIDE,
                num_inference_steps=1,
                guidance_scale=1.0,
                output_type="pil",
            )
            for version in self.safety.checkers:
                self.safety.check(list(out.images), version)

    def render(self, params: GenerateInput, seed: int, indices: Sequence[int]) -> RenderResult:
        """Render images ``indices`` of ``params``; image ``i`` uses seed ``seed + i``."""
        with self._lock:
            return render(
                self.pipe, self.safety, self.spec, self.settings, params, seed, indices, self.micro_batch
            )
