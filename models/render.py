"""Render one batch of a request, top to bottom in the order of a diffusers ``__call__``.

1. check inputs   2. expand the prompt   3. apply the request's LoRAs/embeddings
4. one CPU ``torch.Generator`` per image, seeded ``seed + index``   5. denoise and decode
6. unload LoRAs/embeddings (always)   7. safety check, black out what is flagged

Image ``i`` of a request always uses seed ``seed + i`` and its own generator, which draws both
its initial latents and the LCM scheduler's per-step noise; generators live on the CPU so the
noise is the same on every device. The noise alone does not make an image independent of its
batch, though: on CPU, oneDNN convolutions and MKL's one-row GEMV (``Linear`` on a ``[B, C]``
input, e.g. the time embedding) sum in a different order for batch 1 than for batch 4, which
moves values by ~1e-6 and, now and then, a pixel by one level. So ``micro_batch`` images go
through the pipeline at a time: the renderer uses 1 on CPU, where rendering indices
``[0, 1, 2, 3]`` together is then byte-identical to rendering each alone (checked by
``tests/test_models.py``), and ``spec.max_batch`` on GPUs, where throughput needs the batch
and an image may differ from its solo render by such a level (cuDNN/cuBLAS also pick kernels
by shape).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from farm.config import Settings
from farm.errors import RenderError
from farm.schemas import GenerateInput
from models.adapters import request_adapters
from models.prompt import expand_prompt
from models.registry import ModelSpec
from models.rendered import RenderedImage, RenderResult
from models.safety import SafetyCheckers, black_like

log = logging.getLogger(__name__)


def _accepts(pipe: Any, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def _uses_cfg(pipe: Any, guidance_scale: float) -> bool:
    """Whether the pipeline runs classifier-free guidance (so a negative prompt matters)."""
    embeds_guidance = getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None
    return guidance_scale > 1.0 and not embeds_guidance and _accepts(pipe, "negative_prompt")


def check_inputs(spec: ModelSpec, params: GenerateInput, seed: int, indices: Sequence[int],
                 safety: SafetyCheckers) -> None:
    if params.model_name != spec.name:
        raise RenderError(f"this worker serves {spec.name!r}, not {params.model_name!r}")
    if not indices:
        raise RenderError("no image indices to render")
    if len(set(indices)) != len(indices):
        raise RenderError(f"image indices must be distinct (got {list(indices)})")
    bad = [i for i in indices if not 0 <= i < params.num_images]
    if bad:
        raise RenderError(f"image indices {bad} outside 0..{params.num_images - 1} (num_images)")
    if seed < 0 or seed + max(indices) >= 2**63:
        raise RenderError(f"seed {seed} out of range")
    width, height = params.size
    if width % 8 or height % 8:
        raise RenderError(f"image size {width}x{height} must be a multiple of 8")
    if params.enable_safety_checker:
        safety.require(params.safety_checker_version)


def _pipe_kwargs(pipe: Any, params: GenerateInput) -> dict[str, Any]:
    """The pipeline arguments shared by every micro-batch (prompts are added per batch)."""
    width, height = params.size
    kwargs: dict[str, Any] = {
        "height": height,
        "width": width,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "output_type": "pil",
    }
    if params.negative_prompt:
        if _uses_cfg(pipe, params.guidance_scale):
            kwargs["negative_prompt"] = params.negative_prompt
        elif not _accepts(pipe, "negative_prompt") or getattr(pipe.unet.config, "time_cond_proj_dim", None):
            log.warning("%s has no negative prompt (LCM-distilled, guidance is embedded): ignored",
                        type(pipe).__name__)
        else:
            log.info("negative_prompt has no effect with guidance_scale <= 1 (no classifier-free guidance)")
    if _accepts(pipe, "guidance_rescale"):
        kwargs["guidance_rescale"] = params.guidance_rescale
    return kwargs


def render(pipe: Any, safety: SafetyCheckers, spec: ModelSpec, settings: Settings,
           params: GenerateInput, seed: int, indices: Sequence[int], micro_batch: int) -> RenderResult:
    """Render images ``indices`` of request ``params``; image ``i`` uses seed ``seed + i``.

    At most ``micro_batch`` images go through the pipeline at once (see the module doc).
    """
    # 1. Check inputs
    indices = list(indices)
    check_inputs(spec, params, seed, indices, safety)

    # 2. Expand the prompt
    prompt = expand_prompt(params.prompt) if params.expand_prompt else params.prompt

    kwargs = _pipe_kwargs(pipe, params)
    pil_images: list[Image.Image] = []
    # 3. Apply the request's LoRAs and embeddings (6. unloaded on the way out, whatever happens)
    with request_adapters(pipe, params, settings):
        t0 = time.perf_counter()
        for start in range(0, len(indices), micro_batch):
            chunk = indices[start : start + micro_batch]
            # 4. One generator per image, on the CPU, seeded seed + index
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in chunk]
            # 5. Denoise and decode
            batch = {**kwargs, "prompt": [prompt] * len(chunk), "generator": generators}
            if "negative_prompt" in kwargs:
                batch["negative_prompt"] = [kwargs["negative_prompt"]] * len(chunk)
            pil_images.extend(pipe(**batch).images)
        inference_seconds = time.perf_counter() - t0

    # 7. Safety check: flagged images become black images of the same size
    if params.enable_safety_checker:
        flags = safety.check(pil_images, params.safety_checker_version)
    else:
        flags = [False] * len(pil_images)
    share = inference_seconds / len(indices)
    images = [
        RenderedImage(index=i, seed=seed + i, image=black_like(img) if flagged else img,
                      nsfw=flagged, render_seconds=share)
        for i, img, flagged in zip(indices, pil_images, flags, strict=True)
    ]
    return RenderResult(images=images, prompt=prompt, inference_seconds=inference_seconds)
