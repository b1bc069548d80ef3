"""Guarded ledger operations.

Every status change is ``UPDATE jobs SET … WHERE id = :id AND status IN (:allowed)``
and says whether it applied, so a late or repeated message can never move a job
backwards. Images are upserted on ``(job_id, index)``, so a redelivered task
overwrites its rows instead of adding new ones. Callers own the transaction
(see :func:`db.session.session_scope`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import CursorResult, and_, bindparam, column, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.models import Batch, Image, Job, JobLog, utcnow
from farm import events
from farm.errors import ConflictError, RequestIdTakenError
from farm.status import ACTIVE, BatchStatus, JobStatus


def _canonical(value: Any) -> Any:
    """``value`` as it comes back from a JSON column (tuples become lists, and so on)."""
    return json.loads(json.dumps(value, sort_keys=True))


def _guarded_update(s: Session, request_id: str, allowed: Iterable[JobStatus], **values: Any) -> bool:
    values.setdefault("updated_at", utcnow())
    stmt = (
        update(Job)
        .where(Job.id == request_id, Job.status.in_(list(allowed)))
        .values(**values)
        .execution_options(synchronize_session="fetch")
    )
    result = cast(CursorResult[Any], s.execute(stmt))
    return result.rowcount == 1


# Jobs.


def get_job(s: Session, request_id: str, owner: str | None = None) -> Job | None:
    """The job ``request_id``, freshly read; with ``owner``, only if it is that owner's."""
    stmt = select(Job).where(Job.id == request_id)
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    return s.scalars(stmt.execution_options(populate_existing=True)).one_or_none()


def _find_existing(
    s: Session, request_id: str, owner: str, input: dict[str, Any], idempotency_key: str | None
) -> Job | None:
    job = get_job(s, request_id)
    if job is not None:
        if job.owner != owner:
            raise RequestIdTakenError(f"request id {request_id!r} is already taken")
        if _canonical(job.input) != input:
            raise RequestIdTakenError(f"request id {request_id!r} was already used for a different request")
        return job
    if idempotency_key is not None:
        stmt = select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key)
        return s.scalars(stmt.execution_options(populate_existing=True)).one_or_none()
    return None


