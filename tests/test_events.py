"""Job-change events (``farm.events``) on the private PostgreSQL and the embedded SQLite ledger.

No test asserts a duration. "Woken by the event" is shown as an outcome: the fallback is set to
30 s and the wait bounded below it, so only the event can end it in time. "Not woken" is shown
by ordering: a later committed change of another job is seen first, and notifications arrive
in commit order.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from db import ledger
from db.migrate import upgrade
from db.session import dispose_engines, get_sessionmaker, is_sqlite, session_scope
from farm import events
from farm.config import Settings, reset_settings
from farm.status import JobStatus

EVENT_WAIT = 20.0  # a bounded wait for something the event alone can deliver in time
LONG_FALLBACK = 30.0  # longer than every bounded wait here: a fallback re-read cannot end them


class Boom(Exception):
    pass


def _until(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.fixture(autouse=True)
def _stop_listeners() -> Iterator[None]:
    yield
    events.shutdown()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    upgrade(url)
    if not is_sqlite(url):
        events.start(url)
        assert _until(lambda: events.listening(url)), "the listener did not connect"
    yield url
    dispose_engines()


@pytest.fixture
def farm_url(ledger_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``ledger_url`` as the configured ledger, with a fallback longer than any wait in these tests."""
    monkeypatch.setenv("FARM_DATABASE_URL", ledger_url)
    monkeypatch.setenv("FARM_EVENT_FALLBACK_SECONDS", str(LONG_FALLBACK))
    reset_settings()
    yield ledger_url
    reset_settings()


def new_job(url: str, owner: str = "alice") -> str:
    rid = f"ev-{uuid.uuid4().hex[:12]}"
    with session_scope(url) as s:
        ledger.create_job(
            s, request_id=rid, owner=owner, model_name="farm/tiny-lcm", model_key="tiny", lane="queue",
            source="api", input={"prompt": "a cat"}, seed=1, num_images=1,
        )  # fmt: skip
    return rid


def status_of(url: str, rid: str) -> JobStatus:
    with session_scope(url) as s:
        job = ledger.get_job(s, rid)
        assert job is not None
        return JobStatus(job.status)


def settle(url: str) -> None:
    """Commit a change of another job and wait for its event: every earlier notification is in."""
    marker = new_job(url)
    with events.subscribe(marker, url) as sub:
        with session_scope(url) as s:
            ledger.add_log(s, marker, "marker")
        assert sub.wait(EVENT_WAIT), "the marker's event never came"


def test_a_committed_change_wakes_the_waiter_and_a_rolled_back_one_does_not(ledger_url: str) -> None:
    rid = new_job(ledger_url)
    with events.subscribe(rid, ledger_url) as sub:
        with pytest.raises(Boom), session_scope(ledger_url) as s:
            assert ledger.start_job(s, rid)
            ledger.add_log(s, rid, "about to fail")
            raise Boom
        settle(ledger_url)
        assert not sub.wait(0), "woken by a rolled-back change"
        assert status_of(ledger_url, rid) == JobStatus.IN_QUEUE

        with session_scope(ledger_url) as s:
            assert ledger.start_job(s, rid)
        assert sub.wait(EVENT_WAIT)  # the fallback is far longer: only the event ends this wait
        assert status_of(ledger_url, rid) == JobStatus.IN_PROGRESS  # a woken waiter reads the committed state
        assert not sub.wait(0)  # one change, one wake-up

        # a guarded update that does not apply notifies nobody
        with session_scope(ledger_url) as s:
            assert not ledger.start_job(s, rid)
        settle(ledger_url)
        assert not sub.wait(0)


def test_the_event_is_sent_on_commit_never_before(ledger_url: str) -> None:
    rid = new_job(ledger_url)
    with events.subscribe(rid, ledger_url) as sub:
        s = get_sessionmaker(ledger_url)()
        try:
            ledger.add_log(s, rid, "one")
            ledger.add_log(s, rid, "two")  # same job, same transaction: one wake-up
            assert ledger.finish_job(s, rid, JobStatus.CANCELLED, error="x", error_type="cancelled")
            if not is_sqlite(ledger_url):  # (SQLite: the open transaction holds the write lock)
                settle(ledger_url)
            assert not sub.wait(0), "woken before the commit"
            s.commit()
        finally:
            s.close()
        assert sub.wait(EVENT_WAIT)
        assert status_of(ledger_url, rid) == JobStatus.CANCELLED
        if not is_sqlite(ledger_url):
            settle(ledger_url)
        assert not sub.wait(0)


def test_a_nested_savepoint_does_not_fire_before_the_commit(ledger_url: str) -> None:
    rid = new_job(ledger_url)
    with events.subscribe(rid, ledger_url) as sub:
        with session_scope(ledger_url) as s:
            with s.begin_nested():
                ledger.add_log(s, rid, "inside a savepoint")
            assert not sub.wait(0)
        assert sub.wait(EVENT_WAIT)


