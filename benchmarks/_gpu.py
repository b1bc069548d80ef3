"""Shared by ``benchmarks/gpu.py`` and ``benchmarks/gpu_checks.py``: environment, models, timing, jobs.

Full mode: ``--model-dir`` holds the random full-size models of ``python -m models.fullsize``
(written there if missing). Smoke mode (``--tiny``, for CPU tests): the ``--small`` versions of
the same models are written to a temporary folder and every case shrinks to 64x64 and a few images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a lighthouse on a cliff at dusk, oil painting, dramatic sky"


def arguments(doc: str | None, budget: float) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: small random models, 64x64, few images")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="random full-size models (default: FARM_MODEL_DIR; written there if missing)")
    parser.add_argument("--budget-s", type=float, default=budget, help="skip stages that would not fit")
    parser.add_argument("--out", type=Path, default=None, help="also write the final JSON here")
    return parser


def setup(args: argparse.Namespace) -> Path:
    """Settings for this process (FARM_* variables), and the random models in place; the model folder."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from models.fullsize import extra_models, write_all

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    os.environ.setdefault("FARM_DATA_DIR", tempfile.mkdtemp(prefix="farm-gpu-"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["FARM_EXTRA_MODELS"] = json.dumps(extra_models())
    os.environ.setdefault("FARM_MAX_NUM_IMAGES", "256")
    os.environ.setdefault("FARM_METRICS_PORT", "0")
    if args.tiny:
        model_dir = Path(tempfile.mkdtemp(prefix="farm-gpu-models-"))
        import torch

        write_all(model_dir, ["sd15", "sdxl"], dtype=torch.float32, small=True, distilled=["sd15"])
    else:
        model_dir = args.model_dir or Path(os.environ.get("FARM_MODEL_DIR") or "")
        if not str(model_dir):
            raise SystemExit("give --model-dir (or FARM_MODEL_DIR): the folder of `python -m models.fullsize`")
        if not (model_dir / "runwayml" / "stable-diffusion-v1-5" / "model_index.json").is_file():
            import torch

            device = args.device if args.device.startswith("cuda") else "cpu"
            write_all(model_dir, ["sd15", "sdxl"], dtype=torch.float16, device=device, distilled=["sd15"])
    os.environ["FARM_MODEL_DIR"] = str(model_dir)
    from farm.config import reset_settings

    reset_settings()
    return model_dir


class Budget:
    """Wall-clock budget of a run: stages that would not fit are skipped and say so."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, stage: str, needs: float) -> bool:
        if self.left() >= needs:
            return True
        self.skipped.append(f"{stage} (needs ~{needs:.0f} s, {max(0.0, self.left()):.0f} s left)")
        print(f"skipped {self.skipped[-1]}", flush=True)
        return False


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def params(model_name: str, size: tuple[int, int], steps: int, guidance: float, n: int, **kw: Any) -> Any:
    from farm.schemas import GenerateInput

    return GenerateInput(model_name=model_name, prompt=PROMPT, image_size={"width": size[0], "height": size[1]},
                         num_inference_steps=steps, guidance_scale=guidance, num_images=n, **kw)


@contextmanager
def embedded_farm(model_name: str, device: str) -> Iterator[Any]:
    """A real Celery worker for ``model_name`` on ``device`` in this process (in-memory broker, SQLite
    ledger, local storage: what ``farm generate --device`` runs); yields its renderer."""
    from db.migrate import ensure_schema
    from farm.config import get_settings
    from tasks import loaded_model
    from tasks.celery_app import get_app
    from tasks.embedded import embedded_worker
    from tasks.loaded_model import get_renderer

    settings = get_settings()
    ensure_schema()
    try:
        with embedded_worker(get_app(settings), model_name, device, settings):
            yield get_renderer()
    finally:
        loaded_model._renderer = None  # the process keeps its model; a benchmark moves on to the next one


def run_job(inp: Any, timeout: float = 600.0) -> tuple[float, Any]:
    """Submit ``inp`` through the farm's submit path, wait for it in the ledger: (seconds, final job row)."""
    from db import ledger
    from db.session import session_scope
    from farm.config import get_settings
    from farm.lifecycle import submit as submission
    from farm.status import JobStatus, Lane

    settings = get_settings()
    t0 = time.perf_counter()
    rid = submission.submit(inp, owner=settings.default_owner, lane=Lane.QUEUE, source="bench", settings=settings)
    while time.perf_counter() - t0 < timeout:
        with session_scope() as s:
            job = ledger.get_job(s, rid)
            assert job is not None
            if JobStatus(job.status).is_terminal:
                took = time.perf_counter() - t0
                s.expunge(job)
                return took, job
        time.sleep(0.005)
    raise TimeoutError(f"job {rid} did not finish in {timeout:.0f} s")


def stored_images(job_id: str) -> list[bytes]:
    from db import ledger
    from db.session import session_scope
    from farm.config import get_settings
    from farm.storage import get_storage

    storage = get_storage(get_settings())
    with session_scope() as s:
        return [storage.get(row.object_key) for row in ledger.list_images(s, job_id)]


def versions(device: str) -> dict[str, Any]:
    import platform

    import diffusers
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    return {"gpu": gpu, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def save(report: dict[str, Any], out: Path | None) -> None:
    """Write the report so far (after every stage: a run killed at its time limit still leaves what it did)."""
    if out is not None:
        out.write_text(json.dumps(report, indent=2))


def finish(report: dict[str, Any], out: Path | None) -> None:
    save(report, out)
    print(json.dumps(report), flush=True)
