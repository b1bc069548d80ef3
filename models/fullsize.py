"""Full-size SD1.5 and SDXL architectures with RANDOM weights, written locally in diffusers layout.

No weights can be downloaded on our machines, yet GPU benchmarks need the real FLOPs and memory.
So this writes, under a model folder, what ``FARM_MODEL_DIR`` would hold for the real repos
(``model_index.json`` + one folder per component, safetensors, the ``fp16`` variant by default),
from the real repos' configs: the SD1.5 UNet (860M parameters), the SDXL UNet (2.6B, ``text_time``
added embeddings), their VAEs, CLIP ViT-L/14 and OpenCLIP bigG text encoders, random LCM-LoRAs
(rank 64, on the attention and feed-forward projections), LCM-distilled UNets
(``time_cond_proj_dim=256``), both safety checkers (CLIP ViT-L/14 vision, ViT-base) and the
TAESD/TAESDXL tiny decoders. They then load through ``models.loading`` like real weights.
Their images are noise. The tokenizer is the tiny model's byte-level CLIP vocabulary
(``models.tiny.write_tokenizer_files``): prompts are padded to 77 tokens as with the real one,
so the text encoders do the same work.

    python -m models.fullsize --out DIR [--family sd15 --family sdxl] [--distilled sd15] [--device cuda] [--small]

``--small`` scales every width and depth down (same classes, same layout, same loading path),
for CPU tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models.registry import BUILTIN, SD15_BASE, SDXL_BASE
from models.tiny import write_tokenizer_files

log = logging.getLogger(__name__)

# Repo ids the writer fills (paths under the model folder), beside the two base models.
LORAS = {"sd15": BUILTIN[SD15_BASE].lora, "sdxl": BUILTIN[SDXL_BASE].lora}
DISTILLED_UNETS = {"sd15": "farm-random/lcm-sd15-unet", "sdxl": "latent-consistency/lcm-sdxl"}
TINY_DECODERS = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
SAFETY_V1 = "CompVis/stable-diffusion-safety-checker"
SAFETY_V2 = "Falconsai/nsfw_image_detection"
LORA_RANK = 64
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TOKEN_IDS = {"bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}  # models.tiny's byte-level vocab
SMALL_VIT = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
             "patch_size": 8}


def extra_models() -> dict[str, dict[str, str]]:
    """``FARM_EXTRA_MODELS`` entries for the LCM-distilled variants this writer makes."""
    return {
        "farm-random/lcm-sd15": {"family": "sd15", "kind": "distilled", "repo": SD15_BASE,
                                 "unet": DISTILLED_UNETS["sd15"]},
        "farm-random/lcm-sdxl": {"family": "sdxl", "kind": "distilled", "repo": SDXL_BASE,
                                 "unet": DISTILLED_UNETS["sdxl"]},
    }


def unet_config(family: str, distilled: bool = False, small: bool = False) -> dict[str, Any]:
    """The UNet config of the real repo (``unet/config.json``), or a narrow one of the same layout."""
    cfg: dict[str, Any]
    if family == "sd15":
        cfg = {
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
            "cross_attention_dim": 768, "sample_size": 64,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        }
        if small:
            cfg.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, cross_attention_dim=32)
    else:
        cfg = {
            "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,  # text_encoder_2's projection + 6 time ids x 256
        }
        if small:
            cfg.update(block_out_channels=[32, 64, 64], layers_per_block=1, attention_head_dim=[2, 4, 4],
                       transformer_layers_per_block=[1, 1, 2], cross_attention_dim=64, addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=32 + 6 * 8)
    cfg.update(in_channels=4, out_channels=4, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
    if distilled:
        cfg["time_cond_proj_dim"] = 256
    return cfg


def vae_config(family: str, small: bool = False) -> dict[str, Any]:
    """``vae/config.json`` of the real repo: four levels, 8x downsampling; SDXL's differs in its scaling."""
    return {
        "block_out_channels": [32, 32, 32, 32] if small else [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1 if small else 2,
        "norm_num_groups": 32, "sample_size": 1024 if family == "sdxl" else 512,
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
        "force_upcast": family == "sdxl",  # the stock SDXL VAE overflows in fp16; diffusers decodes it in fp32
    }


def text_config(which: str, small: bool = False) -> dict[str, Any]:
    """CLIP ViT-L/14's text tower (``clip-l``, SD1.5 and SDXL's first encoder) or OpenCLIP bigG's (``clip-g``)."""
    if which == "clip-l":
        cfg = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
               "projection_dim": 768, "hidden_act": "quick_gelu"}
        if small:
            cfg.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                       projection_dim=32)
    else:
        cfg = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
               "projection_dim": 1280, "hidden_act": "gelu"}
        if small:
            cfg.update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                       projection_dim=32)
    vocab = 514 if small else 49408  # small: the byte-level tokenizer's own size (models.tiny)
    return {**cfg, "vocab_size": vocab, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
            **TOKEN_IDS}


