"""Safety checkers: v1 (CompVis ``StableDiffusionSafetyChecker``) and v2 (a ViT classifier).

Both load when the renderer loads, from ``settings.safety_checker_v1`` / ``_v2`` (a hub id, a
folder under ``FARM_MODEL_DIR``, or a local folder). ``farm/tiny-lcm`` uses the built-in tiny
checkers (``models.tiny``) unless those settings are set explicitly. A checker whose weights
are missing is logged once at load; a request that asks for it then fails with
``ModelNotFoundError`` naming where it was looked for.

v2 flags an image when the label it predicts contains ``nsfw`` (case-insensitive).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from farm.config import Settings
from farm.errors import ModelNotFoundError
from models.loading import from_pretrained, torch_dtype
from models.registry import ModelSpec
from models.tiny import ensure_tiny_safety

log = logging.getLogger(__name__)

Version = Literal["v1", "v2"]
VERSIONS: tuple[Version, ...] = ("v1", "v2")


@dataclass
class _Checker:
    version: Version
    model: Any
    processor: Any
    source: str

    @torch.no_grad()
    def flags(self, images: list[Image.Image]) -> list[bool]:
        param = next(self.model.parameters())
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(device=param.device, dtype=param.dtype)
        if self.version == "v1":
            # The checker also blacks out what it flags in ``images``; we only want the flags
            # (blackout is done on the PIL images by the caller), so give it placeholders.
            placeholders = [np.zeros(1) for _ in images]
            _, has_nsfw = self.model(clip_input=pixels, images=placeholders)
            return [bool(x) for x in has_nsfw]
        logits = self.model(pixel_values=pixels).logits
        labels = self.model.config.id2label
        return ["nsfw" in str(labels[int(i)]).lower() for i in logits.argmax(-1).tolist()]


def _explicit(settings: Settings, version: Version) -> bool:
    return f"safety_checker_{version}" in settings.model_fields_set


def _load_one(version: Version, spec: ModelSpec, device: str, settings: Settings) -> _Checker:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import AutoImageProcessor, AutoModelForImageClassification, CLIPImageProcessor

    if spec.kind == "builtin" and not _explicit(settings, version):
        ref = str(ensure_tiny_safety(settings, version))
    else:
        ref = settings.safety_checker_v1 if version == "v1" else settings.safety_checker_v2
    what = f"safety checker {version}"
    model_cls = StableDiffusionSafetyChecker if version == "v1" else AutoModelForImageClassification
    proc_cls = CLIPImageProcessor if version == "v1" else AutoImageProcessor
    model = from_pretrained(model_cls, ref, settings, what, dtype=torch_dtype(device))
    processor = from_pretrained(proc_cls, ref, settings, f"{what} image processor")
    model.to(device).eval()
    return _Checker(version, model, processor, ref)


@dataclass
class SafetyCheckers:
    """The loaded checkers of one renderer, and why any is missing."""

    checkers: dict[str, _Checker] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, spec: ModelSpec, device: str, settings: Settings) -> SafetyCheckers:
        out = cls()
        for version in VERSIONS:
            try:
                out.checkers[version] = _load_one(version, spec, device, settings)
            except ModelNotFoundError as exc:
                out.missing[version] = str(exc)
                log.warning("%s: requests with safety_checker_version=%s will fail: %s", spec.name, version, exc)
        return out

    def require(self, version: str) -> None:
        """Raise ``ModelNotFoundError`` if checker ``version`` could not be loaded."""
        if version not in self.checkers:
            reason = self.missing.get(version, f"unknown safety checker version {version!r}")
            raise ModelNotFoundError(reason)

    def check(self, images: list[Image.Image], version: str) -> list[bool]:
        """Per image: whether checker ``version`` flags it."""
        self.require(version)
        return self.checkers[version].flags(images)


def black_like(image: Image.Image) -> Image.Image:
    """A black RGB image of the same size."""
    return Image.new("RGB", image.size, (0, 0, 0))
