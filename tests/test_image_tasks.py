"""Image-to-image and inpainting at the model layer, on the real built-in tiny model (CPU, no mocks):
the steps ``strength`` runs, seeds, the inpainting tolerance, the output size rules, the derived
pipelines sharing the loaded weights, and the bad-image battery of ``models.source_image``."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from farm.config import Settings, reset_settings
from farm.errors import InvalidInputError, RenderError
from farm.schemas import GenerateInput
from models.encode import encode_image
from models.hold import HoldRenderer
from models.image_pipes import IMAGE_TO_IMAGE, INPAINTING, ImagePipelines, pipeline_class_name
from models.registry import HOLD_MODEL, TINY_MODEL
from models.rendered import RenderItem, RenderResult, SourceImages
from models.renderer import DiffusersRenderer
from models.source_image import (
    StepPlan,
    decode_image,
    decode_mask,
    effective_steps,
    plan_size,
    prepare_sources,
    step_plan,
)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    data = tmp_path_factory.mktemp("image-tasks-data")
    mp = pytest.MonkeyPatch()
    mp.setenv("FARM_DATA_DIR", str(data))
    reset_settings()
    yield Settings(data_dir=data)
    mp.undo()
    reset_settings()


@pytest.fixture(scope="module")
def renderer(settings: Settings) -> DiffusersRenderer:
    return DiffusersRenderer.load(TINY_MODEL, device="cpu", settings=settings)


def encoded(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def picture(size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A source with structure (a gradient and a square), so that renders from it differ from noise."""
    width, height = size
    xs, ys = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([xs, ys, np.full_like(xs, 128)], axis=-1).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 20, 20)
    return Image.fromarray(pixels)


def params(size: tuple[int, int], **kw: Any) -> GenerateInput:
    base: dict[str, Any] = {"model_name": TINY_MODEL, "prompt": "a red fox in the snow", "num_images": 2,
                            "image_size": {"width": size[0], "height": size[1]}, "num_inference_steps": 4,
                            "guidance_scale": 1.0, "format": "png"}
    return GenerateInput(**{**base, **kw})


def pngs(result: RenderResult) -> list[bytes]:
    return [encode_image(img.image, "png")[0] for img in result.images]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that ends where its pixel data would begin: a header claiming ``width`` x ``height``, then the
    start of an IDAT chunk and nothing more (opening reads up to there; decoding fails as truncated)."""
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
            + struct.pack(">I", 1 << 20) + b"IDAT")


# -- strength and steps --------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "strength", "plan"), [
    (4, 1.0, StepPlan(4, 4)), (4, 0.95, StepPlan(4, 3)), (4, 0.5, StepPlan(4, 2)), (6, 0.95, StepPlan(6, 5)),
    (4, 0.2, StepPlan(5, 1)),  # int(4 * 0.2) == 0: a 5-step schedule runs its last step
    (2, 0.1, StepPlan(10, 1)), (1, 0.5, StepPlan(2, 1)),
])
def test_step_plan_follows_diffusers_and_runs_at_least_one_step(steps: int, strength: float, plan: StepPlan) -> None:
    assert step_plan(steps, strength) == plan
    assert effective_steps(steps, strength) == plan.steps_run


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, 0.01])
def test_a_strength_no_schedule_can_run_is_refused_naming_strength(strength: float) -> None:
    with pytest.raises(InvalidInputError) as err:
        step_plan(4, strength)
    assert err.value.field == "strength"


@pytest.mark.parametrize(("steps", "strength"), [(4, 1.0), (4, 0.5), (4, 0.2), (3, 0.7)])
@pytest.mark.parametrize("task", [IMAGE_TO_IMAGE, INPAINTING])
def test_strength_changes_the_denoising_steps_that_run(renderer: DiffusersRenderer, steps: int, strength: float,
                                                      task: str) -> None:
    """Counted by the progress hook: once per denoising step, once more per micro-batch (one image here)."""
    source = prepare_sources(encoded(picture()), encoded(Image.new("L", (64, 64), 255)) if task == INPAINTING
                             else None, strength=strength)
    calls: list[int] = []
    result = renderer.render_items([RenderItem(params((64, 64), num_inference_steps=steps), 3, 0, source=source)],
                                   on_progress=lambda: calls.append(1))
    assert len(calls) == effective_steps(steps, strength) + 1
    assert result.images[0].image.size == (64, 64)


# -- seeds and determinism -----------------------------------------------------------------------


@pytest.mark.parametrize("task", [IMAGE_TO_IMAGE, INPAINTING])
def test_same_seed_and_inputs_give_the_same_bytes_and_image_i_uses_seed_plus_i(renderer: DiffusersRenderer,
                                                                              task: str) -> None:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    def source() -> SourceImages:  # decoded afresh each time: equal inputs, not the same objects
        return prepare_sources(encoded(picture()), encoded(mask) if task == INPAINTING else None, strength=0.75)

    p = params((64, 64))
    first = pngs(renderer.render(p, 7, [0, 1], source=source()))
    assert first == pngs(renderer.render(p, 7, [0, 1], source=source()))
    assert first[0] != first[1]
    assert pngs(renderer.render(p, 8, [0], source=source())) == first[1:]  # image 1 of seed 7 is seed 8
    assert pngs(renderer.render(p, 9, [0], source=source())) != first[:1]
    assert renderer.loads == 1


def test_the_source_image_matters(renderer: DiffusersRenderer) -> None:
    p = params((64, 64))
    from_one = pngs(renderer.render(p, 7, [0], source=prepare_sources(encoded(picture()), strength=0.5)))
    other = Image.new("RGB", (64, 64), (10, 200, 30))
    from_other = pngs(renderer.render(p, 7, [0], source=prepare_sources(encoded(other), strength=0.5)))
    assert from_one != from_other


def test_inpainting_keeps_unmasked_pixels_and_repaints_white(renderer: DiffusersRenderer) -> None:
    """Tolerance 0 where the mask is black: the tiny model's random VAE does not give its input back
    (a round trip moves a pixel by ~90 levels on average), so the renderer pastes the source's pixels
    back outside the mask (``models.render.finish_source``); inside the repainted square they change."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    source = prepare_sources(encoded(picture()), encoded(mask), strength=1.0)
    out = np.asarray(renderer.render(params((64, 64)), 5, [0], source=source).images[0].image).astype(int)
    src = np.asarray(source.image).astype(int)
    keep, repaint = np.asarray(mask) == 0, np.asarray(mask) == 255
    assert np.abs(out - src)[keep].max() == 0
    assert np.abs(out - src)[repaint].mean() > 10


