"""Scheduling efficiency of a pool: how busy K workers are kept, with ``farm/hold`` as the GPU.

    python benchmarks/scheduling.py --workers K --images N --hold-ms T [--batch-size 8]

``farm/hold`` is a STAND-IN, not a model: it sleeps T ms per image and returns flat images,
so the "GPU" time of a job is exactly N x T and everything else is the farm's overhead.
Starts its own private Redis, PostgreSQL ledger and S3 (SeaweedFS) servers, ``farm db upgrade``,
and K ``farm worker --model farm/hold`` processes (``FARM_HOLD_MS=T``), submits one
warm-up job of K x batch-size images, then one N-image job (``FARM_MAX_NUM_IMAGES`` raised
to N; ``FARM_BATCH_SIZE`` images per task, 8 by default) through the coordinator, and waits
for the job to be COMPLETED in the ledger.

    efficiency = (N x T / K) / seconds,  seconds = submit started -> job finished_at in the ledger
    images_per_s = N / seconds

With ``--hold-ms 0`` the workers hold nothing, so the run measures the control plane alone
(claims, messages, ledger writes, storage, collection): ``images_per_s`` is then the figure,
and ``efficiency`` is null (there is no "GPU" time to compare with).

Where the time goes, from the workers' Celery logs and the ledger:

- hold: the T x batch sleep of each task; in-task overhead: the task's own run time minus
  its hold (job read, ``start_job``, done indices, JPEG encode, one S3 put and one image row
  per image, progress log, completion check);
- store per image: the spacing of a task's image rows in the ledger (encode + S3 put + row);
- gap: from a task's end on a worker to the next task received by that worker (ack, broker
  hop, Celery bookkeeping);
- first task: submit -> first task received; tail: spread of the workers' last task ends
  (N / batch tasks do not divide evenly over K workers);
- CPU: busy share of the machine's cores during the job (``/proc/stat``) and the CPU
  seconds of the workers, Redis, PostgreSQL and SeaweedFS (S3).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _stack import ServerStack  # noqa: E402  (benchmarks/_stack.py)

from tests.workers import WorkerProcess  # noqa: E402

HOLD = "farm/hold"
PHASES = re.compile(r"batch (?P<id>\S+): claim (?P<claim>[\d.]+) ms, render (?P<render>[\d.]+) ms, "
                    r"hand-off (?P<handoff>[\d.]+) ms")
CELERY_LINE = re.compile(
    r"^\[(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[\w-]+\] Task farm\.render\[(?P<id>[^\]]+)\] "
    r"(?P<what>received|succeeded in (?P<secs>[\d.e-]+)s)"
)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: set[int]) -> float:
    """utime + stime of ``pids`` and their reaped children, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / TICKS


def processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, session id) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class Stack(ServerStack):
    """Private servers and K hold workers; ``close()`` stops them all."""

    def __init__(self, workdir: Path, workers: int, hold_ms: int, batch_size: int, images: int) -> None:
        super().__init__(workdir)
        self.k, self.hold_ms, self.batch_size, self.images = workers, hold_ms, batch_size, images
        self.workers: list[WorkerProcess] = []

    def start(self) -> None:
        self.start_servers(
            FARM_HOLD_MS=str(self.hold_ms), FARM_BATCH_SIZE=str(self.batch_size),
            FARM_MAX_NUM_IMAGES=str(max(64, self.images, self.k * self.batch_size)),
        )  # fmt: skip
        self.workers = [WorkerProcess(self.env, model=HOLD, name=f"hold{k}@cpu.%h") for k in range(self.k)]
        for w in self.workers:
            self.closers.append(w.stop)
        with ThreadPoolExecutor(self.k) as pool:
            list(pool.map(lambda w: w.start(), self.workers))

    def pids(self) -> dict[str, set[int]]:
        """Process groups to account CPU to: workers, redis, postgres, s3 (SeaweedFS)."""
        procs = processes()
        groups: dict[str, set[int]] = {"workers": set(), "redis": set(), "postgres": set(), "s3": set()}
        sids = {w.proc.pid for w in self.workers if w.proc}
        postmaster = int((self.pg.data / "postmaster.pid").read_text().split()[0])
        for pid, (ppid, sid) in procs.items():
            if sid in sids:
                groups["workers"].add(pid)
            elif pid == postmaster or ppid == postmaster:
                groups["postgres"].add(pid)
        groups["redis"] = {self.redis.proc.pid} if self.redis.proc else set()
        groups["s3"] = {self.s3.proc.pid} if self.s3.proc else set()
        return groups


def run_job(env: dict[str, str], images: int, seed: int) -> tuple[str, float]:
    """Submit one N-image farm/hold job (``farm.lifecycle.submit``); (request id, submit start Unix time)."""
    from farm.lifecycle import submit as submission
    from farm.schemas import GenerateInput

    inp = GenerateInput(model_name=HOLD, prompt="scheduling benchmark", num_images=images, seed=seed,
                        image_size={"width": 64, "height": 64}, sync_mode=False,
                        enable_safety_checker=False)  # fmt: skip
    t0 = time.time()
    return submission.submit(inp, owner="bench", source="cli"), t0


