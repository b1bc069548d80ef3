"""Latency the HTTP API adds around a render: submit → result, minus the worker's render time.

    python benchmarks/api_latency.py [--requests 200] [--concurrency 1] [--steps 2]
                                     [--modes subscribe,poll-10ms,stream,run,run-stream]
                                     [--model farm/tiny-lcm | --model farm/hold --hold-ms 10]

Starts its own private Redis, PostgreSQL and S3 (SeaweedFS) servers, ``farm db upgrade``,
one ``farm worker --model farm/tiny-lcm`` on the CPU (or ``farm/hold``, the scheduling
STAND-IN that sleeps ``--hold-ms`` per image instead of rendering) and ``farm api`` over
plain HTTP on 127.0.0.1 (no TLS: the handshake is not what is measured), makes an API key,
and sends ``--requests`` requests per mode (64x64, ``--steps`` steps, one image,
``sync_mode: false``) with ``farm.client``:

- ``subscribe``: ``SyncClient.subscribe(use_stream=False)`` polling status every 0.1 s, as fal's client does;
- ``poll-10ms``: the same with a 0.01 s poll, which shows what the 0.1 s interval costs;
- ``stream``: ``subscribe(use_stream=True)``, following the queue's server-sent status events
  (``GET /fal-ai/fast-lcm-diffusion/requests/{id}/status/stream``);
- ``run``: one blocking ``POST /run/fal-ai/fast-lcm-diffusion`` (the server waits on the
  ledger for the client and answers the output);
- ``run-stream``: one ``POST /run/fal-ai/fast-lcm-diffusion/stream``, reading its server-sent
  ``status`` events and the final ``output`` event: the route ``fal_client.stream()`` uses
  (it POSTs the arguments to ``https://fal.run/{app}/stream``).

overhead = (result received − submit started) − ``timings.inference`` of the output: the
farm's own time around the render. The JSON's ``run_p50_overhead_ms`` is that of ``run``,
``stream_p50_overhead_ms`` that of ``run-stream`` (fal_client's ``stream()``);
``status_stream_p50_overhead_ms`` is the queue status stream (``stream`` mode).
The ledger's timestamps split it into:

- api: submit sent → job row made (HTTP, key check, validation, idempotency and limit queries);
- queue: → the worker starts the job (publish, broker hop, worker pickup, job read);
- store: → the image row is written, less the render itself (safety check, JPEG encode,
  S3 upload, image row);
- finish: → the job is COMPLETED in the ledger (progress log, completion check);
- notice: → the client sees COMPLETED (the poll interval and one status call; for ``run``
  the server's own wait loop and the output read, so ``result`` is 0 there);
- result: → the output is received (GET, presigning the URL).

All clocks are this machine's.
The last line is one JSON object; the headline figures are those of ``--headline``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stack import ServerStack  # noqa: E402  (benchmarks/_stack.py)

from tests.services import free_port, wait_for  # noqa: E402
from tests.workers import FARM, WorkerProcess  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    # use_stream=False: poll the status route, as fal_client's subscribe() does (farm.client's wait()
    # may default to following the status stream)
    "subscribe": {"poll_interval": 0.1, "use_stream": False},
    "poll-10ms": {"poll_interval": 0.01, "use_stream": False},
    "stream": {"use_stream": True},
    "run": {},
    "run-stream": {},
}
STAGES = ("api", "queue", "store", "finish", "notice", "result")
TINY, HOLD = "farm/tiny-lcm", "farm/hold"


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
    """Private servers, one worker and ``farm api``; ``close()`` stops them all."""

    def __init__(self, workdir: Path, model: str = TINY, hold_ms: int = 10) -> None:
        super().__init__(workdir)
        self.model, self.hold_ms = model, hold_ms
        self.api: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.start_servers(FARM_MAX_JOBS_IN_FLIGHT="10000", FARM_HOLD_MS=str(self.hold_ms))
        self.key = self.farm("keys", "create", "--owner", "bench", "--name", "api_latency").strip().splitlines()[-1]
        worker = WorkerProcess(self.env, model=self.model)
        self.closers.append(worker.stop)
        worker.start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = open(self.workdir / "api.log", "wb")  # noqa: SIM115 (closed in close())
        command = [FARM, "api", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        self.api = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        self.closers.append(self._stop_api)
        self.closers.append(log.close)

        def healthy() -> bool:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
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

    def ledger_times(self, ids: list[str]) -> dict[str, tuple[float, ...]]:
        """request id or idempotency key → Unix times (created, started, last image stored, finished)."""
        from sqlalchemy import create_engine, text

        query = text("SELECT j.id, j.idempotency_key, j.created_at, j.started_at, max(i.created_at), j.finished_at "
                     "FROM jobs j JOIN images i ON i.job_id = j.id "
                     "WHERE j.id = ANY(:ids) OR j.idempotency_key = ANY(:ids) GROUP BY j.id")  # fmt: skip
        engine = create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(query, {"ids": ids}).all()
        finally:
            engine.dispose()
        out = {}
        for rid, key, *stamps in rows:
            out[rid] = out[key or rid] = tuple(t.timestamp() for t in stamps)
        return out


def one_request(url: str, key: str, mode: str, payload: dict[str, Any]) -> dict[str, Any]:
    from farm.client import Completed, Status

    client = _client(url, key)
    seen: dict[str, float] = {}

    def on_update(status: Status) -> None:
        if isinstance(status, Completed):
            seen["done"] = time.time()

    t0 = time.time()
    if mode == "run":
        rid = uuid.uuid4().hex  # the run reply has no id: the input's request_id finds the job in the ledger
        out = client.run({**payload, "request_id": rid})
    elif mode == "run-stream":
        rid = uuid.uuid4().hex
        out = run_stream(client, {**payload, "request_id": rid}, seen)
    else:
        handle = client.submit(payload)
        seen["submitted"] = time.time()
        rid = handle.request_id
        out = handle.wait(on_queue_update=on_update, **MODES[mode])
    t1 = time.time()
    return {"rid": rid, "t0": t0, "t1": t1, "done": seen.get("done", t1), "inference": out.timings["inference"]}


def run_stream(client: Any, payload: dict[str, Any], seen: dict[str, float]) -> Any:
    """``POST /run/{app}/stream`` as ``fal_client.stream()`` does: status events, then the output event."""
    import httpx
    from httpx_sse import EventSource

    from farm.client._common import status_event
    from farm.schemas import GenerateOutput

    url = client.endpoint.run_url + "/stream"
    # the SyncClient's own connection pool and key header, as the run mode uses
    with client._http.stream("POST", url, json=payload, headers={"Accept": "text/event-stream"},
                             timeout=httpx.Timeout(30, read=300)) as response:  # fmt: skip
        if not response.is_success:
            response.read()
            raise SystemExit(f"POST {url}: {response.status_code} {response.text[:500]}")
        for sse in EventSource(response).iter_sse():  # as farm.client reads a live stream
            event = status_event(sse)
            if event is None:
                continue
            if "error_type" in event:
                raise SystemExit(f"POST {url}: error event {event}")
            if event.get("status") == "COMPLETED":
                seen["done"] = time.time()
            elif "timings" in event:
                return GenerateOutput.model_validate(event)
    raise SystemExit(f"POST {url}: the stream ended without an output event")


_clients = threading.local()


def _client(url: str, key: str) -> Any:
    from farm.client import SyncClient

    if getattr(_clients, "client", None) is None:
        _clients.client = SyncClient(url, key=key, max_retries=0)
    return _clients.client


def measure(stack: Stack, mode: str, n: int, concurrency: int, payload: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        samples = list(pool.map(lambda _: one_request(stack.url, stack.key, mode, payload), range(n)))
    wall = time.perf_counter() - started
    total = [(s["t1"] - s["t0"]) * 1000 for s in samples]
    render = [s["inference"] * 1000 for s in samples]
    overhead = [t - r for t, r in zip(total, render, strict=True)]
    report: dict[str, Any] = {
        "requests": n,
        "p50_overhead_ms": round(pct(overhead, 0.5), 2),
        "p90_overhead_ms": round(pct(overhead, 0.9), 2),
        "p99_overhead_ms": round(pct(overhead, 0.99), 2),
        "mean_overhead_ms": round(statistics.fmean(overhead), 2),
        "p50_total_ms": round(pct(total, 0.5), 2),
        "p99_total_ms": round(pct(total, 0.99), 2),
        "p50_render_ms": round(pct(render, 0.5), 2),
        "requests_per_s": round(n / wall, 2),
    }
    ids = [s["rid"] for s in samples]
    if ids:
        times = stack.ledger_times(ids)
        parts: dict[str, list[float]] = {k: [] for k in STAGES}
        for s in samples:
            created, begun, stored, finished = times[s["rid"]]
            parts["api"].append(created - s["t0"])
            parts["queue"].append(begun - created)
            parts["store"].append(stored - begun - s["inference"])
            parts["finish"].append(finished - stored)
            parts["notice"].append(s["done"] - finished)
            parts["result"].append(s["t1"] - s["done"])
        report["split_p50_ms"] = {k: round(pct(v, 0.5) * 1000, 2) for k, v in parts.items()}
        report["split_mean_ms"] = {k: round(statistics.fmean(v) * 1000, 2) for k, v in parts.items()}
        own = [sum(parts[k][i] for k in STAGES if k != "notice") * 1000 for i in range(n)]
        report["p50_without_notice_ms"] = round(pct(own, 0.5), 2)  # the farm's part, whatever the polling
    return report


def status_call_ms(stack: Stack, payload: dict[str, Any], n: int = 200) -> float:
    """p50 of one GET status round trip on a finished job: the floor of any poll."""
    client = _client(stack.url, stack.key)
    handle = client.submit(payload)
    handle.wait(poll_interval=0.01)
    calls = []
    for _ in range(n):
        t = time.perf_counter()
        handle.status()
        calls.append((time.perf_counter() - t) * 1000)
    return round(pct(calls, 0.5), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per mode")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, choices=(1, 2))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--headline", default="subscribe", choices=tuple(MODES))
    parser.add_argument("--no-safety-checker", action="store_true", help="skip the (tiny) safety checker")
    parser.add_argument("--model", default=TINY, choices=(TINY, HOLD),
                        help="the worker's model; farm/hold is a STAND-IN that sleeps --hold-ms per image")
    parser.add_argument("--hold-ms", type=int, default=10, help="FARM_HOLD_MS of the farm/hold worker")
    args = parser.parse_args()
    if args.hold_ms < 0:
        parser.error("need --hold-ms >= 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    if args.headline not in modes:
        modes.insert(0, args.headline)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    hold = args.model == HOLD
    payload = {"model_name": args.model, "prompt": "a lighthouse at dusk", "num_images": 1,
               "image_size": {"width": 64, "height": 64}, "num_inference_steps": args.steps,
               "sync_mode": False, "enable_safety_checker": not (args.no_safety_checker or hold)}  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="farm-bench-api-"))
    stack = Stack(workdir, args.model, args.hold_ms)
    ok = False
    try:
        print("starting Redis, PostgreSQL, S3 (SeaweedFS), farm worker and farm api …", file=sys.stderr)
        stack.start()
        for _ in range(args.warmup):
            one_request(stack.url, stack.key, "poll-10ms", payload)
        floor = status_call_ms(stack, payload)
        results = {}
        for mode in modes:
            print(f"{mode}: {args.requests} requests, concurrency {args.concurrency} …", file=sys.stderr)
            results[mode] = measure(stack, mode, args.requests, args.concurrency, payload)
        ok = True
    finally:
        stack.close()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir} (api.log) for a look", file=sys.stderr)

    model = (f"farm/hold (STAND-IN: holds {args.hold_ms} ms, renders nothing) 64x64" if hold
             else f"farm/tiny-lcm 64x64 {args.steps} step(s)")  # fmt: skip
    print(f"API latency on loopback, plain HTTP, {model}, one image, "
          f"concurrency {args.concurrency}, {os.cpu_count()} CPUs; one status call p50 {floor} ms")  # fmt: skip
    print(f"{'mode':<10} {'overhead p50':>12} {'p90':>8} {'p99':>8} {'total p50':>10} {'render p50':>10}  "
          f"split p50 ms ({' / '.join(STAGES)})")  # fmt: skip
    for mode, r in results.items():
        split = " / ".join(f"{v:.1f}" for v in r["split_p50_ms"].values())
        print(f"{mode:<10} {r['p50_overhead_ms']:>10.1f}ms {r['p90_overhead_ms']:>6.1f}ms "
              f"{r['p99_overhead_ms']:>6.1f}ms {r['p50_total_ms']:>8.1f}ms "
              f"{r['p50_render_ms']:>8.1f}ms  {split}")  # fmt: skip
    print("overhead = total - render; 'notice' is the wait for the next status poll (or event) after the job "
          "finished, the rest is the farm's own work:")  # fmt: skip
    for mode, r in results.items():
        print(f"  {mode}: {r['p50_overhead_ms']:.1f} ms p50 = notice {r['split_p50_ms']['notice']:.1f} ms "
              f"+ farm {r['p50_without_notice_ms']:.1f} ms (p50s, so the parts do not add up exactly)")  # fmt: skip

    def own(mode: str, q: str) -> float | None:
        return results[mode][f"{q}_overhead_ms"] if mode in results else None

    for mode, route in (("run", "POST /run/fal-ai/fast-lcm-diffusion, answers the output"),
                        ("run-stream", "POST /run/fal-ai/fast-lcm-diffusion/stream, fal_client.stream()")):  # fmt: skip
        if mode in results:
            print(f"farm's own time on {route}: p50 {own(mode, 'p50')} ms, p90 {own(mode, 'p90')} ms "
                  f"(end to end minus timings.inference, {results[mode]['requests']} requests)")  # fmt: skip
    head = results[args.headline]
    report = {
        "benchmark": "api_latency",
        "headline_mode": args.headline,
        "requests": head["requests"],
        "concurrency": args.concurrency,
        "p50_overhead_ms": head["p50_overhead_ms"],
        "p99_overhead_ms": head["p99_overhead_ms"],
        "p50_total_ms": head["p50_total_ms"],
        "p99_total_ms": head["p99_total_ms"],
        "p50_without_notice_ms": head["p50_without_notice_ms"],
        "status_call_p50_ms": floor,
        "run_p50_overhead_ms": own("run", "p50"),
        "run_p90_overhead_ms": own("run", "p90"),
        "stream_p50_overhead_ms": own("run-stream", "p50"),
        "stream_p90_overhead_ms": own("run-stream", "p90"),
        "stream_route": "POST /run/fal-ai/fast-lcm-diffusion/stream (fal_client.stream(); mode run-stream)",
        "status_stream_p50_overhead_ms": own("stream", "p50"),
        "modes": results,
        "transport": "http on 127.0.0.1 (no TLS)",
        "model": args.model + (" (stand-in: holds, does not render)" if hold else ""),
        "hold_ms": args.hold_ms if hold else None,
        "image": f"64x64, {'held' if hold else f'{args.steps} steps'}, 1 image, sync_mode false, jpeg",
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
