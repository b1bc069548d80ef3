"""Model registry: which ``model_name`` loads how. Import-light (no torch).

Every model belongs to a base-model family; each family has its own Celery queues
(``render.<key>.<lane>``), and a worker serves exactly one model.

``farm/hold`` (family ``hold``) is a STAND-IN, not a model: it holds each image for
``FARM_HOLD_MS`` milliseconds instead of computing and returns a flat image, so that
scheduling (fan-out, batching, lanes, leases) can be measured on a CPU machine as if a GPU
did the work. It is never a default; its workers never import torch (``models.hold``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from farm.config import Settings, get_settings
from farm.errors import UnknownModelError

Family = Literal["sdxl", "sd15", "tiny", "hold"]
Kind = Literal["lcm-lora", "distilled", "builtin"]

TINY_MODEL = "farm/tiny-lcm"
HOLD_MODEL = "farm/hold"  # stand-in for scheduling work: holds, does not render
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_BASE = "runwayml/stable-diffusion-v1-5"


@dataclass(frozen=True)
class ModelSpec:
    """How one model name is loaded and served."""

    name: str
    key: str  # queue key: render.<key>.<lane>
    family: Family
    kind: Kind
    repo: str  # diffusers repo id (or builtin name)
    lora: str | None = None  # LCM-LoRA repo id, for kind == "lcm-lora"
    unet: str | None = None  # LCM-distilled UNet repo id, optional for kind == "distilled"
    default_size: tuple[int, int] = (1024, 1024)
    max_batch: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


BUILTIN: dict[str, ModelSpec] = {
    SDXL_BASE: ModelSpec(
        name=SDXL_BASE,
        key="sdxl",
        family="sdxl",
        kind="lcm-lora",
        repo=SDXL_BASE,
        lora="latent-consistency/lcm-lora-sdxl",
        default_size=(1024, 1024),
        max_batch=8,
    ),
    SD15_BASE: ModelSpec(
        name=SD15_BASE,
        key="sd15",
        family="sd15",
        kind="lcm-lora",
        repo=SD15_BASE,
        lora="latent-consistency/lcm-lora-sdv1-5",
        default_size=(512, 512),
        max_batch=16,
    ),
    TINY_MODEL: ModelSpec(
        name=TINY_MODEL,
        key="tiny-lcm",
        family="tiny",
        kind="builtin",
        repo=TINY_MODEL,
        default_size=(64, 64),
        max_batch=16,
    ),
    # Stand-in for a GPU, for scheduling work only: sleeps FARM_HOLD_MS per image and returns
    # flat images (models.hold). Never a default.
    HOLD_MODEL: ModelSpec(
        name=HOLD_MODEL,
        key="hold",
        family="hold",
        kind="builtin",
        repo=HOLD_MODEL,
        default_size=(64, 64),
        max_batch=16,
        extra={"stand_in": True},
    ),
}


def all_models(settings: Settings | None = None) -> dict[str, ModelSpec]:
    """Built-in models plus those added by ``FARM_EXTRA_MODELS``.

    An extra entry looks like ``{"my/lcm-dreamshaper": {"family": "sd15", "repo":
    "SimianLuo/LCM_Dreamshaper_v7"}}`` (kind defaults to ``distilled``; ``key`` to the family).
    """
    settings = settings or get_settings()
    models = dict(BUILTIN)
    for name, raw in settings.extra_models.items():
        family = raw.get("family", "sd15")
        if family not in ("sdxl", "sd15"):
            raise ValueError(f"FARM_EXTRA_MODELS[{name!r}].family must be sdxl or sd15")
        models[name] = ModelSpec(
            name=name,
            key=str(raw.get("key", name.replace("/", "--").lower())),
            family=family,
            kind=raw.get("kind", "distilled"),
            repo=str(raw.get("repo", name)),
            lora=raw.get("lora"),
            unet=raw.get("unet"),
            default_size=(1024, 1024) if family == "sdxl" else (512, 512),
            max_batch=int(raw.get("max_batch", 8)),
        )
    return models


def get_model(name: str, settings: Settings | None = None) -> ModelSpec:
    models = all_models(settings)
    try:
        return models[name]
    except KeyError:
        known = ", ".join(sorted(models))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None
