"""``farm/hold``, the scheduling stand-in: listed, declared as a stand-in, flat images, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from farm.commands.worker import models as models_command
from farm.config import Settings
from farm.errors import RenderError
from farm.schemas import GenerateInput
from models import hold
from models.hold import HoldRenderer, flat_colour
from models.registry import HOLD_MODEL, all_models

ROOT = Path(__file__).resolve().parents[1]


def params(**extra: object) -> GenerateInput:
    base: dict[str, object] = {"model_name": HOLD_MODEL, "prompt": "a grey square", "num_images": 4,
                               "image_size": {"width": 96, "height": 64}}  # fmt: skip
    return GenerateInput.model_validate({**base, **extra})


def test_listed_as_a_stand_in_and_never_the_default(farm_env: Path) -> None:
    spec = all_models()[HOLD_MODEL]
    assert (spec.family, spec.key, spec.kind) == ("hold", "hold", "builtin")
    assert GenerateInput.model_fields["model_name"].default != HOLD_MODEL
    assert GenerateInput(prompt="x").model_name != HOLD_MODEL
    out = CliRunner().invoke(models_command).output
    line = next(line for line in out.splitlines() if line.startswith(HOLD_MODEL + "\t"))
    assert "STAND-IN" in line
    readme = (ROOT / "README.md").read_text()
    assert "`farm/hold`" in readme and "stand-in" in readme.lower()


def test_renders_flat_images_of_the_requested_size_after_holding(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(hold.time, "sleep", slept.append)
    renderer = HoldRenderer.load(HOLD_MODEL, settings=Settings(hold_ms=40))
    assert (renderer.loads, renderer.device, renderer.spec.name) == (1, "cpu", HOLD_MODEL)
    result = renderer.render(params(), seed=7, indices=[0, 2, 3])
    assert slept == [pytest.approx(0.04)] * 3  # 3 images x 40 ms, one at a time (a heartbeat after each)
    assert [(img.index, img.seed, img.nsfw) for img in result.images] == [(0, 7, False), (2, 9, False), (3, 10, False)]
    for img in result.images:
        assert img.image.size == (96, 64) and img.image.mode == "RGB"
        assert img.image.getcolors() == [(96 * 64, flat_colour(7, img.index))]  # one flat colour
    assert len({flat_colour(7, i) for i in range(4)}) == 4
    # deterministic: the colour depends on seed + index only
    again = renderer.render(params(), seed=8, indices=[1])
    assert again.images[0].image.tobytes() == result.images[1].image.tobytes()
    assert result.prompt == "a grey square"


def test_rejects_what_it_cannot_serve() -> None:
    renderer = HoldRenderer.load(HOLD_MODEL, settings=Settings(hold_ms=0))
    with pytest.raises(RenderError, match="outside"):
        renderer.render(params(), seed=1, indices=[4])
    with pytest.raises(RenderError, match="serves"):
        renderer.render(params(model_name="farm/tiny-lcm"), seed=1, indices=[0])


def test_a_hold_worker_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import tasks.render_batch, farm.storage, models.encode\n"
        "from tasks.celery_app import get_app\nfrom tasks.loaded_model import load_renderer\n"
        "from farm.schemas import GenerateInput\n"
        "get_app()\n"
        "r = load_renderer('farm/hold', 'cpu')\n"
        "r.render(GenerateInput(model_name='farm/hold', prompt='x', image_size={'width': 64, 'height': 64}), 1, [0])\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "FARM_DATA_DIR": str(tmp_path), "FARM_HOLD_MS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