def scheduler_config(family: str) -> dict[str, Any]:
    """The noise schedule both families were trained with (the loader swaps in ``LCMScheduler`` with it)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
            "timestep_spacing": "leading" if family == "sdxl" else "linspace"}


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer_files(Path(tok_dir))
        return CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)


def _text_encoder(which: str, small: bool, tokenizer: Any, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**text_config(which, small))
    assert [config.bos_token_id, config.eos_token_id] == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _save(model: Any, folder: Path, dtype: torch.dtype) -> None:
    if dtype == torch.float16:
        model.half()  # (diffusers' ``to(dtype)`` warns about modules meant for float32: these have none)
    model.to("cpu")
    model.save_pretrained(folder, variant="fp16" if dtype == torch.float16 else None, safe_serialization=True)


def write_pipeline(out: Path, family: str, *, dtype: torch.dtype = torch.float16, device: str = "cpu",
                   small: bool = False) -> Path:
    """The base model's pipeline folder (as ``runwayml/stable-diffusion-v1-5`` or the SDXL base repo)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import EulerDiscreteScheduler, PNDMScheduler

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        parts: dict[str, Any] = {"unet": UNet2DConditionModel(**unet_config(family, small=small)),
                                 "vae": AutoencoderKL(**vae_config(family, small))}
        parts["text_encoder"] = _text_encoder("clip-l", small, tokenizer, projection=False)
        if family == "sdxl":
            parts["text_encoder_2"] = _text_encoder("clip-g", small, tokenizer, projection=True)
    for name, model in parts.items():
        _save(model, out / name, dtype)
    tokenizers = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
    for name in tokenizers:
        tokenizer.save_pretrained(out / name)
    scheduler = (EulerDiscreteScheduler if family == "sdxl" else PNDMScheduler).from_config(scheduler_config(family))
    scheduler.save_pretrained(out / "scheduler")
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if family == "sdxl":
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:  # as in the real repo (plain diffusers runs it); the farm passes None and runs FARM_SAFETY_CHECKER_V1
        write_safety_checker(out / "safety_checker", "v1", dtype=dtype, device=device, small=small,
                             processor_out=out / "feature_extractor")
        index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                     feature_extractor=["transformers", "CLIPImageProcessor"])
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def write_distilled_unet(out: Path, family: str, *, dtype: torch.dtype = torch.float16, device: str = "cpu",
                         small: bool = False) -> Path:
    """An LCM-distilled UNet repo (as ``latent-consistency/lcm-sdxl``): guidance embedded, one pass per step."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(family, distilled=True, small=small))
    _save(unet, out, dtype)
    return out


def lora_state_dict(family: str, small: bool = False, rank: int = LORA_RANK) -> dict[str, torch.Tensor]:
    """A random LCM-LoRA for the UNet in diffusers' PEFT layout (``unet.<module>.lora_A/B.weight``).

    The UNet is built on the meta device (no memory) to find the projection layers and their shapes;
    ``lora_B`` is small, so the fused weights stay near the base ones.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**unet_config(family, small=small))
    gen = torch.Generator().manual_seed(2)
    rank = min(rank, 4) if small else rank
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            out_f, in_f = module.weight.shape
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            state[f"unet.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * (0.01 / rank**0.5)
    return state


def write_lora(out: Path, family: str, *, dtype: torch.dtype = torch.float16, small: bool = False) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in lora_state_dict(family, small).items()}
    save_file(state, str(out / "pytorch_lora_weights.safetensors"))
    return out


