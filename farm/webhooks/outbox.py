"""The webhook outbox: one ``webhook_deliveries`` row per finished job that asked for a webhook.

:func:`enqueue` is called inside the transaction that moves a job to COMPLETED, FAILED or
CANCELLED, so the row exists exactly when the job has finished; the dispatcher delivers it
later, from the ledger alone. The row holds no body: it is built when each attempt is made
(no image data URI ever sits in the outbox, and a presigned URL is fresh). The body is fal's:
``{request_id, gateway_request_id, status: "OK"|"ERROR", payload, error}``; when the output
cannot be built, ``payload`` is null and ``payload_error`` says why.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import null, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db import ledger
from db.models import Job, WebhookAttempt, WebhookDelivery, utcnow
from farm.config import Settings, get_settings
from farm.status import DeliveryStatus, JobStatus

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED, GONE = (DeliveryStatus.PENDING, DeliveryStatus.DELIVERED, DeliveryStatus.FAILED,
                                   DeliveryStatus.GONE)


def build_body(s: Session, job: Job, settings: Settings) -> dict[str, Any]:
    status = JobStatus(job.status)
    body: dict[str, Any] = {"request_id": job.id, "gateway_request_id": job.id}
    if status == JobStatus.COMPLETED:
        from farm.results import build_output
        from farm.storage import get_storage

        body.update(status="OK", error=None)
        try:
            body["payload"] = build_output(s, job, get_storage(settings), settings).model_dump(mode="json")
        except Exception as exc:  # storage down: still deliver, as fal does, with payload_error
            log.warning("webhook payload of %s could not be built: %s", job.id, exc)
            body.update(payload=None, payload_error=f"{type(exc).__name__}: {exc}")
    else:
        body.update(status="ERROR", payload=None, error=job.error or status.value.lower())
    return body


def enqueue(s: Session, job: Job | str, settings: Settings | None = None) -> bool:
    """Add the outbox row of a just-finished job (or job id) if it has a webhook URL; True if added.

    Call it in the transaction that finished the job. Idempotent: a second call adds nothing.
    """
    fresh = ledger.get_job(s, job if isinstance(job, str) else job.id)
    if fresh is None or not fresh.webhook_url or not JobStatus(fresh.status).is_terminal:
        return False
    settings = settings or get_settings()
    values = {
        "job_id": fresh.id,
        "owner": fresh.owner,
        "url": fresh.webhook_url,
        "body": null(),  # SQL NULL (not JSON null): built when an attempt is made (dispatcher), from the ledger
        "status": PENDING,
        "attempts": 0,
        "next_attempt_at": utcnow(),
        "created_at": utcnow(),
    }
    insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert  # the two dialects
    stmt = insert(WebhookDelivery).values(**values).on_conflict_do_nothing(index_elements=["job_id"])
    return bool(s.execute(stmt.returning(WebhookDelivery.id)).first())


def get_delivery(s: Session, job_id: str) -> WebhookDelivery | None:
    stmt = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
    return s.scalars(stmt.execution_options(populate_existing=True)).one_or_none()


def list_attempts(s: Session, delivery_id: int) -> list[WebhookAttempt]:
    stmt = select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)
    return list(s.scalars(stmt))
