"""Leased, fenced batches, in the ledger.

A job's images are split into batches when it is submitted (one row each). A Celery message
only says "batch k of job J is ready"; the ledger decides who renders it:

* :func:`claim` takes batches that are queued, or whose lease ran out, in one ``UPDATE …
  RETURNING``; each claim bumps the batch's ``token``. A redelivered or spare message for a
  batch that is done, or leased to a live worker, claims nothing.
* :func:`claim_companions` takes other queued batches that fit in the same GPU batch
  (cross-request batching; same ``compat`` key and lane), skipping rows others have locked.
* Every write after a claim is **fenced**: conditional on ``(id, token)`` and ``status =
  claimed`` (:func:`extend` the heartbeat, :func:`holding`, :func:`complete`, :func:`give_back`,
  :func:`fail`). A worker whose batch was taken over (it stalled past its lease, or was cut
  off) finds its writes refused and never touches the new holder's rows.
* :mod:`db.batch_sweep` reaps batches whose lease ran out and lists those whose message may be gone,
  for the sweeper; :mod:`db.worker_registry` holds the worker registry and how a job is cut for the pool.

SQLite has no row locks; there ``BEGIN IMMEDIATE`` (see :mod:`db.session`) serialises writers,
which gives the same answers. Callers own the transaction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, case, func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from db.models import Batch, utcnow
from farm.status import LANES_BY_PRIORITY, BatchStatus, Lane
from models.source_image import step_plan

FETCHING = BatchStatus.FETCHING
QUEUED, CLAIMED, DONE, FAILED, CANCELLED = (BatchStatus.QUEUED, BatchStatus.CLAIMED, BatchStatus.DONE,
                                            BatchStatus.FAILED, BatchStatus.CANCELLED)
FINISHED = (DONE, FAILED, CANCELLED)
Held = tuple[int, int]  # (batch id, claim token): what every fenced write names

_COMPAT_FIELDS = (
    "model_name", "image_size", "num_inference_steps", "guidance_scale", "guidance_rescale",
    "loras", "embeddings", "enable_safety_checker", "safety_checker_version",
)


def compat_key(input: dict[str, Any], owner: str | None = None) -> str:
    """The cross-request batching key, of batches and realtime frames alike: inputs with the same key can
    share a GPU batch (same model, size, steps, guidance, LoRAs; ``input`` as ``model_dump(mode="json")``).

    With or without a negative prompt never share (SDXL: no negative prompt is not an empty one), and
    inputs with LoRAs, embeddings or source images share only with their ``owner``'s (upload URLs and
    stored inputs resolve per owner). Image-to-image and inpainting share only with their own task, the
    same step plan (``models.source_image.step_plan``: the effective steps) and the same source image and
    mask, sized the same way.
    """
    picked = {name: input.get(name) for name in _COMPAT_FIELDS}
    picked["has_negative_prompt"] = bool(input.get("negative_prompt"))
    picked["owner"] = owner if input.get("loras") or input.get("embeddings") or input.get("image_url") else None
    if input.get("image_url"):  # image-to-image / inpainting: one task, one render size, one step plan
        plan = step_plan(int(input.get("num_inference_steps") or 1), float(input.get("strength") or 1.0))
        picked["task"] = "inpainting" if input.get("mask_url") else "image-to-image"
        picked["steps"] = [plan.pipeline_steps, plan.steps_run]
        # the render size follows from the source image (no image_size: its own size): only inputs of the same
        # image, sized the same way, share a batch
        picked["source"] = [input["image_url"], input.get("mask_url"), input.get("preserve_aspect_ratio"),
                            input.get("crop_output")]
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:32]


def split(num_images: int, size: int, workers: int = 1) -> list[list[int]]:
    """Indices ``0..num_images-1`` in consecutive batches of at most ``size``, balanced.

    The number of batches is rounded up to a multiple of ``workers`` (when there are enough
    images) and batch sizes differ by at most one, so that every worker of the pool gets the
    same number of images and none is left with a last batch while the others idle. On a
    long job (two rounds or more) the last round is cut in halves.
    """
    size, workers = max(1, size), max(1, workers)
    count = -(-num_images // size)
    if workers > 1:
        count = min(num_images, -(-count // workers) * workers)
    base, extra = divmod(num_images, max(1, count))
    out, start = [], 0
    for k in range(count):
        length = base + (1 if k < extra else 0)
        out.append(list(range(start, start + length)))
        start += length
    if workers > 1 and count >= 2 * workers:
        # the last round in halves: workers drift apart over a long job, and the ones that finish
        # early then wait for the others' last batch; half batches halve that wait
        head, tail = out[:-workers], out[-workers:]
        out = head + [half for b in tail for half in (b[: (len(b) + 1) // 2], b[(len(b) + 1) // 2 :]) if half]
    return out


def create_batches(s: Session, job_id: str, model_key: str, lane: str, compat: str,
                   chunks: Sequence[list[int]], *, fetching: bool = False) -> list[Batch]:
    """Queued batches of a new job, marked published now: the caller publishes right after its commit
    (if that fails it clears the mark; if it dies first, the sweeper's dispatch timeout covers it).
    ``fetching``: its file inputs are fetched first (farm.lifecycle.fetch): not claimable, not published."""
    now = utcnow()
    status, publishes, published_at = (FETCHING, 0, None) if fetching else (QUEUED, 1, now)
    rows = [Batch(job_id=job_id, k=k, indices=list(chunk), model_key=model_key, lane=lane, compat=compat,
                  status=status, attempts=0, token=0, publishes=publishes, published_at=published_at)
            for k, chunk in enumerate(chunks)]
    s.add_all(rows)
    return rows


def to_fetch(s: Session, job_ids: Iterable[str]) -> None:
    """The queued batches of these jobs → fetching: their file inputs are fetched first (farm.lifecycle.fetch)."""
    ids = list(job_ids)
    if ids:
        s.execute(update(Batch).where(Batch.job_id.in_(ids), Batch.status == QUEUED)
                  .values(status=FETCHING, publishes=0, published_at=None))


def take_fetch(s: Session, job_id: str, holder: str, until: datetime) -> bool:
    """Lease the job's fetching batches to ``holder`` until ``until``, unless another holder's lease runs;
    whether any was taken."""
    stmt = (update(Batch).where(Batch.job_id == job_id, Batch.status == FETCHING,
                                or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < utcnow()))
            .values(worker=holder, lease_expires_at=until))
    return bool(_ids(s, stmt))


def fetched(s: Session, job_id: str, holder: str) -> list[Batch]:
    """The job's fetching batches that ``holder`` still leases → queued, marked published now (the caller
    announces them after its commit); [] if none is still held (cancelled, or the lease was lost)."""
    stmt = (update(Batch).where(Batch.job_id == job_id, Batch.status == FETCHING, Batch.worker == holder)
            .values(status=QUEUED, worker=None, lease_expires_at=None, published_at=utcnow(), publishes=1))
    return sorted(returning_batches(s, stmt), key=lambda b: b.k)


def get_batches(s: Session, job_id: str) -> list[Batch]:
    stmt = select(Batch).where(Batch.job_id == job_id).order_by(Batch.k)
    return list(s.scalars(stmt.execution_options(populate_existing=True)))


def _lease(seconds: float, now: datetime | None = None) -> datetime:
    return (now or utcnow()) + timedelta(seconds=seconds)


def _claimed_values(worker: str, lease_seconds: float) -> dict[str, Any]:
    now = utcnow()
    return {"status": CLAIMED, "worker": worker, "attempts": Batch.attempts + 1, "token": Batch.token + 1,
            "claimed_at": now, "lease_expires_at": _lease(lease_seconds, now)}


def returning_batches(s: Session, stmt: Any) -> list[Batch]:
    """Run an ``UPDATE … RETURNING`` of batches (this module's and ``db.batch_sweep``'s) and get fresh rows."""
    return list(s.scalars(stmt.returning(Batch).execution_options(synchronize_session=False,
                                                                  populate_existing=True)))


def claim(s: Session, job_id: str, k: int, worker: str, lease_seconds: float) -> Batch | None:
    """Batch ``k`` of ``job_id`` for ``worker``, if it is queued or its lease ran out; else None."""
    rows = claim_many(s, [(job_id, k)], worker, lease_seconds)
    return rows[0] if rows else None


def claim_many(s: Session, batches: Sequence[tuple[str, int]], worker: str, lease_seconds: float) -> list[Batch]:
    """The listed ``(job_id, k)`` batches that are queued or whose lease ran out, claimed in one statement.

    A row another transaction holds is waited for, then re-checked: two claims of one batch
    never both succeed. Each claim bumps ``token`` and ``attempts``.
    """
    if not batches:
        return []
    claimable = or_(Batch.status == QUEUED, and_(Batch.status == CLAIMED, Batch.lease_expires_at < utcnow()))
    stmt = (update(Batch).where(tuple_(Batch.job_id, Batch.k).in_([tuple(b) for b in batches]), claimable)
            .values(**_claimed_values(worker, lease_seconds)))
    order = {tuple(b): i for i, b in enumerate(batches)}
    return sorted(returning_batches(s, stmt), key=lambda b: order.get((b.job_id, b.k), 0))


_LANE_RANK = case({lane.value: rank for rank, lane in enumerate(LANES_BY_PRIORITY)}, value=Batch.lane, else_=99)


def claim_next(s: Session, model_key: str, worker: str, lease_seconds: float) -> Batch | None:
    """The oldest queued batch of the model's highest non-empty lane, claimed in one statement
    (``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1)``); None if nothing is queued.

    A worker pulls its next batch this way while the current one renders, instead of waiting for
    a message: the message of a batch taken like this finds it claimed and is dropped.
    """
    pick = (select(Batch.id).where(Batch.model_key == model_key, Batch.status == QUEUED)
            .order_by(_LANE_RANK, Batch.id).limit(1).with_for_update(skip_locked=True).scalar_subquery())
    rows = returning_batches(s, update(Batch).where(Batch.id == pick, Batch.status == QUEUED)
                      .values(**_claimed_values(worker, lease_seconds)))
    return rows[0] if rows else None


def higher_lane_waiting(s: Session, model_key: str, lane: str) -> bool:
    """Whether a batch of a higher lane than ``lane`` is queued for the model (it should go first)."""
    higher = [x.value for x in LANES_BY_PRIORITY[: LANES_BY_PRIORITY.index(Lane(lane))]]
    if not higher:
        return False
    stmt = select(Batch.id).where(Batch.model_key == model_key, Batch.status == QUEUED,
                                  Batch.lane.in_(higher)).limit(1)
    return s.scalar(stmt) is not None


def release(s: Session, held: Sequence[Held]) -> set[int]:
    """Claimed batches not started yet → queued again, unpublished (the sweeper announces them), the
    attempt not counted; for the claims that still hold."""
    if not held:
        return set()
    stmt = (update(Batch).where(_fenced(held))
            .values(status=QUEUED, worker=None, lease_expires_at=None, published_at=None,
                    attempts=Batch.attempts - 1))
    return _ids(s, stmt)


def claim_companions(s: Session, first: Batch, worker: str, lease_seconds: float, room: int,
                     exclude_jobs: Iterable[str] = ()) -> list[Batch]:
    """Queued batches of other jobs that can join ``first`` in one GPU batch, up to ``room`` images.

    Same model, same ``compat`` key, same lane; oldest first. Only whole batches are taken.
    """
    if room <= 0:
        return []
    stmt = (
        select(Batch.id, Batch.indices)
        .where(Batch.model_key == first.model_key, Batch.compat == first.compat, Batch.lane == first.lane,
               Batch.status == QUEUED, Batch.job_id.not_in([first.job_id, *exclude_jobs]))
        .order_by(Batch.id)
        .limit(room)
        .with_for_update(skip_locked=True)
    )
    picked: list[int] = []
    for batch_id, indices in s.execute(stmt):
        if len(indices) <= room:
            picked.append(batch_id)
            room -= len(indices)
    if not picked:
        return []
    claimed = returning_batches(s, update(Batch).where(Batch.id.in_(picked), Batch.status == QUEUED)
                         .values(**_claimed_values(worker, lease_seconds)))
    return sorted(claimed, key=lambda b: b.id)


def compatible_in_flight(s: Session, first: Batch) -> bool:
    """Whether another job's batch that could share ``first``'s GPU batch is being rendered now.

    Only then is it worth waiting for companions: compatible traffic is arriving. A lone
    request on a quiet pool does not wait.
    """
    stmt = select(Batch.id).where(Batch.model_key == first.model_key, Batch.compat == first.compat,
                                  Batch.status == CLAIMED, Batch.job_id != first.job_id).limit(1)
    return s.scalar(stmt) is not None


# Fenced writes: each names (batch id, token) and applies only while that claim still holds.


def _fenced(held: Sequence[Held]) -> Any:
    return and_(tuple_(Batch.id, Batch.token).in_([tuple(h) for h in held]), Batch.status == CLAIMED)


def _ids(s: Session, stmt: Any) -> set[int]:
    return set(s.scalars(stmt.returning(Batch.id).execution_options(synchronize_session=False)))


def extend(s: Session, held: Sequence[Held], worker: str, lease_seconds: float) -> set[int]:
    """Heartbeat: push on the leases ``worker`` still holds; returns the ids it still holds."""
    if not held:
        return set()
    stmt = update(Batch).where(_fenced(held), Batch.worker == worker).values(lease_expires_at=_lease(lease_seconds))
    return _ids(s, stmt)


def holding(s: Session, held: Sequence[Held]) -> set[int]:
    """The ids of ``held`` whose claim still holds (a read: nothing is locked or changed)."""
    if not held:
        return set()
    return set(s.scalars(select(Batch.id).where(_fenced(held))))


def stored_by_holder(s: Session, held: Sequence[Held]) -> set[int]:
    """The ids of ``held`` that their own claim stored (done under that token; a cancel closes
    batches as cancelled, so it never shows here)."""
    if not held:
        return set()
    stmt = select(Batch.id).where(tuple_(Batch.id, Batch.token).in_([tuple(h) for h in held]),
                                  Batch.status == DONE)
    return set(s.scalars(stmt))


def complete(s: Session, held: Sequence[Held]) -> set[int]:
    """Claimed batches → done, for the claims that still hold; returns those ids."""
    if not held:
        return set()
    stmt = update(Batch).where(_fenced(held)).values(status=DONE, finished_at=utcnow(), lease_expires_at=None)
    return _ids(s, stmt)


def finish_held(s: Session, held: Sequence[Held], status: BatchStatus, error: str | None = None) -> set[int]:
    """Claimed batches → ``status`` (failed | cancelled), for the claims that still hold."""
    if not held:
        return set()
    stmt = update(Batch).where(_fenced(held)).values(status=status, finished_at=utcnow(), lease_expires_at=None,
                                                     error=error)
    return _ids(s, stmt)


def fail(s: Session, batch_id: int, token: int, error: str) -> bool:
    """A claimed batch → failed, if the claim still holds."""
    return bool(finish_held(s, [(batch_id, token)], FAILED, error))


def give_back(s: Session, batch_id: int, token: int, error: str, retry_in: float) -> bool:
    """A failed attempt: the claim lapses after ``retry_in`` seconds (held by nobody meanwhile), then the
    sweeper puts the batch back to queued and publishes it. False if the claim no longer holds."""
    stmt = (update(Batch).where(_fenced([(batch_id, token)]))
            .values(worker=None, error=error, lease_expires_at=_lease(retry_in)))
    return bool(_ids(s, stmt))


def close_open(s: Session, job_id: str, status: BatchStatus = CANCELLED, error: str | None = None) -> int:
    """Every fetching, queued or claimed batch of a job → ``status``: queued ones never start, and the holders
    of claimed ones find their fenced writes refused (their keepers stop the render)."""
    stmt = (update(Batch).where(Batch.job_id == job_id, Batch.status.in_([FETCHING, QUEUED, CLAIMED]))
            .values(status=status, finished_at=utcnow(), lease_expires_at=None, error=error))
    return cast(CursorResult[Any], s.execute(stmt)).rowcount


def counts_by_status(s: Session, job_id: str) -> dict[str, int]:
    stmt = select(Batch.status, func.count()).where(Batch.job_id == job_id).group_by(Batch.status)
    return {status: int(n) for status, n in s.execute(stmt)}
