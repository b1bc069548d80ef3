"""Views of a job built from the ledger: the output schema and the status.

Import-light. URLs are made when read: presigned (S3) or ``file://`` (local), or data
URIs when the request asked for ``sync_mode``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from db import ledger
from db.models import Job
from farm.config import Settings
from farm.schemas import GenerateInput, GenerateOutput, Image, stored_input
from farm.status import JobStatus
from farm.storage import Storage, data_uri
from models.prompt import expand_prompt


def used_prompt(inp: GenerateInput) -> str:
    return expand_prompt(inp.prompt) if inp.expand_prompt else inp.prompt


def build_output(s: Session, job: Job, storage: Storage, settings: Settings) -> GenerateOutput:
    inp = stored_input(job.input)
    rows = ledger.list_images(s, job.id)
    images = []
    for row in rows:
        if inp.sync_mode:
            url = data_uri(storage.get(row.object_key), row.content_type)
        else:
            url = storage.url(row.object_key, settings.presign_expiry_seconds)
        images.append(Image(url=url, width=row.width, height=row.height, content_type=row.content_type))
    inference = job.inference_seconds
    if inference is None:
        inference = sum(row.render_seconds for row in rows)
    return GenerateOutput(
        images=images,
        timings={"inference": round(inference, 6)},
        seed=job.seed,
        has_nsfw_concepts=[row.nsfw for row in rows],
        prompt=used_prompt(inp),
    )


def status_view(s: Session, job: Job, *, with_logs: bool = False) -> dict[str, Any]:
    """Status in the ledger's words (FAILED and CANCELLED stay distinct here)."""
    status = JobStatus(job.status)
    view: dict[str, Any] = {
        "request_id": job.id,
        "status": status.value,
        "model_name": job.model_name,
        "images_done": ledger.count_images(s, job.id),
        "num_images": job.num_images,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }
    if status == JobStatus.IN_QUEUE:
        view["queue_position"] = ledger.queue_position(s, job)
    if job.error:
        view["error"] = job.error
        view["error_type"] = job.error_type
    if with_logs:
        view["logs"] = [
            {"timestamp": row.timestamp.isoformat(), "level": row.level, "source": row.source,
             "message": row.message}
            for row in ledger.get_logs(s, job.id)
        ]
    return view
