"""``farm.bulk``: drive a bulk dataset job from a Celery worker (``farm bulk worker``).

Two forms of kwargs:

- ``{"bulk_id": ID}``: run (or resume) a job already recorded, e.g. by ``POST /bulk``;
- ``{"manifest": PATH, "out": DEST, "model_name": NAME, ...}``: record a job and run it.
  PATH and a local DEST must lie inside ``FARM_BULK_ROOT`` (``s3://`` destinations are free).

The task returns the job's final progress (JSON): a run that ends in an error returns the job as it is
then (RUNNING, to be sent again by a sweeper, or FAILED with its ``error``), logged once by the driver.
It runs for as long as the job does, so it is routed to its own queue (``FARM_BULK_QUEUE``), served by
``farm bulk worker`` (a thread pool, no model), never by a GPU worker.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from celery import Celery

from farm.bulk.options import create_from_options
from farm.config import get_settings
from farm.errors import ConflictError, JobNotFoundError

log = logging.getLogger(__name__)


def bulk_job(bulk_id: str | None = None, **options: Any) -> dict[str, Any]:
    from farm.bulk import control, driver

    settings = get_settings()
    if bulk_id is None:
        bulk_id = create_from_options(options, settings)
    # a message never resumes a paused, failed or finished job (a stale one may come after a pause):
    # a resume sets the job RUNNING first (POST /bulk/{id}/resume)
    try:
        final = driver.run(bulk_id, settings=settings, max_in_flight=int(options.get("max_in_flight", 256)),
                           resume=False)
    except (ConflictError, JobNotFoundError) as exc:  # another driver has it, or it is gone: nothing to do here
        log.info("farm.bulk %s: %s", bulk_id, exc)
        return {"bulk_id": bulk_id, "skipped": str(exc)}
    except Exception:  # counted, and logged once, by the driver (farm.bulk.stops); a sweeper sends it again
        final = control.progress_of(bulk_id)  # RUNNING, or FAILED with its error
    return dataclasses.asdict(final)


LONG = 30 * 86400  # a bulk job may run for days: no task time limit worth the name


def register(app: Celery) -> None:
    # acknowledged on receipt: redelivery after the visibility timeout would start a second
    # driver beside a live one. A bulk worker that stops (its drivers hand their jobs back) or dies
    # leaves its job RUNNING in the ledger without a live driver; a sweeper sends farm.bulk again
    # (farm.lifecycle.sweep.bulk_dispatch), and `farm bulk resume ID` carries on at once.
    app.task(name="farm.bulk", acks_late=False, time_limit=LONG, soft_time_limit=LONG - 60)(bulk_job)
