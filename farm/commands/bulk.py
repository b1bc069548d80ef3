"""``farm bulk``: dataset jobs from a manifest (run, status, pause, resume, cancel)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

from db.migrate import ensure_schema
from db.session import session_scope
from farm.bulk import driver
from farm.bulk.manifest import read_manifest
from farm.config import get_settings
from farm.errors import FarmError, InvalidInputError
from farm.status import BulkStatus

err = Console(stderr=True)


def _set(values: tuple[str, ...]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` (VALUE as JSON, else as a string) → input-field defaults."""
    out: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise InvalidInputError("--set", f"expected FIELD=VALUE, got {item!r}")
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out


def _size(text: str) -> Any:
    if "x" in text and all(p.isdigit() for p in text.split("x", 1)):
        w, h = text.split("x", 1)
        return {"width": int(w), "height": int(h)}
    return text


class _Bar:
    """A rich progress bar fed by driver snapshots: done/total, images/s, ETA, failures."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[failures]}"), console=err)
        self.task = self.progress.add_task("bulk", total=None, rate="", failures="")
        self.started = time.monotonic()
        self.first: int | None = None

    def __call__(self, snap: driver.Progress) -> None:
        finished = snap.done + snap.failed
        if self.first is None:
            self.first = finished
        rate = (finished - self.first) / max(1e-6, time.monotonic() - self.started)
        total = snap.total if snap.total is not None else None
        self.progress.update(self.task, completed=finished, total=total,
                             description=f"{snap.bulk_id} {snap.status.lower()}",
                             rate=f"{rate:.1f} img/s", failures=f"{snap.failed} failed" if snap.failed else "")


def _nothing_to_do(bulk_id: str) -> bool:
    """A complete job has nothing to render: say so at once, without loading a model or starting a
    driver (which would only find every sample done). A cancelled one is refused at once."""
    with session_scope() as s:
        snap = driver.progress(s, bulk_id)
        dest = driver.get(s, bulk_id).dest
    if snap.status not in (BulkStatus.COMPLETED, BulkStatus.CANCELLED):
        return False
    click.echo(json.dumps(dataclasses.asdict(snap), indent=2))
    if snap.status == BulkStatus.CANCELLED:
        raise FarmError(f"bulk job {bulk_id} was cancelled")
    hint = "; --retry-failed renders the failed samples again" if snap.failed else ""
    err.print(f"bulk job {bulk_id} is already complete ({snap.done} done, {snap.failed} failed, "
              f"{snap.shards_written} shards in {dest}): nothing to do{hint}", highlight=False)
    return True


def _drive(bulk_id: str, model_name: str, device: str, max_in_flight: int) -> driver.Progress:
    settings = get_settings()
    if not settings.embedded:
        from farm.commands.generate import warn_if_unserved

        warn_if_unserved(model_name, settings)  # the job waits for a worker: said before the bar starts
    with contextlib.ExitStack() as stack:
        if settings.embedded:
            from tasks.celery_app import get_app
            from tasks.embedded import embedded_worker

            with err.status(f"loading {model_name} in-process (embedded mode, no servers configured)"):
                stack.enter_context(embedded_worker(get_app(settings), model_name, device, settings))
        bar = _Bar()
        with bar.progress:
            final = driver.run(bulk_id, on_progress=bar, on_row_error=lambda e: err.print(e.message, style="yellow",
                                                                                           highlight=False),
                               max_in_flight=max_in_flight, settings=settings)
    click.echo(json.dumps(dataclasses.asdict(final), indent=2))
    if final.status == BulkStatus.CANCELLED:
        raise FarmError(f"bulk job {bulk_id} was cancelled")
    if final.error:  # it paused itself (the owner's daily quota): say why
        err.print(f"bulk job {bulk_id} {final.status.lower()}: {final.error}", highlight=False)
    return final


@click.group()
def bulk() -> None:
    """Dataset jobs: a manifest of prompts in, a sharded dataset out (resumable)."""


@bulk.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "dest", required=True, help="Local directory or s3://bucket/prefix.")
@click.option("--dataset-format", "fmt", type=click.Choice(["webdataset", "imagefolder", "parquet"]),
              default="webdataset", show_default=True)
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per shard (<= 10000).")
@click.option("--model", "model_name", required=True, help="model_name of every sample (a row may override it).")
@click.option("--image-size", default=None, help="Default image_size: a named size or WIDTHxHEIGHT.")
@click.option("--steps", "num_inference_steps", type=int, default=None)
@click.option("--guidance-scale", type=float, default=None)
@click.option("--negative-prompt", default=None, help="Default negative prompt (a row's column wins).")
@click.option("--format", "image_format", type=click.Choice(["jpeg", "png"]), default=None)
@click.option("--safety-checker/--no-safety-checker", "enable_safety_checker", default=None)
@click.option("--strength", type=float, default=None,
              help="Default strength of the rows with an image column (a row's strength column wins).")
@click.option("--set", "sets", multiple=True, help="FIELD=VALUE default for any input field (VALUE as JSON).")
@click.option("--images-per-prompt", type=int, default=1, show_default=True)
@click.option("--seed", "base_seed", type=int, default=0, show_default=True,
              help="Base seed: a sample without a seed column gets seed + its index.")
@click.option("--expand", type=click.Choice(["combinatorial", "random", "none"]), default="combinatorial",
              show_default=True, help="How {a|b} templates expand (dynamicprompts).")
@click.option("--variants", type=int, default=1, show_default=True, help="Random expansions per row.")
@click.option("--wildcards", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of __wildcard__ files.")
@click.option("--strict", is_flag=True, help="Refuse the whole manifest if any row is malformed.")
@click.option("--budget-images", type=int, default=None, help="Stop cleanly after this many images.")
@click.option("--budget-gpu-seconds", type=float, default=None, help="Stop cleanly after this much render time.")
@click.option("--job-id", "bulk_id", default=None, help="Run (or resume) this job id.")
@click.option("--retry-failed", is_flag=True, help="Render the failed samples of --job-id again.")
@click.option("--max-in-flight", type=int, default=256, show_default=True, help="Farm jobs submitted at once.")
@click.option("--device", default="cpu", show_default=True, help="Device of the in-process worker (embedded mode).")
def run(manifest: Path, dest: str, fmt: str, shard_size: int, model_name: str, image_size: str | None,
        num_inference_steps: int | None, guidance_scale: float | None, negative_prompt: str | None,
        image_format: str | None, enable_safety_checker: bool | None, strength: float | None, sets: tuple[str, ...],
        images_per_prompt: int, base_seed: int, expand: str, variants: int, wildcards: Path | None, strict: bool,
        budget_images: int | None, budget_gpu_seconds: float | None, bulk_id: str | None, retry_failed: bool,
        max_in_flight: int, device: str) -> None:
    """Render MANIFEST (.txt, .csv, .jsonl or .parquet) into a dataset at --out."""
    settings = get_settings()
    ensure_schema()
    defaults: dict[str, Any] = {
        "image_size": _size(image_size) if image_size else None, "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "negative_prompt": negative_prompt, "format": image_format,
        "enable_safety_checker": enable_safety_checker, "strength": strength,
    }
    defaults = {k: v for k, v in defaults.items() if v is not None} | _set(sets)
    spec = driver.BulkSpec(model_name=model_name, defaults=defaults, images_per_prompt=images_per_prompt,
                           base_seed=base_seed, expand=expand, variants=variants,
                           wildcards=str(wildcards.resolve()) if wildcards else None, strict=strict,
                           budget_images=budget_images, budget_gpu_seconds=budget_gpu_seconds)
    if strict:  # the whole manifest is checked before anything is recorded
        with err.status("checking the manifest (--strict)"):
            n = 0
            for _ in read_manifest(manifest, defaults={**defaults, "model_name": model_name},
                                   images_per_prompt=images_per_prompt, base_seed=base_seed,
                                   expand=expand,  # type: ignore[arg-type]
                                   variants=variants, wildcards=wildcards, strict=True):
                n += 1
        err.print(f"manifest ok: {n} samples", highlight=False)
    bulk_id = driver.create(manifest=manifest.resolve(), dest=dest, fmt=fmt, shard_size=shard_size, spec=spec,
                            owner=settings.default_owner, bulk_id=bulk_id, settings=settings)
    if retry_failed:
        err.print(f"{driver.retry_failed(bulk_id)} failed sample(s) back to pending", highlight=False)
    if _nothing_to_do(bulk_id):
        return
    err.print(f"bulk job {bulk_id} → {dest} ({fmt}, {shard_size} per shard)", highlight=False)
    _drive(bulk_id, model_name, device, max_in_flight)


@bulk.command()
@click.argument("bulk_id")
def status(bulk_id: str) -> None:
    """Print the progress of a bulk job."""
    ensure_schema()
    with session_scope() as s:
        snap = driver.progress(s, bulk_id)
    click.echo(json.dumps(dataclasses.asdict(snap), indent=2))


@bulk.command()
@click.argument("bulk_id")
def pause(bulk_id: str) -> None:
    """Stop submitting; the running driver lets in-flight images finish and stops."""
    ensure_schema()
    click.echo(f"{bulk_id}: {driver.set_status(bulk_id, BulkStatus.PAUSED)} → PAUSED")


@bulk.command()
@click.argument("bulk_id")
def cancel(bulk_id: str) -> None:
    """Cancel a bulk job and its images in flight (written shards stay)."""
    ensure_schema()
    click.echo(f"{bulk_id}: {driver.set_status(bulk_id, BulkStatus.CANCELLED)} → CANCELLED")


@bulk.command()
@click.argument("bulk_id")
@click.option("--retry-failed", is_flag=True, help="Render the failed samples again.")
@click.option("--budget-images", type=int, default=None, help="A new image budget (the whole job's).")
@click.option("--budget-gpu-seconds", type=float, default=None, help="A new render-time budget.")
@click.option("--max-in-flight", type=int, default=256, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Device of the in-process worker (embedded mode).")
def resume(bulk_id: str, retry_failed: bool, budget_images: int | None, budget_gpu_seconds: float | None,
           max_in_flight: int, device: str) -> None:
    """Run a paused, interrupted or budget-stopped bulk job on: only what is missing is rendered."""
    ensure_schema()
    with session_scope() as s:
        job = driver.get(s, bulk_id)
        model_name = job.spec["model_name"]
        if job.status == BulkStatus.CANCELLED:
            raise FarmError(f"bulk job {bulk_id} was cancelled")
        if budget_images is not None or budget_gpu_seconds is not None:
            spec = dict(job.spec)
            if budget_images is not None:
                spec["budget_images"] = budget_images
            if budget_gpu_seconds is not None:
                spec["budget_gpu_seconds"] = budget_gpu_seconds
            job.spec = spec
    if retry_failed:
        err.print(f"{driver.retry_failed(bulk_id)} failed sample(s) back to pending", highlight=False)
    if _nothing_to_do(bulk_id):
        return
    _drive(bulk_id, model_name, device, max_in_flight)



@bulk.command("worker")
@click.option("--concurrency", type=int, default=4, show_default=True, help="Bulk jobs driven at once.")
@click.option("--log-level", "log_level", default=None, help="Worker log level (default: FARM_LOG_LEVEL).")
@click.option("--loglevel", "old_log_level", default=None, hidden=True, help="Deprecated: use --log-level.")
def bulk_worker(concurrency: int, log_level: str | None, old_log_level: str | None) -> None:
    """Serve farm.bulk tasks (Celery and POST /bulk): drives jobs, renders nothing, needs no GPU."""
    from farm.commands.worker import log_level_option

    loglevel = log_level_option(log_level, old_log_level)
    settings = get_settings()
    if settings.embedded:
        raise FarmError("farm bulk worker needs FARM_BROKER_URL (redis://…)")
    ensure_schema()
    from celery.signals import worker_shutting_down

    from farm.bulk.runners import leave_jobs
    from tasks.celery_app import get_app

    # a warm shutdown waits for the running tasks, and a farm.bulk task runs as long as its job: its
    # driver hands the job back instead (it stays RUNNING; a sweeper sends farm.bulk again)
    worker_shutting_down.connect(lambda **_: leave_jobs(), weak=False)
    argv = ["worker", "--pool", "threads", "--concurrency", str(concurrency), "--queues", settings.bulk_queue,
            "--hostname", "bulk@%h", "--loglevel", (loglevel or settings.log_level).upper(), "--task-events"]
    get_app(settings).worker_main(argv)
