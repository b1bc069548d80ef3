"""Bulk dataset throughput: the farm against a plain loop over the pipeline, in the same run.

    python benchmarks/bulk.py --images 2000 [--workers 1] [--size 64x64] [--steps 2]
    python benchmarks/bulk.py --model farm/hold --hold-ms 0 --images 5000

Farm: private Redis, PostgreSQL ledger, SeaweedFS S3, K ``farm worker --model farm/tiny-lcm``
processes, and ``farm bulk run`` on a .txt manifest of N distinct prompts (one image each)
into a local WebDataset (shards of 1000). Measured from the bulk job's creation to its
completion in the ledger (ingest, submit, render, store, collect, shard writing). Direct: the
same N renders (same prompts, seeds and parameters) and JPEG encodes in this process, one
after another, with the model loaded once. The tiny model renders in milliseconds, so every
per-image overhead of the farm shows.

``--model farm/hold`` runs ``farm/hold`` workers instead: a STAND-IN that sleeps ``--hold-ms``
per image (``FARM_HOLD_MS``; 0 = the control plane alone: ingest, submit, claims, messages,
ledger writes, storage, collection, shards) and renders flat images. There is no direct loop
then (it would render nothing) and ``ratio`` and ``direct_images_per_s`` are null.

farm_images_per_s = images done / seconds, seconds = bulk job created -> finished in the ledger.
``profile.cpu_ms_per_image``: CPU time of each process over the ``farm bulk run`` (the driver CLI,
start-up included; the workers; PostgreSQL and its backends; SeaweedFS; Redis) per image done (with psutil).
A human summary, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stack import ServerStack  # noqa: E402  (benchmarks/_stack.py)

from tests.workers import FARM, WorkerProcess  # noqa: E402

TINY = "farm/tiny-lcm"
HOLD = "farm/hold"
PHASES = re.compile(r"claim (?P<claim>[\d.]+) ms, render (?P<render>[\d.]+) ms, hand-off [\d.]+ ms "
                    r"\((?P<images>\d+) image\(s\), (?P<requests>\d+) request")


def direct(n: int, width: int, height: int, steps: int, base_seed: int) -> float:
    """Images per second of a plain render + encode loop in this process."""
    from farm.schemas import GenerateInput
    from models.encode import encode_image
    from models.renderer import DiffusersRenderer

    renderer = DiffusersRenderer.load(TINY)
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


def _processes(stack: ServerStack, workers: list[WorkerProcess]) -> dict[str, list[Any]]:
    """The processes whose CPU time is reported, by role (empty without psutil)."""
    try:
        import psutil
    except ImportError:
        return {}
    postmaster = int((stack.pg.data / "postmaster.pid").read_text().split()[0])
    return {"worker(s)": [psutil.Process(w.proc.pid) for w in workers if w.proc is not None],
            "postgresql": [psutil.Process(postmaster)],
            "SeaweedFS (S3)": [psutil.Process(stack.s3.proc.pid)] if stack.s3.proc else [],
            "redis": [psutil.Process(stack.redis.proc.pid)] if stack.redis.proc else []}


def _cpu(procs: list[Any]) -> float:
    """CPU seconds of ``procs`` and their children, live and reaped."""
    import psutil

    total = 0.0
    for proc in procs:
        try:
            family = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in family:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system + t.children_user + t.children_system
    return total


def prompt(i: int) -> str:
    return f"sample {i}: a lighthouse at dusk, oil painting"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-in-flight", type=int, default=256)
    parser.add_argument("--model", default=TINY, choices=(TINY, HOLD),
                        help="farm/hold: a STAND-IN that sleeps --hold-ms per image; no direct loop then")
    parser.add_argument("--hold-ms", type=int, default=0, help="FARM_HOLD_MS of the farm/hold workers")
    args = parser.parse_args()
    if args.hold_ms < 0 or args.images < 1 or args.workers < 1:
        parser.error("need --images >= 1, --workers >= 1, --hold-ms >= 0")
    hold = args.model == HOLD
    width, height = (int(v) for v in args.size.lower().split("x"))
    workdir = Path(tempfile.mkdtemp(prefix="farm-bench-bulk-"))
    stack = ServerStack(workdir)
    try:
        kind = f"farm/hold (stand-in, {args.hold_ms} ms)" if hold else "tiny"
        print(f"starting Redis, PostgreSQL, S3 (SeaweedFS) and {args.workers} {kind} worker(s) …", file=sys.stderr)
        stack.start_servers(**({"FARM_HOLD_MS": str(args.hold_ms)} if hold else {}))
        tag = "hold" if hold else "tiny"
        workers = [WorkerProcess(stack.env, model=args.model, name=f"{tag}{k}@bench.%h") for k in range(args.workers)]
        for w in workers:
            stack.closers.append(w.stop)
            w.start()
        manifest = workdir / "prompts.txt"
        manifest.write_text("".join(prompt(i) + "\n" for i in range(args.images)))
        out = workdir / "dataset"
        cmd = [FARM, "bulk", "run", str(manifest), "--out", str(out), "--model", args.model, "--image-size", args.size,
               "--steps", str(args.steps), "--expand", "none", "--shard-size", "1000", "--seed", "0",
               "--job-id", "bench", "--max-in-flight", str(args.max_in_flight)]
        if hold:
            cmd.append("--no-safety-checker")  # farm/hold has none
        print(f"farm: {args.images} images …", file=sys.stderr)
        servers = _processes(stack, workers)
        cpu_before = {name: _cpu(procs) for name, procs in servers.items()}
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=stack.env, capture_output=True, text=True, timeout=3600)
        cli_seconds = time.perf_counter() - t0
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the CLI: the only child reaped meanwhile
        cpu_seconds = {name: _cpu(procs) - cpu_before[name] for name, procs in servers.items()}
        cpu_seconds["driver (farm bulk run)"] = (children_after.ru_utime - children_before.ru_utime
                                                 + children_after.ru_stime - children_before.ru_stime)
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
        direct_rate: float | None = None
        if not hold:  # the direct loop renders the real tiny model; farm/hold has no render worth comparing
            print(f"direct: {args.images} images …", file=sys.stderr)
            direct_rate = direct(args.images, width, height, args.steps, base_seed=0)
        farm_rate = final["done"] / max(farm_seconds, 1e-6)
        ratio = farm_rate / direct_rate if direct_rate else None

        def mean(values: list[float]) -> float | None:
            return round(statistics.fmean(values), 2) if values else None

        profile = {
            "render_tasks": len(phases),
            "images_per_render_task_mean": mean([int(m["images"]) for m in phases]),
            "requests_per_render_task_mean": mean([int(m["requests"]) for m in phases]),
            "claim_ms_mean": mean([float(m["claim"]) for m in phases]),
            "render_ms_per_image_mean": mean(per_image_render),
            "messages_dropped_already_claimed": dropped,
            "first_image_after_s": round((first_image - created).total_seconds(), 2),
            "last_image_to_finished_s": round((finished - last_image).total_seconds(), 2),
            "cli_seconds_incl_startup": round(cli_seconds, 2),
            # CPU of each process over the CLI run (start-up included), per image done; null without psutil
            "cpu_ms_per_image": {name: round(1000 * v / max(1, final["done"]), 2) for name, v in cpu_seconds.items()}
            if servers else None,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        }
        what = (f"farm/hold (STAND-IN: {args.hold_ms} ms per image, renders nothing)" if hold
                else f"{TINY} {args.size}, {args.steps} steps")  # fmt: skip
        print(f"bulk: {args.images} images, {what}, {args.workers} worker(s), {os.cpu_count()} CPU(s)")
        if direct_rate is not None and ratio is not None:
            versus = f"direct loop {direct_rate:.1f} img/s, ratio {ratio:.3f}"
        else:
            versus = "no direct loop (farm/hold), ratio n/a"
        print(f"farm {farm_rate:.1f} img/s ({final['done']} done, {final['failed']} failed, in {farm_seconds:.1f} s "
              f"from bulk job created to finished); {versus}")  # fmt: skip
        print(f"render tasks {profile['render_tasks']}, {profile['images_per_render_task_mean']} images each (mean), "
              f"claim {profile['claim_ms_mean']} ms, render {profile['render_ms_per_image_mean']} ms per image; "
              f"first image after {profile['first_image_after_s']} s, last image -> done "
              f"{profile['last_image_to_finished_s']} s; CLI {profile['cli_seconds_incl_startup']} s with start-up; "
              f"{dropped} message(s) dropped as already claimed")  # fmt: skip
        if profile["cpu_ms_per_image"]:
            shares = ", ".join(f"{name} {ms} ms" for name, ms in profile["cpu_ms_per_image"].items())
            print(f"CPU per image done: {shares} (load average {profile['load_avg_1m_at_end']})")
        print(json.dumps({
            "benchmark": "bulk", "model": args.model + (" (stand-in: holds, does not render)" if hold else ""),
            "hold_ms": args.hold_ms if hold else None, "images": args.images, "workers": args.workers,
            "size": args.size, "steps": args.steps, "farm_seconds": round(farm_seconds, 3),
            "farm_images_per_s": round(farm_rate, 2),
            "direct_images_per_s": round(direct_rate, 2) if direct_rate is not None else None,
            "ratio": round(ratio, 4) if ratio is not None else None,
            "done": final["done"], "failed": final["failed"], "shards": final["shards_written"], "profile": profile,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }))
    finally:
        stack.close()


if __name__ == "__main__":
    main()
