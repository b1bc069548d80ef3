"""Views of a job built from the ledger: the output schema and the status.

Import-light. URLs are made when read: presigned (S3) or ``file://`` (local), or data
URIs when the request asked for ``sync_mode`` and its images hold at most
``sync_inline_max_bytes`` together (beyond it, the same result, and its webhook, give URLs).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from sqlalchemy.orm import Session

from db import ledger
from db.models import Job
from farm.config import Settings
from farm.image_schemas import admitted_input
from farm.schemas import GenerateInput, GenerateOutput, Image
from farm.status import JobStatus
from farm.storage import Storage, data_uri
from models.prompt import expand_prompt

FETCH_THREADS = 8  # sync_mode: objects fetched at once per process
_fetcher: ThreadPoolExecutor | None = None
_fetcher_lock = threading.Lock()


def _forget_fetcher() -> None:  # a forked child has none of its parent's threads
    global _fetcher, _fetcher_lock
    _fetcher, _fetcher_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_fetcher)


def used_prompt(inp: GenerateInput) -> str:
    return expand_prompt(inp.prompt) if inp.expand_prompt else inp.prompt


def _fetch_all(storage: Storage, keys: list[str]) -> list[bytes]:
    """The objects ``keys``, fetched at once (one round trip of wall time, not one per image)."""
    global _fetcher
    if len(keys) <= 1:
        return [storage.get(key) for key in keys]
    with _fetcher_lock:
        if _fetcher is None:
            _fetcher = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="farm-fetch")
        pool = _fetcher
    return list(pool.map(storage.get, keys))


def build_output(s: Session, job: Job, storage: Storage, settings: Settings) -> GenerateOutput:
    inp = admitted_input(job.input)
    rows = ledger.list_images(s, job.id)
    if inp.sync_mode and sum(row.size_bytes for row in rows) <= settings.sync_inline_max_bytes:
        blobs = _fetch_all(storage, [row.object_key for row in rows])
        urls = [data_uri(blob, row.content_type) for blob, row in zip(blobs, rows, strict=True)]
    else:
        urls = [storage.url(row.object_key, settings.presign_expiry_seconds) for row in rows]
    images = [Image(url=url, width=row.width, height=row.height, content_type=row.content_type)
              for url, row in zip(urls, rows, strict=True)]
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


API_FINAL_NOTE = ("the HTTP API reports this request as COMPLETED with its error and error_type: "
                  "fal's clients know no other final status")


def api_status(status: JobStatus) -> Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]:
    """The status word of fal's queue API (and ``farm api``) for a ledger status."""
    if status.is_terminal:
        return "COMPLETED"
    return "IN_QUEUE" if status == JobStatus.IN_QUEUE else "IN_PROGRESS"


def status_view(s: Session, job: Job, *, with_logs: bool = False) -> dict[str, Any]:
    """Status in the ledger's words (FAILED and CANCELLED stay distinct here), with the word the
    HTTP API uses beside it (``api_status``), and a note where the two differ."""
    status = JobStatus(job.status)
    view: dict[str, Any] = {
        "request_id": job.id,
        "status": status.value,
        "api_status": api_status(status),
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
    if status in (JobStatus.FAILED, JobStatus.CANCELLED):
        view["note"] = API_FINAL_NOTE
    if with_logs:
        view["logs"] = [
            {"timestamp": row.timestamp.isoformat(), "level": row.level, "source": row.source,
             "message": row.message}
            for row in ledger.get_logs(s, job.id)
        ]
    return view
