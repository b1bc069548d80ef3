"""Every bulk job ends, and no manifest multiplies into unbounded work (issue 20, findings 4, 5 and 10).

Real attacks on the live farm: manifests posted to the guarded ``farm api`` of tests/test_abuse.py (one
running bulk job per owner there), driven by ``farm bulk run``/``resume`` processes (the driver a ``farm
bulk worker`` runs, here one process per run so that each run can be counted), rendered by the session
stack's tiny worker on the real ledger.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_stack import ApiStack
from tests.test_abuse import _manifests, guarded  # noqa: F401  (fixture)
from tests.workers import run_farm

TINY = "farm/tiny-lcm"
DEFAULTS = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}


def _body(manifest: bytes, fmt: str, out: str, **extra: Any) -> dict[str, Any]:
    return {"manifest": f"data:application/octet-stream;base64,{base64.b64encode(manifest).decode()}",
            "manifest_format": fmt, "out": out, "model_name": TINY, "format": "imagefolder", "shard_size": 10,
            "defaults": DEFAULTS, "budget_images": 100, **extra}


def _start(c: httpx.Client, body: dict[str, Any]) -> str:
    started = c.post("/bulk", json=body)
    assert started.status_code == 202, started.text
    return str(started.json()["bulk_id"])


def _resume(stack: ApiStack, bulk_id: str, **env: str) -> Any:
    """``farm bulk resume`` as the operator would run it: (exit status, final progress or None, stderr)."""
    done = run_farm(["bulk", "resume", bulk_id, "--max-in-flight", "2"], {**stack.env, **env})
    final = json.loads(done.stdout) if done.stdout.strip().startswith("{") else None
    return done.returncode, final, done.stderr


def _dataset(stack: ApiStack, owner: str, out: str) -> Path:
    return Path(stack.env["FARM_DATA_DIR"]) / "bulk" / "tenants" / owner / out


def _parquet(table: Any, **kwargs: Any) -> bytes:
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, **kwargs)
    return sink.getvalue()


def test_hostile_rows_are_rejected_with_their_reason_and_the_job_completes(guarded: ApiStack) -> None:  # noqa: F811
    """A deeply nested line (a RecursionError in the driver, every attempt), NULs (which PostgreSQL
    refuses), a 18,000-character template (seconds of parsing) and a 1 KB Parquet file that decodes to
    128 MiB: each row is rejected with its reason, before the work it would cost, and the job completes
    with the good rows. A row that expands to 10^8 samples is refused when the job is posted."""
    owner = "abuse-bulk-rows"
    lines = [
        json.dumps({"prompt": "a red boat"}),
        '{"prompt": "a deep one", "meta": ' + "[" * 30000 + "]" * 30000 + "}",
        json.dumps({"prompt": "a boat\u0000"}),
        json.dumps({"prompt": "a boat", "note": "\u0000"}),
        json.dumps({"prompt": "{red|green} " * 1500}),
        json.dumps({"prompt": "a green hill"}),
    ]
    with guarded.client(guarded.make_key(owner)) as c:
        huge = c.post("/bulk", json=_body(b"a {red|green} boat\n", "txt", "huge", expand="random", variants=10000,
                                          images_per_prompt=10000))
        assert huge.status_code == 422, huge.text
        (err,) = huge.json()["detail"]
        assert err["loc"][-1] == "variants" and "FARM_BULK_MAX_SAMPLES_PER_ROW" in err["msg"], err
        assert _manifests(guarded, owner) == []
        bulk_id = _start(c, _body("\n".join(lines).encode(), "jsonl", "rows"))
        status, final, stderr = _resume(guarded, bulk_id)
        assert status == 0, stderr[-3000:]
        assert (final["status"], final["done"], final["failed"], final["rows_rejected"]) == ("COMPLETED", 2, 0, 4)
        assert c.get(f"/bulk/{bulk_id}").json()["status"] == "COMPLETED"
        report = json.loads((_dataset(guarded, owner, "rows") / "_stats.json").read_text())
        reasons = report["rejections"]
        assert [r.split(":")[0] for r in reasons] == ["row 2", "row 3", "row 4", "row 5"], reasons
        assert "nested more than" in reasons[0]
        assert "prompt: must not contain NUL" in reasons[1] and "note: must not contain NUL" in reasons[2]
        assert "FARM_BULK_MAX_TEMPLATE_CHARS" in reasons[3]
        assert guarded.env["FARM_DATA_DIR"] not in json.dumps(report)  # the tenant's report names no server path

        import pyarrow as pa

        bomb = _parquet(pa.table({"prompt": ["a" * 2**17] * 1024 + ["a blue door"]}), compression="zstd")
        assert len(bomb) < 2048  # a few hundred bytes of file, 128 MiB of text once decoded
        bulk_id = _start(c, _body(bomb, "parquet", "bomb"))
        status, final, stderr = _resume(guarded, bulk_id)
        assert status == 0, stderr[-3000:]
        assert (final["status"], final["done"], final["rows_rejected"]) == ("COMPLETED", 1, 1024)
        report = json.loads((_dataset(guarded, owner, "bomb") / "_stats.json").read_text())
        assert len(report["rejections"]) == 100  # the first ones' reasons are kept; all are counted
        assert "FARM_BULK_MAX_LINE_BYTES" in report["rejections"][0]


def test_a_parquet_file_corrupt_midway_fails_the_job_and_frees_its_slot(guarded: ApiStack) -> None:  # noqa: F811
    """Its footer reads (the job is accepted), its second row group does not: the job is FAILED at once
    with the row it could not read, and the owner's one running slot is free again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    owner = "abuse-bulk-parquet"
    data = bytearray(_parquet(pa.table({"prompt": [f"a boat number {i}" for i in range(3000)]}),
                              row_group_size=1000, compression="none"))
    offset = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(1).column(0).data_page_offset
    data[offset:offset + 200] = b"\xab" * 200
    with guarded.client(guarded.make_key(owner)) as c:
        # rows are read ahead of the renders by twice a shard: the unreadable row group is reached at once
        bulk_id = _start(c, _body(bytes(data), "parquet", "corrupt", shard_size=1000))
        held = c.post("/bulk", json=_body(b"a boat\n", "txt", "next"))
        assert held.status_code == 429 and "FARM_MAX_BULK_RUNNING" in held.text, held.text
        status, _, stderr = _resume(guarded, bulk_id)
        assert status != 0
        snap = c.get(f"/bulk/{bulk_id}").json()
        assert snap["status"] == "FAILED", snap
        assert "cannot be read from this row on" in snap["error"] and snap["error"].startswith("row "), snap
        assert guarded.env["FARM_DATA_DIR"] not in snap["error"]
        again = _start(c, _body(b"a boat\n", "txt", "next"))  # the FAILED job holds no running slot
        assert c.post(f"/bulk/{again}/cancel").status_code == 200


