"""CUDA correctness checks of the render path, on the random full-size models (run before gpu.py).

    python benchmarks/gpu_checks.py --device cuda:0 --model-dir DIR [--out checks.json]
    python benchmarks/gpu_checks.py --device cpu --tiny       # smoke mode (CI): small models, 64x64

1. fp16 on the fused LCM-LoRA path (SD1.5) and on the LCM-distilled path: weights in fp16, finite
   latents, images that are not flat.
2. SDXL's VAE decodes in fp16 without NaNs, and a batch whose fp16 decode overflows is decoded
   again in fp32 (``models.decode``; forced with huge latents); fp16 and fp32 decode times.
3. The batch size from free memory: the probe's estimate per image against the memory a batch of
   that size really takes.
4. The safety checker path: v1 and v2 (full-size random checkers) run; a checker that flags
   blacks the images out.
5. A 16-image job through a real Celery worker on the device (embedded: in-memory broker,
   SQLite ledger, local storage): COMPLETED, 16 JPEGs stored.
6. Image ``i`` uses seed ``seed + i``: the same initial latents whatever the batch split (one
   batch of 8, two of 4, eight of 1); how far the final pixels move is reported, not required.

Each check reports ok and what it measured; one failing does not stop the others. Last line: JSON.
"""

from __future__ import annotations

import io
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpu  # noqa: E402  (benchmarks/_gpu.py)


def flat(images: list[Any]) -> bool:
    import numpy as np

    return any(float(np.asarray(im).std()) == 0.0 for im in images)


def latents_of(renderer: Any, size: tuple[int, int], guidance: float, n: int = 2) -> Any:
    return renderer.pipe(prompt=[_gpu.PROMPT] * n, width=size[0], height=size[1], num_inference_steps=2,
                         guidance_scale=guidance, output_type="latent").images


def check_fp16(renderer: Any, size: tuple[int, int], fp16: bool) -> dict[str, Any]:
    import torch

    dtype = renderer.pipe.unet.dtype
    out: dict[str, Any] = {"unet_dtype": str(dtype), "vae_dtype": str(renderer.pipe.vae.dtype),
                           "time_cond_proj_dim": renderer.pipe.unet.config.time_cond_proj_dim}
    for guidance in (1.0, 1.5):
        finite = bool(torch.isfinite(latents_of(renderer, size, guidance)).all())
        result = renderer.render(_gpu.params(renderer.spec.name, size, 2, guidance, 2), 7, [0, 1])
        out[f"g{guidance}"] = {"finite_latents": finite, "flat_image": flat([i.image for i in result.images])}
    out["ok"] = (dtype == torch.float16) == fp16 and all(
        out[f"g{g}"]["finite_latents"] and not out[f"g{g}"]["flat_image"] for g in (1.0, 1.5))
    return out


def check_sdxl_vae(renderer: Any, size: tuple[int, int], device: str) -> dict[str, Any]:
    import torch

    from models.decode import Decoder

    out = check_fp16(renderer, size, device.startswith("cuda"))
    out["decoded_in_fp32"] = renderer.decoder.upcast
    latents = latents_of(renderer, size, 1.0, n=renderer.spec.max_batch)
    probe = Decoder(renderer.pipe)
    out["fp16_decode_s"] = round(_gpu.timed(lambda: probe(latents).images(), device), 3)
    huge = torch.full_like(latents, 6e4)  # /0.13025 is past fp16's largest value: the fp16 decode cannot be finite
    pixels = probe(huge).pixels
    out["overflow_upcast"] = probe.upcast
    out["fp32_decode_s"] = round(_gpu.timed(lambda: probe(latents).images(), device), 3)
    out["ok"] = out["ok"] and not renderer.decoder.upcast and (probe.upcast or renderer.pipe.vae.dtype ==
                                                                  torch.float32) and pixels.numel() > 0
    return out


