"""The input and output schemas mirror fast-lcm-diffusion; every bound names its field."""

from __future__ import annotations

import pytest

from farm.admission import parse_input
from farm.config import Settings
from farm.errors import InvalidInputError
from farm.schemas import NAMED_SIZES, GenerateInput, GenerateOutput, ImageSizeName


def test_defaults_match_the_seed(farm_env):
    inp = GenerateInput(prompt="a cat")
    assert inp.model_name == "stabilityai/stable-diffusion-xl-base-1.0"
    assert inp.negative_prompt == ""
    assert inp.image_size == ImageSizeName.square_hd and inp.size == (1024, 1024)
    assert inp.num_inference_steps == 6
    assert inp.seed is None
    assert inp.guidance_scale == 1.5
    assert inp.guidance_rescale == 0.0
    assert inp.sync_mode is True
    assert inp.num_images == 1
    assert inp.enable_safety_checker is True
    assert inp.safety_checker_version == "v1"
    assert inp.expand_prompt is False
    assert inp.format == "jpeg"
    assert inp.request_id == ""
    assert inp.loras == [] and inp.embeddings == []


def test_named_sizes():
    assert {
        ImageSizeName.square_hd: (1024, 1024),
        ImageSizeName.square: (512, 512),
        ImageSizeName.portrait_4_3: (768, 1024),
        ImageSizeName.portrait_16_9: (576, 1024),
        ImageSizeName.landscape_4_3: (1024, 768),
        ImageSizeName.landscape_16_9: (1024, 576),
    } == NAMED_SIZES


def test_no_image_size_gets_the_models_own_default(farm_env):
    # resolved at admission, into the dumped input that submit records in the ledger
    sdxl = parse_input({"prompt": "a cat"})
    assert sdxl.model_dump(mode="json")["image_size"] == "square_hd" and sdxl.size == (1024, 1024)
    sd15 = parse_input({"prompt": "a cat", "model_name": "runwayml/stable-diffusion-v1-5"})
    assert sd15.model_dump(mode="json")["image_size"] == "square" and sd15.size == (512, 512)
    tiny = parse_input({"prompt": "a cat", "model_name": "farm/tiny-lcm"})
    assert tiny.model_dump(mode="json")["image_size"] == {"width": 64, "height": 64} and tiny.size == (64, 64)
    # an explicit value always wins, named or custom, for any model
    assert parse_input({"prompt": "a cat", "model_name": "farm/tiny-lcm", "image_size": "square_hd"}).size == (
        1024, 1024)
    assert parse_input({"prompt": "a cat", "image_size": {"width": 64, "height": 128}}).size == (64, 128)
    # the resolved default is not "set": a client sending only the fields it was given leaves it to the farm
    assert "image_size" not in tiny.model_dump(exclude_unset=True)
    # an input read back from the ledger keeps its recorded size, and renders exactly that
    assert GenerateInput.model_validate(tiny.model_dump(mode="json"), context={"stored": True}).size == (64, 64)


def test_seed_example_input_validates(farm_env):
    inp = parse_input({
        "model_name": "stabilityai/stable-diffusion-xl-base-1.0",
        "prompt": "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k.",
        "negative_prompt": "cartoon, illustration, animation. face. male, female",
        "image_size": "square_hd", "num_inference_steps": 6, "guidance_scale": 1.5, "sync_mode": True,
        "num_images": 1, "enable_safety_checker": True, "safety_checker_version": "v1", "format": "jpeg",
    })
    assert inp.size == (1024, 1024)
    custom = parse_input({"prompt": "x", "image_size": {"width": 640, "height": 384}})
    assert custom.size == (640, 384)


