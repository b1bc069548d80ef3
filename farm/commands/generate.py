"""``farm generate`` and ``farm status``: render through the Celery path and follow the ledger."""

from __future__ import annotations

import base64
import contextlib
import json
import mimetypes
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from db import ledger
from db.migrate import ensure_schema
from db.session import session_scope
from farm import events
from farm.admission import admit
from farm.config import Settings, get_settings
from farm.devices import check_device
from farm.errors import FarmError, InvalidInputError, JobNotFoundError, RequestIdTakenError
from farm.lifecycle import finish as ending
from farm.lifecycle import submit as submission
from farm.results import build_output, status_view
from farm.schemas import ImageSizeName
from farm.status import JobStatus, Lane
from farm.storage import get_storage

err = Console(stderr=True)


def _image_size(value: str) -> Any:
    if value in ImageSizeName.__members__:
        return value
    width, sep, height = value.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InvalidInputError("image_size", f"must be one of {', '.join(ImageSizeName)} or WIDTHxHEIGHT")
    return {"width": int(width), "height": int(height)}


def _lora(value: str) -> dict[str, Any]:
    path, sep, scale = value.rpartition(":")
    if sep and path and _is_float(scale):
        return {"path": path, "scale": float(scale)}
    return {"path": value}


def _embedding(value: str) -> dict[str, Any]:
    path, sep, tokens = value.rpartition(":")
    if sep and path and tokens.startswith("<"):
        return {"path": path, "tokens": tokens.split(",")}
    return {"path": value}


def _image_ref(value: str, field: str, settings: Settings) -> str:
    """``--image`` / ``--mask``: an http(s) URL as given; a local file as a data URI (staged to storage at
    submit, within FARM_FILE_INPUT_MAX_BYTES and the owner's quota, as LoRA data URIs are)."""
    if value.lower().startswith(("http://", "https://")):
        return value
    path = Path(value).expanduser()
    try:
        size = path.stat().st_size
        if size > settings.file_input_max_bytes:
            raise InvalidInputError(field, f"the file is {size} bytes, more than the {settings.file_input_max_bytes} "
                                           "allowed (FARM_FILE_INPUT_MAX_BYTES)")
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(field, f"cannot read {value}: {exc.strerror or exc}") from None
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@click.command()
@click.argument("prompt")
@click.option("--model", "model_name", default=None, help="model_name (default: the schema's, SDXL).")
@click.option("--negative-prompt", default=None,
              help="What the images should not show (needs --guidance-scale above 1; LCM-distilled models ignore it).")
@click.option("--image-size", default=None,
              help="square_hd, square, portrait_4_3, … or WIDTHxHEIGHT (default: the model's own, see `farm models`).")
@click.option("--steps", "num_inference_steps", type=int, default=None, help="num_inference_steps (6).")
@click.option("--seed", type=int, default=None, help="Seed of image 0; image i uses seed + i.")
@click.option("--guidance-scale", type=float, default=None,
              help="guidance_scale (1.5); above 1 runs classifier-free guidance, where --negative-prompt acts.")
@click.option("--guidance-rescale", type=float, default=None, help="guidance_rescale, 0 to 1 (0).")
@click.option("--num-images", type=int, default=None, help="num_images (1), at most FARM_MAX_NUM_IMAGES.")
@click.option("--sync-mode/--no-sync-mode", default=False, show_default=True,
              help="Return images as data URIs, not URLs (the CLI defaults to URLs, unlike the API).")
@click.option("--safety-checker/--no-safety-checker", "enable_safety_checker", default=None,
              help="Black out images the safety checker flags (default: on).")
@click.option("--safety-checker-version", type=click.Choice(["v1", "v2"]), default=None,
              help="v1: CompVis's checker (default); v2: a ViT classifier.")
@click.option("--expand-prompt/--no-expand-prompt", default=None,
              help="Append quality phrases to the prompt (default: off).")
@click.option("--format", "format_", type=click.Choice(["jpeg", "png"]), default=None,
              help="Image format (default: jpeg).")
@click.option("--request-id", default=None,
              help="Record the job under this id (default: a new one); the same id and input again give the same job.")
@click.option("--lora", "loras", multiple=True, help="PATH[:SCALE], under the files root or a hub id.")
@click.option("--embedding", "embeddings", multiple=True, help="PATH[:<tok1>,<tok2>].")
@click.option("--image", "image", default=None,
              help="PATH or URL of a source image: image-to-image (with --mask: inpainting); PNG, JPEG or WebP.")
