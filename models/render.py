"""Render one batch of a request, top to bottom in the order of a diffusers ``__call__``.

1. check inputs   2. expand the prompt   3. apply the request's LoRAs/embeddings
4. one CPU ``torch.Generator`` per image, seeded ``seed + index``   5. denoise, and queue the decode
6. unload LoRAs/embeddings (always)   7. pixels to images, safety check, black out what is flagged

Items with source images (``RenderItem.source``) render image-to-image or inpainting through the
pipeline derived from the loaded one (``models.image_pipes``); a batch holds one task and one step
plan (``models.source_image.step_plan``). Each image's generator also draws its VAE-encoding sample.
Inpainting: diffusers blends the source's latents back outside the mask at each step, but a VAE
round trip is not the identity (the tiny model's random VAE is far from it), so stage 7 pastes the
source's pixels back where the mask is black (grey blends): unmasked pixels are the source's
exactly. Then ``crop_output`` crops (``SourceImages.output_size``), and the safety check sees the
final image.

:func:`begin` does 1-6 and returns a :class:`Pending`; its ``result()`` does 7. :func:`render` is
both at once. A worker on a GPU calls ``result()`` in its uploader thread (``farm.render``), so the
CPU side of batch k (waiting for its pixels, PIL images, safety check, then JPEG encode and upload)
runs while the GPU denoises batch k+1. The VAE decode itself runs right after the denoising of its
batch, under the render lock: an fp16 decode's finite-value check waits for it (``models.decode``).

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
from models.decode import Decoded, Decoder
from models.image_pipes import INPAINTING, ImagePipelines
from models.prompt import expand_prompt
from models.registry import ModelSpec
from models.rendered import TEXT_TO_IMAGE, ProgressHook, RenderedImage, RenderItem, RenderResult, SourceImages, task_of
from models.safety import SafetyCheckers, black_like
from models.source_image import LCM_ORIGINAL_STEPS, StepPlan, step_plan
from models.speed import unfused_for_loras

log = logging.getLogger(__name__)


def _accepts(pipe: Any, name: str) -> bool:
    return name in inspect.signature(pipe.__call__).parameters


def uses_cfg(pipe: Any, guidance_scale: float) -> bool:
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


def check_sources(items: Sequence[RenderItem], max_steps: int) -> StepPlan | None:
    """One task per batch and, with source images, one step plan; each source has its request's size."""
    tasks = {task_of(i.source) for i in items}
    if len(tasks) > 1:
        raise RenderError(f"one batch mixes tasks {sorted(tasks)} (db.batches.compat_key keeps them apart)")
    plans = set()
    for item in items:
        source = item.source
        if source is None:
            continue
        size = item.params.size
        if source.image.size != size or (source.mask is not None and source.mask.size != size):
            raise RenderError(f"source images of {source.image.size} for a {size} render: size them with "
                              "models.source_image.prepare_sources")
        plans.add(step_plan(item.params.num_inference_steps, source.strength, max_steps))
    if len(plans) > 1:
        raise RenderError(f"one batch mixes step plans {sorted((p.pipeline_steps, p.steps_run) for p in plans)}")
    return plans.pop() if plans else None


def finish_source(image: Image.Image, source: SourceImages | None) -> Image.Image:
    """Inpainting: the source's pixels back where the mask is black (grey blends); then ``crop_output``."""
    if source is None:
        return image
    if source.mask is not None:
        image = Image.composite(image, source.image, source.mask)
    if source.output_size is not None and source.output_size != image.size:
        (width, height), (out_w, out_h) = image.size, source.output_size
        left, top = (width - out_w) // 2, (height - out_h) // 2
        image = image.crop((left, top, left + out_w, top + out_h))
    return image


def _pipe_kwargs(pipe: Any, params: GenerateInput) -> dict[str, Any]:
    """The pipeline arguments shared by every micro-batch (prompts are added per batch)."""
    width, height = params.size
    kwargs: dict[str, Any] = {
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "output_type": "latent",  # decoded by models.decode
    }
    if _accepts(pipe, "height"):  # image-to-image takes the size of its input image
        kwargs.update(height=height, width=width)
    if params.negative_prompt:
        if uses_cfg(pipe, params.guidance_scale):
            kwargs["negative_prompt"] = params.negative_prompt
        elif not _accepts(pipe, "negative_prompt") or getattr(pipe.unet.config, "time_cond_proj_dim", None):
            log.warning("%s has no negative prompt (LCM-distilled, guidance is embedded): ignored",
                        type(pipe).__name__)
        else:
            log.info("negative_prompt has no effect with guidance_scale <= 1 (no classifier-free guidance)")
    if _accepts(pipe, "guidance_rescale"):
        kwargs["guidance_rescale"] = params.guidance_rescale
    return kwargs


