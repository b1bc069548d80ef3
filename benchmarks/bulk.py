"""Bulk dataset throughput: the farm against a plain loop over the pipeline, in the same run.

    python benchmarks/bulk.py --images 2000 [--workers 1] [--size 64x64] [--steps 2]

Farm: private Redis, PostgreSQL ledger, moto S3, K ``farm worker --model farm/tiny-lcm``
processes, and ``farm bulk run`` on a .txt manifest of N distinct prompts (one image each)
into a local WebDataset (shards of 1000). Measured from the bulk job's creation to its
completion in the ledger (ingest, submit, render, store, collect, shard writing). Direct: the
same N renders (same prompts, seeds and parameters) and JPEG encodes in this process, one
after another, with the model loaded once. The tiny model renders in milliseconds, so every
per-image overhead of the farm shows. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._stack import ServerStack  # noqa: E402
from tests.workers import FARM, WorkerProcess  # noqa: E402

TINY = "farm/tiny-lcm"
PHASES = re.compile(r"claim (?P<claim>[\d.]+) ms, render (?P<render>[\d.]+) ms, hand-off [\d.]+ ms "
                    r"\((?P<images>\d+) image\(s\), (?P<requests>\d+) request")


def direct(n: int, width: int, height: int, steps: int, base_seed: int) -> float:
    """Images per second of a plain render + encode loop in this process."""
    from farm.schemas import GenerateInput
    from models.encode import encode_image
    from models.runtime import Renderer

    renderer = Renderer.load(TINY)
    warm = GenerateInput(model_name=TINY, prompt="warm", image_size={"width": width, "height": height},
                         num_inference_steps=steps, enable_safety_checker=False)
    renderer.render(warm, 0, [0])
    t0 = time.perf_counter()
    for i in range(n):
        params = GenerateInput(model_name=TINY, prompt=prompt(i), image_size={"width": width, "height": height},
                               num_inference_steps=steps)
        image = renderer.render(params, base_seed + i, [0]).images[0].image
        encode_image(image, params.format)
    return n / (time.perf_counter() - t0)


def prompt(i: int) -> str:
    return f"sample {i}: a lighthouse at dusk, oil painting"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-in-flight", type=int, default=256)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    workdir = Path(tempfile.mkdtemp(prefix="farm-bench-bulk-"))
    stack = ServerStack(workdir)
    try:
        print(f"starting Redis, PostgreSQL, S3 (moto) and {args.workers} tiny worker(s) …", file=sys.stderr)
        stack.start_servers()
        workers = [WorkerProcess(stack.env, model=TINY, name=f"tiny{k}@bench.%h") for k in range(args.workers)]
        for w in workers:
            stack.closers.append(w.stop)
            w.start()
        manifest = workdir / "prompts.txt"
        manifest.write_text("".join(prompt(i) + "\n" for i in range(args.images)))
        out = workdir / "dataset"
        cmd = [FARM, "bulk", "run", str(manifest), "--out", str(out), "--model", TINY, "--image-size", args.size,
               "--steps", str(args.steps), "--expand", "none", "--shard-size", "1000", "--seed", "0",
               "--job-id", "bench", "--max-in-flight", str(args.max_in_flight)]
        print(f"farm: {args.images} images …", file=sys.stderr)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=stack.env, capture_output=True, text=True, timeout=3600)
        cli_seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"farm bulk run failed:\n{done.stderr[-3000:]}")
        final = json.loads(done.stdout)
        os.environ.update({k: v for k, v in stack.env.items() if k.startswith("FARM_")})
        from sqlalchemy import text

        from db.session import session_scope
        from farm.config import reset_settings

        reset_settings()
        with session_scope() as s:
            created, finished = s.execute(
                text("SELECT created_at, finished_at FROM bulk_jobs WHERE id = 'bench'")).one()
            first_image, last_image = s.execute(text(
                "SELECT min(i.created_at), max(i.created_at) FROM images i JOIN bulk_samples b ON b.job_id = i.job_id "
                "WHERE b.bulk_id = 'bench'")).one()
        farm_seconds = (finished - created).total_seconds()
        time.sleep(0.3)
        phases = [m for w in workers for line in w.lines if (m := PHASES.search(line))]
        dropped = sum("already done or leased elsewhere" in line for w in workers for line in w.lines)
        per_image_render = [float(m["render"]) / int(m["images"]) for m in phases if int(m["images"])]
        print(f"direct: {args.images} images …", file=sys.stderr)
        direct_rate = direct(args.images, width, height, args.steps, base_seed=0)
        farm_rate = final["done"] / farm_seconds
        profile = {
            "render_tasks": len(phases),
            "images_per_render_task_mean": round(statistics.fmean(int(m["images"]) for m in phases), 2),
            "requests_per_render_task_mean": round(statistics.fmean(int(m["requests"]) for m in phases), 2),
            "claim_ms_mean": round(statistics.fmean(float(m["claim"]) for m in phases), 2),
            "render_ms_per_image_mean": round(statistics.fmean(per_image_render), 2),
            "messages_dropped_already_claimed": dropped,
            "first_image_after_s": round((first_image - created).total_seconds(), 2),
            "last_image_to_finished_s": round((finished - last_image).total_seconds(), 2),
            "cli_seconds_incl_startup": round(cli_seconds, 2),
        }
        print(f"farm {farm_rate:.1f} img/s ({final['done']} in {farm_seconds:.1f} s), direct {direct_rate:.1f} img/s, "
              f"ratio {farm_rate / direct_rate:.3f}; {profile}", file=sys.stderr)
        print(json.dumps({
            "benchmark": "bulk", "model": TINY, "images": args.images, "workers": args.workers, "size": args.size,
            "steps": args.steps, "farm_seconds": round(farm_seconds, 3), "farm_images_per_s": round(farm_rate, 2),
            "direct_images_per_s": round(direct_rate, 2), "ratio": round(farm_rate / direct_rate, 4),
            "done": final["done"], "failed": final["failed"], "shards": final["shards_written"], "profile": profile,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }))
    finally:
        stack.close()


if __name__ == "__main__":
    main()
