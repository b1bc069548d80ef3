"""README blocks run as written, by bash in a fresh environment, against this suite's private servers.

A block is found by the marker comment above it (``<!-- test_readme: NAME -->``). Only what
must differ on a test machine is replaced: the Redis URL (the private server) and the API's
port (a free one). ``pip install`` runs with ``--no-index``: everything it names is installed
already, so it checks that and downloads nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from tests.services import free_port
from tests.workers import clean_env

README = Path(__file__).resolve().parents[1] / "README.md"
VENV_BIN = Path(sys.executable).parent


def readme_block(name: str, lang: str = "sh") -> str:
    pattern = rf"<!-- test_readme: {re.escape(name)} -->\n```{lang}\n(.*?)\n```\n"
    match = re.search(pattern, README.read_text(), re.S)
    assert match, f"README.md has no ```{lang} block marked {name!r}"
    return match.group(1)


def run_block(script: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run ``script`` with ``bash -e`` in its own process group; whatever it left running is stopped."""
    log = cwd / "block.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = -1
        finally:
            _stop_group(proc)
    return code, log.read_text(errors="replace")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM whatever is left in the block's process group (its background jobs), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 20
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)  # raises once the group is empty
                if proc.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(0.2)
                else:
                    time.sleep(0.2)
        except ProcessLookupError:
            return


def test_try_it_on_one_machine(redis_server, tmp_path):
    block = readme_block("try-it-on-one-machine")
    assert "redis://localhost:6379/0" in block and "8443" in block
    broker = f"redis://127.0.0.1:{redis_server.port}/12"  # a database of its own: no other test's messages
    script = block.replace("redis://localhost:6379/0", broker).replace("8443", str(free_port()))
    home = tmp_path / "home"  # a fresh user: the embedded ledger and outputs land under ~/.local/share
    home.mkdir()
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "pip").write_text(f'#!/bin/sh\nexec "{VENV_BIN / "python"}" -m pip "$@" --no-index --quiet\n')
    (shims / "pip").chmod(0o755)
    env = {k: v for k, v in clean_env().items() if not k.startswith(("FAL_", "SSL_CERT", "BASH_ENV", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{shims}:{VENV_BIN}:/usr/bin:/bin")

    code, out = run_block(script, tmp_path, env, timeout=300)
    assert code == 0, out[-6000:]
    lines = out.splitlines()
    # fal_client: each distinct status once, then one readable line per image (URLs, no data URIs)
    assert lines.count("Completed") == 1 and lines.count("InProgress") <= 1 and lines.count("Queued") <= 1, out
    assert [line for line in lines if line.startswith("64 x 64 file://")], out[-6000:]  # tiny-lcm's own size
    assert "base64" not in out
    # curl: the status stream ends with COMPLETED, then the result (64x64, a URL)
    assert '"status": "COMPLETED"' in out or '"status":"COMPLETED"' in out, out[-6000:]
    results = [json.loads(line) for line in lines if line.startswith('{"images"')]
    assert results and [(i["width"], i["height"]) for i in results[-1]["images"]] == [(64, 64)], out[-6000:]
    assert results[-1]["images"][0]["url"].startswith("file://")
    assert (tmp_path / "farm-try" / "client.pem").is_file()  # made where the block said


def test_bulk_worked_example_then_the_training_script_reads_it(tmp_path):
    """The Bulk datasets example on an embedded farm, then the training-script block reading its dataset."""
    home = tmp_path / "home"  # a fresh user: nothing configured, the embedded farm under ~/.local/share
    home.mkdir()
    env = {k: v for k, v in clean_env().items() if not k.startswith(("BASH_ENV", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}:/usr/bin:/bin")

    code, out = run_block(readme_block("bulk-worked-example"), tmp_path, env, timeout=300)
    assert code == 0, out[-6000:]
    status = json.loads(out[out.rindex('{\n  "bulk_id"'):])  # `farm bulk status`, the block's last command
    # 3 colours x 2 seas from the template row and the lighthouse row, 2 images per prompt
    assert (status["bulk_id"], status["status"], status["total"], status["done"], status["failed"]) == (
        "boats-v1", "COMPLETED", 14, 14, 0), out[-6000:]
    dataset = tmp_path / "dataset"
    assert sorted(p.name for p in dataset.iterdir()) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "_stats.json"]  # the listing the README shows
    with tarfile.open(dataset / "00000.tar") as tar:
        names = tar.getnames()
    assert names[:4] == ["000000000.jpg", "000000000.json", "000000001.jpg", "000000001.json"]
    assert len(names) == 28

    script = readme_block("bulk-training-read", "python")
    script += '\nprint("read", len(ds), sorted({image.size for image, _ in pipeline}), caption)\n'
    (tmp_path / "train.py").write_text(script)
    code, out = run_block(f'"{VENV_BIN / "python"}" train.py', tmp_path, env, timeout=180)
    assert code == 0, out[-6000:]
    assert "read 14 [(256, 256)] a lighthouse at dusk" in out.splitlines(), out[-6000:]