# -- sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "target", "options", "render", "output"), [
    ((1024, 1024), None, {}, (1024, 1024), (1024, 1024)),  # fal_client's own test: 1024x1024 in, 1024x1024 out
    ((100, 76), None, {}, (104, 80), (104, 80)),  # each side to the nearest multiple of 8
    ((4000, 1000), None, {}, (2048, 512), (2048, 512)),  # scaled into FARM_MAX_IMAGE_SIDE, aspect kept
    ((40, 20), None, {}, (128, 64), (128, 64)),  # scaled up to FARM_MIN_IMAGE_SIDE
    ((100, 76), (64, 96), {}, (64, 96), (64, 96)),  # an image_size: covered and centre-cropped
    ((200, 100), (128, 128), {"preserve_aspect_ratio": True}, (128, 64), (128, 64)),
    ((204, 100), (128, 128), {"preserve_aspect_ratio": True}, (128, 64), (128, 64)),
    ((204, 100), (128, 128), {"preserve_aspect_ratio": True, "crop_output": True}, (128, 64), (128, 63)),
    ((100, 76), None, {"crop_output": True}, (104, 80), (104, 79)),
    ((100, 76), (64, 96), {"crop_output": True}, (64, 96), (64, 96)),  # already the asked ratio
])
def test_size_rules(size: tuple[int, int], target: tuple[int, int] | None, options: dict[str, bool],
                    render: tuple[int, int], output: tuple[int, int]) -> None:
    plan = plan_size(size, target, **options)
    assert (plan.render, plan.output) == (render, output)


def test_rendered_sizes_follow_the_rules(renderer: DiffusersRenderer) -> None:
    data = encoded(picture((100, 76)))
    own = prepare_sources(data)
    assert own.image.size == (104, 80)
    assert renderer.render(params(own.image.size), 1, [0], source=own).images[0].image.size == (104, 80)
    asked = prepare_sources(data, target=(64, 96))
    assert renderer.render(params((64, 96)), 1, [0], source=asked).images[0].image.size == (64, 96)
    cropped = prepare_sources(encoded(picture((204, 100))), target=(128, 128), preserve_aspect_ratio=True,
                              crop_output=True)
    assert cropped.image.size == (128, 64)
    assert renderer.render(params((128, 64)), 1, [0], source=cropped).images[0].image.size == (128, 63)


