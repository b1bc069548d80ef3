"""Store: a rendered GPU batch goes to storage and into the ledger, fenced by its claims.

1. Which claims still hold (one read): a batch taken over (its holder stalled past the lease, or
   was cut off) or closed (its job was cancelled or failed) is dropped here, logged once.
2. Encode and upload the images of the batches still held (deterministic keys).
3. One transaction: mark the held batches done (fenced: ``(id, token)`` and claimed), upsert the
   image rows of the batches that were accepted (one statement), add their usage per owner and
   model (farm.accounting: the GPU batch's render time split by image), add each job's progress line,
   and finish every job whose last image this was (its row locked first, so two workers storing a
   job's last two batches at once cannot both miss the completion).
4. A batch refused at step 3 because its job ended meanwhile: its uploaded objects are deleted
   (no row refers to them). One refused because it was taken over keeps them: the new holder
   writes the same keys.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, select, update

from db import batches as ledger_batches
from db import ledger
from db.models import Batch, Image, Job, JobLog, utcnow
from db.session import session_scope
from db.usage_counters import UsageEntry, record_usage
from farm import events
from farm.accounting import batch_usage
from farm.config import Settings
from farm.lifecycle.claim import Claimed
from farm.lifecycle.finish import Ending, finish_all
from farm.results import used_prompt
from farm.status import BatchStatus, JobStatus
from farm.storage import Storage, object_key

log = logging.getLogger(__name__)
STORE_TRIES = 3


@dataclass
class StoreOutcome:
    """What became of a stored GPU batch."""

    done: list[int] = field(default_factory=list)  # batch ids recorded
    refused: list[int] = field(default_factory=list)  # batch ids whose claim no longer held
    completed: list[str] = field(default_factory=list)  # job ids this store completed
    usage: list[UsageEntry] = field(default_factory=list)  # what the stored images counted, per owner and model


def still_held(group: Sequence[Claimed]) -> set[int]:
    with session_scope() as s:
        return ledger_batches.holding(s, [c.held for c in group])


def store(group: Sequence[Claimed], images: Sequence[Any], *, worker: str, storage: Storage, settings: Settings,
          note: str = "", inference_seconds: float = 0.0,
          on_progress: Callable[[], None] | None = None) -> StoreOutcome:
    """Upload and record ``images`` (``RenderedImage``s tagged with their job id) of ``group``."""
    from models.encode import encode_image

    held = still_held(group)
    outcome = StoreOutcome(refused=[c.batch_id for c in group if c.batch_id not in held])
    _log_refused(group, outcome.refused, "before storing")
    by_job = {c.job_id: c for c in group if c.batch_id in held}
    work = [(by_job[img.tag], img) for img in images if img.tag in by_job]

    def put(item: tuple[Claimed, Any]) -> dict[str, Any]:
        c, img = item
        data, content_type = encode_image(img.image, c.params.format)
        key = object_key(c.owner, c.job_id, img.index, c.params.format)
        _retrying(lambda: storage.put(key, data, content_type), f"store {key}")
        if on_progress is not None:
            on_progress()
        return {"job_id": c.job_id, "index": img.index, "seed": img.seed, "object_key": key,
                "width": img.image.width, "height": img.image.height, "content_type": content_type,
                "size_bytes": len(data), "nsfw": img.nsfw, "render_seconds": img.render_seconds, "worker": worker}

    rows = list(_pool(settings).map(put, work)) if len(work) > 1 else [put(w) for w in work]
    kept = [c for c in group if c.batch_id in held]
    with session_scope() as s:
        accepted = ledger_batches.complete(s, [c.held for c in kept])
        late = [c for c in kept if c.batch_id not in accepted]
        ok = {(c.job_id, i) for c in kept if c.batch_id in accepted for i in c.indices}
        recorded = [r for r in rows if (r["job_id"], r["index"]) in ok]
        ledger.record_images(s, recorded)
        # usage in the same transaction: the GPU batch's render time split by image (farm.accounting)
        outcome.usage = batch_usage(recorded, {c.job_id: (c.owner, c.params.model_name) for c in kept},
                                    len(images), inference_seconds)
        record_usage(s, outcome.usage)
        outcome.done = sorted(accepted)
        if ok:
            outcome.completed = _progress(s, [c for c in kept if c.batch_id in accepted], note,
                                          inference_seconds, len(group), settings, recorded)
    outcome.refused += [c.batch_id for c in late]
    _log_refused(group, [c.batch_id for c in late], "while storing")
    if late:
        _delete_if_closed(late, rows, storage)
    return outcome


def _progress(s: Any, accepted: list[Claimed], note: str, inference_seconds: float, shared: int,
              settings: Settings, images: Sequence[dict[str, Any]]) -> list[str]:
    """Count each job's new images on its row, add its progress line, and finish the jobs this completes.

    ``jobs.images_done`` is incremented in the transaction that records the images (one statement
    for every job of the GPU batch). Increments of one job serialise on its row, so exactly one
    store sees the count reach ``num_images``, and no image row is read back to find out. The lock
    order is batches, then jobs, as everywhere (claims, cancels, the sweeper). A job stored whole by
    this batch is described from what is in hand; bulk samples get no log lines (nobody reads them:
    the bulk job has its own progress).
    """
    added: dict[str, int] = {}
    for r in images:
        added[r["job_id"]] = added.get(r["job_id"], 0) + 1
    by_job = {job_id: [c for c in accepted if c.job_id == job_id] for job_id in sorted({c.job_id for c in accepted})}
    counts: dict[str, int] = {}
    if added:
        bump = case({job_id: n for job_id, n in added.items()}, value=Job.id, else_=0)
        stmt = (update(Job).where(Job.id.in_(sorted(added))).values(images_done=Job.images_done + bump)
                .returning(Job.id, Job.images_done).execution_options(synchronize_session=False))
        counts = {job_id: int(n) for job_id, n in s.execute(stmt)}
    mine = {(r["job_id"], r["index"]): r for r in images}
    others = f", batched with {shared - 1} other request(s)" if shared > 1 else ""
    now = utcnow()
    logs, endings = [], []
    for job_id, cs in by_job.items():
        c = cs[0]
        count = counts.get(job_id, 0)
        quiet = c.source == "bulk"
        if not quiet:
            todo = sum(len(x.todo) for x in cs)
            logs.append(JobLog(job_id=job_id, level="INFO", source="worker", timestamp=now,
                               message=f"{count}/{c.total} images ({todo} in {inference_seconds:.3f} s{others}{note})"))
        if job_id not in added or count < c.total:
            continue  # not the store that completes it (or nothing new: the count only moves here)
        whole = len(cs) == 1 and len(c.todo) == c.total
        if whole:
            flags = [(bool(mine[(job_id, i)]["nsfw"]), float(mine[(job_id, i)]["render_seconds"])) for i in c.indices]
        else:
            flags = [(bool(n), float(r)) for n, r in s.execute(
                select(Image.nsfw, Image.render_seconds).where(Image.job_id == job_id).order_by(Image.index))]
        endings.append(Ending(job_id=job_id, status=JobStatus.COMPLETED,
                              message=None if quiet else f"completed {c.total} image(s)",
                              result={"has_nsfw_concepts": [n for n, _ in flags], "prompt": used_prompt(c.params)},
                              inference_seconds=sum(r for _, r in flags), source=c.source, webhook=c.webhook))
    s.add_all(logs)
    for job_id in {log.job_id for log in logs}:
        events.notify(s, job_id)  # the status stream with logs=1 pushes progress lines
    return finish_all(s, endings, settings, locked=True)


_uploads: ThreadPoolExecutor | None = None
_uploads_lock = threading.Lock()


def _pool(settings: Settings) -> ThreadPoolExecutor:
    """Encode-and-put threads: a batch's images go to storage concurrently (``upload_concurrency``)."""
    global _uploads
    with _uploads_lock:
        if _uploads is None:
            _uploads = ThreadPoolExecutor(max(1, settings.upload_concurrency), thread_name_prefix="farm-put")
        return _uploads