def test_a_change_before_the_wait_is_not_lost(ledger_url: str) -> None:
    rid = new_job(ledger_url)
    # registered before the change: the change is kept until the wait
    with events.subscribe(rid, ledger_url) as sub:
        assert status_of(ledger_url, rid) == JobStatus.IN_QUEUE
        with session_scope(ledger_url) as s:
            ledger.start_job(s, rid)
        if not is_sqlite(ledger_url):
            settle(ledger_url)  # the event is in before anybody waits
        assert sub.wait(EVENT_WAIT)
    # changed before a one-shot waiter registered: it times out, and the fallback re-read sees the change
    with session_scope(ledger_url) as s:
        ledger.finish_job(s, rid, JobStatus.COMPLETED)
    if not is_sqlite(ledger_url):
        settle(ledger_url)
    assert not events.wait_for_change(rid, 0.2, url=ledger_url)
    assert status_of(ledger_url, rid) == JobStatus.COMPLETED


def test_an_async_waiter_is_woken_from_another_thread(ledger_url: str) -> None:
    rid = new_job(ledger_url)

    def write() -> None:
        with session_scope(ledger_url) as s:
            ledger.start_job(s, rid)

    async def scenario() -> bool:
        with events.subscribe(rid, ledger_url) as sub:
            writer = threading.Thread(target=write)
            writer.start()
            try:
                return await sub.wait_async(EVENT_WAIT)
            finally:
                await asyncio.to_thread(writer.join, 30)

    assert asyncio.run(scenario())
    assert status_of(ledger_url, rid) == JobStatus.IN_PROGRESS


def _run_job_in(url: str, rid: str, go: threading.Event) -> threading.Thread:
    """A stand-in worker: once ``go`` is set, start the job, log, and complete it."""

    def work() -> None:
        if not go.wait(30):
            return
        with session_scope(url) as s:
            ledger.start_job(s, rid)
        with session_scope(url) as s:
            ledger.add_log(s, rid, "rendering")
        with session_scope(url) as s:
            ledger.finish_job(s, rid, JobStatus.COMPLETED, inference_seconds=0.1)
            ledger.add_log(s, rid, "completed 1 image(s)")

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_the_run_route_waiter_is_pushed_every_change(farm_url: str) -> None:
    from farm.api.routes_run import wait_for_job

    rid = new_job(farm_url)
    settings = Settings()
    assert settings.event_fallback_seconds == LONG_FALLBACK
    go = threading.Event()
    worker = _run_job_in(farm_url, rid, go)

    async def scenario() -> list[JobStatus]:
        seen: list[JobStatus] = []
        updates = wait_for_job(rid, None, settings, None)
        try:
            seen.append(await asyncio.wait_for(anext(updates), EVENT_WAIT))
            go.set()
            while not seen[-1].is_terminal:
                seen.append(await asyncio.wait_for(anext(updates), EVENT_WAIT))
        finally:
            await updates.aclose()
        return seen

    seen = asyncio.run(scenario())
    worker.join(30)
    assert seen[0] == JobStatus.IN_QUEUE and seen[-1] == JobStatus.COMPLETED


def test_the_status_stream_pushes_status_and_log_lines(farm_url: str) -> None:
    from farm.api.routes_queue import _status_events

    rid = new_job(farm_url)
    go = threading.Event()
    worker = _run_job_in(farm_url, rid, go)

    async def scenario() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        updates = _status_events(rid, "alice", "https://farm.test", True, LONG_FALLBACK)
        try:
            seen.append(json.loads((await asyncio.wait_for(anext(updates), EVENT_WAIT))["data"]))
            go.set()
            while seen[-1]["status"] != "COMPLETED":
                seen.append(json.loads((await asyncio.wait_for(anext(updates), EVENT_WAIT))["data"]))
        finally:
            await updates.aclose()
        return seen

    seen = asyncio.run(scenario())
    worker.join(30)
    assert seen[0]["status"] == "IN_QUEUE" and seen[-1]["status"] == "COMPLETED"
    messages = [line["message"] for event in seen for line in event.get("logs") or []]
    assert "rendering" in messages and "completed 1 image(s)" in messages


def test_a_finished_job_answers_at_once(farm_url: str) -> None:
    from farm.api.routes_run import wait_for_job

    rid = new_job(farm_url)
    with session_scope(farm_url) as s:
        ledger.finish_job(s, rid, JobStatus.FAILED, error="boom", error_type="render_error")

    async def scenario() -> list[JobStatus]:
        return [status async for status in wait_for_job(rid, None, Settings(), None)]

    assert asyncio.run(asyncio.wait_for(scenario(), EVENT_WAIT)) == [JobStatus.FAILED]


def test_the_listener_survives_a_postgres_restart(postgres_server: Any, pg_url: str) -> None:
    upgrade(pg_url)
    events.start(pg_url)
    assert _until(lambda: events.listening(pg_url)), "the listener did not connect"
    for _ in range(2):  # twice: the second outage finds a listener that came back once already
        rid = new_job(pg_url)
        dispose_engines()
        try:
            postgres_server.stop()
            assert _until(lambda: not events.listening(pg_url)), "the listener did not notice the server stop"
            with events.subscribe(rid, pg_url) as sub:
                assert not sub.wait(0.2)  # while it is down, waiters just time out (and re-read)
        finally:
            postgres_server.start()
        assert _until(lambda: events.listening(pg_url)), "the listener did not reconnect"

        with events.subscribe(rid, pg_url) as sub:
            with session_scope(pg_url) as s:
                assert ledger.start_job(s, rid)
            assert sub.wait(EVENT_WAIT)
        assert status_of(pg_url, rid) == JobStatus.IN_PROGRESS