def wait_done(rid: str, timeout: float) -> None:
    from db import ledger
    from db.session import session_scope
    from farm.status import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as s:
            job = ledger.get_job(s, rid)
            if job is not None and JobStatus(job.status).is_terminal:
                if job.status != JobStatus.COMPLETED:
                    raise SystemExit(f"job {rid} ended {job.status}: {job.error}")
                return
        time.sleep(0.01)
    raise SystemExit(f"job {rid} not completed within {timeout:.0f} s")


def ledger_times(rid: str) -> tuple[float, float, float, dict[int, float], list[list[int]]]:
    """(created, started, finished) Unix times of the job, index -> image row time, and its batches."""
    from sqlalchemy import text

    from db.session import session_scope

    with session_scope() as s:
        job = s.execute(text("SELECT created_at, started_at, finished_at FROM jobs WHERE id = :id"),
                        {"id": rid}).one()  # fmt: skip
        rows = s.execute(text('SELECT "index", created_at FROM images WHERE job_id = :id'), {"id": rid}).all()
        cut = s.execute(text("SELECT k, indices FROM batches WHERE job_id = :id ORDER BY k"), {"id": rid}).all()
    created, started, finished = (t.timestamp() for t in job)
    return created, started, finished, {i: t.timestamp() for i, t in rows}, [list(ix) for _, ix in cut]