def test_a_driver_error_that_repeats_fails_the_job_after_bounded_attempts(guarded: ApiStack) -> None:  # noqa: F811
    """The job's dataset folder turns into a file (a real fault on the real disk): every run of its driver
    ends in an OSError. Each run is counted in the ledger; at FARM_BULK_MAX_ATTEMPTS the job is FAILED,
    says why without naming a path, and frees its slot, instead of being sent again forever."""
    owner = "abuse-bulk-retry"
    with guarded.client(guarded.make_key(owner)) as c:
        bulk_id = _start(c, _body(b"a boat\na door\n", "txt", "broken"))
        folder = _dataset(guarded, owner, "broken")
        folder.rmdir()  # created empty when the job was recorded
        folder.write_text("not a folder")
        try:
            first, _, _ = _resume(guarded, bulk_id, FARM_BULK_MAX_ATTEMPTS="2")
            assert first != 0
            assert guarded.sql("SELECT status, attempts FROM bulk_jobs WHERE id = :id", id=bulk_id) == [("RUNNING", 1)]
            assert c.post("/bulk", json=_body(b"a boat\n", "txt", "next")).status_code == 429  # still running
            second, _, _ = _resume(guarded, bulk_id, FARM_BULK_MAX_ATTEMPTS="2")
            assert second != 0
            snap = c.get(f"/bulk/{bulk_id}").json()
            assert snap["status"] == "FAILED", snap
            assert "failed 2 times" in snap["error"] and "FARM_BULK_MAX_ATTEMPTS" in snap["error"], snap
            assert str(folder) not in snap["error"] and guarded.env["FARM_DATA_DIR"] not in snap["error"]
            status = run_farm(["bulk", "status", bulk_id], guarded.env)
            assert json.loads(status.stdout)["status"] == "FAILED"
            again = _start(c, _body(b"a boat\n", "txt", "next"))
            assert c.post(f"/bulk/{again}/cancel").status_code == 200
        finally:
            folder.unlink(missing_ok=True)


