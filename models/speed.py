"""GPU speed settings applied to a loaded pipeline, and the compile bookkeeping of a renderer.

Every one is off by default (``farm.config``): on a CPU nothing here runs unless asked for.

* ``FARM_FUSE_QKV``: each UNet attention's Q, K, V (self-attention) or K, V (cross-attention)
  projections become one matmul. A request with LoRAs is rendered unfused (its LoRA layers sit on
  the separate projections), and the projections are fused again afterwards.
* ``FARM_TINY_DECODER``: decode with a TAESD-architecture ``AutoencoderTiny`` instead of the
  model's VAE. Much faster, and the images are different (softer): opt-in only.
* ``FARM_COMPILE``: ``torch.compile`` of the UNet (``unet``) and of the VAE decoder
  (``unet+vae``), static shapes. :class:`CompileState` warms each shape the worker will see
  (``warm_shapes``) at start, then switches torch to ``eager_on_recompile``: a shape that was not
  warmed (or a request with LoRAs, which changes the UNet) runs eagerly instead of stalling the
  worker for a recompile (which could outlast its batch lease). Such renders are counted
  (``cold_renders``), and so are graphs compiled after warm-up (``recompiles``, 0 by design).

SDPA (flash attention on Hopper) is diffusers' default attention, and channels_last is set in
``models.loading``; neither needs a setting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from farm.config import Settings
from farm.errors import ModelNotFoundError
from models.registry import ModelSpec

log = logging.getLogger(__name__)

TINY_DECODERS = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl", "tiny": "madebyollin/taesd"}
Shape = tuple[int, int, int, bool]  # width, height, images in the batch, classifier-free guidance


def tiny_decoder_ref(spec: ModelSpec, settings: Settings) -> str | None:
    """The tiny decoder to load for ``spec``: ``auto`` picks TAESD or TAESDXL by family; empty: none."""
    ref = settings.tiny_decoder.strip()
    if not ref:
        return None
    return TINY_DECODERS.get(spec.family, TINY_DECODERS["sd15"]) if ref == "auto" else ref


def apply(pipe: Any, spec: ModelSpec, device: str, settings: Settings) -> None:
    """Fuse, swap the decoder, compile: whatever the settings ask for, in that order."""
    if settings.fuse_qkv:
        pipe.unet.fuse_qkv_projections()
        log.info("%s: fused QKV projections in the UNet", spec.name)
    ref = tiny_decoder_ref(spec, settings)
    if ref is not None:
        from diffusers import AutoencoderTiny

        from models.loading import from_pretrained, torch_dtype

        try:
            tiny = from_pretrained(AutoencoderTiny, ref, settings, "tiny decoder", dtype=torch_dtype(device))
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"{exc} (FARM_TINY_DECODER={settings.tiny_decoder})") from None
        if device.startswith("cuda"):
            tiny.to(memory_format=torch.channels_last)
        pipe.vae = tiny.to(device)
        log.warning("%s: decoding with the tiny decoder %s (FARM_TINY_DECODER): faster, different images",
                    spec.name, ref)
    if settings.compile != "none":
        kwargs: dict[str, Any] = {"backend": settings.compile_backend, "dynamic": False}
        if settings.compile_backend == "inductor":
            kwargs["mode"] = settings.compile_mode
        pipe.unet.compile(**kwargs)
        if settings.compile == "unet+vae":
            pipe.vae.decoder.compile(**kwargs)
        log.info("%s: torch.compile of %s (%s), compiled while warming up", spec.name, settings.compile, kwargs)


@contextmanager
def unfused_for_loras(pipe: Any, has_loras: bool) -> Iterator[None]:
    """Undo fused QKV projections while a request's LoRAs are loaded (they sit on the separate ones)."""
    fused = has_loras and getattr(pipe.unet, "original_attn_processors", None) is not None
    if fused:
        pipe.unet.unfuse_qkv_projections()
    try:
        yield
    finally:
        if fused:
            pipe.unet.fuse_qkv_projections()


def uncompiled(compiling: bool) -> AbstractContextManager[Any]:
    """Run compiled modules eagerly inside the block (a probe or a tiny warm-up must not compile a shape)."""
    return torch.compiler.set_stance("force_eager") if compiling else nullcontext()


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


class CompileState:
    """Which shapes were warmed, and what happened after warm-up (see the module doc)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.warm: set[Shape] = set()
        self.compile_seconds = 0.0
        self.cold_renders = 0
        self._graphs_after_warmup: int | None = None
        self._cold_logged: set[Shape] = set()

    @property
    def recompiles(self) -> int:
        """Graphs compiled since warm-up ended (0 in steady state)."""
        if self._graphs_after_warmup is None:
            return 0
        return compiled_graphs() - self._graphs_after_warmup

    def warmed(self, shapes: Sequence[Shape], seconds: float) -> None:
        """Warm-up is over: remember its shapes and stop compiling."""
        self.warm.update(shapes)
        self.compile_seconds += seconds
        self._graphs_after_warmup = compiled_graphs()
        torch.compiler.set_stance("eager_on_recompile")
        log.info("compiled and warmed %d shape(s) in %.1f s (%d graphs): %s", len(self.warm), seconds,
                 self._graphs_after_warmup, ", ".join(describe(s) for s in sorted(self.warm)))

    def check(self, shapes: Sequence[Shape], loras: bool) -> None:
        """Count the micro-batches about to run that no compiled graph serves (they run eagerly)."""
        if not self.enabled or self._graphs_after_warmup is None:
            return
        for shape in shapes:
            if shape in self.warm and not loras:
                continue
            self.cold_renders += 1
            if shape not in self._cold_logged or loras:
                self._cold_logged.add(shape)
                why = "a request with LoRAs" if loras else "a shape not warmed at start (FARM_WARM_SIZES)"
                log.warning("%s runs uncompiled: %s (%d cold render(s) so far)", describe(shape), why,
                            self.cold_renders)


def describe(shape: Shape) -> str:
    width, height, n, cfg = shape
    return f"{width}x{height} x{n}{' with CFG' if cfg else ''}"


def warm_shapes(sizes: Sequence[tuple[int, int]], batches: Sequence[int], cfg: bool) -> list[Shape]:
    """Every (size, batch, guidance) combination to warm: with ``cfg``, both with and without guidance."""
    modes = (False, True) if cfg else (False,)
    return [(w, h, n, m) for (w, h) in sizes for n in dict.fromkeys(batches) for m in modes]


def timed_warm_up(run: Any, shapes: Sequence[Shape], state: CompileState) -> float:
    """Run ``run(shape)`` for each shape, compiling as needed (the first call of a shape compiles it),
    then stop compiling; seconds taken."""
    t0 = time.perf_counter()
    with torch.compiler.set_stance("default"):
        for shape in shapes:
            started = time.perf_counter()
            run(shape)
            log.info("warmed %s in %.1f s", describe(shape), time.perf_counter() - started)
    took = time.perf_counter() - t0
    state.warmed(shapes, took)  # after the block: leaving it restores the stance it found
    return took
