"""Load a model's diffusers pipeline once: weights lookup, dtype, LCM scheduler, LCM-LoRA fusing.

Weights are looked up in ``settings.model_dir / <repo id>`` first (when that folder exists),
else the repo id goes to ``from_pretrained``, which reads the Hugging Face cache and, unless
``HF_HUB_OFFLINE`` is set, the hub. Weights found nowhere raise ``ModelNotFoundError`` naming
every place that was looked at.

| kind | family | pipeline |
| --- | --- | --- |
| ``builtin`` | tiny | ``StableDiffusionPipeline`` from the built-in folder (see ``models.tiny``) |
| ``lcm-lora`` | sd15 / sdxl | ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` + LCM-LoRA fused |
| ``distilled`` | sd15 / sdxl | ``LatentConsistencyModelPipeline`` / ``StableDiffusionXLPipeline``, optional LCM UNet |

All use ``LCMScheduler``; fp16 on CUDA (the ``fp16`` variant where a repo has one), fp32 on CPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from farm.config import Settings
from farm.errors import ModelNotFoundError
from models.registry import ModelSpec
from models.tiny import ensure_tiny_pipeline

log = logging.getLogger(__name__)

LCM_ADAPTER = "lcm"


def hub_offline() -> bool:
    """Whether hub downloads are off (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``, read now)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def torch_dtype(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


def _is_path(ref: str) -> bool:
    return Path(ref).is_absolute() or ref.startswith(".")


def cached_snapshot(repo_id: str) -> str | None:
    """The folder of ``repo_id``'s cached snapshot in the Hugging Face cache, or None."""
    from huggingface_hub import snapshot_download

    try:
        return str(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or not a valid repo id
        return None


def weights_source(ref: str, settings: Settings) -> str | None:
    """Where to load ``ref`` from: a path as given, ``model_dir / ref`` if it exists, else the
    repo id, or, when offline, its cached snapshot folder (None if not cached).

    Offline, a cache miss is decided here: ``from_pretrained`` of some libraries would still
    try the network (with retries) for optional files when the offline flag was set after import.
    """
    if _is_path(ref):
        return ref
    if settings.model_dir is not None:
        local = settings.model_dir / ref
        if local.exists():
            return str(local)
    return cached_snapshot(ref) if hub_offline() else ref


def not_found_message(what: str, ref: str, settings: Settings, cause: BaseException | None = None) -> str:
    """Name every place the weights of ``ref`` were looked for."""
    places = []
    if _is_path(ref):
        places.append(f"the folder {ref}")
    else:
        if settings.model_dir is not None:
            places.append(f"{settings.model_dir / ref} (FARM_MODEL_DIR)")
        else:
            places.append("no FARM_MODEL_DIR (not set)")
        places.append(f"the Hugging Face cache {hf_cache_dir()}")
        if hub_offline():
            places.append("no download (offline: HF_HUB_OFFLINE is set)")
        else:
            places.append("the Hugging Face hub (online)")
    msg = f"{what} {ref!r} not found; looked in: " + "; ".join(places)
    reason = _cause(cause) if cause is not None else None
    return f"{msg} ({reason})" if reason else msg


def _cause(exc: BaseException) -> str | None:
    """What a loader's error says about the weights, in the farm's words, without the loader's
    advice about its own arguments (``local_files_only``, "the stacktrace above")."""
    text = " ".join(str(exc).split())
    low = text.lower()
    if "connect" in low or "offline" in low or isinstance(exc, (ConnectionError, TimeoutError)):
        return "the Hugging Face hub could not be reached"
    if "not a valid model identifier" in low or "repository not found" in low or "gated" in low or "401" in low:
        return "the hub has no such public repo; a gated or private one needs `hf auth login`"
    if "no file named" in low:  # "Error no file named diffusion_pytorch_model.bin found in directory …"
        missing = text[low.index("no file named") + len("no file named"):].split(" found", 1)[0].strip()
        return f"incomplete: no file named {missing}"
    return None


def _present(ref: str, settings: Settings) -> bool:
    """Whether the weights of ``ref`` are on this machine (under FARM_MODEL_DIR or in the Hugging Face cache)."""
    if _is_path(ref):
        return Path(ref).exists()
    if settings.model_dir is not None and (settings.model_dir / ref).exists():
        return True
    return cached_snapshot(ref) is not None


# A diffusers pipeline repo holds one folder per component; its top-level single-file checkpoints
# (several GB each, e.g. v1-5-pruned.ckpt) are not what ``from_pretrained`` reads.
PIPELINE_FILES = ("model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors")


def download_help(spec: ModelSpec, settings: Settings) -> str:
    """What ``spec`` needs on this machine and the commands that download what is missing."""
    needed = [(spec.repo, "the base model" if spec.lora or spec.unet else "the model", True)]
    if spec.lora:
        needed.append((spec.lora, "its LCM-LoRA", False))
    if spec.unet:
        needed.append((spec.unet, "its LCM UNet", False))
    missing = [(ref, role, pipeline) for ref, role, pipeline in needed if not _is_path(ref)
               and not _present(ref, settings)]
    if not missing:
        return ""
    names = " and ".join(f"{ref} ({role})" for ref, role, _ in needed)
    which = {1: "it", 2: "both"}.get(len(missing), "them") if len(missing) == len(needed) else "what is missing"
    lines = [f"{spec.name} needs {names}; download {which} with:"]
    for ref, _role, pipeline in missing:
        command = f"hf download {ref}"
        if pipeline:
            command += "".join(f' --include "{pattern}"' for pattern in PIPELINE_FILES)
        if settings.model_dir is not None:
            command += f" --local-dir {settings.model_dir / ref}"
        lines.append(f"    {command}")
    where = (f"into FARM_MODEL_DIR ({settings.model_dir})" if settings.model_dir is not None
             else f"into the Hugging Face cache ({hf_cache_dir()})")
    note = f"(`hf` is huggingface_hub's command line, installed with the worker; the files go {where}"
    if hub_offline():
        note += "; HF_HUB_OFFLINE is set here, so run them where the hub is reachable"
    lines.append(note + "), then run the command again.")
    return "\n".join(lines)


def from_pretrained(cls: Any, ref: str, settings: Settings, what: str, variant: str | None = None,
                    **kwargs: Any) -> Any:
    """``cls.from_pretrained`` for ``ref`` with the farm's lookup rules and error.

    With a ``variant`` it is tried first, then without (not every repo has fp16 files).
    """
    source = weights_source(ref, settings)
    if source is None:
        raise ModelNotFoundError(not_found_message(what, ref, settings))
    attempts = [variant, None] if variant else [None]
    error: BaseException | None = None
    for v in attempts:
        try:
            return cls.from_pretrained(source, **({"variant": v} if v else {}), **kwargs)
        except (OSError, ValueError) as exc:
            error = exc
            log.debug("loading %s from %s (variant %s) failed: %s", what, source, v, exc)
    raise ModelNotFoundError(not_found_message(what, ref, settings, error)) from error


def _quiet() -> None:
    """No download/loading progress bars in worker logs."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()


def _fuse_lcm_lora(pipe: Any, spec: ModelSpec, settings: Settings) -> None:
    """Load LCM-LoRA, fuse it into the base weights, drop the adapter layers.

    Afterwards the plain weights carry LCM, and a request's own LoRAs can be loaded and
    unloaded without touching it.
    """
    assert spec.lora is not None, f"{spec.name}: kind lcm-lora needs a lora repo"
    source = weights_source(spec.lora, settings)
    if source is None:
        raise ModelNotFoundError(not_found_message("LCM-LoRA", spec.lora, settings))
    try:
        pipe.load_lora_weights(source, adapter_name=LCM_ADAPTER)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(not_found_message("LCM-LoRA", spec.lora, settings, exc)) from exc
    pipe.fuse_lora(adapter_names=[LCM_ADAPTER], lora_scale=1.0)
    pipe.unload_lora_weights()


def _load(spec: ModelSpec, dtype: torch.dtype, settings: Settings) -> Any:
    from diffusers import (
        LatentConsistencyModelPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    variant = "fp16" if dtype == torch.float16 else None
    no_checker = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if spec.family == "hold":
        raise ValueError(f"{spec.name} is a scheduling stand-in with no pipeline: use models.hold.HoldRenderer")
    if spec.kind == "builtin":
        folder = str(ensure_tiny_pipeline(settings))
        return from_pretrained(StableDiffusionPipeline, folder, settings, "model", None, dtype=dtype, **no_checker)
    cls: Any
    if spec.kind == "lcm-lora":
        cls = StableDiffusionXLPipeline if spec.family == "sdxl" else StableDiffusionPipeline
        extra = {} if spec.family == "sdxl" else no_checker
        pipe = from_pretrained(cls, spec.repo, settings, "model", variant, dtype=dtype, **extra)
        _fuse_lcm_lora(pipe, spec, settings)
        return pipe
    if spec.kind == "distilled":
        cls = StableDiffusionXLPipeline if spec.family == "sdxl" else LatentConsistencyModelPipeline
        extra = {} if spec.family == "sdxl" else no_checker
        if spec.unet:
            extra["unet"] = from_pretrained(
                UNet2DConditionModel, spec.unet, settings, "LCM UNet", variant, dtype=dtype
            )
        return from_pretrained(cls, spec.repo, settings, "model", variant, dtype=dtype, **extra)
    raise ValueError(f"{spec.name}: unknown model kind {spec.kind!r}")


def load_pipeline(spec: ModelSpec, device: str, settings: Settings) -> Any:
    """The ready pipeline of ``spec`` on ``device``, with ``LCMScheduler``."""
    from diffusers import LCMScheduler

    _quiet()
    dtype = torch_dtype(device)
    try:
        pipe = _load(spec, dtype, settings)
    except ModelNotFoundError as exc:  # where it looked, then how to fix it; not the loader's traceback
        help_text = download_help(spec, settings)
        raise ModelNotFoundError(f"{exc}.\n{help_text}" if help_text else str(exc)) from None
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.to(device)
    log.info("loaded %s (%s, %s) on %s as %s", spec.name, spec.kind, spec.family, device, type(pipe).__name__)
    return pipe
