"""GPU speed settings and the split decode, on the built-in tiny model on a CPU (models.speed, models.decode).

The compiled path runs with torch.compile's ``eager`` backend (dynamo traces, guards and caches
graphs exactly as with inductor, without generating code): inductor's own C++ code generation takes
~100 s for the tiny UNet on a 2-core CPU (measured), so that variant is opt-in (FARM_TEST_INDUCTOR=1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from db import worker_registry as batches
from farm.config import Settings, reset_settings
from farm.schemas import GenerateInput
from models.decode import Decoder
from models.encode import encode_image
from models.registry import TINY_MODEL
from models.render import Pending
from models.rendered import RenderItem
from models.renderer import DiffusersRenderer
from tests.test_ledger import ledger_url, sessions  # noqa: F401  (fixtures)
from tests.test_models import _make_lora


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    data = tmp_path_factory.mktemp("speed-data")
    files = data / "files"
    files.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("FARM_DATA_DIR", str(data))
    mp.setenv("FARM_FILES_ROOT", str(files))
    reset_settings()
    yield Settings(data_dir=data, files_root=files)
    mp.undo()
    reset_settings()
    torch.compiler.set_stance("default")  # a compiled renderer set eager_on_recompile for this process


@pytest.fixture(scope="module")
def renderer(settings: Settings) -> DiffusersRenderer:
    return DiffusersRenderer.load(TINY_MODEL, device="cpu", settings=settings)


def params(**kw: Any) -> GenerateInput:
    base: dict[str, Any] = {"model_name": TINY_MODEL, "prompt": "a red fox in the snow", "num_inference_steps": 2,
                            "image_size": {"width": 64, "height": 64}, "guidance_scale": 1.0, "num_images": 4,
                            "format": "png"}
    return GenerateInput(**{**base, **kw})


def pngs(result: Any) -> list[bytes]:
    return [encode_image(img.image, "png")[0] for img in result.images]


def test_decoder_gives_the_pipelines_own_bytes(renderer: DiffusersRenderer) -> None:
    """The split decode (output_type="latent", then models.decode) is the pipeline's own decode, byte for byte."""
    pipe = renderer.pipe
    call = {"prompt": ["a fox", "a cat"], "height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": 1.0}
    own = pipe(**call, output_type="pil", generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    latents = pipe(**call, output_type="latent", generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).images
    split = Decoder(pipe)(latents).images()
    assert [encode_image(i, "png")[0] for i in split] == [encode_image(i, "png")[0] for i in own]


def test_decoder_upcasts_only_after_an_fp16_overflow(renderer: DiffusersRenderer) -> None:
    from models.loading import load_pipeline
    from models.registry import get_model

    pipe = load_pipeline(get_model(TINY_MODEL, renderer.settings), "cpu", renderer.settings)
    pipe.vae.half()
    decoder = Decoder(pipe)
    fine = decoder(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert not decoder.upcast and fine.pixels.shape == (1, 64, 64, 3)
    huge = decoder(torch.full((1, 4, 8, 8), 6e4))  # /0.18215 is past fp16's largest value (65504)
    assert decoder.upcast and decoder.fp32_vae.dtype == torch.float32 and huge.pixels.shape == (1, 64, 64, 3)
    assert pipe.vae.dtype == torch.float16  # the pipeline's own VAE is left as it was


def test_pending_finishes_later_with_the_same_images(renderer: DiffusersRenderer) -> None:
    """What a GPU worker does (finish in the uploader thread) gives what the CPU path gives."""
    items = [RenderItem(params(), 7, i) for i in range(4)]
    inline = pngs(renderer.render_items(items))
    renderer.overlap = True
    try:
        pending = renderer.begin_items(items)
        assert isinstance(pending, Pending) and len(pending) == 4
        assert pngs(pending.result()) == inline
    finally:
        renderer.overlap = False


def test_fused_qkv_close_to_unfused_and_unfused_for_loras(renderer: DiffusersRenderer, settings: Settings) -> None:
    import numpy as np

    fused = DiffusersRenderer.load(TINY_MODEL, "cpu", settings.model_copy(update={"fuse_qkv": True}))
    assert fused.pipe.unet.original_attn_processors is not None
    assert "Fused" in type(next(iter(fused.pipe.unet.attn_processors.values()))).__name__
    a, b = (r.render(params(num_images=2), 3, [0, 1]).images for r in (renderer, fused))
    assert max(int(np.abs(np.asarray(x.image, np.int16) - np.asarray(y.image, np.int16)).max())
               for x, y in zip(a, b, strict=True)) <= 2  # the same function, summed in another order
    path = _make_lora(settings)
    lora = params(num_images=2, loras=[{"path": path, "scale": 1.0}])
    assert pngs(fused.render(lora, 3, [0, 1])) != pngs(fused.render(params(num_images=2), 3, [0, 1]))  # applied
    assert pngs(fused.render(lora, 3, [0, 1])) == pngs(renderer.render(lora, 3, [0, 1]))  # rendered unfused
    assert "Fused" in type(next(iter(fused.pipe.unet.attn_processors.values()))).__name__  # fused again


def _compiled(settings: Settings, backend: str) -> DiffusersRenderer:
    return DiffusersRenderer.load(TINY_MODEL, "cpu", settings.model_copy(update={
        "compile": "unet+vae", "compile_backend": backend, "warm_sizes": ["64x64"], "warm_batches": [0]}))


def _check_compiled(renderer: DiffusersRenderer, compiled: DiffusersRenderer, exact: bool) -> None:
    took = compiled.warm_compiled()
    assert took > 0 and compiled.compiled.warm == {(64, 64, 1, False), (64, 64, 1, True)}
    for guidance in (1.0, 2.0):  # warmed: without and with classifier-free guidance
        p = params(guidance_scale=guidance)
        if exact:
            assert pngs(compiled.render(p, 5, [0, 1, 2, 3])) == pngs(renderer.render(p, 5, [0, 1, 2, 3]))
        else:
            assert len(compiled.render(p, 5, [0, 1]).images) == 2
    assert (compiled.recompiles, compiled.cold_renders) == (0, 0)
    compiled.render(params(image_size={"width": 64, "height": 128}, num_images=1), 5, [0])  # not warmed
    assert (compiled.recompiles, compiled.cold_renders) == (0, 1)  # ran uncompiled, no recompile


@pytest.mark.slow
def test_compiled_path_warms_each_shape_and_never_recompiles(renderer: DiffusersRenderer, settings: Settings) -> None:
    """FARM_COMPILE on the tiny model (eager backend, see the module doc): warmed shapes give the uncompiled
    bytes; a shape not warmed runs uncompiled and is counted, and nothing recompiles after warm-up."""
    _check_compiled(renderer, _compiled(settings, "eager"), exact=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FARM_TEST_INDUCTOR") != "1",
                    reason="inductor compiles the tiny UNet in ~100 s on a 2-core CPU (measured): set "
                           "FARM_TEST_INDUCTOR=1 to run it; the eager-backend test covers the farm's code path")
def test_compiled_path_with_inductor(renderer: DiffusersRenderer, settings: Settings) -> None:
    _check_compiled(renderer, _compiled(settings, "inductor"), exact=False)


def test_speed_settings_are_off_by_default_and_checked() -> None:
    s = Settings()
    assert (s.compile, s.fuse_qkv, s.tiny_decoder, s.warm_sizes) == ("none", False, "", [])
    assert Settings(warm_sizes=["1024x768"]).warm_size_list == [(1024, 768)]
    with pytest.raises(ValueError, match="multiples of 8"):
        Settings(warm_sizes=["100x100"])


def test_tiny_decoder_is_opt_in_and_named_when_missing(settings: Settings, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from farm.errors import ModelNotFoundError
    from models.fullsize import write_tiny_decoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: a miss is decided at once
    with pytest.raises(ModelNotFoundError, match="FARM_TINY_DECODER=auto"):
        DiffusersRenderer.load(
            TINY_MODEL, "cpu", settings.model_copy(update={"tiny_decoder": "auto", "model_dir": tmp_path})
        )
    write_tiny_decoder(tmp_path / "madebyollin" / "taesd", dtype=torch.float32)
    tiny = DiffusersRenderer.load(TINY_MODEL, "cpu", settings.model_copy(update={"tiny_decoder": "auto",
                                                                        "model_dir": tmp_path}))
    assert type(tiny.pipe.vae).__name__ == "AutoencoderTiny"
    assert [i.image.size for i in tiny.render(params(num_images=2), 1, [0, 1]).images] == [(64, 64)] * 2


def test_worker_row_records_compile_counters(sessions) -> None:  # noqa: F811
    with sessions.begin() as s:
        batches.register_worker(s, name="w", model_name=TINY_MODEL, model_key="tiny-lcm", device="cpu",
                                max_batch=4, loads=1, pid=os.getpid())
        batches.beat_worker(s, "w", loads=1, recompiles=2, cold_renders=5)
    with sessions.begin() as s:
        row = batches.live_workers(s, "tiny-lcm", 30)[0]
        assert (row.recompiles, row.cold_renders) == (2, 5)


def test_fullsize_extra_models_are_valid_settings() -> None:
    from models.fullsize import extra_models
    from models.registry import all_models

    models = all_models(Settings(extra_models=json.loads(json.dumps(extra_models()))))
    assert {m.kind for name, m in models.items() if name.startswith("farm-random/")} == {"distilled"}