@click.option("--mask", "mask", default=None, help="PATH or URL of the inpainting mask (white is repainted).")
@click.option("--strength", type=float, default=None,
              help="With --image: how much is repainted, (0, 1] (0.95); int(steps * strength) steps run.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Save the images into this folder (their paths are printed).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the output JSON on stdout (else one line per image: its saved path, or its URL).")
@click.option("--lane", type=click.Choice([lane.value for lane in Lane]), default=Lane.SYNC.value, show_default=True,
              help="Priority lane: a worker always takes the highest non-empty one (realtime > sync > queue > bulk).")
@click.option("--device", default="cpu", show_default=True, help="Device of the in-process worker (embedded mode).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Give up (and cancel) after SECONDS.")
def generate(prompt: str, model_name: str | None, negative_prompt: str | None, image_size: str | None,
             num_inference_steps: int | None, seed: int | None, guidance_scale: float | None,
             guidance_rescale: float | None, num_images: int | None, sync_mode: bool,
             enable_safety_checker: bool | None, safety_checker_version: str | None,
             expand_prompt: bool | None, format_: str | None, request_id: str | None, loras: tuple[str, ...],
             embeddings: tuple[str, ...], image: str | None, mask: str | None, strength: float | None,
             out_dir: Path | None, as_json: bool, lane: str, device: str, timeout: float) -> None:
    """Render PROMPT through the farm; print each image's path (with --out) or URL, or the output JSON.

    With --image, from that image (image-to-image; with --mask, inpainting), at its size unless --image-size."""
    check_device(device)  # spelled right; the in-process worker checks that this machine has it
    settings = get_settings()
    if (mask is not None or strength is not None) and image is None:
        raise InvalidInputError("image_url", "--mask and --strength need --image")
    fields: dict[str, Any] = {
        "prompt": prompt, "model_name": model_name, "negative_prompt": negative_prompt,
        "image_size": _image_size(image_size) if image_size else None,
        "num_inference_steps": num_inference_steps, "seed": seed, "guidance_scale": guidance_scale,
        "guidance_rescale": guidance_rescale, "num_images": num_images, "sync_mode": sync_mode,
        "enable_safety_checker": enable_safety_checker, "safety_checker_version": safety_checker_version,
        "expand_prompt": expand_prompt, "format": format_, "request_id": request_id,
        "loras": [_lora(v) for v in loras] or None, "embeddings": [_embedding(v) for v in embeddings] or None,
        "image_url": _image_ref(image, "image_url", settings) if image else None,
        "mask_url": _image_ref(mask, "mask_url", settings) if mask else None, "strength": strength,
    }
    inp = admit({k: v for k, v in fields.items() if v is not None}, None, settings)
    ensure_schema()
    from tasks.celery_app import get_app

    app = get_app(settings)
    with contextlib.ExitStack() as stack:
        if settings.embedded:
            from tasks.embedded import embedded_worker

            with err.status(f"loading {inp.model_name} in-process (embedded mode, no servers configured)"):
                stack.enter_context(embedded_worker(app, inp.model_name, device, settings))
        try:
            request_id = submission.submit(inp, owner=settings.default_owner, lane=Lane(lane), source="cli",
                                           settings=settings)
        except RequestIdTakenError as exc:  # the user's --request-id: bad input (exit 2), nothing recorded
            raise InvalidInputError("request_id", f"{exc}; give a new id, or the same input again") from None
        err.print(f"request {request_id}", highlight=False)
        if not settings.embedded:
            warn_if_unserved(inp.model_name, settings)
        final = _follow(request_id, inp.num_images, timeout)
    if final != JobStatus.COMPLETED:
        with session_scope() as s:
            job = ledger.get_job(s, request_id)
            reason = job.error if job and job.error else final.value
        raise FarmError(f"request {request_id} {final.value.lower()}: {reason}")
    storage = get_storage(settings)
    with session_scope() as s:
        job = ledger.get_job(s, request_id)
        assert job is not None
        output = build_output(s, job, storage, settings)
        rows = ledger.list_images(s, request_id)
        saved = []
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for row in rows:
                path = out_dir / f"{request_id}_{row.index}.{row.object_key.rsplit('.', 1)[-1]}"
                path.write_bytes(storage.get(row.object_key))
                saved.append(path)
    if as_json:  # the JSON alone on stdout (a program reads it); the paths go to stderr
        click.echo(output.model_dump_json(indent=2))
        for path in saved:
            click.echo(f"saved {path}", err=True)  # one line per path, never wrapped
    else:  # one line per image, for a shell: where it was saved, else where to fetch it
        for line in [str(path) for path in saved] or [image.url for image in output.images]:
            click.echo(line)


