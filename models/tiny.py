"""The built-in ``farm/tiny-lcm`` model and its tiny safety checkers.

Tiny random weights in the shapes of diffusers' own fast tests (``get_dummy_components``),
seeded with ``torch.manual_seed(0)``: a two-level UNet, a five-layer CLIP text encoder of
width 32, a byte-level CLIP tokenizer whose ``vocab.json`` and ``merges.txt`` are generated
here (no hub), and a narrow four-level VAE that downsamples by 8 like a real one. Its images
are noise, fast noise: on a 2-core CPU a 4-image 64x64 render takes ~0.1 s, 512x512 ~1 s.

Everything is written once with ``save_pretrained`` under ``settings.builtin_model_dir``
(into a temporary folder, then renamed into place, so two processes racing are safe) and is
always loaded back through the same ``from_pretrained`` path as real weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from farm.config import Settings

log = logging.getLogger(__name__)

TINY_PIPELINE_DIR = "tiny-lcm"
TINY_SAFETY_DIRS = {"v1": "tiny-safety-v1", "v2": "tiny-safety-v2"}
TINY_HIDDEN = 32  # text encoder width = UNet cross-attention width
TINY_IMAGE_SIDE = 32  # input side of the tiny safety checkers
RECIPE_FILE = "farm-builtin.txt"
RECIPE = "2"  # bump when the weights written here change, so old folders are rewritten

_write_lock = threading.Lock()  # threads share torch's global seed; processes race safely anyway


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def write_tokenizer_files(folder: Path) -> None:
    """Write a byte-level CLIP ``vocab.json`` (514 entries) and a header-only ``merges.txt``.

    The vocab holds the 256 byte characters, their end-of-word (``</w>``) forms, then
    ``<|startoftext|>`` (512) and ``<|endoftext|>`` (513), in the order of CLIP's own vocab.
    Without merges every character is its own token, which is all a tiny model needs.
    """
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _save_tiny_pipeline(target: Path) -> None:
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer_files(Path(tok_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_HIDDEN,
    )
    scheduler = LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.manual_seed(0)
    # Unlike the tests' two-level VAE (which downsamples by 2), four levels downsample by 8 as
    # in real SD: the latents of a 1024x1024 image are 128x128, not 512x512 (with attention over
    # them), which is the difference between seconds and half an hour on a CPU.
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
        mid_block_add_attention=False,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=TINY_HIDDEN,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),  # as in real CLIP: textual inversion grows both together
        )
    )
    pipe: Any = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(target)


def _save_tiny_safety_v1(target: Path) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = {"hidden_size": TINY_HIDDEN, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config=small,
        vision_config={**small, "image_size": TINY_IMAGE_SIDE, "patch_size": 8},
        projection_dim=TINY_HIDDEN,
    )
    torch.manual_seed(0)
    # Concept embeddings and thresholds stay at their initial ones: a cosine similarity is
    # below 1, so the tiny v1 checker never flags.
    StableDiffusionSafetyChecker(config).save_pretrained(target)
    CLIPImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIDE},
        crop_size={"height": TINY_IMAGE_SIDE, "width": TINY_IMAGE_SIDE},
    ).save_pretrained(target)


def save_tiny_safety_v2(target: Path, flag: bool = False) -> None:
    """Write a tiny ViT classifier with labels ``normal``/``nsfw``.

    Its classifier bias decides: ``flag=False`` (the built-in one) never flags, ``flag=True``
    always does (handy to test the blackout path with a real checker).
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=TINY_IMAGE_SIDE,
        patch_size=8,
        hidden_size=TINY_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    torch.manual_seed(0)
    model: Any = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([-20.0, 20.0] if flag else [20.0, -20.0]))
    model.save_pretrained(target)
    ViTImageProcessor(size={"height": TINY_IMAGE_SIDE, "width": TINY_IMAGE_SIDE}).save_pretrained(target)


def _current(folder: Path) -> bool:
    marker = folder / RECIPE_FILE
    return marker.is_file() and marker.read_text(encoding="utf-8") == RECIPE


def _write_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Create ``target`` with ``write`` unless it is there and current.

    Written into a temporary sibling, stamped with :data:`RECIPE`, then renamed into place
    (atomic): a process that loses a race to another keeps the winner's folder. A folder of an
    older recipe is moved aside and replaced.
    """
    if _current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        (tmp / RECIPE_FILE).write_text(RECIPE, encoding="utf-8")
        if target.exists() and not _current(target):
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
            try:
                os.rename(target, stale / target.name)
                log.info("replacing built-in weights of an older recipe at %s", target)
            except OSError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
            log.info("wrote built-in weights to %s", target)
        except OSError:
            if not _current(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_tiny_pipeline(settings: Settings) -> Path:
    """Folder of the built-in ``farm/tiny-lcm`` pipeline (diffusers layout), written if missing."""
    with _write_lock, torch.random.fork_rng(devices=[]):
        return _write_once(settings.builtin_model_dir / TINY_PIPELINE_DIR, _save_tiny_pipeline)


def ensure_tiny_safety(settings: Settings, version: str) -> Path:
    """Folder of the built-in tiny safety checker ``v1`` or ``v2``, written if missing."""
    writers: dict[str, Callable[[Path], None]] = {"v1": _save_tiny_safety_v1, "v2": save_tiny_safety_v2}
    with _write_lock, torch.random.fork_rng(devices=[]):
        return _write_once(settings.builtin_model_dir / TINY_SAFETY_DIRS[version], writers[version])
