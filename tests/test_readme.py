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
import time
from pathlib import Path

from tests.services import free_port
from tests.workers import clean_env

README = Path(__file__).resolve().parents[1] / "README.md"
VENV_BIN = Path(sys.executable).parent


def readme_block(name: str) -> str:
    match = re.search(rf"<!-- test_readme: {re.escape(name)} -->\n```sh\n(.*?)\n```\n", README.read_text(), re.S)
    assert match, f"README.md has no ```sh block marked {name!r}"
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
