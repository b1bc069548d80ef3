"""The worker is typed against ``models.protocol.Renderer``: the diffusers renderer (with the built-in tiny
model) and the ``farm/hold`` stand-in both satisfy it, with the members the worker reads instead of probing."""

from __future__ import annotations

from pathlib import Path

from farm.config import Settings
from models.hold import HoldRenderer
from models.protocol import Renderer
from models.registry import TINY_MODEL

HOLD_MODEL = "farm/hold"


def test_the_hold_stand_in_is_a_renderer() -> None:
    renderer: Renderer = HoldRenderer.load(HOLD_MODEL, settings=Settings(hold_ms=0))
    assert isinstance(renderer, Renderer)
    assert (renderer.recompiles, renderer.cold_renders, renderer.warm_compiled()) == (0, 0, 0.0)
    assert renderer.stand_in_note and "stand-in" in renderer.stand_in_note


def test_the_tiny_diffusers_model_is_a_renderer(tmp_path: Path) -> None:
    from models.renderer import DiffusersRenderer

    renderer: Renderer = DiffusersRenderer.load(TINY_MODEL, device="cpu", settings=Settings(data_dir=tmp_path))
    assert isinstance(renderer, Renderer)
    assert renderer.stand_in_note is None
    assert (renderer.recompiles, renderer.cold_renders) == (0, 0)
