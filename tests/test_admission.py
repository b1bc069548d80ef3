"""Admission (farm.admission): one step from raw fields to an accepted input, cheap checks first."""

from __future__ import annotations

import pytest

from farm import admission
from farm.config import Settings
from farm.errors import InvalidInputError
from farm.schemas import GenerateInput


def test_list_lengths_are_checked_before_any_file_lookup(farm_env, monkeypatch):
    """Too many LoRAs is refused on its length alone: not one of them is looked up on the file system."""
    looked_up: list[str] = []
    monkeypatch.setattr(admission, "resolve_weights_path", lambda path, settings: looked_up.append(path))
    settings = Settings(data_dir=farm_env)
    with pytest.raises(InvalidInputError) as info:
        admission.admit({"prompt": "a", "loras": [{"path": f"o/n{i}"} for i in range(50)]}, None, settings)
    assert info.value.field == "loras" and "at most 4 LoRAs (got 50)" in info.value.reason
    assert looked_up == []
    with pytest.raises(InvalidInputError, match="embeddings: at most"):
        admission.admit({"prompt": "a", "embeddings": [{"path": "o/n"}] * 50}, None, settings)
    assert looked_up == []


def test_bounds_come_from_the_settings_given(farm_env):
    """The schemas read no global settings: the bounds are those of the settings admission is given;
    without any (a framework's parse, a client), only the fixed rules apply."""
    wide = Settings(data_dir=farm_env, max_num_images=200)
    assert admission.admit({"prompt": "a", "num_images": 150}, None, wide).num_images == 150
    with pytest.raises(InvalidInputError, match="between 1 and 64"):
        admission.admit({"prompt": "a", "num_images": 150}, None, Settings(data_dir=farm_env))
    assert GenerateInput.model_validate({"prompt": "a", "num_images": 150}).num_images == 150
    with pytest.raises(ValueError, match="must not be empty"):
        GenerateInput.model_validate({"prompt": " "})


def test_a_parsed_input_is_admitted_on_its_given_fields(farm_env):
    """FastAPI parses the body without bounds; admission checks the fields the client gave, and the
    size left to the farm is still resolved from the model."""
    settings = Settings(data_dir=farm_env)
    parsed = GenerateInput.model_validate({"prompt": "a", "model_name": "farm/tiny-lcm", "num_images": 65})
    with pytest.raises(InvalidInputError, match="num_images"):
        admission.admit(parsed, None, settings)
    ok = admission.admit(GenerateInput.model_validate({"prompt": "a", "model_name": "farm/tiny-lcm"}), None, settings)
    assert ok.size == (64, 64) and "image_size" not in ok.model_fields_set


def test_upload_urls_of_another_owner_are_refused(farm_env):
    url = "https://farm.example/storage/files/ann/uploads/" + "0" * 32 + "/w.safetensors"
    settings = Settings(data_dir=farm_env)
    assert admission.admit({"prompt": "a", "loras": [{"path": url}]}, "ann", settings).loras[0].path == url
    with pytest.raises(InvalidInputError, match="loras.0.path: no such upload for this owner"):
        admission.admit({"prompt": "a", "loras": [{"path": url}]}, "ben", settings)
