"""Worker pools on real servers: leases, fan-out, cross-request batching, cancel, lanes.

Redis broker, PostgreSQL ledger, SeaweedFS S3 and real ``farm worker`` processes. ``farm/hold`` is
the scheduling STAND-IN (holds each image FARM_HOLD_MS instead of computing, flat images);
``farm/tiny-lcm`` is used where the bytes of real renders matter.
"""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta

import pytest
from minio import Minio

from db import ledger
from db.session import dispose_engines, session_scope
from farm.admission import parse_input
from farm.config import reset_settings
from farm.lifecycle import submit as submission
from farm.status import JobStatus, Lane
from tests.test_stack import _bucket_keys, _ledger, builtin_dir, stack  # noqa: F401  (fixtures)
from tests.workers import WorkerProcess

TINY = "farm/tiny-lcm"
HOLD = "farm/hold"


@pytest.fixture
def farm(stack, monkeypatch):  # noqa: F811  (the fixture imported above)
    """The stack, with this process's settings pointing at it (for submission.submit)."""

    def configure(**extra: str) -> None:
        stack["env"].update(extra)
        for name, value in stack["env"].items():
            if name.startswith("FARM_"):
                monkeypatch.setenv(name, value)
        reset_settings()
        dispose_engines()

    def start(model: str, name: str) -> WorkerProcess:
        worker = WorkerProcess(dict(stack["env"]), model=model, name=name)
        stack["workers"].append(worker)
        return worker.start()

    stack["configure"], stack["start"] = configure, start
    yield stack
    dispose_engines()
    reset_settings()


def _submit(model: str, prompt: str, n: int, lane: Lane = Lane.QUEUE, **fields) -> str:
    inp = parse_input({"model_name": model, "prompt": prompt, "num_images": n, "sync_mode": False, **fields})
    return submission.submit(inp, owner="local", lane=lane, source="test")


