"""GPU throughput in one run: plain diffusers against the farm's DiffusersRenderer, and a worker end to end.

    python benchmarks/gpu.py --device cuda:0 --model-dir DIR [--budget-s 330] [--out gpu.json] [--only STAGES]
    python benchmarks/gpu.py --device cpu --tiny        # smoke mode (CI): small random models, 64x64

Models: the random full-size SD1.5 and SDXL of ``python -m models.fullsize`` (written into
``--model-dir`` first if missing): real FLOPs and memory, images of noise.
Cases: SD1.5 512x512, 4 steps, batch 16; SDXL 1024x1024, 4 steps, batch 8; each at guidance 1.0
and 1.5 (the LCM-LoRA models run classifier-free guidance above 1: two UNet passes per step).

* plain: what a user writes without lcm-farm: ``from_pretrained(dtype=float16,
  variant="fp16")``, the LCM-LoRA loaded and fused, ``LCMScheduler``, one ``pipe()`` call per
  batch, PIL images out (SD1.5's pipeline runs its own safety checker, SDXL's has none).
* farm: the ``DiffusersRenderer`` (safety checker v1 on, the API's default), each batch finished in a
  second thread as a worker's uploader does; one variant per speed setting: ``eager`` (the
  defaults), ``fuse_qkv``, ``tiny_decoder`` (changes images: never the headline),
  ``compiled`` (unet+vae, mode default), ``cudagraphs`` (compiled, reduce-overhead).
* e2e: one 256-image SD1.5 job through a real Celery worker in this process (embedded: in-memory
  broker, SQLite ledger, local storage; JPEG encode and store included), submit to COMPLETED,
  against the same worker's renderer rendering the same 256 images alone.

Images/s are over 6 (SD1.5) or 4 (SDXL) timed batches after one warm-up batch, CUDA synchronised;
peak memory is over the timed batches; compile_s is the warm-up of the compiled shapes. The stages
run most important first while ``--budget-s`` allows (``--only`` picks stages); the report is
written to ``--out`` after each one. The headline figures are at guidance 1.0 (``*_cfg_*`` at
1.5), the farm's being its fastest variant that does not change images. Last line: JSON.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpu  # noqa: E402  (benchmarks/_gpu.py)

VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {},
    "fuse_qkv": {"fuse_qkv": True},
    "tiny_decoder": {"tiny_decoder": "auto"},
    "compiled": {"compile": "unet+vae", "compile_mode": "default"},
    "cudagraphs": {"compile": "unet+vae", "compile_mode": "reduce-overhead"},
}
CHANGES_IMAGES = {"tiny_decoder"}


def cases(tiny: bool) -> dict[str, dict[str, Any]]:
    from models.registry import SD15_BASE, SDXL_BASE

    if tiny:
        return {"sd15": {"model": SD15_BASE, "size": (64, 64), "batch": 2, "steps": 2, "repeats": 1},
                "sdxl": {"model": SDXL_BASE, "size": (64, 64), "batch": 2, "steps": 2, "repeats": 1}}
    return {"sd15": {"model": SD15_BASE, "size": (512, 512), "batch": 16, "steps": 4, "repeats": 6},
            "sdxl": {"model": SDXL_BASE, "size": (1024, 1024), "batch": 8, "steps": 4, "repeats": 4}}


def row(family: str, who: str, variant: str, guidance: float, case: dict[str, Any], seconds: float,
        device: str, **extra: Any) -> dict[str, Any]:
    images = case["batch"] * case["repeats"]
    out = {"family": family, "who": who, "variant": variant, "guidance": guidance,
           "size": "x".join(map(str, case["size"])), "batch": case["batch"], "steps": case["steps"],
           "images": images, "img_s": round(images / seconds, 2), "ms_per_image": round(1000 * seconds / images, 2),
           "peak_gib": _gpu.peak_gib(device), **extra}
    print(f"{family} {who:5} {variant:13} g={guidance}: {out['img_s']:8.2f} img/s {out['ms_per_image']:8.2f} "
          f"ms/img peak {out['peak_gib']} GiB {extra}", flush=True)
    return out


def plain(family: str, case: dict[str, Any], guidances: list[float], device: str, model_dir: Path) -> list[dict]:
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from models.fullsize import LORAS

    fp16 = device.startswith("cuda")
    cls: Any = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    t0 = time.perf_counter()
    pipe = cls.from_pretrained(model_dir / case["model"], dtype=torch.float16 if fp16 else torch.float32,
                               **({"variant": "fp16"} if fp16 else {}))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(model_dir / str(LORAS[family])))
    pipe.fuse_lora()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    width, height = case["size"]
    rows = []
    for guidance in guidances:
        def batch(seed: int, g: float = guidance) -> None:
            pipe(prompt=[_gpu.PROMPT] * case["batch"], width=width, height=height, guidance_scale=g,
                 num_inference_steps=case["steps"], generator=torch.manual_seed(seed))

        warm = _gpu.timed(lambda: batch(0), device)
        _gpu.reset_peak(device)
        seconds = _gpu.timed(lambda: [batch(1 + r) for r in range(case["repeats"])], device)
        rows.append(row(family, "plain", "diffusers", guidance, case, seconds, device,
                        load_s=round(load, 1), warm_s=round(warm, 2)))
    return rows  # the pipeline goes with this frame (the caller frees the memory)


def farm_batches(renderer: Any, inp: Any, batches: int, batch: int) -> None:
    """``batches`` batches of ``inp``, each finished in a second thread while the next one denoises."""
    from models.rendered import RenderItem

    with ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher:
        done = [finisher.submit(renderer.begin_items([RenderItem(inp, 1000 * (k + 1), i) for i in range(batch)])
                                .result) for k in range(batches)]
        for future in done:
            future.result()


def farm(family: str, variant: str, case: dict[str, Any], guidances: list[float], device: str) -> list[dict]:
    from farm.config import Settings
    from models.renderer import DiffusersRenderer

    settings = Settings(**VARIANTS[variant], warm_sizes=["x".join(map(str, case["size"]))], warm_batches=[0])
    t0 = time.perf_counter()
    renderer = DiffusersRenderer.load(case["model"], device, settings)
    load = time.perf_counter() - t0
    renderer.micro_batch = case["batch"]
    compile_s = renderer.warm_compiled()
    rows = []
    for guidance in guidances:
        inp = _gpu.params(case["model"], case["size"], case["steps"], guidance, case["batch"])
        warm = _gpu.timed(lambda: farm_batches(renderer, inp, 1, case["batch"]), device)  # noqa: B023
        _gpu.reset_peak(device)
        seconds = _gpu.timed(lambda: farm_batches(renderer, inp, case["repeats"], case["batch"]), device)  # noqa: B023
        rows.append(row(family, "farm", variant, guidance, case, seconds, device, load_s=round(load, 1),
                        compile_s=round(compile_s, 1), warm_s=round(warm, 2), recompiles=renderer.recompiles,
                        cold_renders=renderer.cold_renders, vae_fp32=renderer.decoder.upcast))
    return rows


def end_to_end(case: dict[str, Any], images: int, device: str) -> dict[str, Any]:
    """A job of ``images`` through an embedded worker, against its renderer alone on as many images."""
    import os

    os.environ["FARM_BATCH_SIZE"] = str(case["batch"])
    from farm.config import reset_settings

    reset_settings()
    with _gpu.embedded_farm(case["model"], device) as renderer:
        warm_s, _ = _gpu.run_job(_gpu.params(case["model"], case["size"], case["steps"], 1.0, case["batch"]))
        job_s, job = _gpu.run_job(_gpu.params(case["model"], case["size"], case["steps"], 1.0, images))
        assert job.status == "COMPLETED", f"e2e job {job.id}: {job.status} {job.error}"
        inp = _gpu.params(case["model"], case["size"], case["steps"], 1.0, case["batch"])
        alone_s = _gpu.timed(lambda: farm_batches(renderer, inp, images // case["batch"], case["batch"]), device)
    os.environ.pop("FARM_BATCH_SIZE")
    reset_settings()
    _gpu.free_memory(device)
    out = {"images": images, "job_s": round(job_s, 2), "job_img_s": round(images / job_s, 2),
           "renderer_img_s": round(images / alone_s, 2), "warm_job_s": round(warm_s, 2),
           "e2e_ratio": round(alone_s / job_s, 3)}
    print(f"e2e {images} images: job {out['job_img_s']} img/s, renderer alone {out['renderer_img_s']} img/s, "
          f"ratio {out['e2e_ratio']}", flush=True)
    return out


def headline(rows: list[dict], family: str, who: str, guidance: float) -> float | None:
    fits = [r["img_s"] for r in rows if r["family"] == family and r["who"] == who and r["guidance"] == guidance
            and r["variant"] not in CHANGES_IMAGES]
    return max(fits, default=None)


def main() -> None:
    args = _gpu.arguments(__doc__, budget=330.0)
    args.add_argument("--e2e-images", type=int, default=256)
    args.add_argument("--variants", default="eager,fuse_qkv,tiny_decoder,compiled,cudagraphs",
                      help="the farm variants to measure (each in the order of the plan)")
    args.add_argument("--only", default="", help="comma-separated stage names, e.g. 'sdxl farm compiled'")
    opts = args.parse_args()
    budget = _gpu.Budget(opts.budget_s)
    model_dir = _gpu.setup(opts)
    device, tiny = opts.device, opts.tiny
    all_cases = cases(tiny)
    guidances = [1.0, 1.5]
    variants = [v for v in opts.variants.split(",") if v]
    if not device.startswith("cuda"):  # nothing to measure there but the code path: no compile on a CPU
        variants = [v for v in variants if "compile" not in VARIANTS[v]]
    # (stage, seconds it needs at least in full mode, what runs it)
    def variant(family: str, name: str) -> Any:
        return lambda: farm(family, name, all_cases[family], guidances, device)

    # (stage, seconds it needs at least in full mode, what runs it), most important first
    plan: list[tuple[str, float, Any]] = [
        ("sd15 plain", 20, lambda: plain("sd15", all_cases["sd15"], guidances, device, model_dir)),
        ("sd15 farm eager", 20, variant("sd15", "eager")),
        ("e2e", 35, lambda: end_to_end(all_cases["sd15"], 8 if tiny else opts.e2e_images, device)),
        ("sdxl plain", 40, lambda: plain("sdxl", all_cases["sdxl"], guidances, device, model_dir)),
        ("sdxl farm eager", 40, variant("sdxl", "eager")),
        ("sd15 farm compiled", 150, variant("sd15", "compiled")),
        ("sdxl farm compiled", 200, variant("sdxl", "compiled")),
        ("sd15 farm fuse_qkv", 20, variant("sd15", "fuse_qkv")),
        ("sd15 farm tiny_decoder", 20, variant("sd15", "tiny_decoder")),
        ("sdxl farm tiny_decoder", 40, variant("sdxl", "tiny_decoder")),
        ("sd15 farm cudagraphs", 150, variant("sd15", "cudagraphs")),
    ]
    plan = [(stage, needs, run) for stage, needs, run in plan if stage.split()[-1] not in VARIANTS
            or stage.split()[-1] in variants]
    if opts.only:
        plan = [step for step in plan if step[0] in opts.only.split(",")]
    rows: list[dict] = []
    e2e: dict[str, Any] = {}
    failed: dict[str, str] = {}
    head = {"benchmark": "gpu", "device": device, "smoke": tiny, **_gpu.versions(device)}

    def report() -> dict[str, Any]:
        return {**head, **{f"{fam}_{who}{cfg}_img_s": headline(rows, fam, who, g) for fam in ("sd15", "sdxl")
                           for who in ("farm", "plain") for cfg, g in (("", 1.0), ("_cfg", 1.5))},
                "e2e_ratio": e2e.get("e2e_ratio"), "e2e": e2e, "rows": rows, "skipped": budget.skipped,
                "failed": failed}

    for stage, needs, run in plan:
        if not budget.allows(stage, 0 if tiny else needs):
            continue
        print(f"== {stage} ({budget.left():.0f} s left)", flush=True)
        try:
            result = run()
        except Exception as exc:  # a stage that breaks is reported, the others still run
            failed[stage] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"{stage} FAILED: {failed[stage]}", flush=True)
            continue
        finally:
            _gpu.free_memory(device)
        if stage == "e2e":
            e2e = result
        else:
            rows.extend(result)
        _gpu.save(report(), opts.out)
    _gpu.finish(report(), opts.out)


if __name__ == "__main__":
    main()