class Pending:
    """A batch whose denoising and decoding are queued; :meth:`result` finishes it (stage 7)."""

    def __init__(self, items: list[RenderItem], prompt: str, params: GenerateInput, safety: SafetyCheckers,
                 decoded: list[Decoded], inference_seconds: float) -> None:
        self.items = items
        self.prompt = prompt
        self.params = params
        self.safety = safety
        self.decoded = decoded
        self.inference_seconds = inference_seconds  # denoising (and, on a CPU, decoding)
        self.finish_seconds = 0.0  # waiting for the pixels, images, safety check: set by result()

    def __len__(self) -> int:
        return len(self.items)

    def result(self) -> RenderResult:
        t0 = time.perf_counter()
        pil_images = [finish_source(image, item.source) for item, image in
                      zip(self.items, (image for part in self.decoded for image in part.images()), strict=True)]
        # 7. Safety check: flagged images become black images of the same size
        if self.params.enable_safety_checker:
            flags = self.safety.check(pil_images, self.params.safety_checker_version)
        else:
            flags = [False] * len(pil_images)
        self.finish_seconds = time.perf_counter() - t0
        share = self.inference_seconds / len(self.items)
        images = [
            RenderedImage(index=item.index, seed=item.seed + item.index, image=black_like(img) if flagged else img,
                          nsfw=flagged, render_seconds=share, tag=item.tag)
            for item, img, flagged in zip(self.items, pil_images, flags, strict=True)
        ]
        return RenderResult(images=images, prompt=self.prompt, inference_seconds=self.inference_seconds)


def render(pipe: Any, safety: SafetyCheckers, spec: ModelSpec, settings: Settings,
           items: Sequence[RenderItem], micro_batch: int, on_progress: ProgressHook | None = None,
           decoder: Decoder | None = None, pipes: ImagePipelines | None = None) -> RenderResult:
    """Render ``items`` (see :func:`begin`) and finish them."""
    return begin(pipe, safety, spec, settings, items, micro_batch, on_progress, decoder, pipes).result()


def begin(pipe: Any, safety: SafetyCheckers, spec: ModelSpec, settings: Settings,
          items: Sequence[RenderItem], micro_batch: int, on_progress: ProgressHook | None = None,
          decoder: Decoder | None = None, pipes: ImagePipelines | None = None) -> Pending:
    """Denoise ``items`` (images of one request, or of several compatible ones) and queue their decoding;
    image ``i`` of a request uses seed ``seed + i``.

    At most ``micro_batch`` images go through the pipeline at once (see the module doc). Items of
    different requests must agree on everything but prompt, negative prompt, seed and source images
    (``db.batches.compat_key``; with sources, one task and one step plan, checked here); the first
    item's request supplies size, steps, guidance, LoRAs.
    ``on_progress`` is called after every denoising step and may raise to abort. Items with source
    images run through ``pipes`` (the derived pipelines of ``pipe``, kept by the renderer).
    """
    decoder = decoder or Decoder(pipe)
    # 1. Check inputs
    items = list(items)
    if not items:
        raise RenderError("no image indices to render")
    requests: dict[int, tuple[GenerateInput, int, list[int]]] = {}
    for item in items:
        requests.setdefault(id(item.params), (item.params, item.seed, []))[2].append(item.index)
    for params, seed, indices in requests.values():
        check_inputs(spec, params, seed, indices, safety)
    plan = check_sources(items, getattr(pipe.scheduler.config, "original_inference_steps", LCM_ORIGINAL_STEPS))
    first, source = items[0].params, items[0].source
    task = task_of(source)
    run = pipe if task == TEXT_TO_IMAGE else (pipes or ImagePipelines(pipe, spec.family)).get(task)

    # 2. Expand the prompts
    prompts = {key: expand_prompt(p.prompt) if p.expand_prompt else p.prompt for key, (p, _, _) in requests.items()}

    kwargs = _pipe_kwargs(run, first)
    if plan is not None and source is not None:  # one plan: the first strength gives every item's timesteps
        kwargs.update(num_inference_steps=plan.pipeline_steps, strength=source.strength)
    use_negative = uses_cfg(run, first.guidance_scale) and any(i.params.negative_prompt for i in items)
    if _accepts(run, "callback_on_step_end") and on_progress is not None:
        hook = on_progress

        def _step(_pipe: Any, _step: int, _timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            hook()
            return callback_kwargs

        kwargs["callback_on_step_end"] = _step
    decoded: list[Decoded] = []
    # 3. Apply the request's LoRAs and embeddings (6. unloaded on the way out, whatever happens); LoRA
    # layers sit on the separate Q/K/V projections, so fused ones (FARM_FUSE_QKV) are undone meanwhile
    with unfused_for_loras(pipe, bool(first.loras)), request_adapters(pipe, first, settings):
        t0 = time.perf_counter()
        for start in range(0, len(items), micro_batch):
            chunk = items[start : start + micro_batch]
            # 4. One generator per image, on the CPU, seeded seed + index
            generators = [torch.Generator("cpu").manual_seed(i.seed + i.index) for i in chunk]
            # 5. Denoise, then queue the decode
            batch = {**kwargs, "prompt": [prompts[id(i.params)] for i in chunk], "generator": generators}
            batch.pop("negative_prompt", None)
            if use_negative:
                batch["negative_prompt"] = [i.params.negative_prompt or "" for i in chunk]
            if task != TEXT_TO_IMAGE:
                batch["image"] = [i.source.image for i in chunk if i.source is not None]
            if task == INPAINTING:
                batch["mask_image"] = [i.source.mask for i in chunk if i.source is not None]
            decoded.append(decoder(run(**batch).images))
            if on_progress is not None:
                on_progress()
        inference_seconds = time.perf_counter() - t0
    return Pending(items, prompts[id(first)], first, safety, decoded, inference_seconds)
