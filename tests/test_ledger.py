"""Guarded ledger operations, on the embedded SQLite ledger and on the private PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db import ledger
from db.migrate import upgrade
from db.models import Image, Job, JobLog
from db.session import dispose_engines, get_sessionmaker, session_scope
from farm.errors import ConflictError
from farm.status import JobStatus


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    sqlite = f"sqlite:///{tmp_path / 'ledger.db'}"
    url = sqlite if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    yield url
    dispose_engines()


@pytest.fixture
def sessions(ledger_url: str) -> sessionmaker[Session]:
    return get_sessionmaker(ledger_url)


def new_job(s: Session, request_id: str = "r1", **overrides: Any) -> tuple[Job, bool]:
    fields: dict[str, Any] = {
        "owner": "alice",
        "model_name": "farm/tiny-lcm",
        "model_key": "tiny",
        "lane": "queue",
        "source": "api",
        "input": {"prompt": "a cat", "image_size": {"width": 64, "height": 64}},
        "seed": 2**40,
        "num_images": 2,
    }
    fields.update(overrides)
    return ledger.create_job(s, request_id=request_id, **fields)


def image(job_id: str, index: int, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "job_id": job_id, "index": index, "seed": 7 + index, "object_key": f"alice/{job_id}/{index}.png",
        "width": 64, "height": 64, "content_type": "image/png", "size_bytes": 100, "nsfw": False,
        "render_seconds": 0.5,
    }  # fmt: skip
    fields.update(overrides)
    return fields


def test_create_job_is_idempotent_for_the_same_owner_and_input(ledger_url: str) -> None:
    with session_scope(ledger_url) as s:
        job, created = new_job(s, input={"prompt": "a cat", "loras": ()})
    assert created and job.status is JobStatus.IN_QUEUE and job.seed == 2**40
    assert job.created_at.tzinfo is UTC
    with session_scope(ledger_url) as s:
        again, created = new_job(s, input={"loras": [], "prompt": "a cat"})
        assert not created and again.id == "r1"
        assert s.scalar(select(func.count()).select_from(Job)) == 1


def test_create_job_conflicts_on_another_owner_or_input(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        new_job(s)
    with sessions() as s:
        with pytest.raises(ConflictError, match="already taken"):
            new_job(s, owner="mallory")
        with pytest.raises(ConflictError, match="different request"):
            new_job(s, input={"prompt": "a dog"})


def test_idempotency_key_is_per_owner(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        first, created = new_job(s, "r1", idempotency_key="k")
        assert created
    with sessions.begin() as s:
        same, created = new_job(s, "r2", idempotency_key="k", input={"prompt": "retry"})
        assert not created and same.id == "r1"
        other, created = new_job(s, "r3", owner="bob", idempotency_key="k")
        assert created and other.id == "r3"
        assert ledger.get_job(s, "r2") is None


def test_create_job_recovers_from_a_concurrent_insert(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other writer commits between our read and our insert: the insert fails in
    # its SAVEPOINT, the job is re-read, and our transaction stays usable.
    with sessions.begin() as s:
        new_job(s)
    real = ledger._find_existing
    calls = []

    def racing(*args: Any) -> Job | None:
        calls.append(args[1])
        return None if len(calls) == 1 else real(*args)

    monkeypatch.setattr(ledger, "_find_existing", racing)
    with sessions.begin() as s:
        job, created = new_job(s)
        assert not created and job.id == "r1" and len(calls) == 2
        new_job(s, "r2")  # the transaction goes on
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 2


def test_create_job_waits_for_a_concurrent_uncommitted_insert(sessions: sessionmaker[Session]) -> None:
    results: list[tuple[Job, bool] | BaseException] = []
    with sessions() as first:
        new_job(first)  # flushed, not committed

        def second() -> None:
            try:
                with sessions.begin() as s:
                    results.append(new_job(s))
            except BaseException as exc:  # surfaced below
                results.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the second insert should wait for the first transaction"
        first.commit()
        thread.join(30)
    assert len(results) == 1 and isinstance(results[0], tuple), results
    job, created = results[0]
    assert not created and job.id == "r1"


def test_get_job_filters_by_owner(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        new_job(s)
        assert ledger.get_job(s, "r1", owner="alice") is not None
        assert ledger.get_job(s, "r1", owner="bob") is None
        assert ledger.get_job(s, "nope") is None


def test_guarded_transitions_never_go_backwards(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        new_job(s)
        assert ledger.start_job(s, "r1")
        assert not ledger.start_job(s, "r1")
        assert ledger.finish_job(
            s, "r1", JobStatus.COMPLETED, result={"has_nsfw": [False]}, inference_seconds=1.5
        )
    with sessions.begin() as s:
        assert not ledger.finish_job(s, "r1", JobStatus.FAILED, error="late")
        assert not ledger.start_job(s, "r1")
        assert not ledger.finish_job(s, "nope", JobStatus.COMPLETED)
        with pytest.raises(ValueError, match="terminal"):
            ledger.finish_job(s, "r1", JobStatus.IN_QUEUE)
    with sessions() as s:
        job = ledger.get_job(s, "r1")
        assert job is not None and job.status is JobStatus.COMPLETED and job.error is None
        assert job.result == {"has_nsfw": [False]} and job.inference_seconds == 1.5
        assert job.started_at and job.finished_at and job.started_at <= job.finished_at
        assert job.finished_at.tzinfo is UTC and job.updated_at >= job.created_at


def test_a_queued_job_can_fail_or_be_cancelled(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        new_job(s, "r1")
        new_job(s, "r2")
        assert ledger.finish_job(s, "r1", JobStatus.CANCELLED)
        assert ledger.finish_job(s, "r2", "FAILED", error="boom", error_type="render_error")
    with sessions() as s:
        r1, r2 = ledger.get_job(s, "r1"), ledger.get_job(s, "r2")
        assert r1 is not None and r1.status is JobStatus.CANCELLED and r1.started_at is None
        assert r2 is not None and (r2.status, r2.error, r2.error_type) == ("FAILED", "boom", "render_error")


def test_record_image_upserts_on_job_and_index(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        new_job(s)
        for index in (2, 0, 1):
            ledger.record_image(s, **image("r1", index))
    with sessions.begin() as s:  # a redelivered task writes index 1 again
        ledger.record_image(s, **image("r1", 1, object_key="alice/r1/1.jpg", size_bytes=42, nsfw=True))
    with sessions() as s:
        images = ledger.list_images(s, "r1")
        assert [i.index for i in images] == [0, 1, 2]
        assert (images[1].object_key, images[1].size_bytes, images[1].nsfw) == ("alice/r1/1.jpg", 42, True)
        assert images[1].created_at.tzinfo is UTC
        assert ledger.count_images(s, "r1") == 3 and ledger.done_indices(s, "r1") == {0, 1, 2}
        assert ledger.done_indices(s, "other") == set()


def test_job_and_index_are_unique(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        new_job(s)
        ledger.record_image(s, **image("r1", 0))
    with sessions() as s, pytest.raises(IntegrityError):
        s.add(Image(**image("r1", 0)))
        s.flush()


def test_deleting_a_job_deletes_its_images_and_logs(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        new_job(s)
        ledger.record_image(s, **image("r1", 0))
        ledger.add_log(s, "r1", "hello")
    with sessions.begin() as s:
        s.execute(delete(Job).where(Job.id == "r1"))
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 0
        assert s.scalar(select(func.count()).select_from(JobLog)) == 0


def test_logs_come_back_in_order(sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    with sessions.begin() as s:
        new_job(s)
        for n in range(3):
            ledger.add_log(s, "r1", f"line {n}", level="DEBUG" if n else "INFO", source="coordinator")
        # lines with the same timestamp keep their insertion order
        fixed = ledger.utcnow()
        monkeypatch.setattr(ledger, "utcnow", lambda: fixed)
        for n in range(3, 6):
            ledger.add_log(s, "r1", f"line {n}")
    with sessions() as s:
        logs = ledger.get_logs(s, "r1")
        assert [log.message for log in logs] == [f"line {n}" for n in range(6)]
        assert (logs[0].level, logs[0].source, logs[1].level, logs[5].source) == (
            "INFO",
            "coordinator",
            "DEBUG",
            "worker",
        )
        assert logs[0].timestamp.tzinfo is UTC


def test_queue_position_counts_earlier_queued_jobs_of_the_same_model(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        for rid in ("q1", "q2", "q3"):
            new_job(s, rid)
        new_job(s, "x1", model_key="sdxl")

    def positions() -> dict[str, int | None]:
        with sessions() as s:
            jobs = [ledger.get_job(s, rid) for rid in ("q1", "q2", "q3", "x1")]
            return {job.id: ledger.queue_position(s, job) for job in jobs if job is not None}

    assert positions() == {"q1": 0, "q2": 1, "q3": 2, "x1": 0}
    with sessions.begin() as s:
        ledger.start_job(s, "q1")
        ledger.finish_job(s, "q3", JobStatus.CANCELLED)
    assert positions() == {"q1": None, "q2": 0, "q3": None, "x1": 0}


def test_session_scope_rolls_back_on_error(ledger_url: str) -> None:
    with pytest.raises(RuntimeError), session_scope(ledger_url) as s:
        new_job(s)
        raise RuntimeError("boom")
    with session_scope(ledger_url) as s:
        assert ledger.get_job(s, "r1") is None