def check_batch_from_memory(renderer: Any, device: str) -> dict[str, Any]:
    import torch

    batch = renderer.find_max_batch()
    out: dict[str, Any] = {"batch": batch, "cap": renderer.spec.max_batch}
    if not device.startswith("cuda"):
        return {**out, "ok": batch == renderer.spec.max_batch, "note": "no probe on a CPU: the model's maximum"}
    free, total = torch.cuda.mem_get_info(device)
    base = torch.cuda.memory_allocated(device)
    _gpu.reset_peak(device)
    size = renderer.spec.default_size
    renderer.micro_batch = batch
    renderer.render(_gpu.params(renderer.spec.name, size, 2, 1.0, batch), 1, list(range(batch)))
    used = torch.cuda.max_memory_allocated(device) - base
    out.update(free_gib=round(free / 2**30, 2), total_gib=round(total / 2**30, 2),
               probe_per_image_gib=round(renderer.per_image_bytes / 2**30, 3),
               measured_per_image_gib=round(used / batch / 2**30, 3),
               uncapped_batch=int(free * 0.8) // max(1, renderer.per_image_bytes))
    # right: the batch it chose fits in the headroom it allows itself (0.8 of what was free)
    out["ok"] = used <= free * 0.8
    return out


def check_safety(renderer: Any, size: tuple[int, int], device: str) -> dict[str, Any]:
    import tempfile

    from farm.config import Settings
    from models.safety import SafetyCheckers
    from models.tiny import save_tiny_safety_v2

    out: dict[str, Any] = {}
    for version in ("v1", "v2"):
        result = renderer.render(_gpu.params(renderer.spec.name, size, 2, 1.0, 2, safety_checker_version=version),
                                 3, [0, 1])
        out[version] = {"flags": [i.nsfw for i in result.images]}
    folder = Path(tempfile.mkdtemp(prefix="farm-flagging-"))
    save_tiny_safety_v2(folder, flag=True)
    kept = renderer.safety
    renderer.safety = SafetyCheckers.load(renderer.spec, device, Settings(safety_checker_v2=str(folder)))
    try:
        result = renderer.render(_gpu.params(renderer.spec.name, size, 2, 1.0, 2, safety_checker_version="v2"), 3,
                                 [0, 1])
    finally:
        renderer.safety = kept
    black = [im.image.getbbox() is None for im in result.images]
    out["flagging_v2"] = {"flags": [i.nsfw for i in result.images], "black": black}
    out["ok"] = all(len(out[v]["flags"]) == 2 for v in ("v1", "v2")) and all(black) and all(
        out["flagging_v2"]["flags"])
    return out


def check_seed_split(renderer: Any, size: tuple[int, int]) -> dict[str, Any]:
    import numpy as np
    import torch

    from models.rendered import RenderItem

    pipe = renderer.pipe
    drawn: list[Any] = []
    original = pipe.prepare_latents

    def recording(*args: Any, **kwargs: Any) -> Any:
        latents = original(*args, **kwargs)
        drawn.extend(latents.detach().float().cpu())
        return latents

    inp = _gpu.params(renderer.spec.name, size, 2, 1.0, 8)
    runs: dict[int, tuple[list[Any], list[Any]]] = {}
    pipe.prepare_latents = recording
    try:
        for micro in (8, 4, 1):
            drawn.clear()
            renderer.micro_batch = micro
            result = renderer.render_items([RenderItem(inp, 100, i) for i in range(8)])
            runs[micro] = (list(drawn), [np.asarray(i.image, dtype=np.int16) for i in result.images])
    finally:
        del pipe.prepare_latents  # back to the class's method
    same = all(torch.equal(a, b) for micro in (4, 1) for a, b in zip(runs[8][0], runs[micro][0], strict=True))
    diff = max(int(np.abs(a - b).max()) for micro in (4, 1) for a, b in zip(runs[8][1], runs[micro][1], strict=True))
    return {"ok": same and len(runs[8][0]) == 8, "same_initial_latents": same, "max_pixel_diff": diff}


def check_worker_job(model: str, size: tuple[int, int], device: str) -> dict[str, Any]:
    from PIL import Image

    with _gpu.embedded_farm(model, device):
        took, job = _gpu.run_job(_gpu.params(model, size, 4, 1.0, 16))
        stored = _gpu.stored_images(job.id)
    sizes = {Image.open(io.BytesIO(data)).size for data in stored}
    return {"ok": job.status == "COMPLETED" and len(stored) == 16 and sizes == {size}, "status": str(job.status),
            "error": job.error, "stored": len(stored), "seconds": round(took, 2)}


class Checks:
    """The results so far, written after each check (a run killed at its time limit leaves what it did)."""

    def __init__(self, head: dict[str, Any], out: Path | None) -> None:
        self.head, self.out = head, out
        self.results: dict[str, Any] = {}

    def report(self) -> dict[str, Any]:
        return {**self.head, "ok": all(r["ok"] for r in self.results.values()), "checks": self.results}

    def run(self, name: str, fn: Any, *args: Any) -> None:
        t0 = time.perf_counter()
        try:
            self.results[name] = fn(*args)
        except Exception as exc:
            traceback.print_exc()
            self.results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:800]}
        self.results[name]["check_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {'ok' if self.results[name]['ok'] else 'FAILED'} {self.results[name]}", flush=True)
        _gpu.save(self.report(), self.out)


def main() -> None:
    opts = _gpu.arguments(__doc__, budget=200.0).parse_args()
    _gpu.setup(opts)
    from models.fullsize import extra_models
    from models.registry import SD15_BASE, SDXL_BASE
    from models.renderer import DiffusersRenderer

    device = opts.device
    fp16 = device.startswith("cuda")
    sd15_size, sdxl_size = ((64, 64), (64, 64)) if opts.tiny else ((512, 512), (1024, 1024))
    distilled = next(name for name, spec in extra_models().items() if spec["family"] == "sd15")
    checks = Checks({"benchmark": "gpu_checks", "device": device, "smoke": opts.tiny, **_gpu.versions(device)},
                    opts.out)
    sd15 = DiffusersRenderer.load(SD15_BASE, device)
    checks.run("fp16_lcm_lora_sd15", check_fp16, sd15, sd15_size, fp16)
    checks.run("safety_checkers", check_safety, sd15, sd15_size, device)
    checks.run("seed_split", check_seed_split, sd15, sd15_size)
    checks.run("batch_from_memory", check_batch_from_memory, sd15, device)
    del sd15
    _gpu.free_memory(device)
    lcm = DiffusersRenderer.load(distilled, device)
    checks.run("fp16_distilled_sd15", check_fp16, lcm, sd15_size, fp16)
    del lcm
    _gpu.free_memory(device)
    sdxl = DiffusersRenderer.load(SDXL_BASE, device)
    checks.run("sdxl_vae_fp16", check_sdxl_vae, sdxl, sdxl_size, device)
    del sdxl
    _gpu.free_memory(device)
    checks.run("worker_job_16", check_worker_job, SD15_BASE, sd15_size, device)
    _gpu.finish(checks.report(), opts.out)


if __name__ == "__main__":
    main()
