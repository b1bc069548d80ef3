"""The model stack on the real built-in tiny model (CPU, no mocks): determinism, seeds,
batching, LoRAs, embeddings, safety checkers, prompt expansion, encoding, lookup errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from farm.config import Settings, reset_settings
from farm.errors import InvalidInputError, ModelNotFoundError, RenderError
from farm.schemas import GenerateInput
from models.encode import encode_image
from models.prompt import QUALITY_PHRASES, expand_prompt
from models.registry import SD15_BASE, SDXL_BASE, TINY_MODEL
from models.renderer import DiffusersRenderer, RenderResult
from models.tiny import RECIPE, RECIPE_FILE, _write_once, save_tiny_safety_v2

REPO = Path(__file__).resolve().parents[1]
DISTILLED = "test/tiny-lcm-distilled"
DISTILLED_SPEC = {"family": "sd15", "repo": SD15_BASE, "unet": "test/tiny-lcm-unet"}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings with data and files under a tmp dir; also the global ones (schema validators)."""
    data = tmp_path_factory.mktemp("models-data")
    files = data / "files"
    files.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("FARM_DATA_DIR", str(data))
    mp.setenv("FARM_FILES_ROOT", str(files))
    mp.setenv("FARM_EXTRA_MODELS", json.dumps({DISTILLED: DISTILLED_SPEC}))
    reset_settings()
    yield Settings(data_dir=data, files_root=files, extra_models={DISTILLED: DISTILLED_SPEC})
    mp.undo()
    reset_settings()


@pytest.fixture(scope="module")
def renderer(settings: Settings) -> DiffusersRenderer:
    return DiffusersRenderer.load(TINY_MODEL, device="cpu", settings=settings)


def params(**kw: Any) -> GenerateInput:
    base: dict[str, Any] = {
        "model_name": TINY_MODEL,
        "prompt": "a red fox in the snow",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 2,
        "guidance_scale": 1.0,
        "num_images": 4,
        "format": "png",
    }
    return GenerateInput(**{**base, **kw})


def pngs(result: RenderResult) -> list[bytes]:
    return [encode_image(img.image, "png")[0] for img in result.images]


def render_pngs(
    r: DiffusersRenderer, p: GenerateInput, seed: int = 7, indices: tuple[int, ...] = (0, 1, 2, 3)
) -> list[bytes]:
    return pngs(r.render(p, seed, list(indices)))


# -- determinism and seeds ----------------------------------------------------------------------


def test_same_seed_same_bytes_and_fresh_renderer(renderer: DiffusersRenderer, settings: Settings) -> None:
    p = params()
    first = render_pngs(renderer, p)
    assert render_pngs(renderer, p) == first
    fresh = DiffusersRenderer.load(TINY_MODEL, settings=settings)
    assert fresh.loads == 1 and renderer.loads == 1
    assert render_pngs(fresh, p) == first
    assert len(set(first)) == 4  # four different images