def warn_if_unserved(model_name: str, settings: Settings) -> None:
    """Say before waiting that no live worker serves the model (the job waits for one to join)."""
    from farm.lifecycle.pool import pool_state
    from models.registry import get_model

    spec = get_model(model_name, settings)
    with session_scope() as s:
        state = pool_state(s, spec.name, spec.key, settings)
    if not state.live:
        click.echo(f"warning: {state.describe()}", err=True)  # one line, never wrapped under the progress bar


def _follow(request_id: str, total: int, timeout: float) -> JobStatus:
    """Show progress from the ledger until the job ends; cancel it on Ctrl-C or timeout.

    The ledger is read again whenever the job changes (``farm.events``: it starts, logs a
    batch, finishes), and at least every ``event_fallback_seconds``.
    """
    deadline = time.monotonic() + timeout
    settings = get_settings()
    fallback = settings.event_fallback_seconds
    told, next_check = -1, 0.0  # the job's "no live worker serves" lines printed up to this log id (-1: none read)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())

    def read() -> tuple[JobStatus, int, int | None]:
        with session_scope() as s:
            job = ledger.get_job(s, request_id)
            assert job is not None
            status = JobStatus(job.status)
            done = ledger.count_images(s, request_id)
            return status, done, ledger.queue_position(s, job) if status == JobStatus.IN_QUEUE else None

    def wait(changes: events.Subscription, _: object) -> bool:
        changes.wait(min(fallback, deadline - time.monotonic() + 0.001))
        return True

    try:
        with Progress(*columns, console=err, transient=False) as progress, \
                contextlib.closing(events.watch(request_id, read, wait)) as reads:
            bar = progress.add_task("queued", total=total)
            for status, done, where in reads:
                label = f"queued (position {where})" if where is not None else status.value.lower()
                progress.update(bar, completed=done, description=label)
                if status.is_terminal:
                    return status
                if not settings.embedded and time.monotonic() >= next_check:  # its pool may go away mid-job
                    next_check = time.monotonic() + settings.sweep_seconds
                    told = _say_unserved(request_id, told, settings, progress.console)
                left = deadline - time.monotonic()
                if left < 0:
                    _cancel(request_id, f"client gave up after {timeout:.0f} s")
                    return JobStatus.CANCELLED
            raise AssertionError("the job watch ended")  # watch() ends only when left
    except KeyboardInterrupt:
        _cancel(request_id, "cancelled by the user (Ctrl-C)")
        raise


def _say_unserved(request_id: str, told: int, settings: Settings, console: Console) -> int:
    """Print the job's new "no live worker serves …" lines (those written before the first call were
    said at submit); the last log id seen."""
    from farm.lifecycle.pool import unserved_notices

    if told < 0:
        told = max((i for i, _ in unserved_notices(request_id, 0, settings, write=False)), default=0)
    lines = unserved_notices(request_id, told, settings)
    for _, message in lines:
        console.print(f"warning: {message}", soft_wrap=True, highlight=False, markup=False)  # one line, unwrapped
    return lines[-1][0] if lines else told


def _cancel(request_id: str, reason: str) -> None:
    ending.finish_now(request_id, JobStatus.CANCELLED, message=reason, source="cli", error=reason,
                      error_type="cancelled")


@click.command()
@click.argument("request_id")
@click.option("--logs/--no-logs", default=True, show_default=True)
@click.option("--result", is_flag=True, help="Also print the output JSON of a completed job.")
def status(request_id: str, logs: bool, result: bool) -> None:
    """Print the status of REQUEST_ID from the ledger."""
    settings = get_settings()
    ensure_schema()
    with session_scope() as s:
        job = ledger.get_job(s, request_id)
        if job is None:
            raise JobNotFoundError(f"no request {request_id!r} in the ledger")
        view = status_view(s, job, with_logs=logs)
        if result and job.status == JobStatus.COMPLETED:
            view["result"] = build_output(s, job, get_storage(settings), settings).model_dump(mode="json")
    click.echo(json.dumps(view, indent=2))