def parse_log(lines: list[str], rid: str) -> list[tuple[float, float, float, int]]:
    """(received, ended, run seconds, batch number) per task of job ``rid`` in one worker's log."""
    got: dict[str, float] = {}
    tasks = []
    for line in lines:
        m = CELERY_LINE.match(line)
        if not m or not m["id"].startswith(rid + "."):
            continue
        ts = dt.datetime.strptime(m["ts"], "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
        if m["what"] == "received":
            got[m["id"]] = ts
        elif m["id"] in got:
            tasks.append((got[m["id"]], ts, float(m["secs"]), int(m["id"][len(rid) + 1 :].split(".")[0])))
    return tasks


def profile(stack: Stack, rid: str, t0: float, batch: int, images: int, hold_s: float) -> dict[str, Any]:
    created, started, finished, rows, cut = ledger_times(rid)
    per_worker = [sorted(parse_log(w.lines, rid)) for w in stack.workers]
    runs = [t for tasks in per_worker for t in tasks]
    in_task = [secs - hold_s * len(cut[k]) for _, _, secs, k in runs]
    gaps = [b[0] - a[1] for tasks in per_worker for a, b in zip(tasks, tasks[1:], strict=False)]
    spacing = []
    for indices in cut:
        stamps = sorted(rows[i] for i in indices if i in rows)
        spacing += [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    ends = [tasks[-1][1] for tasks in per_worker if tasks]
    firsts = [tasks[0][0] for tasks in per_worker if tasks]
    phases = [m for w in stack.workers for line in w.lines if (m := PHASES.search(line)) and
              m["id"].startswith(rid + ".")]
    def mean_ms(name: str) -> float | None:
        return round(statistics.fmean(float(m[name]) for m in phases), 1) if phases else None

    return {
        "claim_ms_mean": mean_ms("claim"),
        "render_ms_mean": mean_ms("render"),
        "handoff_ms_mean": mean_ms("handoff"),
        "tasks": len(runs),
        "tasks_per_worker": [len(t) for t in per_worker],
        "task_run_ms_mean": round(statistics.fmean(r[2] for r in runs) * 1000, 1) if runs else None,
        "in_task_overhead_ms_mean": round(statistics.fmean(in_task) * 1000, 1) if in_task else None,
        "store_per_image_ms_median": round(statistics.median(spacing) * 1000, 2) if spacing else None,
        "gap_between_tasks_ms_mean": round(statistics.fmean(gaps) * 1000, 1) if gaps else None,
        "submit_ms": round((created - t0) * 1000, 1),
        "first_task_received_ms": round((min(firsts) - t0) * 1000, 1) if firsts else None,
        "job_started_ms": round((started - t0) * 1000, 1),
        "tail_spread_ms": round((max(ends) - min(ends)) * 1000, 1) if ends else None,
        "last_image_to_completed_ms": round((finished - max(rows.values())) * 1000, 1) if rows else None,
        "log_clock_note": "Celery log times have 1 ms resolution",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="K: farm/hold worker processes")
    parser.add_argument("--images", type=int, default=1000, help="N: images in the job")
    parser.add_argument("--hold-ms", type=int, default=50, help="T: ms each image is held (FARM_HOLD_MS)")
    parser.add_argument("--batch-size", type=int, default=8, help="FARM_BATCH_SIZE: images per task (max 16)")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.workers < 1 or args.images < 1 or args.hold_ms < 0 or not 1 <= args.batch_size <= 16:
        parser.error("need --workers >= 1, --images >= 1, --hold-ms >= 0, 1 <= --batch-size <= 16")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    workdir = Path(tempfile.mkdtemp(prefix="farm-bench-sched-"))
    stack = Stack(workdir, args.workers, args.hold_ms, args.batch_size, args.images)
    ok = False
    try:
        print(f"starting Redis, PostgreSQL, S3 (SeaweedFS) and {args.workers} farm/hold worker(s) …", file=sys.stderr)
        stack.start()
        os.environ.update({k: v for k, v in stack.env.items() if k.startswith("FARM_")})
        from farm.config import reset_settings

        reset_settings()
        warm, _ = run_job(stack.env, args.workers * args.batch_size, seed=1)  # every worker takes a task
        wait_done(warm, args.timeout)
        groups = stack.pids()
        cpu0 = {name: cpu_seconds(pids) for name, pids in groups.items()}
        busy0, total0 = machine_busy()
        rid, t0 = run_job(stack.env, args.images, seed=2)
        wait_done(rid, args.timeout)
        busy1, total1 = machine_busy()
        cpu = {name: round(cpu_seconds(pids) - cpu0[name], 2) for name, pids in groups.items()}
        time.sleep(0.3)  # let the last Celery log lines arrive
        _, _, finished, rows, _ = ledger_times(rid)
        seconds = finished - t0
        last_image_seconds = max(rows.values()) - t0 if rows else float("nan")
        prof = profile(stack, rid, t0, args.batch_size, args.images, args.hold_ms / 1000)
        ok = len(rows) == args.images
    finally:
        stack.close()
        from db.session import dispose_engines

        dispose_engines()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir} for a look", file=sys.stderr)
    if not ok:
        raise SystemExit(f"expected {args.images} image rows, got {len(rows)}")

    ideal = args.images * args.hold_ms / 1000 / args.workers
    # hold 0: nothing is held, so there is no ideal to compare with (and nothing to divide)
    efficiency = ideal / seconds if args.hold_ms > 0 and seconds > 0 else None
    images_per_s = args.images / seconds if seconds > 0 else None
    cores = os.cpu_count() or 1
    busy_share = (busy1 - busy0) / (total1 - total0) if total1 > total0 else float("nan")
    held = f"sleeps {args.hold_ms} ms per image" if args.hold_ms else "holds 0 ms: control plane only"
    print(f"farm/hold (STAND-IN: {held}) x {args.images} images, "
          f"{args.workers} worker(s), batch {args.batch_size}, {cores} CPU(s)")  # fmt: skip
    rate = f"{images_per_s:.1f} images/s" if images_per_s is not None else "images/s n/a"
    eff = (f"ideal N*T/K {ideal:.2f} s, efficiency {efficiency:.3f}" if efficiency is not None
           else "efficiency n/a (hold 0: no GPU time to compare with)")  # fmt: skip
    print(f"wall {seconds:.2f} s (submit -> COMPLETED in the ledger; last image stored at {last_image_seconds:.2f} s), "
          f"{rate}; {eff}")  # fmt: skip
    print(f"tasks {prof['tasks']} ({prof['tasks_per_worker']} per worker); task run {prof['task_run_ms_mean']} ms "
          f"mean, of which overhead beyond the hold {prof['in_task_overhead_ms_mean']} ms; store per image "
          f"{prof['store_per_image_ms_median']} ms (median); gap between a worker's tasks "
          f"{prof['gap_between_tasks_ms_mean']} ms mean")  # fmt: skip
    print(f"first task received {prof['first_task_received_ms']} ms after submit; workers' last tasks end "
          f"{prof['tail_spread_ms']} ms apart; last image -> COMPLETED {prof['last_image_to_completed_ms']} ms")
    print(f"CPU: machine {busy_share:.0%} busy over {cores} cores; CPU seconds {cpu}")
    report = {
        "benchmark": "scheduling",
        "model": HOLD + " (stand-in: holds, does not render)",
        "workers": args.workers,
        "images": args.images,
        "hold_ms": args.hold_ms,
        "batch_size": args.batch_size,
        "seconds": round(seconds, 3),
        "ideal_seconds": round(ideal, 3),
        "efficiency": round(efficiency, 4) if efficiency is not None else None,
        "images_per_s": round(images_per_s, 2) if images_per_s is not None else None,
        "images_per_s_note": "images stored / seconds, seconds = submit started -> job COMPLETED in the ledger",
        "last_image_seconds": round(last_image_seconds, 3),
        "profile": prof,
        "cpu_busy_share": round(busy_share, 3),
        "cpu_seconds": cpu,
        "cpu_count": cores,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
