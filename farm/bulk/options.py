"""Bulk job options as JSON (the ``farm.bulk`` task's kwargs, the API's body) into a recorded bulk job.

Producer-side: the API and the Celery task (tasks.bulk_task) both call it; imports farm/ and db/ only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from farm.config import Settings
from farm.errors import InvalidInputError


def inside(root: Path, value: str, field: str) -> Path:
    """``value`` as a path inside ``root`` (relative paths are taken from it); else InvalidInputError."""
    path = (root / value).resolve() if not Path(value).is_absolute() else Path(value).resolve()
    if not path.is_relative_to(root):
        raise InvalidInputError(field, "must be inside the bulk root (FARM_BULK_ROOT)")  # no server path in it
    return path


def create_from_options(options: dict[str, Any], settings: Settings, owner: str | None = None,
                        manifest: Path | None = None, key_max_in_flight: int | None = None,
                        admit: Callable[[Session], None] | None = None, image_root: str | None = None) -> str:
    """Record a bulk job from JSON options (the Celery task's and the API's); its id.

    ``key_max_in_flight`` (the API key's limit) caps the job's farm jobs in flight; ``admit`` may
    refuse a new job in its transaction (``farm.bulk.control.create``); ``image_root`` (the owner's folder
    over HTTP, relative to the bulk root: the job's report names no server path; never an option, which a
    caller could aim anywhere) holds the files an image column names."""
    from farm.bulk import driver

    root = settings.effective_bulk_root
    root.mkdir(parents=True, exist_ok=True)
    known = {"manifest", "out", "model_name", "format", "shard_size", "defaults", "images_per_prompt", "seed",
             "expand", "variants", "strict", "budget_images", "budget_gpu_seconds", "bulk_id", "max_in_flight"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidInputError(unknown[0], "unknown option")
    for name in ("out", "model_name"):
        if not options.get(name):
            raise InvalidInputError(name, "field required")
    if manifest is None:
        if not options.get("manifest"):
            raise InvalidInputError("manifest", "field required")
        manifest = inside(root, str(options["manifest"]), "manifest")
    out = str(options["out"])
    if not out.startswith("s3://"):
        out = str(inside(root, out, "out"))
    spec = driver.BulkSpec(
        model_name=str(options["model_name"]), defaults=dict(options.get("defaults") or {}),
        images_per_prompt=int(options.get("images_per_prompt", 1)), base_seed=int(options.get("seed", 0)),
        expand=str(options.get("expand", "combinatorial")), variants=int(options.get("variants", 1)),
        strict=bool(options.get("strict", False)), budget_images=options.get("budget_images"),
        budget_gpu_seconds=options.get("budget_gpu_seconds"), max_in_flight=key_max_in_flight,
        image_root=image_root,
    )
    return driver.create(manifest=manifest, dest=out, fmt=str(options.get("format", "webdataset")),
                         shard_size=int(options.get("shard_size", 1000)), spec=spec,
                         owner=owner or settings.default_owner, bulk_id=options.get("bulk_id"), settings=settings,
                         admit=admit)