def test_exif_orientation_is_applied(renderer: DiffusersRenderer) -> None:
    """Stored 64 wide and 128 tall, red on top, with EXIF orientation 6 (shown turned 90 degrees clockwise):
    the input is 128x64 with red on the right, and so is the render with no image_size."""
    stored = Image.new("RGB", (64, 128), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 64, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(stored, "JPEG", exif=exif, quality=95)
    upright = decode_image(data)
    assert upright.size == (128, 64)
    right, left = upright.getpixel((112, 32)), upright.getpixel((16, 32))
    assert isinstance(right, tuple) and isinstance(left, tuple)
    assert right[0] > 200 > left[0] and left[2] > 200
    source = prepare_sources(data)
    assert renderer.render(params((128, 64)), 1, [0], source=source).images[0].image.size == (128, 64)


# -- the pipelines ---------------------------------------------------------------------------------


def test_derived_pipelines_share_the_loaded_weights(renderer: DiffusersRenderer) -> None:
    for task in (IMAGE_TO_IMAGE, INPAINTING):
        derived = renderer.pipes.get(task)
        assert derived is renderer.pipes.get(task)  # built once, kept
        assert derived is not renderer.pipe
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert getattr(derived, name) is getattr(renderer.pipe, name), name
    assert renderer.loads == 1
    assert pipeline_class_name("sd15", IMAGE_TO_IMAGE) == "StableDiffusionImg2ImgPipeline"
    assert pipeline_class_name("sdxl", INPAINTING) == "StableDiffusionXLInpaintPipeline"


def test_a_lora_acts_on_image_to_image_and_does_not_leak(renderer: DiffusersRenderer, settings: Settings) -> None:
    """LoRAs are loaded into the text-to-image pipeline's modules, which the derived pipeline shares."""
    from tests.test_models import _make_lora

    path = _make_lora(settings)

    def render(**kw: Any) -> list[bytes]:
        source = prepare_sources(encoded(picture()), strength=0.75)
        return pngs(renderer.render(params((64, 64), num_images=1, **kw), 2, [0], source=source))

    baseline = render()
    assert render(loras=[{"path": path, "scale": 1.0}]) != baseline
    assert renderer.pipe.get_list_adapters() == {}
    assert render() == baseline


def test_deriving_keeps_the_models_dtype(settings: Settings) -> None:
    """diffusers' ``from_pipe`` casts the shared modules to float32 unless told otherwise: a half-precision
    model (bfloat16 here, as fp16 on a GPU) keeps its dtype and its very tensors."""
    import torch
    from diffusers import StableDiffusionPipeline

    from models.tiny import ensure_tiny_pipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ensure_tiny_pipeline(settings)), dtype=torch.bfloat16,
                                                   safety_checker=None, requires_safety_checker=False)
    weight = next(pipe.unet.parameters())
    pipes = ImagePipelines(pipe, "tiny")
    pipes.get(IMAGE_TO_IMAGE)
    pipes.get(INPAINTING)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert next(pipe.unet.parameters()) is weight and weight.dtype == torch.bfloat16


def test_a_batch_never_mixes_tasks_or_step_plans(renderer: DiffusersRenderer) -> None:
    p = params((64, 64))
    source = prepare_sources(encoded(picture()), strength=0.5)
    with pytest.raises(RenderError, match="mixes tasks"):
        renderer.render_items([RenderItem(p, 1, 0), RenderItem(p, 1, 1, source=source)])
    other = prepare_sources(encoded(picture()), strength=1.0)
    with pytest.raises(RenderError, match="step plans"):
        renderer.render_items([RenderItem(p, 1, 0, source=source), RenderItem(p, 1, 1, source=other)])
    with pytest.raises(RenderError, match="prepare_sources"):
        renderer.render(params((128, 128)), 1, [0], source=source)


def test_the_hold_stand_in_takes_source_images(settings: Settings) -> None:
    hold = HoldRenderer.load(HOLD_MODEL, settings=settings.model_copy(update={"hold_ms": 1}))
    source = prepare_sources(encoded(picture((204, 100))), target=(128, 128), preserve_aspect_ratio=True,
                             crop_output=True)
    p = GenerateInput(model_name=HOLD_MODEL, prompt="x", image_size={"width": 128, "height": 64}, num_images=1)
    assert hold.render(p, 1, [0], source=source).images[0].image.size == (128, 63)


# -- bad images ------------------------------------------------------------------------------------


def refusal(data: bytes, field: str = "image_url", **kw: Any) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as err:
        decode_image(data, field, **kw)
    assert err.value.field == field
    return err.value


