"""What a render returns: plain dataclasses, import-light (PIL only, no torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from farm.schemas import GenerateInput

# Called between diffusion steps and between images; it may raise to abort the render.
ProgressHook = Callable[[], None]


@dataclass(frozen=True, eq=False)
class SourceImages:
    """The input images of an image-to-image (``mask`` None) or inpainting request, ready to render.

    Made by ``models.source_image.prepare_sources``: ``image`` (RGB) and ``mask`` (L, white = repaint)
    already have the request's render size (its ``image_size``); ``output_size`` is where ``crop_output``
    crops the result to (the render size without it). ``strength`` follows diffusers (see
    ``models.source_image.step_plan``).
    """

    image: Image.Image
    mask: Image.Image | None = None
    strength: float = 0.95
    output_size: tuple[int, int] | None = None

    @property
    def task(self) -> str:
        """``image-to-image`` or ``inpainting`` (fal's endpoint subpaths)."""
        return "image-to-image" if self.mask is None else "inpainting"


TEXT_TO_IMAGE = "text-to-image"


def task_of(source: SourceImages | None) -> str:
    """The task an item renders: ``text-to-image`` without source images."""
    return TEXT_TO_IMAGE if source is None else source.task


@dataclass(frozen=True)
class RenderItem:
    """One image to render: image ``index`` of the request ``params``, with seed ``seed + index``.

    Items of different requests may share a GPU batch when their requests agree on model,
    size, steps, guidance and LoRAs (``db.batches.compat_key``); ``tag`` says whose it is. With
    ``source`` images they must also agree on the task and the step plan
    (``models.source_image.step_plan``); the images themselves and the strength may differ.
    """

    params: GenerateInput
    seed: int  # the request's seed
    index: int
    tag: str = ""
    # image-to-image / inpainting: the request's input images (items of one batch share task and steps)
    source: SourceImages | None = None


@dataclass
class RenderedImage:
    index: int
    seed: int  # seed + index
    image: Image.Image  # blacked out if flagged
    nsfw: bool  # False when the safety checker is disabled
    render_seconds: float  # this image's share of the batch time
    tag: str = ""  # RenderItem.tag: the request it belongs to


@dataclass
class RenderResult:
    images: list[RenderedImage]
    prompt: str  # the prompt actually used (after expand_prompt)
    inference_seconds: float


class PendingRender(Protocol):
    """A batch handed over before it is finished: ``result()`` finishes it (``models.render.Pending``)."""

    inference_seconds: float

    def __len__(self) -> int: ...

    def result(self) -> RenderResult: ...


class Ready:
    """A render with nothing left to do: ``result()`` returns it."""

    def __init__(self, result: RenderResult) -> None:
        self._result = result
        self.inference_seconds = result.inference_seconds

    def __len__(self) -> int:
        return len(self._result.images)

    def result(self) -> RenderResult:
        return self._result
