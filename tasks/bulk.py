"""``farm.bulk``: drive a bulk dataset job from a Celery worker (``farm bulk worker``).

Two forms of kwargs:

- ``{"bulk_id": ID}``: run (or resume) a job already recorded, e.g. by ``POST /bulk``;
- ``{"manifest": PATH, "out": DEST, "model_name": NAME, ...}``: record a job and run it.
  PATH and a local DEST must lie inside ``FARM_BULK_ROOT`` (``s3://`` destinations are free).

The task returns the job's final progress (JSON). It runs for as long as the job does, so
it is routed to its own queue (``FARM_BULK_QUEUE``), served by ``farm bulk worker`` (a
thread pool, no model), never by a GPU worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from farm.config import Settings, get_settings
from farm.errors import InvalidInputError


def inside(root: Path, value: str, field: str) -> Path:
    """``value`` as a path inside ``root`` (relative paths are taken from it); else InvalidInputError."""
    path = (root / value).resolve() if not Path(value).is_absolute() else Path(value).resolve()
    if not path.is_relative_to(root):
        raise InvalidInputError(field, "must be inside the bulk root (FARM_BULK_ROOT)")  # no server path in it
    return path


def bulk_job(bulk_id: str | None = None, **options: Any) -> dict[str, Any]:
    from farm.bulk import driver

    settings = get_settings()
    if bulk_id is None:
        bulk_id = create_from_options(options, settings)
    final = driver.run(bulk_id, settings=settings, max_in_flight=int(options.get("max_in_flight", 256)))
    return dataclasses.asdict(final)


def create_from_options(options: dict[str, Any], settings: Settings, owner: str | None = None,
                        manifest: Path | None = None, key_max_in_flight: int | None = None,
                        admit: Callable[[Session], None] | None = None) -> str:
    """Record a bulk job from JSON options (the Celery task's and the API's); its id.

    ``key_max_in_flight`` (the API key's limit) caps the job's farm jobs in flight; ``admit`` may
    refuse a new job in its transaction (``farm.bulk.control.create``)."""
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
    )
    return driver.create(manifest=manifest, dest=out, fmt=str(options.get("format", "webdataset")),
                         shard_size=int(options.get("shard_size", 1000)), spec=spec,
                         owner=owner or settings.default_owner, bulk_id=options.get("bulk_id"), settings=settings,
                         admit=admit)


LONG = 30 * 86400  # a bulk job may run for days: no task time limit worth the name


def register(app: Celery) -> None:
    # acknowledged on receipt: redelivery after the visibility timeout would start a second
    # driver beside a live one. A bulk worker that stops (its drivers hand their jobs back) or dies
    # leaves its job RUNNING in the ledger without a live driver; a sweeper sends farm.bulk again
    # (farm.lifecycle.sweep.bulk_dispatch), and `farm bulk resume ID` carries on at once.
    app.task(name="farm.bulk", acks_late=False, time_limit=LONG, soft_time_limit=LONG - 60)(bulk_job)