def _insert(s: Session) -> Any:
    """The dialect's ``insert`` (with ``ON CONFLICT``): the ledger runs on PostgreSQL, or SQLite on one host."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert
    if dialect == "sqlite":
        return sqlite_insert
    raise NotImplementedError(f"the ledger needs PostgreSQL or SQLite, not {dialect}")


def create_job(
    s: Session,
    *,
    request_id: str,
    owner: str,
    model_name: str,
    model_key: str,
    lane: str,
    source: str,
    input: dict[str, Any],
    seed: int,
    num_images: int,
    idempotency_key: str | None = None,
    webhook_url: str | None = None,
) -> tuple[Job, bool]:
    """Insert a job in ``IN_QUEUE``, or return the one already there; ``(job, created)``.

    The same id for the same owner and input, or the same ``(owner, idempotency_key)``,
    returns the existing job. The same id for another owner or another input raises
    :class:`ConflictError`. Safe against a concurrent insert of the same job.

    PostgreSQL and SQLite: one ``INSERT … ON CONFLICT DO NOTHING RETURNING`` (no read before
    it, no savepoint); only when it conflicts is the job already there looked up. A concurrent
    uncommitted insert of the same id or key is waited for, then found.
    """
    input = _canonical(input)
    now = utcnow()
    stmt = (
        _insert(s)(Job)
        .values(id=request_id, owner=owner, model_name=model_name, model_key=model_key, lane=str(lane),
                source=str(source), status=JobStatus.IN_QUEUE, input=input, seed=seed, num_images=num_images,
                idempotency_key=idempotency_key, webhook_url=webhook_url, created_at=now, updated_at=now)
        .on_conflict_do_nothing()
        .returning(Job)
        .execution_options(populate_existing=True)
    )  # fmt: skip
    for _ in range(3):
        job = s.scalars(stmt).one_or_none()
        if job is not None:
            return job, True
        existing = _find_existing(s, request_id, owner, input, idempotency_key)
        if existing is not None:
            return existing, False
        # the row it conflicted with is gone already (deleted meanwhile): insert again
    raise ConflictError(f"request id {request_id!r} could not be recorded; submit it again")


def start_job(s: Session, request_id: str) -> bool:
    """``IN_QUEUE`` → ``IN_PROGRESS``; False if the job was not in the queue."""
    now = utcnow()
    applied = _guarded_update(
        s, request_id, [JobStatus.IN_QUEUE], status=JobStatus.IN_PROGRESS, started_at=now, updated_at=now
    )
    if applied:
        events.notify(s, request_id)
    return applied


def finish_job(
    s: Session,
    request_id: str,
    status: JobStatus | str,
    *,
    error: str | None = None,
    error_type: str | None = None,
    result: dict[str, Any] | None = None,
    inference_seconds: float | None = None,
) -> bool:
    """An active job → the terminal ``status``; False if it had already finished (or is unknown)."""
    status = JobStatus(status)
    if not status.is_terminal:
        raise ValueError(f"finish_job needs a terminal status, not {status}")
    now = utcnow()
    values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now}
    if error is not None:
        values["error"] = error
    if error_type is not None:
        values["error_type"] = error_type
    if result is not None:
        values["result"] = result
    if inference_seconds is not None:
        values["inference_seconds"] = inference_seconds
    applied = _guarded_update(s, request_id, ACTIVE, **values)
    if applied:
        events.notify(s, request_id)
    return applied


def queue_position(s: Session, job: Job) -> int | None:
    """How many queued jobs of the same model come before ``job`` (0: next); None if not queued."""
    if job.status != JobStatus.IN_QUEUE:
        return None
    earlier = or_(
        Job.created_at < job.created_at,
        and_(Job.created_at == job.created_at, Job.id < job.id),
    )
    stmt = (
        select(func.count())
        .select_from(Job)
        .where(Job.model_key == job.model_key, Job.status == JobStatus.IN_QUEUE, earlier)
    )
    return int(s.scalar(stmt) or 0)


# Images.


def record_image(
    s: Session,
    *,
    job_id: str,
    index: int,
    seed: int,
    object_key: str,
    width: int,
    height: int,
    content_type: str,
    size_bytes: int,
    nsfw: bool,
    render_seconds: float,
) -> None:
    """Insert or overwrite image ``index`` of a job: a redelivered task never adds a second row."""
    values: dict[str, Any] = {
        "seed": seed,
        "object_key": object_key,
        "width": width,
        "height": height,
        "content_type": content_type,
        "size_bytes": size_bytes,
        "nsfw": nsfw,
        "render_seconds": render_seconds,
    }
    stmt = _insert(s)(Image).values(job_id=job_id, index=index, created_at=utcnow(), **values)
    s.execute(stmt.on_conflict_do_update(index_elements=[Image.job_id, Image.index],
                                         set_={**values, "created_at": utcnow()}))


def record_images(s: Session, rows: list[dict[str, Any]]) -> None:
    """Insert or overwrite many image rows in one statement (keys as :func:`record_image`'s, plus
    ``worker``): the images of a batch are recorded together, in the transaction that marks it done."""
    if not rows:
        return
    now = utcnow()
    rows = [{**row, "created_at": now} for row in rows]
    stmt = _insert(s)(Image).values(rows)
    updated = [name for name in rows[0] if name not in ("job_id", "index")]
    s.execute(stmt.on_conflict_do_update(index_elements=[Image.job_id, Image.index],
                                         set_={name: stmt.excluded[name] for name in updated}))


def image_totals(s: Session, job_ids: Iterable[str]) -> dict[str, int]:
    """How many images each job has recorded (one grouped query)."""
    stmt = select(Image.job_id, func.count()).where(Image.job_id.in_(list(job_ids))).group_by(Image.job_id)
    return {job_id: int(n) for job_id, n in s.execute(stmt)}


def list_images(s: Session, request_id: str) -> list[Image]:
    stmt = select(Image).where(Image.job_id == request_id).order_by(Image.index)
    return list(s.scalars(stmt.execution_options(populate_existing=True)))


def done_indices(s: Session, request_id: str) -> set[int]:
    """The indices of the images of a job that are already recorded."""
    return set(s.scalars(select(Image.index).where(Image.job_id == request_id)))


def count_images(s: Session, request_id: str) -> int:
    stmt = select(func.count()).select_from(Image).where(Image.job_id == request_id)
    return int(s.scalar(stmt) or 0)


# Logs.


def add_log(
    s: Session, request_id: str, message: str, *, level: str = "INFO", source: str = "worker"
) -> None:
    s.add(JobLog(job_id=request_id, message=message, level=level, source=source, timestamp=utcnow()))
    s.flush()
    events.notify(s, request_id)


def get_logs(s: Session, request_id: str) -> list[JobLog]:
    stmt = select(JobLog).where(JobLog.job_id == request_id).order_by(JobLog.timestamp, JobLog.id)
    return list(s.scalars(stmt))


# Many jobs at once (bulk submission).


def create_jobs(s: Session, jobs: list[dict[str, Any]]) -> tuple[set[str], dict[str, Job]]:
    """Insert many jobs in ``IN_QUEUE`` in one statement; ``(ids created, {id: job already there})``.

    Each dict holds the columns of a new job (``id``, ``owner``, ``model_name``, ``model_key``,
    ``lane``, ``source``, ``input``, ``seed``, ``num_images``; no idempotency key). The insert
    skips ids that exist (``ON CONFLICT (id) DO NOTHING``); only those are read back, in one
    query, and checked as :func:`create_job` checks them: the same owner and input gives the
    existing job, another owner or input raises :class:`ConflictError`. Safe against a concurrent
    insert of the same ids (the insert waits for it, skips, and the read finds its rows).
    PostgreSQL and SQLite (the two dialects the ledger runs on).
    """
    if not jobs:
        return set(), {}
    insert = _insert(s)
    now = utcnow()
    rows = [{**job, "lane": str(job["lane"]), "source": str(job["source"])} for job in jobs]
    if insert is pg_insert:
        created = set(s.scalars(_insert_from_json(Job, rows, {"status": JobStatus.IN_QUEUE, "created_at": now,
                                                              "updated_at": now})
                                .on_conflict_do_nothing(index_elements=[Job.id]).returning(Job.id)))
    else:
        stmt = insert(Job).on_conflict_do_nothing(index_elements=[Job.id]).returning(Job.id)
        created = set(s.scalars(stmt, [{**row, "status": JobStatus.IN_QUEUE, "created_at": now, "updated_at": now}
                                       for row in rows]))
    missing = [row for row in rows if row["id"] not in created]
    if not missing:
        return created, {}
    found = {job.id: job for job in s.scalars(select(Job).where(Job.id.in_([r["id"] for r in missing]))
                                              .execution_options(populate_existing=True))}
    for row in missing:
        job = found.get(row["id"])
        if job is None:  # neither inserted nor there: deleted at this very moment
            raise ConflictError(f"request id {row['id']!r} could not be recorded; submit it again")
        if job.owner != row["owner"]:
            raise ConflictError(f"request id {row['id']!r} is already taken")
        if _canonical(job.input) != _canonical(row["input"]):
            raise ConflictError(f"request id {row['id']!r} was already used for a different request")
    return created, found


def insert_batches(s: Session, rows: list[dict[str, Any]]) -> list[tuple[int, str, int]]:
    """Queued batches of new jobs (see :func:`create_jobs`) in one statement; ``(id, job_id, k)`` of each.

    Each row has ``job_id``, ``k``, ``indices``, ``model_key``, ``lane`` and ``compat``. They are marked
    published now, as ``db.batches.create_batches`` marks them: the caller publishes right after its commit.
    """
    if not rows:
        return []
    now = utcnow()
    constants = {"status": BatchStatus.QUEUED, "attempts": 0, "token": 0, "publishes": 1, "published_at": now,
                 "created_at": now}
    if s.get_bind().dialect.name == "postgresql":
        stmt = _insert_from_json(Batch, rows, constants).returning(Batch.id, Batch.job_id, Batch.k)
        return [(int(i), str(j), int(k)) for i, j, k in s.execute(stmt)]
    stmt = sqlite_insert(Batch).returning(Batch.id, Batch.job_id, Batch.k)
    return [(int(i), str(j), int(k)) for i, j, k in s.execute(stmt, [{**row, **constants} for row in rows])]


def _insert_from_json(entity: Any, rows: list[dict[str, Any]], constants: dict[str, Any]) -> Any:
    """PostgreSQL: ``INSERT INTO <table> (…) SELECT … FROM jsonb_to_recordset(:rows)``, ``rows`` sent as one JSON
    parameter and ``constants`` the same in every row: a short statement whatever the number of rows (a
    multi-row ``VALUES`` of thousands of parameters costs more to build, send and parse than the rows do)."""
    table = entity.__table__
    names = list(rows[0])
    recordset = (func.jsonb_to_recordset(bindparam("rows", rows, type_=JSONB))
                 .table_valued(*(column(name, table.c[name].type) for name in names))
                 .render_derived(name="r", with_types=True))
    picked = [recordset.c[name] for name in names]
    picked += [literal(value, table.c[name].type) for name, value in constants.items()]
    return pg_insert(table).from_select([*names, *constants], select(*picked))