BAD = [
    ({"prompt": ""}, "prompt", "must not be empty"),
    ({"prompt": "   "}, "prompt", "must not be empty"),
    ({}, "prompt", "Field required"),
    ({"prompt": "x" * 4001}, "prompt", "at most 4000 characters"),
    ({"prompt": "a", "negative_prompt": "x" * 4001}, "negative_prompt", "at most 4000"),
    ({"prompt": "a", "image_size": {"width": 513, "height": 512}}, "image_size.width", "multiple of 8"),
    ({"prompt": "a", "image_size": {"width": 512, "height": 4096}}, "image_size.height", "between 64 and 2048"),
    ({"prompt": "a", "image_size": {"width": 32, "height": 512}}, "image_size.width", "between 64 and 2048"),
    ({"prompt": "a", "image_size": "huge"}, "image_size", "square_hd"),
    ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps", "between 1 and 50"),
    ({"prompt": "a", "num_inference_steps": 51}, "num_inference_steps", "between 1 and 50"),
    ({"prompt": "a", "model_name": "nope/model"}, "model_name", "unknown model 'nope/model'"),
    ({"prompt": "a", "num_images": 10000}, "num_images", "between 1 and 64"),
    ({"prompt": "a", "num_images": 0}, "num_images", "between 1 and 64"),
    ({"prompt": "a", "guidance_scale": -1}, "guidance_scale", "between 0 and 20"),
    ({"prompt": "a", "guidance_rescale": 1.5}, "guidance_rescale", "less than or equal to 1"),
    ({"prompt": "a", "seed": -5}, "seed", "between 0 and 2**62"),
    ({"prompt": "a", "safety_checker_version": "v3"}, "safety_checker_version", "'v1' or 'v2'"),
    ({"prompt": "a", "format": "gif"}, "format", "'jpeg' or 'png'"),
    ({"prompt": "a", "request_id": "has space"}, "request_id", "letters, digits"),
    ({"prompt": "a", "loras": [{"path": "../../etc/passwd"}]}, "loras.0.path", "'..'"),
    ({"prompt": "a", "loras": [{"path": "/etc/passwd"}]}, "loras.0.path", "allowed files root"),
    ({"prompt": "a", "loras": [{"path": "http://169.254.169.254/x"}]}, "loras.0.path", "link-local address; refused"),
    ({"prompt": "a", "loras": [{"path": "owner/name", "scale": 9}]}, "loras.0.scale", "less than or equal"),
    ({"prompt": "a", "loras": [{"path": "o/n"}] * 5}, "loras", "at most 4 LoRAs"),
    ({"prompt": "a", "embeddings": [{"path": "o/n", "tokens": ["<a>", "<a>"]}]}, "embeddings.0.tokens", "distinct"),
    ({"prompt": "a", "embeddings": [{"path": "o/n", "tokens": []}]}, "embeddings.0.tokens", "at least 1"),
    ({"prompt": "a", "unknown_field": 1}, "unknown_field", "Extra inputs are not permitted"),
    ({"prompt": "a", "num_images": "many"}, "num_images", "valid integer"),
]


@pytest.mark.parametrize(("data", "field", "reason"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_every_violation_names_field_and_reason(farm_env, data, field, reason):
    with pytest.raises(InvalidInputError) as info:
        parse_input(data)
    assert info.value.field == field
    assert reason in info.value.reason
    assert str(info.value).startswith(f"{field}: ")


def test_bounds_come_from_settings(farm_env, monkeypatch):
    from farm.config import reset_settings

    monkeypatch.setenv("FARM_MAX_NUM_IMAGES", "200")
    monkeypatch.setenv("FARM_MAX_IMAGE_SIDE", "4096")
    reset_settings()
    assert parse_input({"prompt": "a", "num_images": 150}).num_images == 150
    assert parse_input({"prompt": "a", "image_size": {"width": 4096, "height": 512}}).size == (4096, 512)


def test_local_weights_must_live_under_the_files_root(farm_env, tmp_path):
    from farm.config import get_settings
    from farm.inputs.refs import resolve_weights_path

    root = get_settings().effective_files_root
    (root / "loras").mkdir(parents=True)
    (root / "loras" / "style.safetensors").write_bytes(b"x")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    ref = resolve_weights_path("loras/style.safetensors", get_settings())
    assert ref.kind == "local" and ref.value == str(root / "loras" / "style.safetensors")
    assert resolve_weights_path("latent-consistency/lcm-lora-sdxl", get_settings()).kind == "hub"
    (root / "escape").symlink_to(outside)
    answers = []
    for path in ("escape", str(outside), str(tmp_path / "missing.safetensors"), "/etc/passwd", "/etc/no-such-file"):
        with pytest.raises(ValueError, match="allowed files root") as caught:
            resolve_weights_path(path, get_settings())
        answers.append(str(caught.value))
    # missing and forbidden alike: no file-existence oracle, and no server path in the answer
    assert len(set(answers)) == 1 and str(root) not in answers[0] and str(tmp_path) not in answers[0]


def test_settings_refuse_a_time_limit_above_the_visibility_timeout():
    with pytest.raises(ValueError, match="visibility_timeout"):
        Settings(task_time_limit=4000, visibility_timeout=3600)


def test_output_schema_fields():
    out = GenerateOutput.model_validate({
        "images": [{"url": "data:image/jpeg;base64,AA==", "width": 64, "height": 64}],
        "timings": {"inference": 0.1}, "seed": 3, "has_nsfw_concepts": [False], "prompt": "p",
    })
    assert out.images[0].content_type == "image/jpeg"
    assert set(GenerateOutput.model_fields) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}


def test_urls_are_logged_without_query_or_credentials():
    from farm.netguard import redact

    shown = redact("https://u:pw@hooks.example:8443/x/y?token=s3cret#f")
    assert shown == "https://hooks.example:8443/x/y" and "pw" not in shown
    assert redact("https://hooks.example/x") == "https://hooks.example/x"
    assert "s3cret" not in redact("https://[::1]:9/a?k=s3cret")