def _wait(predicate, timeout: float = 120, what: str = "condition", detail=None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + (f"\n{detail()}" if detail else "")
        time.sleep(0.02)


def _diagnose(st, rid: str) -> str:
    """The job's batches and logs and the workers' log tails, for a failure message."""
    batches = _ledger(st, "SELECT k, status, worker, attempts, lease_expires_at, error FROM batches "
                      "WHERE job_id = :id AND status <> 'done' ORDER BY k", id=rid)
    logs = _ledger(st, "SELECT level, message FROM job_logs WHERE job_id = :id ORDER BY id", id=rid)[-15:]
    tails = "\n".join(f"--- {w.name}\n{w.output[-2500:]}" for w in st["workers"])
    return f"batches not done: {batches}\nlogs: {logs}\n{tails}"


def _status(rid: str) -> JobStatus:
    with session_scope() as s:
        job = ledger.get_job(s, rid)
        assert job is not None
        return JobStatus(job.status)


def _count(st, rid: str) -> int:
    return _ledger(st, "SELECT count(*) FROM images WHERE job_id = :id", id=rid)[0][0]


def _digests(st, rid: str) -> dict[str, str]:
    """sha256 of every stored object of a job, by file name."""
    client = Minio(st["s3"].endpoint, access_key="testing", secret_key="testing", secure=False)
    out = {}
    for key in _bucket_keys(st, prefix=f"outputs/local/{rid}/"):
        response = client.get_object(st["bucket"], key)
        try:
            out[key.rsplit("/", 1)[1]] = hashlib.sha256(response.read()).hexdigest()
        finally:
            response.close()
            response.release_conn()
    return out


def test_sigkilled_worker_of_three_loses_its_batch_to_the_pool_within_the_lease(farm):
    """One of three workers dies mid-job: its batch is reaped after the lease, not the visibility timeout."""
    farm["configure"](FARM_HOLD_MS="40", FARM_LEASE_SECONDS="3", FARM_BATCH_SIZE="4", FARM_MAX_NUM_IMAGES="120")
    workers = [farm["start"](HOLD, f"hold@w{i}.test") for i in range(3)]
    n = 120
    rid = _submit(HOLD, "a kill in the middle", n, image_size={"width": 64, "height": 64})
    victim = "hold@w1.test"

    def victim_holds_a_batch():
        rows = _ledger(farm, "SELECT k FROM batches WHERE job_id = :id AND worker = :w AND status = 'claimed'",
                       id=rid, w=victim)
        return rows and _count(farm, rid) >= 12

    _wait(victim_holds_a_batch, 60, "the victim to hold a batch mid-job")
    workers[1].kill()
    killed_at = _ledger(farm, "SELECT now()")[0][0]
    lost = [k for (k,) in _ledger(farm, "SELECT k FROM batches WHERE job_id = :id AND worker = :w "
                                  "AND status = 'claimed'", id=rid, w=victim)]
    assert lost, "the victim died holding a batch"

    _wait(lambda: _status(rid) == JobStatus.COMPLETED, 90, "the job to complete without the dead worker",
          detail=lambda: _diagnose(farm, rid))
    # exactly n image rows and n objects: nothing lost, nothing twice
    rows = _ledger(farm, 'SELECT "index" FROM images WHERE job_id = :id ORDER BY 1', id=rid)
    assert [r[0] for r in rows] == list(range(n))
    assert _bucket_keys(farm, prefix=f"outputs/local/{rid}/") == sorted(
        f"outputs/local/{rid}/{i}.jpg" for i in range(n))
    # the lost batches were taken back by the reaper and finished by a live worker
    back = _ledger(farm, "SELECT k, status, worker, attempts, claimed_at FROM batches WHERE job_id = :id "
                   "AND k = ANY(:ks) ORDER BY k", id=rid, ks=lost)
    for k, status, worker, attempts, claimed_at in back:
        assert status == "done" and worker != victim and attempts >= 2, (k, status, worker, attempts)
        # back long before the broker would have redelivered it (visibility timeout: 3600 s)
        assert claimed_at - killed_at < timedelta(seconds=3600)
    logs = [m for (m,) in _ledger(farm, "SELECT message FROM job_logs WHERE job_id = :id", id=rid)]
    assert any(f"lease of {victim} expired; back to the pool" in m for m in logs), logs
    assert any(f"{n}/{n} images" in m for m in logs)
    # the survivors never reloaded their model
    loads = _ledger(farm, "SELECT name, loads FROM workers WHERE name <> :w ORDER BY name", w=victim)
    assert loads == [("hold@w0.test", 1), ("hold@w2.test", 1)]
    assert all("farm worker ready" in w.output for w in workers)


def test_a_batch_pulled_ahead_keeps_its_lease_while_the_render_before_it_moves(farm):
    """Issue 17, item 3: each batch renders longer than the lease (one heartbeat of progress per image),
    so the batch pulled ahead waits longer than the lease behind it: it keeps its claim, is never taken
    back, and every batch is claimed once; the keeper never says that the render stalled."""
    farm["configure"](FARM_HOLD_MS="500", FARM_LEASE_SECONDS="2", FARM_BATCH_SIZE="10", FARM_SWEEP_SECONDS="0.5")
    worker = farm["start"](HOLD, "hold@ahead.test")
    rid = _submit(HOLD, "a long render", 30, image_size={"width": 64, "height": 64})
    _wait(lambda: _status(rid) == JobStatus.COMPLETED, 120, "the job to complete", detail=lambda: _diagnose(farm, rid))
    batches = _ledger(farm, "SELECT k, status, attempts, worker FROM batches WHERE job_id = :id ORDER BY k", id=rid)
    assert batches == [(k, "done", 1, "hold@ahead.test") for k in range(3)], batches  # claimed once each
    logs = [m for (m,) in _ledger(farm, "SELECT message FROM job_logs WHERE job_id = :id", id=rid)]
    assert not [m for m in logs if "back to the pool" in m], logs
    tail = worker.output[-3000:]
    assert "no render progress" not in worker.output and "taken over or closed" not in worker.output, tail
    # the premise: the pulled-ahead batch was claimed while the one before it rendered, and waited
    claimed = [c for (c,) in _ledger(farm, "SELECT claimed_at FROM batches WHERE job_id = :id ORDER BY k", id=rid)]
    finished = [f for (f,) in _ledger(farm, "SELECT finished_at FROM batches WHERE job_id = :id ORDER BY k", id=rid)]
    assert claimed[1] < finished[0] and finished[0] - claimed[1] > timedelta(seconds=4), (claimed, finished)


def test_cancel_stops_a_running_job_within_one_batch(farm):
    farm["configure"](FARM_HOLD_MS="50", FARM_LEASE_SECONDS="3", FARM_BATCH_SIZE="4")
    farm["start"](HOLD, "hold@c0.test")
    rid = _submit(HOLD, "cancel me", 64, image_size={"width": 64, "height": 64})
    _wait(lambda: _count(farm, rid) >= 8, 60, "the job to be running")
    assert submission.cancel(rid) == "CANCELLATION_REQUESTED"
    cancelled_at = _ledger(farm, "SELECT now()")[0][0]
    at_cancel = _count(farm, rid)
    _wait(lambda: not _ledger(farm, "SELECT 1 FROM batches WHERE job_id = :id AND status IN ('queued', 'claimed')",
                              id=rid), 30, "every batch to be closed")
    assert _status(rid) == JobStatus.CANCELLED
    # no batch started after the cancel; at most the batches in hand (one rendering, one uploading) finish
    started_after = _ledger(farm, "SELECT k FROM batches WHERE job_id = :id AND claimed_at > :t", id=rid,
                            t=cancelled_at + timedelta(milliseconds=200))
    assert started_after == []
    assert _count(farm, rid) <= at_cancel + 2 * 4
    statuses = dict(_ledger(farm, "SELECT status, count(*) FROM batches WHERE job_id = :id GROUP BY 1", id=rid))
    assert statuses.get("cancelled", 0) >= 16 - (at_cancel + 8) // 4 - 1
    assert submission.cancel(rid) == "ALREADY_COMPLETED"


def _png_data_uri() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_split_does_not_change_images_one_worker_against_three(farm):
    """Image i uses seed + i however the job is cut: 1 worker, 1 batch vs 3 workers, batches of 2; for
    text-to-image and image-to-image alike."""
    job = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "seed": 77}
    farm["configure"](FARM_BATCH_SIZE="8", FARM_BATCH_WAIT_MS="0")
    first = farm["start"](TINY, "tiny@s0.test")
    alone = _submit(TINY, "a lighthouse", 8, **job)
    i2i = {**job, "image_url": _png_data_uri(), "strength": 0.5}  # image-to-image: image i uses seed + i too
    alone_i2i = _submit(TINY, "a lighthouse at dusk", 8, **i2i)
    _wait(lambda: _status(alone) == JobStatus.COMPLETED, 120, "the one-worker job")
    _wait(lambda: _status(alone_i2i) == JobStatus.COMPLETED, 120, "the one-worker image-to-image job")
    assert _ledger(farm, "SELECT count(*), min(worker) FROM batches WHERE job_id = :id", id=alone) == [
        (1, "tiny@s0.test")]

    farm["configure"](FARM_BATCH_SIZE="2")
    farm["start"](TINY, "tiny@s1.test")
    farm["start"](TINY, "tiny@s2.test")
    spread = _submit(TINY, "a lighthouse", 8, **job)
    spread_i2i = _submit(TINY, "a lighthouse at dusk", 8, **i2i)
    _wait(lambda: _status(spread) == JobStatus.COMPLETED, 120, "the three-worker job")
    _wait(lambda: _status(spread_i2i) == JobStatus.COMPLETED, 120, "the three-worker image-to-image job")
    workers = {w for (w,) in _ledger(farm, "SELECT worker FROM batches WHERE job_id = :id", id=spread)}
    assert _ledger(farm, "SELECT count(*) FROM batches WHERE job_id = :id", id=spread) == [(6,)]  # 2,2,1,1,1,1
    assert len(workers) >= 2, workers  # the batches spread over the pool

    a, b = _digests(farm, alone), _digests(farm, spread)
    assert len(a) == 8 and a == b
    i2i_workers = {w for (w,) in _ledger(farm, "SELECT worker FROM batches WHERE job_id = :id", id=spread_i2i)}
    assert len(i2i_workers) >= 2, i2i_workers
    c, d = _digests(farm, alone_i2i), _digests(farm, spread_i2i)
    assert len(c) == 8 and c == d and set(c.values()).isdisjoint(a.values())
    # warmed up before ready, and no reload in steady state
    assert first.output.index("ready on cpu") < first.output.index("farm worker ready")
    assert _ledger(farm, "SELECT DISTINCT loads FROM workers") == [(1,)]