def _log_refused(group: Sequence[Claimed], refused: Sequence[int], when: str) -> None:
    for c in group:
        if c.batch_id in refused:
            log.warning("batch %s.%s (token %d) was taken over or closed %s: dropped, nothing recorded",
                        c.job_id, c.k, c.token, when)


def _delete_if_closed(late: Sequence[Claimed], rows: Sequence[dict[str, Any]], storage: Storage) -> None:
    with session_scope() as s:
        closed = {b.id for b in s.scalars(select(Batch).where(Batch.id.in_([c.batch_id for c in late])))
                  if b.status in (BatchStatus.CANCELLED, BatchStatus.FAILED)}
    gone = {(c.job_id, i) for c in late if c.batch_id in closed for i in c.indices}
    for r in rows:
        if (r["job_id"], r["index"]) in gone:
            try:
                storage.delete(r["object_key"])
            except Exception as exc:  # best effort: an orphan is logged, never fatal
                log.warning("could not delete %s of an ended job: %s", r["object_key"], exc)


def _retrying(action: Callable[[], None], what: str) -> None:
    for attempt in range(STORE_TRIES):
        try:
            action()
            return
        except Exception as exc:
            if attempt == STORE_TRIES - 1:
                raise
            log.warning("%s failed (%s); try %d of %d", what, exc, attempt + 2, STORE_TRIES)
            time.sleep(0.5 * 2**attempt)
