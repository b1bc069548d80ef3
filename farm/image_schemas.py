"""Inputs of ``fal-ai/fast-lcm-diffusion/image-to-image`` and ``/inpainting``, as fal-js types them
(``FastLcmDiffusionImageToImageInput``, ``FastLcmDiffusionInpaintingInput``): text-to-image's fields plus
the source image. Outputs are text-to-image's (:class:`farm.schemas.GenerateOutput`).

A leaf beside :mod:`farm.schemas` (pure pydantic, kept apart so that neither passes 400 lines). Which
task an input is follows from its fields (``mask_url``: inpainting, ``image_url``: image-to-image), so
the Celery task, the CLI and a row read back from the ledger need no task name of their own.

No ``image_size`` here means "the input image's size" (fal's rule): it is NOT resolved to the model's
default at admission, as text-to-image's is; the worker sizes the render from the image
(``models.source_image.prepare_sources``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import Field, model_validator

from farm.schemas import ADMITTED, GenerateInput

TEXT_TO_IMAGE = "text-to-image"
IMAGE_TO_IMAGE = "image-to-image"
INPAINTING = "inpainting"


class ImageToImageInput(GenerateInput):
    """Input of ``fal-ai/fast-lcm-diffusion/image-to-image``."""

    image_url: str = Field(..., description="The image to start from: an https:// URL, a data URI or a farm "
                           "upload URL (PNG, JPEG or WebP).")
    strength: float = Field(0.95, gt=0.0, le=1.0, description="How much of the image is repainted: of "
                            "num_inference_steps, int(num_inference_steps * strength) run (at least 1).")
    crop_output: bool = Field(False, description="Crop the output to the input image's aspect ratio.")
    preserve_aspect_ratio: bool = Field(False, description="With an image_size: fit the input inside it, "
                                        "aspect ratio kept, instead of covering and cropping it.")

    @model_validator(mode="after")
    def _model_size(self) -> Self:
        """No image_size: left empty (the input image's size, resolved by the worker)."""
        return self


class InpaintingInput(GenerateInput):
    """Input of ``fal-ai/fast-lcm-diffusion/inpainting``."""

    image_url: str = Field(..., description="The image to inpaint: an https:// URL, a data URI or a farm "
                           "upload URL (PNG, JPEG or WebP).")
    mask_url: str = Field(..., description="The mask, the image's size: white is repainted, black kept.")
    strength: float = Field(0.95, gt=0.0, le=1.0, description="How much of the masked area is repainted: of "
                            "num_inference_steps, int(num_inference_steps * strength) run (at least 1).")

    @model_validator(mode="after")
    def _model_size(self) -> Self:
        """No image_size: left empty (the input image's size, resolved by the worker)."""
        return self


INPUT_CLASSES: dict[str, type[GenerateInput]] = {
    TEXT_TO_IMAGE: GenerateInput, IMAGE_TO_IMAGE: ImageToImageInput, INPAINTING: InpaintingInput,
}
SUBPATHS = (IMAGE_TO_IMAGE, INPAINTING)  # the app's endpoints besides its root (text-to-image)


def task_of_fields(data: Mapping[str, Any]) -> str:
    """The task raw fields ask for: ``mask_url`` makes inpainting, ``image_url`` image-to-image."""
    if "mask_url" in data:
        return INPAINTING
    return IMAGE_TO_IMAGE if "image_url" in data else TEXT_TO_IMAGE


def task_of_input(inp: GenerateInput) -> str:
    if isinstance(inp, InpaintingInput):
        return INPAINTING
    return IMAGE_TO_IMAGE if isinstance(inp, ImageToImageInput) else TEXT_TO_IMAGE


def image_fields(inp: GenerateInput) -> list[tuple[str, str]]:
    """(field, reference) of the input's source images: ``image_url`` then ``mask_url``."""
    return [(name, value) for name in ("image_url", "mask_url")
            if isinstance(value := getattr(inp, name, None), str)]


def weight_refs(inp: GenerateInput) -> list[tuple[str, str]]:
    """(field, path) of the input's LoRA and embedding weight files."""
    return ([(f"loras.{i}.path", x.path) for i, x in enumerate(inp.loras)]
            + [(f"embeddings.{i}.path", x.path) for i, x in enumerate(inp.embeddings)])


def file_refs(inp: GenerateInput) -> list[tuple[str, str]]:
    """(field, reference) of every file the input names: weights, then source images."""
    return weight_refs(inp) + image_fields(inp)


def admitted_input(data: Mapping[str, Any]) -> GenerateInput:
    """An input read back from the ledger, of the task its fields name (see :func:`farm.schemas.admitted_input`)."""
    return INPUT_CLASSES[task_of_fields(data)].model_validate(data, context=ADMITTED)
