"""``farm.generate``: the public task. kwargs: the input schema; result: the output schema.

The fields pick the endpoint, as :func:`farm.admission.admit` reads them: ``image_url`` makes an
image-to-image request, ``image_url`` with ``mask_url`` an inpainting one (``farm.image_schemas``),
else text-to-image; so no second task name is needed.

It arrives on the dispatch queue from any plain Celery client, records the job in the
ledger under the task's own id, fans the job out to the model's queue and returns
without a result. Whatever way the job ends (completed, failed, cancelled), the one finish
function (farm.lifecycle.finish) writes this task's result: the output schema, or the error.
A redelivered dispatch finds its job recorded and announces its queued batches again.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore

from farm.admission import admit
from farm.config import get_settings
from farm.lifecycle import submit as submission
from farm.status import Lane


def generate(self: Task, **kwargs: Any) -> None:
    settings = get_settings()
    inp = admit(kwargs, None, settings)  # InvalidInputError names the field; no job is created
    submission.submit(
        inp,
        owner=settings.default_owner,
        lane=Lane.QUEUE,
        source="celery",
        request_id=self.request.id,
        settings=settings,
    )
    raise Ignore()  # the result is stored when the job completes


def register(app: Celery) -> None:
    app.task(name="farm.generate", bind=True, acks_late=True, ignore_result=False, time_limit=60)(generate)
