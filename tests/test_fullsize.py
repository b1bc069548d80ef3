"""Random-weight SD1.5 and SDXL for GPU benchmarks (models.fullsize): the full-size layouts have the
real models' parameter counts (built on the meta device: no memory, no time), and the small versions of
the same layouts, written to a folder, load and render through the farm's own loading path."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from farm.config import Settings, reset_settings
from farm.schemas import GenerateInput
from models.fullsize import _safety_v1, _safety_v2, extra_models, text_config, unet_config, vae_config
from models.registry import SD15_BASE, SDXL_BASE
from models.renderer import DiffusersRenderer

REPO = Path(__file__).resolve().parents[1]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_full_size_layouts_have_the_real_parameter_counts() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        assert count(UNet2DConditionModel(**unet_config("sd15"))) == 859_520_964  # runwayml/stable-diffusion-v1-5
        assert count(UNet2DConditionModel(**unet_config("sdxl"))) == 2_567_463_684  # SDXL base 1.0
        assert count(AutoencoderKL(**vae_config("sdxl"))) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**text_config("clip-l")))) == 123_060_480  # ViT-L/14
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**text_config("clip-g")))) == 694_659_840  # bigG
        assert 303e6 < count(_safety_v1(False)[0]) < 305e6 and 85e6 < count(_safety_v2(False)[0]) < 87e6
    assert unet_config("sdxl", distilled=True)["time_cond_proj_dim"] == 256
    assert vae_config("sdxl")["force_upcast"] and not vae_config("sd15")["force_upcast"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The small versions, written by the command line as a GPU session would (fp32: CPU)."""
    folder = tmp_path_factory.mktemp("models")
    done = subprocess.run([sys.executable, "-m", "models.fullsize", "--out", str(folder), "--small", "--dtype",
                           "fp32"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["extra_models"] == extra_models()
    data = tmp_path_factory.mktemp("data")
    mp = pytest.MonkeyPatch()
    for name, value in {"FARM_DATA_DIR": str(data), "FARM_MODEL_DIR": str(folder), "HF_HUB_OFFLINE": "1",
                        "FARM_EXTRA_MODELS": json.dumps(extra_models())}.items():
        mp.setenv(name, value)
    reset_settings()
    yield folder
    mp.undo()
    reset_settings()


def test_written_like_the_real_repos(model_dir: Path) -> None:
    sd15 = json.loads((model_dir / SD15_BASE / "model_index.json").read_text())
    assert sd15["_class_name"] == "StableDiffusionPipeline"
    assert sd15["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    sdxl = json.loads((model_dir / SDXL_BASE / "model_index.json").read_text())
    assert sdxl["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert next((model_dir / SDXL_BASE / part).glob("*.safetensors")).is_file()
    assert (model_dir / "latent-consistency" / "lcm-lora-sdxl" / "pytorch_lora_weights.safetensors").is_file()
    assert (model_dir / "madebyollin" / "taesdxl" / "config.json").is_file()


@pytest.mark.parametrize("name", [SD15_BASE, SDXL_BASE, "farm-random/lcm-sd15"])
def test_small_versions_load_and_render_through_the_farm(model_dir: Path, name: str) -> None:
    """FARM_MODEL_DIR lookup, LCM-LoRA fused (or LCM UNet), LCMScheduler, safety checkers from the folder."""
    renderer = DiffusersRenderer.load(name, "cpu", Settings())
    assert type(renderer.pipe.scheduler).__name__ == "LCMScheduler" and not renderer.safety.missing
    if name == SDXL_BASE:
        assert renderer.pipe.unet.config.addition_embed_type == "text_time"
    p = GenerateInput(model_name=name, prompt="a lighthouse", image_size={"width": 64, "height": 64},
                      num_inference_steps=2, guidance_scale=1.5, num_images=2)
    assert [i.image.size for i in renderer.render(p, 1, [0, 1]).images] == [(64, 64)] * 2