def test_small_requests_share_a_batch_and_match_their_lone_renders(farm):
    """Cross-request batching: three compatible requests rendered together, bytes as if alone."""
    farm["configure"](FARM_BATCH_WAIT_MS="20")
    farm["start"](TINY, "tiny@b0.test")
    common = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
    requests = [("a red boat", 1), ("a green hill", 2), ("a blue door", 3)]
    # keep the worker busy so that the small requests queue up behind it
    blocker = _submit(TINY, "a slow one", 1, image_size={"width": 768, "height": 768}, num_inference_steps=8)
    _wait(lambda: _ledger(farm, "SELECT 1 FROM batches WHERE job_id = :id AND status = 'claimed'", id=blocker),
          60, "the blocker to start")
    together = [_submit(TINY, prompt, 2, seed=seed, **common) for prompt, seed in requests]
    for rid in together:
        _wait(lambda rid=rid: _status(rid) == JobStatus.COMPLETED, 120, "the batched requests")
    logs = [m for (m,) in _ledger(farm, "SELECT message FROM job_logs WHERE job_id = ANY(:ids)", ids=together)]
    assert sum("batched with 2 other request(s)" in m for m in logs) == 3

    for (prompt, seed), rid in zip(requests, together, strict=True):
        lone = _submit(TINY, prompt, 2, seed=seed, **common)
        _wait(lambda lone=lone: _status(lone) == JobStatus.COMPLETED, 120, "a lone request")
        lone_logs = [m for (m,) in _ledger(farm, "SELECT message FROM job_logs WHERE job_id = :id", id=lone)]
        assert not any("batched with" in m for m in lone_logs)
        assert _digests(farm, lone) == _digests(farm, rid) and len(_digests(farm, lone)) == 2


