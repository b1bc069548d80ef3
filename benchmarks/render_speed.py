"""Render throughput of one worker's DiffusersRenderer, in process (no broker, no ledger).

    python benchmarks/render_speed.py [--model farm/tiny-lcm] [--device cpu] [--size 512x512]
                                [--steps 4] [--images 32] [--guidance-scale 1.0]

Loads the model once (as a worker does), renders one warm-up request, then renders
``--images`` images in requests of ``--per-request`` and reports images/s. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="farm/tiny-lcm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--per-request", type=int, default=8)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    args = parser.parse_args()

    os.environ.setdefault("FARM_DATA_DIR", tempfile.mkdtemp(prefix="farm-bench-"))
    from farm.config import get_settings
    from farm.schemas import GenerateInput
    from models.encode import encode_image
    from models.renderer import DiffusersRenderer

    width, height = (int(v) for v in args.size.lower().split("x"))
    params = GenerateInput(
        model_name=args.model, prompt="a lighthouse at dusk, oil painting", num_inference_steps=args.steps,
        image_size={"width": width, "height": height}, guidance_scale=args.guidance_scale,
        num_images=args.per_request, enable_safety_checker=False,
    )
    started = time.perf_counter()
    renderer = DiffusersRenderer.load(args.model, args.device, get_settings())
    load_s = time.perf_counter() - started
    renderer.render(params, 0, list(range(min(2, args.per_request))))  # warm-up

    done, render_s, encode_s = 0, 0.0, 0.0
    seed = 1000
    while done < args.images:
        n = min(args.per_request, args.images - done)
        t0 = time.perf_counter()
        result = renderer.render(params, seed, list(range(n)))
        t1 = time.perf_counter()
        for img in result.images:
            encode_image(img.image, "jpeg")
        render_s += t1 - t0
        encode_s += time.perf_counter() - t1
        done += n
        seed += n
    total = render_s + encode_s
    report = {
        "benchmark": "render",
        "model": args.model,
        "device": args.device,
        "size": f"{width}x{height}",
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "images": done,
        "per_request": args.per_request,
        "micro_batch": renderer.micro_batch,
        "load_seconds": round(load_s, 3),
        "render_seconds": round(render_s, 3),
        "encode_seconds": round(encode_s, 3),
        "images_per_s": round(done / total, 3),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "date": dt.date.today().isoformat(),
    }
    print(f"{done} images {width}x{height}, {args.steps} steps on {args.device}: "
          f"{report['images_per_s']} img/s (render {render_s:.2f} s, encode {encode_s:.2f} s, load {load_s:.2f} s)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
