"""Embedded mode: nothing configured, no servers; SQLite ledger, local files, in-process worker."""

from __future__ import annotations

import json
import sqlite3

from tests.workers import clean_env, run_farm


def test_generate_with_nothing_configured(tmp_path):
    data = tmp_path / "data"
    out = tmp_path / "out"
    env = clean_env(FARM_DATA_DIR=str(data))
    args = ["generate", "--model", "farm/tiny-lcm", "a lighthouse at dusk", "--num-images", "4",
            "--image-size", "64x64", "--seed", "3", "--out", str(out)]
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
                     "--format", "png"], env)
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