def test_not_an_image_is_refused() -> None:
    assert "not an image" in refusal(b"hello, I am text").reason
    assert "empty" in refusal(b"", "image_bytes").reason


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_an_unsupported_format_is_refused_naming_it(fmt: str) -> None:
    err = refusal(encoded(picture((16, 16)), fmt))
    assert fmt in err.reason and "PNG, JPEG or WebP" in err.reason


def test_accepted_formats_decode_to_rgb() -> None:
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert decode_image(encoded(picture((24, 16)), fmt)).mode == "RGB"
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decode_image(encoded(transparent)).getpixel((0, 0)) == (255, 255, 255)  # on white paper


def test_a_decompression_bomb_is_refused_from_its_header_alone() -> None:
    """The files have no pixel data: decoding them fails as truncated (first assertion), so a refusal for
    the pixel count proves that only the header was read. 5000x5000 is over the farm's cap but under PIL's
    own bomb limit."""
    assert "truncated" in refusal(png_header_only(5000, 5000), max_pixels=10**8).reason
    over_cap = refusal(png_header_only(5000, 5000), max_pixels=4096 * 4096)
    assert "5000x5000" in over_cap.reason and "FARM_MAX_INPUT_PIXELS" in over_cap.reason
    assert "pixels" in refusal(png_header_only(100_000, 100_000)).reason  # past PIL's own limit too
    assert "pixels" in refusal(png_header_only(64, 64), "mask_url", max_pixels=32 * 32).reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("kept", [0.2, 0.8])
def test_a_truncated_image_is_refused(fmt: str, kept: float) -> None:
    """Cut in its header or in its pixel data: refused, never decoded with the rest made up."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    data = encoded(noise, fmt)
    err = refusal(data[: int(len(data) * kept)])
    assert f"{fmt} image is truncated or corrupt" in err.reason


def test_a_mask_of_another_size_is_refused_naming_mask_url() -> None:
    with pytest.raises(InvalidInputError) as err:
        prepare_sources(encoded(picture((64, 64))), encoded(Image.new("L", (32, 64), 255)))
    assert err.value.field == "mask_url" and "32x64" in err.value.reason and "64x64" in err.value.reason
    assert decode_mask(encoded(Image.new("RGB", (8, 8), (255, 255, 255))), (8, 8)).mode == "L"


def test_errors_name_no_path(tmp_path: Path) -> None:
    bad = tmp_path / "secret-bucket-key.png"
    bad.write_bytes(b"not a png")
    err = refusal(bad.read_bytes())
    assert str(tmp_path) not in str(err) and "secret" not in str(err)


# -- SDXL ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sdxl(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> DiffusersRenderer:
    """``stabilityai/stable-diffusion-xl-base-1.0``'s spec around random SDXL-shaped weights (the shapes of
    diffusers' own SDXL fast tests: two text encoders, text-time embeddings), built here, no hub."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from models.registry import SDXL_BASE, get_model
    from models.safety import SafetyCheckers
    from models.tiny import write_tokenizer_files

    folder = tmp_path_factory.mktemp("sdxl-tokenizer")
    write_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=8)
    config = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=32)
    pipe: Any = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=LCMScheduler(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return DiffusersRenderer(get_model(SDXL_BASE, settings), "cpu", settings, pipe, SafetyCheckers())


@pytest.mark.parametrize("task", [IMAGE_TO_IMAGE, INPAINTING])
def test_sdxl_family_renders_both_tasks_from_its_pipeline(tiny_sdxl: DiffusersRenderer, task: str) -> None:
    from models.registry import SDXL_BASE

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    def source() -> SourceImages:
        return prepare_sources(encoded(picture()), encoded(mask) if task == INPAINTING else None, strength=0.5)

    p = params((64, 64), model_name=SDXL_BASE, enable_safety_checker=False, num_images=1)
    calls: list[int] = []
    result = tiny_sdxl.render_items([RenderItem(p, 4, 0, source=source())], on_progress=lambda: calls.append(1))
    assert len(calls) == effective_steps(4, 0.5) + 1
    assert type(tiny_sdxl.pipes.get(task)).__name__ == pipeline_class_name("sdxl", task)
    assert tiny_sdxl.pipes.get(task).unet is tiny_sdxl.pipe.unet
    assert pngs(result) == pngs(tiny_sdxl.render(p, 4, [0], source=source()))
    if task == INPAINTING:
        out, src = np.asarray(result.images[0].image).astype(int), np.asarray(source().image).astype(int)
        assert np.abs(out - src)[np.asarray(mask) == 0].max() == 0