def test_the_daily_quota_pauses_a_running_job_and_says_why(guarded: ApiStack, tmp_path: Path) -> None:  # noqa: F811
    """The owner's daily GPU-seconds run out while its job runs (a quota smaller than one image): the
    job stops submitting, lets what is in flight finish and pauses with the reason; a resume while the
    quota is spent pauses again at once; with quota left it goes on."""
    owner = f"abuse-bulk-quota-{uuid.uuid4().hex[:6]}"
    env = {**guarded.env, "FARM_DEFAULT_OWNER": owner, "FARM_OWNER_DAILY_GPU_SECONDS": json.dumps({owner: 1e-6})}
    manifest = tmp_path / "p.txt"
    manifest.write_text("".join(f"a lamp number {i}\n" for i in range(300)))
    bulk_id = f"quota-{uuid.uuid4().hex[:8]}"
    done = run_farm(["bulk", "run", str(manifest), "--out", str(tmp_path / "ds"), "--model", TINY,
                     "--image-size", "64x64", "--steps", "1", "--shard-size", "50", "--max-in-flight", "1",
                     "--job-id", bulk_id], env)
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads(done.stdout)
    assert final["status"] == "PAUSED", final
    assert 1 <= final["done"] < 300 and final["in_flight"] == 0, final
    assert "daily GPU-second quota spent" in final["error"] and "daily GPU-second quota spent" in done.stderr
    with guarded.client(guarded.make_key(owner)) as c:
        snap = c.get(f"/bulk/{bulk_id}").json()
    assert (snap["status"], snap["done"]) == ("PAUSED", final["done"]) and "quota" in snap["error"], snap

    spent = run_farm(["bulk", "resume", bulk_id], env)
    assert spent.returncode == 0, spent.stderr[-3000:]
    again = json.loads(spent.stdout)
    assert (again["status"], again["done"]) == ("PAUSED", final["done"]) and "quota" in again["error"], again

    more = {**env, "FARM_OWNER_DAILY_GPU_SECONDS": json.dumps({owner: 1e9})}  # the operator raises it
    resumed = run_farm(["bulk", "resume", bulk_id, "--budget-images", str(final["done"] + 2)], more)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = json.loads(resumed.stdout)
    assert (last["status"], last["done"], last["error"]) == ("BUDGET_REACHED", final["done"] + 2, None), last


@pytest.fixture(autouse=True)
def _no_job_left_running(guarded: ApiStack) -> Any:  # noqa: F811
    """Whatever a test leaves running is cancelled (its owner's slot and the shared worker's time)."""
    yield
    for (bulk_id,) in guarded.sql("SELECT id FROM bulk_jobs WHERE status = 'RUNNING' AND owner LIKE 'abuse-bulk-%'"):
        run_farm(["bulk", "cancel", bulk_id], guarded.env)


def test_a_driver_killed_soon_after_each_start_fails_the_job(guarded: ApiStack) -> None:  # noqa: F811
    """A driver that dies without an exception (SIGKILL, as the out-of-memory killer or a native crash in a
    Parquet reader would end it) leaves its lease behind; the next driver counts that run when it died
    within ten minutes of its start, so a job whose driver keeps dying is FAILED at FARM_BULK_MAX_ATTEMPTS
    instead of being sent again forever."""
    import os
    import signal
    import subprocess
    import time

    from tests.workers import FARM

    owner = f"abuse-bulk-crash-{uuid.uuid4().hex[:6]}"
    env = {**guarded.env, "FARM_BULK_MAX_ATTEMPTS": "2"}
    lines = "".join(f"a kite number {i}\n" for i in range(400)).encode()
    with guarded.client(guarded.make_key(owner)) as c:
        bulk_id = _start(c, _body(lines, "txt", "crash", budget_images=400))
    for run in range(2):
        proc = subprocess.Popen([FARM, "bulk", "resume", bulk_id, "--max-in-flight", "1"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            for _ in range(600):  # until this driver holds the job's lease (bounded: 60 s)
                rows = guarded.sql("SELECT runner FROM bulk_jobs WHERE id = :id", id=bulk_id)
                if rows and rows[0][0] and f":{proc.pid}:" in rows[0][0]:
                    break
                assert proc.poll() is None, f"run {run}: the driver ended before it was killed"
                time.sleep(0.1)
            else:
                raise AssertionError(f"run {run}: the driver never took the job")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        assert guarded.sql("SELECT status, attempts FROM bulk_jobs WHERE id = :id", id=bulk_id) == [
            ("RUNNING", run)], run  # the kill itself is counted by the next driver
    code, final, stderr = _resume(guarded, bulk_id, FARM_BULK_MAX_ATTEMPTS="2")
    assert final is not None and final["status"] == "FAILED", (code, stderr[-2000:])
    with guarded.client(guarded.make_key(owner)) as c:
        snap = c.get(f"/bulk/{bulk_id}").json()
    assert snap["status"] == "FAILED" and "without finishing" in snap["error"], snap
    assert guarded.sql("SELECT count(*) FROM bulk_samples WHERE bulk_id = :id AND status = 'submitted'",
                       id=bulk_id) == [(0,)]  # its farm jobs in flight were cancelled