def test_sync_request_waits_at_most_one_bulk_batch(farm):
    """Lanes: a sync request submitted during a bulk job finishes before the bulk job's next batch starts."""
    farm["configure"](FARM_HOLD_MS="150", FARM_BATCH_SIZE="2")
    farm["start"](HOLD, "hold@l0.test")
    bulk = _submit(HOLD, "bulk", 40, lane=Lane.BULK, image_size="square")
    _wait(lambda: _count(farm, bulk) >= 4, 60, "the bulk job to run")
    submitted = _ledger(farm, "SELECT now()")[0][0]
    sync = _submit(HOLD, "sync", 6, lane=Lane.SYNC, image_size="square")
    _wait(lambda: _status(sync) == JobStatus.COMPLETED, 60, "the sync job")
    finished = _ledger(farm, "SELECT finished_at FROM jobs WHERE id = :id", id=sync)[0][0]
    sync_last_claim = _ledger(farm, "SELECT max(claimed_at) FROM batches WHERE job_id = :id", id=sync)[0][0]
    bulk_started = _ledger(farm, "SELECT k FROM batches WHERE job_id = :id AND claimed_at > :a AND claimed_at < :b",
                           id=bulk, a=submitted, b=sync_last_claim)
    # at most the bulk batch that was already being taken when the sync request came
    assert len(bulk_started) <= 1, bulk_started
    assert _status(bulk) == JobStatus.IN_PROGRESS and finished is not None
    submission.cancel(bulk)


