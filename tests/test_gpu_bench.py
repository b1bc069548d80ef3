"""Smoke runs of the GPU benchmark and of its correctness checks on a CPU (``--device cpu --tiny``): small
random models, 64x64, a few images. They prove the scripts run end to end (plain diffusers, the Renderer,
a job through an embedded worker) so that a session with a GPU only has to run them; no timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(script: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, f"benchmarks/{script}", "--device", "cpu", "--tiny", *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.slow
def test_gpu_benchmark_runs_on_a_cpu(tmp_path: Path) -> None:
    report = run("gpu.py", tmp_path, "--out", str(tmp_path / "gpu.json"))
    assert not report["failed"] and not report["skipped"]
    for key in ("sd15_farm_img_s", "sd15_plain_img_s", "sdxl_farm_img_s", "sdxl_plain_img_s", "e2e_ratio"):
        assert isinstance(report[key], float) and report[key] > 0, key
    who = {(r["family"], r["who"], r["variant"], r["guidance"]) for r in report["rows"]}
    assert {("sd15", "plain", "diffusers", 1.5), ("sdxl", "farm", "eager", 1.0), ("sd15", "farm", "fuse_qkv", 1.0),
            ("sd15", "farm", "tiny_decoder", 1.5)} <= who
    assert json.loads((tmp_path / "gpu.json").read_text())["e2e"]["images"] == 8


@pytest.mark.slow
def test_gpu_checks_run_on_a_cpu(tmp_path: Path) -> None:
    report = run("gpu_checks.py", tmp_path)
    failed = {name: check for name, check in report["checks"].items() if not check["ok"]}
    assert report["ok"] and not failed, failed
    assert report["checks"]["seed_split"]["same_initial_latents"]
    assert report["checks"]["worker_job_16"]["stored"] == 16
