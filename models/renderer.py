"""The worker's model: load once, render many (cog's ``setup()`` / ``predict()``).

    renderer = DiffusersRenderer.load("farm/tiny-lcm", device="cpu")
    result = renderer.render(params, seed=42, indices=[0, 1, 2, 3])

``load`` builds the pipeline (fp16 on CUDA, fp32 on CPU, ``LCMScheduler``), applies the speed
settings (``models.speed``), loads the safety checkers and warms everything up with one tiny
render, so the first request pays no first-call costs (image-to-image and inpainting pipelines are
derived from the loaded one on first use, sharing its weights: ``models.image_pipes``); with ``FARM_COMPILE``,
``warm_compiled()`` (called by the worker once its batch size is known) compiles and warms each
configured size. Denoising is serialised by a lock: one pipeline serves one request at a time
(request LoRAs and embeddings are applied to the shared pipeline). On CUDA, ``begin_items``
returns before the batch is finished (``models.render.Pending``): the worker finishes it in its
uploader thread while the next batch denoises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from farm.config import Settings, get_settings
from farm.schemas import GenerateInput, ImageSize
from models import speed
from models.decode import Decoder
from models.image_pipes import ImagePipelines
from models.loading import load_pipeline
from models.registry import ModelSpec, get_model
from models.render import RenderedImage, RenderResult, begin, uses_cfg
from models.rendered import PendingRender, ProgressHook, Ready, RenderItem, SourceImages
from models.safety import SafetyCheckers

__all__ = ["RenderItem", "RenderResult", "RenderedImage", "DiffusersRenderer", "batch_from_memory"]

log = logging.getLogger(__name__)

WARMUP_SIDE = 64  # smallest side every supported UNet accepts
WARM_GUIDANCE = 1.5  # any guidance above 1 warms the classifier-free guidance shapes


def batch_from_memory(free_bytes: int, per_image_bytes: int, cap: int, headroom: float = 0.8) -> int:
    """How many images fit in ``headroom`` of the free memory, between 1 and ``cap``."""
    return max(1, min(cap, int(free_bytes * headroom) // max(1, per_image_bytes)))


class DiffusersRenderer:
    """One model's pipeline and safety checkers, loaded once and pinned to one device."""

    spec: ModelSpec
    device: str
    loads: int  # how many times a pipeline was loaded (stays 1 in steady state)
    stand_in_note: str | None = None  # a real model renders (see models.protocol)

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
        self.per_image_bytes = 0  # GPU memory of one image at the default size (find_max_batch's probe)
        self.decoder = Decoder(pipe)
        self.pipes = ImagePipelines(pipe, spec.family)  # image-to-image, inpainting: same weights, built once
        self.compiled = speed.CompileState(settings.compile != "none")
        self.overlap = device.startswith("cuda")  # finish batches (stage 7) in the caller's uploader thread
        self._lock = threading.Lock()

    @property
    def recompiles(self) -> int:
        """Graphs torch.compile built after warm-up (0 in steady state; see ``models.speed``)."""
        return self.compiled.recompiles

    @property
    def cold_renders(self) -> int:
        """Micro-batches that ran uncompiled after warm-up although FARM_COMPILE is set."""
        return self.compiled.cold_renders

    @classmethod
    def load(cls, model_name: str, device: str = "cpu", settings: Settings | None = None) -> DiffusersRenderer:
        """Load the pipeline once (fp16 on CUDA, fp32 on CPU), LCMScheduler, safety checkers; warm up."""
        settings = settings or get_settings()
        spec = get_model(model_name, settings)
        t0 = time.perf_counter()
        pipe = load_pipeline(spec, device, settings)
        speed.apply(pipe, spec, device, settings)
        safety = SafetyCheckers.load(spec, device, settings)
        renderer = cls(spec, device, settings, pipe, safety)
        renderer.warm_up()
        renderer.load_seconds = time.perf_counter() - t0
        log.info("%s ready on %s in %.2fs", spec.name, device, renderer.load_seconds)
        return renderer

    def warm_up(self) -> None:
        """One tiny render (and one pass of each loaded safety checker), uncompiled (see ``warm_compiled``)."""
        with self._lock, speed.uncompiled(self.compiled.enabled):
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

    def warm_compiled(self, sizes: Sequence[tuple[int, int]] | None = None,
                      batches: Sequence[int] | None = None) -> float:
        """With FARM_COMPILE: compile and warm every (size, batch, guidance) shape this worker serves;
        seconds taken (0 without FARM_COMPILE). Sizes: FARM_WARM_SIZES, else the model's default size;
        batches: FARM_WARM_BATCHES, where 0 is the full batch (``micro_batch``)."""
        if not self.compiled.enabled:
            return 0.0
        sizes = list(sizes or self.settings.warm_size_list or [self.spec.default_size])
        batches = [self.micro_batch if b == 0 else min(b, self.micro_batch)
                   for b in (batches or self.settings.warm_batches)]
        shapes = speed.warm_shapes(sizes, batches, uses_cfg(self.pipe, WARM_GUIDANCE))

        def run(shape: speed.Shape) -> None:
            width, height, n, cfg = shape
            params = GenerateInput(model_name=self.spec.name, prompt="warm-up", image_size=ImageSize(
                width=width, height=height), num_inference_steps=2, guidance_scale=WARM_GUIDANCE if cfg else 1.0,
                num_images=n, enable_safety_checker=False)
            self.render(params, 0, list(range(n)))

        return speed.timed_warm_up(run, shapes, self.compiled)

    def render(self, params: GenerateInput, seed: int, indices: Sequence[int],
               source: SourceImages | None = None) -> RenderResult:
        """Render images ``indices`` of ``params`` (from ``source``, if given); image ``i`` uses seed ``seed + i``."""
        return self.render_items([RenderItem(params, seed, i, source=source) for i in indices])

    def render_items(self, items: Sequence[RenderItem], on_progress: ProgressHook | None = None) -> RenderResult:
        """Render images of one or several compatible requests as one batch (see ``models.render``)."""
        return self.begin_items(items, on_progress).result()

    def begin_items(self, items: Sequence[RenderItem], on_progress: ProgressHook | None = None) -> PendingRender:
        """Denoise ``items``; on CUDA, return before the batch is finished (``result()`` finishes it)."""
        with self._lock:
            self._check_compiled(items)
            pending = begin(self.pipe, self.safety, self.spec, self.settings, items, self.micro_batch, on_progress,
                            self.decoder, self.pipes)
            return pending if self.overlap else Ready(pending.result())

    def _check_compiled(self, items: Sequence[RenderItem]) -> None:
        if not self.compiled.enabled or not items:
            return
        first = items[0].params
        width, height = first.size
        cfg = uses_cfg(self.pipe, first.guidance_scale)
        shapes = [(width, height, min(self.micro_batch, len(items) - start), cfg)
                  for start in range(0, len(items), self.micro_batch)]
        self.compiled.check(shapes, loras=bool(first.loras))

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
        with self._lock, speed.uncompiled(self.compiled.enabled):
            self.pipe(prompt="probe", height=height, width=width, num_inference_steps=1, guidance_scale=1.0,
                      output_type="pil")
        per_image = max(1, torch.cuda.max_memory_allocated(device) - base)
        self.per_image_bytes = per_image
        free, _total = torch.cuda.mem_get_info(device)
        fits = batch_from_memory(free, per_image, self.spec.max_batch)
        log.info("%s on %s: %.2f GiB free, ~%.2f GiB per %dx%d image: batch %d", self.spec.name, self.device,
                 free / 2**30, per_image / 2**30, width, height, fits)
        return fits
