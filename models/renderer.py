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
from models.rendered import ProgressHook, RenderItem
from models.safety import SafetyCheckers

__all__ = ["RenderItem", "RenderResult", "RenderedImage", "Renderer", "batch_from_memory"]

log = logging.getLogger(__name__)

WARMUP_SIDE = 64  # smallest side every supported UNet accepts


def batch_from_memory(free_bytes: int, per_image_bytes: int, cap: int, headroom: float = 0.8) -> int:
    """How many images fit in ``headroom`` of the free memory, between 1 and ``cap``."""
    return max(1, min(cap, int(free_bytes * headroom) // max(1, per_image_bytes)))


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
        return self.render_items([RenderItem(params, seed, i) for i in indices])

    def render_items(self, items: Sequence[RenderItem], on_progress: ProgressHook | None = None) -> RenderResult:
        """Render images of one or several compatible requests as one batch (see ``models.render``)."""
        with self._lock:
            return render(self.pipe, self.safety, self.spec, self.settings, items, self.micro_batch, on_progress)

    def find_max_batch(self) -> int:
        """The most images per batch on this worker: FARM_BATCH_SIZE if set; on CUDA, what fits
        in free memory at the model's default size (capped by the model's maximum); else the
        model's maximum."""
        if self.settings.batch_size > 0:
            return self.settings.batch_size
        if not self.device.startswith("cuda"):
            return self.spec.max_batch
        import torch

        device = torch.device(self.device)
        width, height = self.spec.default_size
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with self._lock:
            self.pipe(prompt="probe", height=height, width=width, num_inference_steps=1, guidance_scale=1.0,
                      output_type="pil")
        per_image = max(1, torch.cuda.max_memory_allocated(device) - base)
        free, _total = torch.cuda.mem_get_info(device)
        fits = batch_from_memory(free, per_image, self.spec.max_batch)
        log.info("%s on %s: %.2f GiB free, ~%.2f GiB per %dx%d image: batch %d", self.spec.name, self.device,
                 free / 2**30, per_image / 2**30, width, height, fits)
        return fits