def test_same_bytes_in_another_process(renderer: DiffusersRenderer, settings: Settings, tmp_path: Path) -> None:
    """Another process, which also writes its own copy of the built-in weights."""
    p = params(guidance_scale=2.0, negative_prompt="blurry")
    expected = [hashlib.sha256(b).hexdigest() for b in render_pngs(renderer, p, seed=123)]
    script = (
        "import hashlib, json, sys\n"
        "from farm.config import Settings\nfrom farm.schemas import GenerateInput\n"
        "from models.renderer import DiffusersRenderer\nfrom models.encode import encode_image\n"
        "s = Settings(data_dir=sys.argv[1], files_root=sys.argv[2])\n"
        "p = GenerateInput.model_validate_json(sys.argv[3])\n"
        "res = DiffusersRenderer.load('farm/tiny-lcm', settings=s).render(p, 123, [0, 1, 2, 3])\n"
        "print(json.dumps([hashlib.sha256(encode_image(i.image, 'png')[0]).hexdigest() for i in res.images]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(settings.files_root), p.model_dump_json()],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
    assert (tmp_path / "builtin" / "tiny-lcm" / "model_index.json").is_file()


@pytest.mark.parametrize("cfg", [False, True], ids=["no-cfg", "cfg"])
def test_batch_equals_each_alone(renderer: DiffusersRenderer, cfg: bool) -> None:
    p = params(guidance_scale=2.5, negative_prompt="dark", guidance_rescale=0.5) if cfg else params()
    batch = render_pngs(renderer, p, seed=99)
    alone = [render_pngs(renderer, p, seed=99, indices=(i,))[0] for i in range(4)]
    assert batch == alone


def test_image_i_uses_seed_plus_i(renderer: DiffusersRenderer) -> None:
    p = params()
    a = renderer.render(p, 10, [2]).images[0]
    b = renderer.render(p, 12, [0]).images[0]
    assert (a.index, a.seed, b.index, b.seed) == (2, 12, 0, 12)
    assert encode_image(a.image, "png") == encode_image(b.image, "png")


def test_different_seeds_differ(renderer: DiffusersRenderer) -> None:
    p = params(num_images=1)
    assert render_pngs(renderer, p, seed=1, indices=(0,)) != render_pngs(renderer, p, seed=2, indices=(0,))


def test_negative_prompt_and_rescale_need_guidance(renderer: DiffusersRenderer) -> None:
    cfg = params(num_images=1, guidance_scale=3.0)
    base = render_pngs(renderer, cfg, indices=(0,))
    assert render_pngs(renderer, params(num_images=1, guidance_scale=3.0, negative_prompt="snow"), indices=(0,)) != base
    assert render_pngs(renderer, params(num_images=1, guidance_scale=3.0, guidance_rescale=0.7), indices=(0,)) != base
    # without classifier-free guidance (scale <= 1) the negative prompt has nothing to act on
    plain = params(num_images=1)
    assert render_pngs(renderer, plain, indices=(0,)) == render_pngs(
        renderer, params(num_images=1, negative_prompt="snow"), indices=(0,)
    )


def test_result_shape_and_timings(renderer: DiffusersRenderer) -> None:
    p = params(image_size={"width": 128, "height": 64}, num_images=3)
    res = renderer.render(p, 5, [1, 2])
    assert [(i.index, i.seed) for i in res.images] == [(1, 6), (2, 7)]
    assert all(i.image.size == (128, 64) and i.image.mode == "RGB" for i in res.images)
    assert res.inference_seconds > 0
    assert sum(i.render_seconds for i in res.images) == pytest.approx(res.inference_seconds)
    assert res.prompt == p.prompt


def test_bad_requests_fail_clearly(renderer: DiffusersRenderer) -> None:
    with pytest.raises(RenderError, match="indices"):
        renderer.render(params(num_images=2), 1, [2])
    with pytest.raises(RenderError, match="distinct"):
        renderer.render(params(), 1, [0, 0])
    with pytest.raises(RenderError, match="serves"):
        renderer.render(params(model_name=SD15_BASE), 1, [0])


# -- LoRAs and embeddings -----------------------------------------------------------------------


def _make_lora(settings: Settings) -> str:
    """A rank-4 LoRA on the tiny UNet's attention, random non-zero lora_B, diffusers format."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(settings.builtin_model_dir / "tiny-lcm" / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    folder = settings.effective_files_root / "loras" / "tiny"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True)
    return "loras/tiny/pytorch_lora_weights.safetensors"


def test_lora_changes_output_and_does_not_leak(renderer: DiffusersRenderer, settings: Settings) -> None:
    path = _make_lora(settings)
    base = params(num_images=2)
    baseline = render_pngs(renderer, base, indices=(0, 1))
    with_lora = render_pngs(renderer, params(num_images=2, loras=[{"path": path, "scale": 1.0}]), indices=(0, 1))
    assert with_lora[0] != baseline[0] and with_lora[1] != baseline[1]
    assert renderer.pipe.get_list_adapters() == {}
    assert render_pngs(renderer, base, indices=(0, 1)) == baseline


def test_embedding_changes_output_and_does_not_leak(renderer: DiffusersRenderer, settings: Settings) -> None:
    import torch
    from safetensors.torch import save_file

    folder = settings.effective_files_root / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    save_file({"emb_params": vectors}, folder / "tiny.safetensors")
    tokenizer, encoder = renderer.pipe.tokenizer, renderer.pipe.text_encoder
    vocab, rows = len(tokenizer), encoder.get_input_embeddings().weight.shape[0]

    base = params(num_images=1, prompt="a photo of <s0> <s1>")
    baseline = render_pngs(renderer, base, indices=(0,))
    emb = params(num_images=1, prompt="a photo of <s0> <s1>",
                 embeddings=[{"path": "embeddings/tiny.safetensors", "tokens": ["<s0>", "<s1>"]}])
    assert render_pngs(renderer, emb, indices=(0,)) != baseline
    assert (len(tokenizer), encoder.get_input_embeddings().weight.shape[0]) == (vocab, rows)
    assert render_pngs(renderer, base, indices=(0,)) == baseline
    # and a second use loads again (the tokens were really removed)
    assert render_pngs(renderer, emb, indices=(0,)) != baseline


def test_bad_lora_and_embedding_inputs(
    renderer: DiffusersRenderer, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import save_file

    folder = settings.effective_files_root / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.zeros(3, 32)}, folder / "three.safetensors")
    bad = params(num_images=1, embeddings=[{"path": "embeddings/three.safetensors", "tokens": ["<a>", "<b>"]}])
    with pytest.raises(InvalidInputError, match="3 vectors but 2 tokens"):
        renderer.render(bad, 1, [0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(settings.data_dir / "empty-hf-cache"))
    from farm import inputs

    with pytest.raises(ValueError, match="hub id 'nobody/missing-lora' is not in the Hugging Face cache"):
        inputs.fetch_one("loras.0.path", "nobody/missing-lora", "local", settings)  # the fetch stage
    with pytest.raises(InvalidInputError, match="loras.0.path: was not fetched before rendering"):
        renderer.render(params(num_images=1, loras=[{"path": "nobody/missing-lora"}]), 1, [0])  # never the worker
    # a LoRA for layers this model does not have: an error, or skipped with force=true
    (settings.effective_files_root / "loras").mkdir(exist_ok=True)
    nowhere = {"unet.nowhere.to_q.lora_A.weight": torch.ones(4, 32),
               "unet.nowhere.to_q.lora_B.weight": torch.ones(32, 4)}
    save_file(nowhere, settings.effective_files_root / "loras" / "nowhere.safetensors")
    with pytest.raises(InvalidInputError, match="does not fit"):
        renderer.render(params(num_images=1, loras=[{"path": "loras/nowhere.safetensors"}]), 1, [0])
    # a file that is not weights at all: an input error naming the field and the file's problem (force
    # does not skip it: it is not a LoRA that does not fit, it is no LoRA)
    (settings.effective_files_root / "loras" / "junk.bin").write_bytes(b"not a lora")
    (settings.effective_files_root / "loras" / "empty.safetensors").write_bytes(b"")
    (folder / "junk.safetensors").write_bytes(b"\xff" * 64)
    for path, problem in [
        ("loras/junk.bin", "the LoRA file 'loras/junk.bin' is neither a valid safetensors file (Error while "
                           "deserializing header: "),
        ("loras/empty.safetensors", "the LoRA file 'loras/empty.safetensors' is empty"),
    ]:
        with pytest.raises(InvalidInputError) as caught:
            renderer.render(params(num_images=1, loras=[{"path": path, "force": True}]), 1, [0])
        assert caught.value.field == "loras.0.path" and caught.value.reason.startswith(problem), caught.value
    with pytest.raises(InvalidInputError) as caught:
        renderer.render(params(num_images=1, embeddings=[{"path": "embeddings/junk.safetensors", "tokens": ["<j>"]}]),
                        1, [0])
    assert caught.value.field == "embeddings.0.path"
    assert caught.value.reason.startswith("the embedding file 'embeddings/junk.safetensors' is not a valid "
                                          "safetensors file ("), caught.value
    assert renderer.pipe.get_list_adapters() == {}
    forced = params(num_images=1, loras=[{"path": "loras/nowhere.safetensors", "force": True}])
    assert render_pngs(renderer, forced, indices=(0,)) == render_pngs(renderer, params(num_images=1), indices=(0,))
    assert renderer.pipe.get_list_adapters() == {}
    assert not any(not t.special for t in renderer.pipe.tokenizer.added_tokens_decoder.values())


# -- safety checkers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flagging(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> DiffusersRenderer:
    """The tiny model with a real (tiny) v2 ViT whose bias always says nsfw, and v1 missing."""
    folder = tmp_path_factory.mktemp("always-nsfw")
    save_tiny_safety_v2(folder, flag=True)
    s = Settings(data_dir=settings.data_dir, files_root=settings.files_root,
                 safety_checker_v2=str(folder), safety_checker_v1=str(folder / "no-such-checker"))
    return DiffusersRenderer.load(TINY_MODEL, settings=s)


def test_flagged_images_are_blacked_out(flagging: DiffusersRenderer) -> None:
    res = flagging.render(params(safety_checker_version="v2"), 3, [0, 1])
    assert [i.nsfw for i in res.images] == [True, True]
    for img in res.images:
        assert img.image.size == (64, 64) and img.image.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_builtin_checkers_pass_noise(renderer: DiffusersRenderer) -> None:
    for version in ("v1", "v2"):
        res = renderer.render(params(safety_checker_version=version), 3, [0, 1])
        assert [i.nsfw for i in res.images] == [False, False]
        assert all(i.image.getextrema() != ((0, 0), (0, 0), (0, 0)) for i in res.images)


def test_safety_disabled_means_no_check(flagging: DiffusersRenderer, renderer: DiffusersRenderer) -> None:
    p = params(safety_checker_version="v2", enable_safety_checker=False)
    res = flagging.render(p, 3, [0, 1])
    assert [i.nsfw for i in res.images] == [False, False]
    assert pngs(res) == render_pngs(renderer, p, seed=3, indices=(0, 1))


def test_missing_checker_fails_only_requests_that_ask_for_it(flagging: DiffusersRenderer) -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-checker"):
        flagging.render(params(safety_checker_version="v1"), 3, [0])
    assert flagging.render(params(safety_checker_version="v1", enable_safety_checker=False), 3, [0]).images


# -- prompt expansion ---------------------------------------------------------------------------


def test_expand_prompt_rule() -> None:
    assert expand_prompt("a cat") == "a cat, " + ", ".join(QUALITY_PHRASES)
    assert expand_prompt("  a cat,  ") == expand_prompt("a cat")
    once = expand_prompt("a fox, Sharp  Focus")
    assert once == "a fox, Sharp  Focus, highly detailed, high quality, professional lighting"
    assert expand_prompt(once) == once  # idempotent


def test_expand_prompt_is_what_renders(renderer: DiffusersRenderer) -> None:
    p = params(num_images=1, expand_prompt=True)
    res = renderer.render(p, 4, [0])
    assert res.prompt == expand_prompt(p.prompt)
    same = params(num_images=1, prompt=expand_prompt(p.prompt))
    assert pngs(res) == render_pngs(renderer, same, seed=4, indices=(0,))


# -- encoding -----------------------------------------------------------------------------------


def test_encode_image_deterministic_and_clean() -> None:
    img = Image.effect_noise((48, 32), 40).convert("RGB")
    tagged = img.copy()
    tagged.info.update({"comment": b"secret", "dpi": (300, 300)})
    for fmt, ctype, magic in (("png", "image/png", b"\x89PNG"), ("jpeg", "image/jpeg", b"\xff\xd8\xff")):
        data, content_type = encode_image(img, fmt)
        assert content_type == ctype and data.startswith(magic)
        assert encode_image(img, fmt) == (data, ctype)
        assert encode_image(tagged, fmt)[0] == data
        assert encode_image(img.convert("RGBA"), fmt)[0] == data
        assert Image.open(io.BytesIO(data)).size == (48, 32)
    png = Image.open(io.BytesIO(encode_image(img, "png")[0]))
    assert png.tobytes() == img.tobytes()
    with pytest.raises(ValueError):
        encode_image(img, "webp")  # type: ignore[arg-type]


# -- weights lookup -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", [SD15_BASE, SDXL_BASE])
def test_missing_real_model_names_where_it_looked(
    model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = Settings(data_dir=tmp_path / "data", model_dir=tmp_path / "models")
    with pytest.raises(ModelNotFoundError) as err:
        DiffusersRenderer.load(model, settings=s)
    msg = str(err.value)
    assert str(tmp_path / "models" / model) in msg
    assert "Hugging Face cache" in msg and "offline" in msg


@pytest.fixture
def model_dir(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A FARM_MODEL_DIR holding tiny stand-ins for SD1.5, its LCM-LoRA, the v1 checker and an
    LCM-distilled UNet, so the real-model loading paths run offline."""
    import torch
    from diffusers import UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "models"
    tiny = settings.builtin_model_dir
    shutil.copytree(tiny / "tiny-lcm", root / SD15_BASE)
    shutil.copytree(tiny / "tiny-safety-v1", root / "CompVis/stable-diffusion-safety-checker")
    lora = settings.effective_files_root / _make_lora(settings)
    (root / "latent-consistency/lcm-lora-sdv1-5").mkdir(parents=True)
    shutil.copy(lora, root / "latent-consistency/lcm-lora-sdv1-5" / lora.name)
    config = dict(UNet2DConditionModel.load_config(tiny / "tiny-lcm" / "unet"), time_cond_proj_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        UNet2DConditionModel.from_config(config).save_pretrained(root / "test/tiny-lcm-unet")
    return root


def test_lcm_lora_model_loads_from_model_dir(settings: Settings, model_dir: Path, renderer: DiffusersRenderer) -> None:
    s = settings.model_copy(update={"model_dir": model_dir})
    sd15 = DiffusersRenderer.load(SD15_BASE, settings=s)
    assert sd15.pipe.get_list_adapters() == {}  # LCM-LoRA fused, adapter layers gone
    p = params(model_name=SD15_BASE, num_images=1)
    base = render_pngs(sd15, p, indices=(0,))
    tiny = render_pngs(renderer, params(num_images=1), indices=(0,))
    assert base != tiny  # the fused LCM-LoRA changed the weights
    lora = "loras/tiny/pytorch_lora_weights.safetensors"
    assert render_pngs(sd15, params(model_name=SD15_BASE, num_images=1, loras=[{"path": lora}]), indices=(0,)) != base
    assert render_pngs(sd15, p, indices=(0,)) == base  # the user LoRA left, LCM stayed
    # v1 came from the model dir; v2 (Falconsai/nsfw_image_detection) is missing there
    assert not sd15.render(p, 1, [0]).images[0].nsfw
    with pytest.raises(ModelNotFoundError, match=str(model_dir / "Falconsai/nsfw_image_detection")):
        sd15.render(params(model_name=SD15_BASE, num_images=1, safety_checker_version="v2"), 1, [0])


def test_distilled_model_ignores_negative_prompt(
    settings: Settings, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = DiffusersRenderer.load(DISTILLED, settings=settings.model_copy(update={"model_dir": model_dir}))
    assert type(r.pipe).__name__ == "LatentConsistencyModelPipeline"
    assert r.pipe.unet.config.time_cond_proj_dim == 32
    p = params(model_name=DISTILLED, guidance_scale=4.0)
    plain = render_pngs(r, p, indices=(0, 1))
    negative = params(model_name=DISTILLED, guidance_scale=4.0, negative_prompt="x")
    with caplog.at_level("WARNING", logger="models.render"):
        assert render_pngs(r, negative, indices=(0, 1)) == plain
    assert "negative prompt" in caplog.text
    assert render_pngs(r, params(model_name=DISTILLED, guidance_scale=8.0), indices=(0, 1)) != plain  # embedded w


def test_builtin_weights_write_survives_a_lost_race(tmp_path: Path) -> None:
    target = tmp_path / "tiny"

    def other_process_wins(tmp: Path) -> None:
        (tmp / "mine").write_text("loser")
        target.mkdir()
        (target / "theirs").write_text("winner")
        (target / RECIPE_FILE).write_text(RECIPE)

    assert _write_once(target, other_process_wins) == target
    assert sorted(p.name for p in target.iterdir()) == sorted([RECIPE_FILE, "theirs"])
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # temp folder cleaned up
    # a folder of an older recipe is replaced
    (target / RECIPE_FILE).write_text("old")
    assert _write_once(target, lambda tmp: (tmp / "new").write_text("x")) == target
    assert sorted(p.name for p in target.iterdir()) == sorted([RECIPE_FILE, "new"])
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
