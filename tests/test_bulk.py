"""Bulk dataset jobs on the real stack: Redis, PostgreSQL, S3, real worker and CLI processes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from celery import Celery

from tests.test_stack import _ledger, builtin_dir, stack  # noqa: F401  (fixtures)
from tests.workers import FARM, WorkerProcess, run_farm

TINY = "farm/tiny-lcm"
INPUT_FIELDS = ("model_name", "prompt", "negative_prompt", "image_size", "num_inference_steps", "seed",
                "guidance_scale", "guidance_rescale", "num_images", "enable_safety_checker",
                "safety_checker_version", "expand_prompt", "format", "loras", "embeddings")


def _tar_members(dest: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for tar_path in sorted(dest.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                assert member.name not in out, f"{member.name} twice"
                data = tar.extractfile(member)
                assert data is not None
                out[member.name] = data.read()
    return out


def _start_tiny(stack, env: dict[str, str], name: str) -> WorkerProcess:  # noqa: F811
    worker = WorkerProcess(env, model=TINY, name=name)
    stack["workers"].append(worker)
    return worker.start()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_killed_bulk_job_resumes_into_exactly_the_expected_shards(stack, tmp_path, monkeypatch):  # noqa: F811
    env = dict(stack["env"], FARM_LEASE_SECONDS="3")
    workers = [WorkerProcess(env, model=TINY, name=f"tiny@bulk{i}.test") for i in range(2)]
    stack["workers"].extend(workers)
    for w in workers:
        w.start()
    manifest = tmp_path / "prompts.txt"
    manifest.write_text("".join(f"a {colour} {thing}\n" for colour in ("red", "green", "blue", "grey", "gold")
                                for thing in ("boat", "house", "tree", "cat", "dog", "lamp", "hill", "door",
                                              "bird", "car", "bell", "kite", "fish", "moon", "shoe", "cup",
                                              "key", "map", "hat", "sun")))  # 100 prompts
    dest = tmp_path / "dataset"
    args = ["bulk", "run", str(manifest), "--out", str(dest), "--model", TINY, "--images-per-prompt", "3",
            "--shard-size", "100", "--image-size", "64x64", "--steps", "2", "--seed", "1000", "--job-id", "ds1",
            "--max-in-flight", "32"]
    first = subprocess.Popen([FARM, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        _wait(lambda: _ledger(stack, "SELECT count(*) FROM bulk_samples WHERE bulk_id = 'ds1' AND status = 'done'")
              [0][0] >= 60, 180, "a part of the job to be done")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the CLI dies mid-job …
        first.wait(10)
    workers[1].kill()  # … and so does one worker
    done_at_kill = _ledger(stack, "SELECT count(*) FROM bulk_samples WHERE bulk_id = 'ds1' AND status = 'done'")[0][0]
    assert done_at_kill < 300, "the job must be interrupted part-way"

    again = run_farm(args, env, timeout=600)  # same job id: renders only what is missing
    assert again.returncode == 0, again.stderr[-3000:]
    final = json.loads(again.stdout)
    assert (final["status"], final["done"], final["failed"], final["total"]) == ("COMPLETED", 300, 0, 300)

    # exactly the 300 expected keys, each once, in 3 shards
    members = _tar_members(dest)
    keys = sorted({name.split(".", 1)[0] for name in members})
    assert keys == [f"{s:05d}{i:04d}" for s in range(3) for i in range(100)]
    assert sorted(members) == sorted([f"{k}.jpg" for k in keys] + [f"{k}.json" for k in keys])
    assert all((dest / f"{s:05d}_stats.json").exists() and (dest / f"{s:05d}.parquet").exists() for s in range(3))
    stats = json.loads((dest / "_stats.json").read_text())
    assert (stats["done"], stats["failed"], stats["shards"]) == (300, 0, 3)
    # every sample rendered once in the farm: one farm job each, no duplicate
    assert _ledger(stack, "SELECT count(DISTINCT job_id), count(*) FROM bulk_samples WHERE bulk_id = 'ds1'") == [
        (300, 300)]

    # it loads with webdataset and with datasets
    import webdataset as wds

    loaded = list(wds.WebDataset([str(p) for p in sorted(dest.glob("*.tar"))], shardshuffle=False))
    assert sorted(sample["__key__"] for sample in loaded) == keys
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    ds = datasets.load_dataset("webdataset", data_files=[str(p) for p in sorted(dest.glob("*.tar"))],
                               split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == 300

    # each sample's metadata regenerates its image byte-identically when rendered alone
    monkeypatch.setenv("FARM_DATA_DIR", stack["env"]["FARM_DATA_DIR"])
    from farm.config import reset_settings
    from farm.schemas import GenerateInput
    from models.encode import encode_image
    from models.renderer import DiffusersRenderer

    reset_settings()
    renderer = DiffusersRenderer.load(TINY)
    for key in (keys[0], keys[151], keys[-1]):
        meta = json.loads(members[f"{key}.json"])
        assert meta["seed"] == 1000 + int(key[:5]) * 100 + int(key[5:])  # base seed + sample index
        inp = GenerateInput.model_validate({k: meta[k] for k in INPUT_FIELDS if k in meta} | {"num_images": 1})
        image = renderer.render(inp, seed=meta["seed"], indices=[0]).images[0].image
        data, _ = encode_image(image, inp.format)
        assert data == members[f"{key}.jpg"], key
    reset_settings()


def test_malformed_rows_are_reported_by_line_and_strict_refuses(stack, tmp_path):  # noqa: F811
    env = dict(stack["env"])
    _start_tiny(stack, env, "tiny@rows.test")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text('{"prompt": "a red boat"}\n'
                        '{"prompt": "a bad size", "image_size": {"width": 65, "height": 64}}\n'
                        'not json\n'
                        '{"prompt": "a green hill", "seed": 5}\n')
    args = ["bulk", "run", str(manifest), "--model", TINY, "--image-size", "64x64", "--steps", "1",
            "--dataset-format", "imagefolder", "--shard-size", "10"]
    strict = run_farm([*args, "--out", str(tmp_path / "strict"), "--strict"], env)
    assert strict.returncode == 2
    assert "row 2" in strict.stderr and "image_size.width" in strict.stderr
    assert _ledger(stack, "SELECT count(*) FROM bulk_jobs") == [(0,)]  # nothing recorded

    done = run_farm([*args, "--out", str(tmp_path / "lenient")], env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "row 2" in done.stderr and "row 3" in done.stderr
    final = json.loads(done.stdout)
    assert (final["done"], final["rows_rejected"]) == (2, 2)
    lines = [json.loads(x) for x in (tmp_path / "lenient" / "00000" / "metadata.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["seed"]) for x in lines] == [("a red boat", 0), ("a green hill", 5)]


def test_bulk_task_from_plain_celery_with_a_bulk_worker(stack, tmp_path):  # noqa: F811
    root = tmp_path / "bulk-root"
    (root / "in").mkdir(parents=True)
    (root / "in" / "p.csv").write_text('prompt,num_inference_steps\n"a red boat",1\n"a blue door",2\n')
    env = dict(stack["env"], FARM_BULK_ROOT=str(root))
    _start_tiny(stack, env, "tiny@celery-bulk.test")
    with open(tmp_path / "bulk-worker.log", "w") as out:  # a file, not a pipe nobody reads (it could fill)
        driver = subprocess.Popen([FARM, "bulk", "worker", "--concurrency", "2"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        broker = env["FARM_BROKER_URL"]
        client = Celery("plain", broker=broker, backend=broker)  # knows nothing of lcm-farm
        result = client.send_task("farm.bulk", queue="farm.bulk", kwargs={
            "manifest": "in/p.csv", "out": "out/ds", "model_name": TINY, "format": "parquet", "shard_size": 3,
            "images_per_prompt": 2, "defaults": {"image_size": {"width": 64, "height": 64}}})
        final = result.get(timeout=300)
        assert (final["status"], final["done"], final["shards_written"]) == ("COMPLETED", 4, 2)
        outside = client.send_task("farm.bulk", queue="farm.bulk", kwargs={
            "manifest": "/etc/passwd", "out": "x", "model_name": TINY})
        with pytest.raises(Exception, match="manifest: must be inside the bulk root"):
            outside.get(timeout=60, propagate=True)
        client.close()
    finally:
        os.killpg(driver.pid, signal.SIGTERM)
        driver.wait(30)
    import pyarrow.parquet as pq

    table = pq.read_table(root / "out" / "ds" / "00000.parquet")
    assert table.num_rows == 3 and "image" in table.column_names
    first = table.to_pylist()[0]
    from PIL import Image

    assert Image.open(io.BytesIO(first["image"]["bytes"])).size == (64, 64)


def test_bulk_job_over_http_for_its_owner_only(api_stack, tmp_path):
    """POST /bulk with a data-URI manifest, progress at GET /bulk/{id}, driven by a `farm bulk worker`."""
    import base64

    # its output goes to a file: a pipe nobody reads fills up and blocks the worker (it could not exit)
    driver_log = tmp_path / "bulk-worker.log"
    with open(driver_log, "w") as out:
        driver = subprocess.Popen([FARM, "bulk", "worker"], env=api_stack.env, stdout=out,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        key, other = api_stack.make_key("bulk-alice"), api_stack.make_key("bulk-bob")
        manifest = '{"prompt": "a red boat"}\n{"prompt": "a {calm|stormy} sea"}\n'
        body = {"manifest": "data:application/jsonl;base64," + base64.b64encode(manifest.encode()).decode(),
                "manifest_format": "jsonl", "out": "http-ds", "model_name": TINY, "format": "imagefolder",
                "shard_size": 2, "defaults": {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1},
                "budget_images": 100}
        with api_stack.client(key) as c:
            bad = c.post("/bulk", json={**body, "out": "../../escape"})
            assert bad.status_code == 422 and "out" in bad.text
            started = c.post("/bulk", json=body)
            assert started.status_code == 202, started.text
            bulk_id = started.json()["bulk_id"]
            deadline = time.monotonic() + 180
            while (snap := c.get(f"/bulk/{bulk_id}").json())["status"] != "COMPLETED":
                assert time.monotonic() < deadline, snap
                time.sleep(0.2)
        assert (snap["done"], snap["total"], snap["shards_written"]) == (3, 3, 2)
        with api_stack.client(other) as c:
            assert c.get(f"/bulk/{bulk_id}").status_code == 404
            assert c.post(f"/bulk/{bulk_id}/cancel").status_code == 404
            # another owner's folder is out of reach, for manifests and for datasets
            stolen = c.post("/bulk", json={**body, "manifest": "../bulk-alice/http-ds/00000/metadata.jsonl"})
            assert stolen.status_code == 422 and "manifest" in stolen.text
        owned = Path(api_stack.env["FARM_DATA_DIR"]) / "bulk" / "tenants" / "bulk-alice" / "http-ds"
        assert sorted(p.name for p in owned.iterdir()) == ["00000", "00000_stats.json", "00001",
                                                           "00001_stats.json", "_stats.json"]
    finally:
        _stop_bulk_worker(driver, driver_log)


def _stop_bulk_worker(proc: subprocess.Popen[str], log: Path) -> None:
    """SIGTERM a `farm bulk worker`; it must be gone within 30 s (else it is killed and its log shown)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError("farm bulk worker did not stop within 30 s of SIGTERM:\n"
                             + log.read_text()[-4000:]) from None


