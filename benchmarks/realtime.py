"""Latency the realtime socket adds around a render: one connection, frames one after another.

    python benchmarks/realtime.py [--frames 500] [--warmup 20] [--steps 2] [--tls] [--safety-checker]
                                  [--task text-to-image|image-to-image]

Starts its own private Redis, PostgreSQL and S3 (SeaweedFS) servers, ``farm db upgrade``, one
``farm worker --model farm/tiny-lcm`` on the CPU and ``farm api`` on 127.0.0.1 (plain ``ws://``
unless ``--tls``), makes an API key and opens one realtime connection with ``farm.client``
(``SyncClient.realtime``). It sends ``--frames`` frames (64x64, ``--steps`` steps, one image, jpeg,
safety checker off unless ``--safety-checker``), each after the previous result came back.

overhead = round trip (send → result decoded) − ``timings.render`` of the result: the worker's
renderer call (the denoising loop and decode, and the safety check when on). What remains is the
farm's frame path: msgpack, the socket, admission in the API, the Redis lane and reply channel,
the worker's wake-up, JPEG encoding. ``timings.inference`` (the pipeline alone) is reported too.

``--task image-to-image`` (fal's sketch demo): each frame also carries a 512x512 JPEG as ``image_bytes``
to ``…/image-to-image/realtime`` (strength 0.5, still rendered at 64x64), so the overhead adds the
frame's bytes on the wire and in Redis, the API's header check and the worker's decode and resize. The
same connection count and frames are measured for text-to-image first, on the same stack, and both
figures are reported (``text_to_image`` and ``image_to_image``).

All clocks are this machine's. The last line is one JSON object with ``p50_overhead_ms`` and
``p99_overhead_ms``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stack import ServerStack  # noqa: E402  (benchmarks/_stack.py)

from tests.services import free_port, wait_for  # noqa: E402
from tests.workers import FARM, WorkerProcess  # noqa: E402

TINY = "farm/tiny-lcm"
APP = "fal-ai/fast-lcm-diffusion"


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class Stack(ServerStack):
    """Private servers, one tiny-model worker and ``farm api``; ``close()`` stops them all."""

    def __init__(self, workdir: Path, tls: bool) -> None:
        super().__init__(workdir)
        self.tls = tls
        self.api: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.start_servers()
        self.key = self.farm("keys", "create", "--owner", "bench", "--name", "realtime").strip().splitlines()[-1]
        worker = WorkerProcess(self.env, model=TINY)
        self.closers.append(worker.stop)
        worker.start()
        port = free_port()
        command = [FARM, "api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        self.context: ssl.SSLContext | None = None
        if self.tls:
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1")
            cert.private_key_and_cert_chain_pem.write_to_path(str(self.workdir / "server.pem"))
            command += ["--tls-cert", str(self.workdir / "server.pem"), "--tls-key", str(self.workdir / "server.pem")]
            self.context = ssl.create_default_context()
            ca.configure_trust(self.context)
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        log = open(self.workdir / "api.log", "wb")  # noqa: SIM115 (closed in close())
        self.api = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        self.closers.append(self._stop_api)
        self.closers.append(log.close)

        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2, context=self.context) as resp:
                return bool(resp.status == 200)

        wait_for(healthy, "farm api", self.api, 60)

    def _stop_api(self) -> None:
        if self.api is not None and self.api.poll() is None:
            os.killpg(self.api.pid, signal.SIGTERM)
            try:
                self.api.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.api.pid, signal.SIGKILL)
                self.api.wait(5)

    def usage(self) -> list[Any]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(text(
                    "SELECT source, frames, gpu_seconds FROM usage WHERE owner = 'bench'")).all()]  # fmt: skip
        finally:
            engine.dispose()


def sketch_jpeg() -> bytes:
    """A 512x512 JPEG with detail (a gradient and noise: not a trivially small file), as a sketch frame carries."""
    import io

    from PIL import Image

    noise = Image.effect_noise((512, 512), 64).convert("RGB")
    gradient = Image.linear_gradient("L").resize((512, 512)).convert("RGB")
    buf = io.BytesIO()
    Image.blend(noise, gradient, 0.5).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def measure(stack: Stack, frames: int, warmup: int, payload: dict[str, Any], app: str = APP) -> dict[str, Any]:
    from farm.client import SyncClient

    rtt: list[float] = []
    render: list[float] = []
    inference: list[float] = []
    with SyncClient(stack.url, key=stack.key, app=app, verify=stack.context) as farm, \
            farm.realtime(max_buffering=1) as conn:
        for i in range(warmup + frames):
            t0 = time.perf_counter()
            conn.send({**payload, "seed": i, "request_id": f"f{i}"})
            result = conn.recv(timeout=60)
            t1 = time.perf_counter()
            if result is None or result.get("request_id") != f"f{i}" or not result["images"][0]["content"]:
                raise SystemExit(f"frame {i}: unexpected result {str(result)[:300]}")
            if i < warmup:
                continue
            rtt.append((t1 - t0) * 1000)
            render.append(result["timings"]["render"] * 1000)
            inference.append(result["timings"]["inference"] * 1000)
    overhead = [t - r for t, r in zip(rtt, render, strict=True)]
    return {
        "frames": frames,
        "p50_overhead_ms": round(pct(overhead, 0.5), 2),
        "p90_overhead_ms": round(pct(overhead, 0.9), 2),
        "p99_overhead_ms": round(pct(overhead, 0.99), 2),
        "p50_round_trip_ms": round(pct(rtt, 0.5), 2),
        "p99_round_trip_ms": round(pct(rtt, 0.99), 2),
        "p50_render_ms": round(pct(render, 0.5), 2),
        "p50_inference_ms": round(pct(inference, 0.5), 2),
        "frames_per_s": round(len(rtt) / (sum(rtt) / 1000), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tls", action="store_true", help="wss:// with a test CA (default: ws:// on loopback)")
    parser.add_argument("--safety-checker", action="store_true", help="run the (tiny) safety checker per frame")
    parser.add_argument("--task", choices=["text-to-image", "image-to-image"], default="text-to-image",
                        help="image-to-image: a 512x512 JPEG in each frame, measured beside text-to-image")
    args = parser.parse_args()
    if args.frames < 1 or args.warmup < 0:
        parser.error("need --frames >= 1 and --warmup >= 0")
    payload = {"model_name": TINY, "prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64},
               "num_inference_steps": args.steps, "enable_safety_checker": args.safety_checker}  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="farm-bench-realtime-"))
    stack = Stack(workdir, args.tls)
    try:
        stack.start()
        load_before = os.getloadavg()
        result = text = measure(stack, args.frames, args.warmup, payload)
        sketch: dict[str, Any] | None = None
        if args.task == "image-to-image":
            jpeg = sketch_jpeg()
            frame = {**payload, "image_bytes": jpeg, "strength": 0.5}
            result = sketch = measure(stack, args.frames, args.warmup, frame, f"{APP}/image-to-image")
            sketch["jpeg_bytes"] = len(jpeg)
        load_after = os.getloadavg()
        time.sleep(0.5)
        usage = stack.usage()
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{result['frames']} frames over one {'wss' if args.tls else 'ws'} connection: round trip p50 "
          f"{result['p50_round_trip_ms']} ms, render p50 {result['p50_render_ms']} ms; overhead p50 "
          f"{result['p50_overhead_ms']} ms, p90 {result['p90_overhead_ms']} ms, p99 {result['p99_overhead_ms']} ms")
    if sketch is not None:
        print(f"  text-to-image beside it: overhead p50 {text['p50_overhead_ms']} ms, p99 {text['p99_overhead_ms']} "
              f"ms; image-to-image ({sketch['jpeg_bytes']} byte 512x512 JPEG per frame): overhead p50 "
              f"{sketch['p50_overhead_ms']} ms, p99 {sketch['p99_overhead_ms']} ms")
    print(f"usage ledger after close: {usage}")
    report = {
        "benchmark": "realtime",
        "task": args.task,
        **result,
        **({"text_to_image": text, "image_to_image": sketch} if sketch is not None else {}),
        "warmup_frames": args.warmup,
        "transport": f"{'wss (TLS)' if args.tls else 'ws'} on 127.0.0.1",
        "model": TINY,
        "image": f"64x64, {args.steps} steps, 1 image, jpeg, safety checker {'on' if args.safety_checker else 'off'}"
                 + (", image-to-image from a 512x512 JPEG (image_bytes), strength 0.5" if sketch is not None else ""),
        "usage_rows": usage,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
