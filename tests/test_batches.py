"""Leased batches and the worker registry (db.batches), on SQLite and on the private PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from db import batches
from db.models import Batch, utcnow
from models.runtime import batch_from_memory
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
        assert batches.claim(s, "j1", 0, "w1", 30) is not None
    with sessions.begin() as s:
        assert batches.claim(s, "j1", 0, "w2", 30) is None  # leased to a live worker
        assert batches.extend(s, [batches.get_batches(s, "j1")[0].id], "w1", 30)
        assert batches.reap(s, 30) == []
        s.execute(update(Batch).where(Batch.job_id == "j1", Batch.k == 0)
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))  # w1 stopped beating
    with sessions.begin() as s:
        reaped = batches.reap(s, 30)  # taken from w1, held by nobody until its new message comes
        assert [(b.k, b.status, b.worker, b.error) for b in reaped] == [(0, "claimed", None, "lease of w1 expired")]
    with sessions.begin() as s:
        assert batches.reap(s, 30) == []  # under its fresh lease: not reaped twice
    with sessions.begin() as s:
        row = batches.claim(s, "j1", 0, "w2", 30)
        assert row is not None and row.worker == "w2" and row.attempts == 2
        assert batches.extend(s, [row.id], "w1", 30) == set()  # w1 does not hold it any more
        assert batches.finish(s, row.id, batches.DONE)
    with sessions.begin() as s:
        assert batches.claim(s, "j1", 0, "w3", 30) is None  # done: a redelivered message claims nothing
        assert batches.counts_by_status(s, "j1") == {"done": 1, "queued": 1}


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
        assert batches.pool_batch_size(s, "tiny", 64, configured=8, within_seconds=30) == 8  # no worker yet
        for i, mb in enumerate([16, 16, 12, 16]):
            batches.register_worker(s, name=f"w{i}", model_name="farm/tiny-lcm", model_key="tiny", device="cpu",
                                    max_batch=mb, loads=1, pid=1)
        assert len(batches.live_workers(s, "tiny", 30)) == 4
        assert batches.pool_batch_size(s, "tiny", 64, configured=8, within_seconds=30) == 12  # smallest max
        assert batches.pool_batch_size(s, "tiny", 20, configured=8, within_seconds=30) == 5  # 4 workers, 4 batches
        batches.stop_worker(s, "w2")
        assert batches.pool_batch_size(s, "tiny", 64, configured=8, within_seconds=30) == 16


def test_split_balances_batches_over_the_pool():
    cut = batches.split(1000, 8, workers=8)
    assert len(cut) == 136 and {len(b) for b in cut[:-16]} == {7, 8}  # 16 rounds of 7-8 images …
    assert [len(b) for b in cut[-16:]] == [4, 3] * 8  # … the last one in halves
    assert [i for b in cut for i in b] == list(range(1000))  # consecutive, each index once
    assert batches.split(8, 3, workers=3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert batches.split(2, 8, workers=8) == [[0], [1]]  # never an empty batch