def _safety_v1(small: bool) -> tuple[Any, Any]:
    """CompVis's checker: CLIP ViT-L/14's vision tower. Its concept embeddings stay at their initial
    values, so the random checker never flags."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
              "patch_size": 14, "image_size": 224}
    if small:
        vision = {**SMALL_VIT, "image_size": 32}
    side = vision["image_size"]
    model = StableDiffusionSafetyChecker(CLIPConfig(text_config=text_config("clip-l", small), vision_config=vision,
                                                    projection_dim=32 if small else 768))
    return model, CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def _safety_v2(small: bool) -> tuple[Any, Any]:
    """A ViT-base image classifier labelled normal/nsfw (as ``Falconsai/nsfw_image_detection``)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    vit: dict[str, Any] = {**SMALL_VIT, "image_size": 32} if small else {
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "patch_size": 16, "image_size": 224}
    config = ViTConfig(**vit, id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    side = vit["image_size"]
    return ViTForImageClassification(config), ViTImageProcessor(size={"height": side, "width": side})


def write_safety_checker(out: Path, version: str, *, dtype: torch.dtype = torch.float16, device: str = "cpu",
                         small: bool = False, processor_out: Path | None = None) -> Path:
    """Safety checker ``v1`` or ``v2``, with its image processor in the same folder (or ``processor_out``)."""
    torch.manual_seed(3)
    with torch.device(device):
        model, processor = (_safety_v1 if version == "v1" else _safety_v2)(small)
    _save(model, out, dtype)
    processor.save_pretrained(processor_out or out)
    return out


def write_tiny_decoder(out: Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """TAESD's (and TAESDXL's: same architecture) ``AutoencoderTiny`` with random weights."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(4)
    _save(AutoencoderTiny(), out, dtype)
    return out


def write_all(model_dir: Path, families: list[str], *, dtype: torch.dtype = torch.float16, device: str = "cpu",
              small: bool = False, distilled: list[str] | None = None) -> dict[str, float]:
    """Everything the farm loads for ``families``, at repo-id paths under ``model_dir`` (the LCM-distilled UNets
    of the ``distilled`` families only, default all); seconds per part."""
    took: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        took[name] = round(time.perf_counter() - t0, 2)
        log.info("wrote %s in %.1f s", name, took[name])

    for family in families:
        base = SDXL_BASE if family == "sdxl" else SD15_BASE
        timed(base, write_pipeline, model_dir / base, family, dtype=dtype, device=device, small=small)
        timed(str(LORAS[family]), write_lora, model_dir / str(LORAS[family]), family, dtype=dtype, small=small)
        if distilled is None or family in distilled:
            timed(DISTILLED_UNETS[family], write_distilled_unet, model_dir / DISTILLED_UNETS[family], family,
                  dtype=dtype, device=device, small=small)
        timed(TINY_DECODERS[family], write_tiny_decoder, model_dir / TINY_DECODERS[family], dtype=dtype)
    for version, repo in (("v1", SAFETY_V1), ("v2", SAFETY_V2)):
        timed(repo, write_safety_checker, model_dir / repo, version, dtype=dtype, device=device, small=small)
    return took


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.fullsize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the model folder (use it as FARM_MODEL_DIR)")
    parser.add_argument("--family", action="append", choices=["sd15", "sdxl"], help="default: both")
    parser.add_argument("--device", default="cpu", help="where the random weights are made (cuda is much faster)")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="fp16: the fp16 variant files")
    parser.add_argument("--small", action="store_true", help="narrow, shallow versions of the same layout")
    parser.add_argument("--distilled", action="append", choices=["sd15", "sdxl", "none"],
                        help="the families whose LCM-distilled UNet to write (default: every family written)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    took = write_all(args.out, args.family or ["sd15", "sdxl"], dtype=torch.float16 if args.dtype == "fp16"
                     else torch.float32, device=args.device, small=args.small, distilled=args.distilled)
    print(json.dumps({"model_dir": str(args.out), "seconds": took, "extra_models": extra_models()}))


if __name__ == "__main__":
    main()
