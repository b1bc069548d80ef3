"""Embedded mode: nothing configured, no servers; SQLite ledger, local files, in-process worker."""

from __future__ import annotations

import json
import sqlite3
import tarfile

from tests.workers import clean_env, run_farm


def test_generate_with_nothing_configured(tmp_path):
    data = tmp_path / "data"
    out = tmp_path / "out"
    env = clean_env(FARM_DATA_DIR=str(data))
    args = ["generate", "--model", "farm/tiny-lcm", "a lighthouse at dusk", "--num-images", "4",
            "--image-size", "64x64", "--seed", "3", "--json", "--out", str(out)]
    done = run_farm(args, env)
    assert done.returncode == 0, done.stderr
    output = json.loads(done.stdout)
    assert len(output["images"]) == 4 and output["seed"] == 3
    rid = done.stderr.split("request ", 1)[1].split()[0]
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{rid}_{i}.jpg" for i in range(4)]
    assert all(f.read_bytes()[:3] == b"\xff\xd8\xff" for f in files)  # JPEG
    # local storage: file:// URLs under the data dir, deterministic keys
    stored = data / "outputs" / "local" / rid
    assert output["images"][0]["url"] == (stored / "0.jpg").as_uri()
    assert sorted(p.name for p in stored.iterdir()) == [f"{i}.jpg" for i in range(4)]
    with sqlite3.connect(data / "ledger.db") as conn:
        assert conn.execute("SELECT status, num_images FROM jobs WHERE id = ?", (rid,)).fetchall() == [
            ("COMPLETED", 4)
        ]
        assert conn.execute("SELECT count(*) FROM images WHERE job_id = ?", (rid,)).fetchone() == (4,)

    # the same seed and parameters again: byte-identical images
    again = run_farm([*args[:-1], str(tmp_path / "again")], env)
    assert again.returncode == 0, again.stderr
    rid2 = again.stderr.split("request ", 1)[1].split()[0]
    assert [(tmp_path / "again" / f"{rid2}_{i}.jpg").read_bytes() for i in range(4)] == [
        f.read_bytes() for f in files
    ]

    status = run_farm(["status", rid], env)
    assert status.returncode == 0
    assert json.loads(status.stdout)["status"] == "COMPLETED"


def test_sync_mode_prints_data_uris_and_unknown_request_is_an_error(tmp_path):
    env = clean_env(FARM_DATA_DIR=str(tmp_path / "data"))
    done = run_farm(["generate", "--model", "farm/tiny-lcm", "x", "--image-size", "64x64", "--sync-mode",
                     "--format", "png", "--json"], env)
    assert done.returncode == 0, done.stderr
    image = json.loads(done.stdout)["images"][0]
    assert image["url"].startswith("data:image/png;base64,") and image["content_type"] == "image/png"
    missing = run_farm(["status", "no-such-request"], env)
    assert missing.returncode == 1 and "no request 'no-such-request'" in missing.stderr


def test_giving_up_cancels_the_job_and_exits_cleanly(tmp_path):
    data = tmp_path / "data"
    env = clean_env(FARM_DATA_DIR=str(data))
    done = run_farm(["generate", "--model", "farm/tiny-lcm", "x", "--num-images", "4", "--image-size", "1024x1024",
                     "--timeout", "2"], env)
    assert done.returncode == 1
    assert "cancelled: client gave up after 2 s" in " ".join(done.stderr.split())
    assert "terminate called" not in done.stderr
    with sqlite3.connect(data / "ledger.db") as conn:
        assert conn.execute("SELECT status, error_type FROM jobs").fetchall() == [("CANCELLED", "cancelled")]
    # farm status shows the ledger's word and the API's, and says why they differ
    rid = done.stderr.split("request ", 1)[1].split()[0]
    view = json.loads(run_farm(["status", rid, "--no-logs"], env).stdout)
    assert (view["status"], view["api_status"], view["error_type"]) == ("CANCELLED", "COMPLETED", "cancelled")
    assert "COMPLETED with its error" in view["note"]


def test_rerunning_a_finished_bulk_job_says_so_at_once(tmp_path):
    env = clean_env(FARM_DATA_DIR=str(tmp_path / "data"))
    manifest = tmp_path / "p.txt"
    manifest.write_text("a boat\na lighthouse\n")
    args = ["bulk", "run", str(manifest), "--out", str(tmp_path / "ds"), "--model", "farm/tiny-lcm", "--steps", "1",
            "--shard-size", "2", "--job-id", "twice"]
    first = run_farm(args, env)
    assert first.returncode == 0, first.stderr
    assert "torchvision" not in first.stderr and "hostname" not in first.stderr.lower(), first.stderr  # no noise
    snap = json.loads(first.stdout)
    assert (snap["status"], snap["done"], snap["shards_written"]) == ("COMPLETED", 2, 1)
    with tarfile.open(tmp_path / "ds" / "00000.tar") as tar:  # no image_size: the model's own, 64x64
        member = tar.extractfile("000000000.json")
        assert member is not None
        meta = json.load(member)
    assert meta["image_size"] == {"width": 64, "height": 64} and (meta["width"], meta["height"]) == (64, 64)
    # again, and resumed: nothing to do, said at once; no model is loaded (on this device it could not be)
    for again in (run_farm([*args, "--device", "cuda:99"], env), run_farm(["bulk", "resume", "twice", "--device",
                                                                             "cuda:99"], env)):
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) == snap
        assert "already complete (2 done, 0 failed, 1 shards in" in " ".join(again.stderr.split()), again.stderr
        assert "nothing to do" in " ".join(again.stderr.split())  # rich wraps stderr at 80 columns


def test_missing_weights_error_keeps_each_download_command_on_one_line(tmp_path):
    """The README's SD1.5 `farm generate` without weights: the printed `hf download …` lines paste as they are."""
    data, weights = tmp_path / "data", tmp_path / "weights"
    env = clean_env(FARM_DATA_DIR=str(data), FARM_MODEL_DIR=str(weights), HF_HOME=str(tmp_path / "hf"),
                    COLUMNS="60")  # a narrow terminal: the error must not be cut into lines at its width
    sd15, lora = "runwayml/stable-diffusion-v1-5", "latent-consistency/lcm-lora-sdv1-5"
    done = run_farm(["generate", "a red fox", "--model", sd15, "--image-size", "768x512", "--steps", "4",
                     "--out", str(tmp_path / "out")], env)
    assert done.returncode == 1, done.stderr
    lines = [line.strip() for line in done.stderr.splitlines()]
    assert (f'hf download {sd15} --include "model_index.json" --include "*/*.json" --include "*/*.txt" '
            f'--include "*/*.safetensors" --local-dir {weights / sd15}') in lines, done.stderr
    assert f"hf download {lora} --local-dir {weights / lora}" in lines, done.stderr
    assert lines[0].startswith(f"error: model '{sd15}' not found; looked in: ") and lines[0].endswith(
        "no download (offline: HF_HUB_OFFLINE is set)."), done.stderr
    assert not (tmp_path / "out").exists()
    with sqlite3.connect(data / "ledger.db") as conn:  # nothing was recorded
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