TAKER = """
import sys, time
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    message = conn.SimpleQueue(sys.argv[2]).get(timeout=30)  # taken, never acknowledged
    print("took", message.headers["id"], flush=True)
    time.sleep(600)
"""


def test_message_taken_by_a_worker_that_died_before_claiming_comes_back(farm):
    """A process takes a render message off Redis and is SIGKILLed before any claim: the batch still renders."""
    import subprocess
    import sys

    farm["configure"](FARM_HOLD_MS="10", FARM_LEASE_SECONDS="2", FARM_BATCH_SIZE="4")
    rid = _submit(HOLD, "an orphan", 8, image_size={"width": 64, "height": 64})  # no worker yet: 2 queued
    taker = subprocess.Popen([sys.executable, "-c", TAKER, farm["env"]["FARM_BROKER_URL"], "render.hold.queue"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert taker.stdout is not None
        line = taker.stdout.readline()
        assert line.startswith(f"took {rid}."), line
    finally:
        taker.kill()  # died holding the message: Redis keeps it unacknowledged (visibility timeout: 3600 s)
        taker.wait(10)
    farm["start"](HOLD, "hold@o0.test")
    _wait(lambda: _status(rid) == JobStatus.COMPLETED, 60, "the orphaned batch to be rendered",
          detail=lambda: _diagnose(farm, rid))
    assert _count(farm, rid) == 8
    assert _ledger(farm, "SELECT DISTINCT status FROM batches WHERE job_id = :id", id=rid) == [("done",)]


def test_a_failing_batch_is_retried_a_bounded_number_of_times_then_the_job_names_it(farm):
    import base64
    import io

    import torch

    farm["configure"](FARM_BATCH_RETRIES="1", FARM_LEASE_SECONDS="2", FARM_BATCH_SIZE="2")
    farm["start"](TINY, "tiny@f0.test")
    # a file that reads (a valid PyTorch checkpoint: torch.load with weights_only takes it) but that the LoRA
    # loader cannot read (a list, not a state dict: diffusers fails with a TypeError): not the file's own
    # problem (models.adapters._file_problem finds none), so it is unreadable weights (ModelNotFoundError,
    # 503), which the farm retries; garbage bytes would be an input error that fails once (test_bad_lora)
    checkpoint = io.BytesIO()
    torch.save([1, 2], checkpoint)
    bad_lora = "data:application/octet-stream;base64," + base64.b64encode(checkpoint.getvalue()).decode()
    rid = _submit(TINY, "a broken adapter", 2, image_size={"width": 64, "height": 64}, num_inference_steps=1,
                  loras=[{"path": bad_lora}])
    _wait(lambda: _status(rid) == JobStatus.FAILED, 90, "the job to fail", detail=lambda: _diagnose(farm, rid))
    error, error_type = _ledger(farm, "SELECT error, error_type FROM jobs WHERE id = :id", id=rid)[0]
    assert error.startswith("images [0, 1] failed: LoRA") and "could not be read" in error, error
    assert _ledger(farm, "SELECT status, attempts FROM batches WHERE job_id = :id", id=rid) == [("failed", 2)]
    logs = [m for (m,) in _ledger(farm, "SELECT message FROM job_logs WHERE job_id = :id ORDER BY id", id=rid)]
    assert sum("retry 1 of 1" in m for m in logs) == 1 and not any("retry 2" in m for m in logs), logs
    assert _count(farm, rid) == 0