def test_budget_stops_cleanly_then_pause_and_resume_finish_the_job(stack, tmp_path):  # noqa: F811
    env = dict(stack["env"])
    _start_tiny(stack, env, "tiny@budget.test")
    manifest = tmp_path / "p.txt"
    manifest.write_text("".join(f"a lamp number {i}\n" for i in range(10)))
    dest = tmp_path / "ds"
    args = ["bulk", "run", str(manifest), "--out", str(dest), "--model", TINY, "--image-size", "64x64",
            "--steps", "1", "--shard-size", "5", "--job-id", "b1", "--max-in-flight", "2"]
    first = run_farm([*args, "--budget-images", "7"], env)
    assert first.returncode == 0, first.stderr[-2000:]
    snap = json.loads(first.stdout)
    assert (snap["status"], snap["done"], snap["in_flight"], snap["shards_written"]) == ("BUDGET_REACHED", 7, 0, 1)
    assert (dest / "00000.tar").exists() and not (dest / "00001.tar").exists()  # a shard only when complete

    assert "→ PAUSED" in run_farm(["bulk", "pause", "b1"], env).stdout
    resumed = run_farm(["bulk", "resume", "b1", "--budget-images", "100"], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    snap = json.loads(resumed.stdout)
    assert (snap["status"], snap["done"], snap["shards_written"]) == ("COMPLETED", 10, 2)
    assert sorted(n.split(".")[0] for n in _tar_members(dest)) == sorted(
        [f"{s:05d}{i:04d}" for s in range(2) for i in range(5)] * 2)  # .jpg and .json each
    cancelled = run_farm(["bulk", "cancel", "b1"], env)
    assert "COMPLETED → CANCELLED" in cancelled.stdout  # a finished job stays finished
    assert json.loads(run_farm(["bulk", "status", "b1"], env).stdout)["status"] == "COMPLETED"


def test_a_stopped_bulk_worker_hands_its_job_back_and_another_finishes_it(stack, tmp_path):  # noqa: F811
    """SIGTERM to a `farm bulk worker` whose job cannot finish yet (no render worker serves its model):
    the worker leaves at once instead of waiting for the job, the job stays RUNNING without a driver,
    and once a render worker is up its sweeper sends farm.bulk again to a second bulk worker, which
    completes the job with every sample once."""
    root = tmp_path / "bulk-root"
    (root / "in").mkdir(parents=True)
    (root / "in" / "p.txt").write_text("a red boat\na blue door\na green hill\n")
    env = dict(stack["env"], FARM_BULK_ROOT=str(root), FARM_SWEEP_SECONDS="1", FARM_DISPATCH_TIMEOUT="2")
    logs = [tmp_path / "bulk-a.log", tmp_path / "bulk-b.log"]

    def bulk_worker(log_path: Path) -> subprocess.Popen[str]:
        with open(log_path, "w") as out:  # a file, not a pipe nobody reads
            return subprocess.Popen([FARM, "bulk", "worker"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)

    first = bulk_worker(logs[0])
    second = None
    try:
        client = Celery("plain", broker=env["FARM_BROKER_URL"], backend=env["FARM_BROKER_URL"])
        client.send_task("farm.bulk", queue="farm.bulk", kwargs={
            "manifest": "in/p.txt", "out": "out/ds", "model_name": TINY, "format": "imagefolder",
            "images_per_prompt": 2, "defaults": {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}})
        client.close()
        _wait(lambda: _ledger(stack, "SELECT count(*) FROM bulk_jobs WHERE runner IS NOT NULL "
                                     "AND ingested = 6")[0][0] == 1, 120, "the job to be driven")
        _stop_bulk_worker(first, logs[0])  # it hands its job back instead of waiting for it
        assert "stays RUNNING for the next driver" in logs[0].read_text()
        rows = _ledger(stack, "SELECT status, runner FROM bulk_jobs")
        assert rows == [("RUNNING", None)], rows
        assert _ledger(stack, "SELECT count(*) FROM bulk_samples WHERE status = 'done'") == [(0,)]
        second = bulk_worker(logs[1])
        _start_tiny(stack, env, "tiny@handback.test")  # its sweeper sends farm.bulk again
        _wait(lambda: _ledger(stack, "SELECT status FROM bulk_jobs")[0][0] == "COMPLETED", 240,
              "the second bulk worker to complete the job")
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    assert "farm.bulk" in logs[1].read_text()
    counts = _ledger(stack, "SELECT status, count(*) FROM bulk_samples GROUP BY 1")
    assert [tuple(c) for c in counts] == [("done", 6)], counts
    lines = (root / "out" / "ds" / "00000" / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 6 and len({json.loads(x)["file_name"] for x in lines}) == 6
