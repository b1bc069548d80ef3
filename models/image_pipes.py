"""The image-to-image and inpainting pipelines of a loaded model, derived from its text-to-image one.

``from_pipe`` builds a pipeline of another class around the *same* component objects (UNet, VAE,
text encoders, tokenizers, scheduler): no second copy of the weights, no reload (``loads`` stays 1).
Whatever acts on those modules acts on every task alike: LoRAs and embeddings loaded into the
text-to-image pipeline, fused QKV projections, a compiled UNet, a tiny decoder. Each derived pipeline
is built on first use and kept; callers hold the renderer's lock, as for any render.

The class is the family's own (not ``AutoPipelineFor…``): an LCM-distilled SD1.5 checkpoint loads as
``LatentConsistencyModelPipeline``, whose own image-to-image pipeline reads ``strength`` differently
(it always runs ``num_inference_steps`` steps); the Stable Diffusion pipelines run
``int(num_inference_steps * strength)`` of them on every model alike (``models.source_image.step_plan``),
and embed the guidance of an LCM UNet (``time_cond_proj_dim``) as the LCM pipeline does. Inpainting
uses the standard 4-channel UNet: diffusers blends the source's latents back outside the mask at
every step (``models.render`` then pastes the source's pixels back there, see its module doc).
"""

from __future__ import annotations

import logging
from typing import Any

from farm.errors import RenderError
from models.registry import Family
from models.rendered import TEXT_TO_IMAGE

log = logging.getLogger(__name__)

IMAGE_TO_IMAGE = "image-to-image"
INPAINTING = "inpainting"
TASKS = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINTING)

_SD = {IMAGE_TO_IMAGE: "StableDiffusionImg2ImgPipeline", INPAINTING: "StableDiffusionInpaintPipeline"}
_SDXL = {IMAGE_TO_IMAGE: "StableDiffusionXLImg2ImgPipeline", INPAINTING: "StableDiffusionXLInpaintPipeline"}


def pipeline_class_name(family: Family, task: str) -> str:
    """The diffusers class that renders ``task`` for a model of ``family``."""
    if task not in (IMAGE_TO_IMAGE, INPAINTING):
        raise RenderError(f"no derived pipeline for task {task!r} (one of {', '.join(TASKS)})")
    return (_SDXL if family == "sdxl" else _SD)[task]


class ImagePipelines:
    """One model's pipeline per task: the loaded text-to-image one, and those derived from it."""

    def __init__(self, pipe: Any, family: Family) -> None:
        self.pipe = pipe
        self.family = family
        self.built: dict[str, Any] = {}

    def get(self, task: str) -> Any:
        """The pipeline of ``task``, derived from the text-to-image one the first time it is asked for."""
        if task == TEXT_TO_IMAGE:
            return self.pipe
        if task not in self.built:
            import diffusers
            from diffusers.utils import logging as dlogging

            cls = getattr(diffusers, pipeline_class_name(self.family, task))
            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # from_pipe's cast below warns of a cast that changes nothing
            try:
                # from_pipe casts every shared module to ``dtype``, float32 unless told: an fp16 model
                # would be cast in place for every task. Its own dtype makes the cast a no-op.
                derived = cls.from_pipe(self.pipe, dtype=self.pipe.dtype)
            finally:
                dlogging.set_verbosity(level)
            derived.set_progress_bar_config(disable=True)
            self.built[task] = derived
            log.info("%s: %s derived from %s (shared components)", task, cls.__name__, type(self.pipe).__name__)
        return self.built[task]
