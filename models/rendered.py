"""What a render returns: plain dataclasses, import-light (PIL only, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass
class RenderedImage:
    index: int
    seed: int  # seed + index
    image: Image.Image  # blacked out if flagged
    nsfw: bool  # False when the safety checker is disabled
    render_seconds: float  # this image's share of the batch time


@dataclass
class RenderResult:
    images: list[RenderedImage]
    prompt: str  # the prompt actually used (after expand_prompt)
    inference_seconds: float
