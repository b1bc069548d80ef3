"""Leased batches and the worker registry (db.batches), on SQLite and on the private PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from db import batch_sweep, batches
from db import worker_registry as workers
from db.models import Batch, utcnow
from models.renderer import batch_from_memory
from tests.test_ledger import ledger_url, new_job, sessions  # noqa: F401  (fixtures)

COMPAT = batches.compat_key({"model_name": "farm/tiny-lcm", "image_size": "square", "num_inference_steps": 4})


def _job(sm: sessionmaker[Session], rid: str, n: int, size: int, lane: str = "queue", compat: str = COMPAT) -> None:
    with sm.begin() as s:
        new_job(s, rid, num_images=n)
        batches.create_batches(s, rid, "tiny", lane, compat, batches.split(n, size))


def test_split_and_compat_key():
    assert batches.split(10, 4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # 3 batches, balanced
    assert batches.split(3, 0) == [[0], [1], [2]]
    other = batches.compat_key({"model_name": "farm/tiny-lcm", "image_size": "square", "num_inference_steps": 5})
    assert other != COMPAT
    assert batches.compat_key({"image_size": "square", "num_inference_steps": 4, "prompt": "x",
                                         "model_name": "farm/tiny-lcm", "seed": 3}) == COMPAT  # prompt, seed: free


def test_batch_from_memory():
    gib = 2**30
    assert batch_from_memory(40 * gib, 2 * gib, cap=16) == 16
    assert batch_from_memory(10 * gib, 2 * gib, cap=16) == 4  # 80 % of 10 GiB
    assert batch_from_memory(1 * gib, 2 * gib, cap=16) == 1  # never below one


def test_claim_once_until_the_lease_runs_out(sessions):  # noqa: F811
    _job(sessions, "j1", 8, 4)
    with sessions.begin() as s:
        first = batches.claim(s, "j1", 0, "w1", 30)
        assert first is not None and first.token == 1 and first.attempts == 1
    with sessions.begin() as s:
        assert batches.claim(s, "j1", 0, "w2", 30) is None  # leased to a live worker
        assert batches.extend(s, [(first.id, 1)], "w1", 30) == {first.id}
        assert batch_sweep.reap(s) == []
        s.execute(update(Batch).where(Batch.job_id == "j1", Batch.k == 0)
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))  # w1 stopped beating
    with sessions.begin() as s:
        reaped = batch_sweep.reap(s)  # back to queued, with no known message: the sweeper publishes it
        assert [(b.k, b.status, b.worker, b.error, b.published_at) for b in reaped] == [
            (0, "queued", None, "lease of w1 expired", None)]
    with sessions.begin() as s:
        assert batch_sweep.reap(s) == []  # not reaped twice
    with sessions.begin() as s:
        row = batches.claim(s, "j1", 0, "w2", 30)
        assert row is not None and row.worker == "w2" and row.attempts == 2 and row.token == 2
        assert batches.extend(s, [(row.id, 1)], "w1", 30) == set()  # w1's token is stale
        assert batches.complete(s, [(row.id, 2)]) == {row.id}
    with sessions.begin() as s:
        assert batches.claim(s, "j1", 0, "w3", 30) is None  # done: a redelivered message claims nothing
        assert batches.counts_by_status(s, "j1") == {"done": 1, "queued": 1}


def test_fenced_writes_of_a_taken_over_claim_are_refused(sessions):  # noqa: F811
    _job(sessions, "f1", 4, 4)
    with sessions.begin() as s:
        old = batches.claim(s, "f1", 0, "w1", 30)
        assert old is not None
        s.execute(update(Batch).where(Batch.id == old.id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with sessions.begin() as s:
        new = batches.claim(s, "f1", 0, "w2", 30)  # lease ran out: w2 takes it over without a reap
        assert new is not None and new.token == old.token + 1
    stale = (old.id, old.token)
    with sessions.begin() as s:  # every write w1 tries now changes nothing
        assert batches.holding(s, [stale]) == set()
        assert batches.extend(s, [stale], "w1", 30) == set()
        assert batches.complete(s, [stale]) == set()
        assert not batches.give_back(s, old.id, old.token, "boom", 1)
        assert not batches.fail(s, old.id, old.token, "boom")
    with sessions.begin() as s:
        row = batches.get_batches(s, "f1")[0]
        assert (row.status, row.worker, row.token, row.error) == ("claimed", "w2", 2, None)
        assert batches.holding(s, [(new.id, new.token)]) == {new.id}
        assert batches.give_back(s, new.id, new.token, "out of memory", 5)  # the holder's own write applies
        row = batches.get_batches(s, "f1")[0]
        assert (row.worker, row.error) == (None, "out of memory")


def test_due_lists_what_may_have_lost_its_message(sessions):  # noqa: F811
    _job(sessions, "d1", 2, 1)  # two batches, marked published at insert
    _job(sessions, "d2", 1, 1, lane="bulk")
    now = utcnow()
    with sessions.begin() as s:
        assert batch_sweep.due(s, older_than=now - timedelta(seconds=30), empty_queues=[]) == []  # fresh messages
        ids = [b.id for b in batches.get_batches(s, "d1")]
        batch_sweep.unpublished(s, ids[:1])  # its publish failed
    with sessions.begin() as s:
        due = batch_sweep.due(s, older_than=now - timedelta(seconds=30), empty_queues=[])
        assert [(b.job_id, b.k, b.publishes) for b in due] == [("d1", 0, 2)]
        assert due[0].published_at is not None
    with sessions.begin() as s:  # the broker lost its data: everything published before now
        later = utcnow()
        due = batch_sweep.due(s, older_than=later - timedelta(seconds=30), empty_queues=[], published_before=later)
        assert sorted((b.job_id, b.k) for b in due) == [("d1", 0), ("d1", 1), ("d2", 0)]
    with sessions.begin() as s:  # unclaimed past the dispatch timeout: only where the queue is empty
        future = utcnow() + timedelta(seconds=1)
        assert batch_sweep.stale_queues(s, future) == {("tiny", "queue"), ("tiny", "bulk")}
        due = batch_sweep.due(s, older_than=future, empty_queues=[("tiny", "bulk")])
        assert [(b.job_id, b.k) for b in due] == [("d2", 0)]


def test_companions_share_model_compat_and_lane(sessions):  # noqa: F811
    _job(sessions, "a", 2, 2)
    _job(sessions, "b", 2, 2)
    _job(sessions, "c", 4, 4)  # too big for the room left
    _job(sessions, "d", 2, 2, lane="bulk")
    _job(sessions, "e", 2, 2, compat="other")
    _job(sessions, "f", 2, 2)
    with sessions.begin() as s:
        first = batches.claim(s, "a", 0, "w1", 30)
        assert first is not None
        picked = batches.claim_companions(s, first, "w1", 30, room=5)
        assert [b.job_id for b in picked] == ["b", "f"]
        assert all(b.status == "claimed" and b.worker == "w1" for b in picked)


def test_pool_batch_size_spreads_a_job_over_live_workers(sessions):  # noqa: F811
    with sessions.begin() as s:
        assert workers.pool_batch_size(s, "tiny", 64, configured=8, within_seconds=30) == 8  # no worker yet
        for i, mb in enumerate([16, 16, 12, 16]):
            workers.register_worker(s, name=f"w{i}", model_name="farm/tiny-lcm", model_key="tiny", device="cpu",
                                    max_batch=mb, loads=1, pid=1)
        assert len(workers.live_workers(s, "tiny", 30)) == 4
        assert workers.pool_batch_size(s, "tiny", 64, configured=8, within_seconds=30) == 12  # smallest max
        assert workers.pool_batch_size(s, "tiny", 20, configured=8, within_seconds=30) == 5  # 4 workers, 4 batches
        workers.stop_worker(s, "w2", pid=1)  # its own row: registered with pid 1 on this host
        assert workers.pool_batch_size(s, "tiny", 64, configured=8, within_seconds=30) == 16


def test_split_balances_batches_over_the_pool():
    cut = batches.split(1000, 8, workers=8)
    assert len(cut) == 136 and {len(b) for b in cut[:-16]} == {7, 8}  # 16 rounds of 7-8 images …
    assert [len(b) for b in cut[-16:]] == [4, 3] * 8  # … the last one in halves
    assert [i for b in cut for i in b] == list(range(1000))  # consecutive, each index once
    assert batches.split(8, 3, workers=3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert batches.split(2, 8, workers=8) == [[0], [1]]  # never an empty batch
