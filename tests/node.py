"""The Node project under ``tests/js``: fal's npm clients, pinned by ``package-lock.json``.

Node and npm come from the machine (Debian packages); ``npm ci`` installs the locked packages
when ``tests/js/node_modules`` is missing or older than the lock file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.services import missing

JS_DIR = Path(__file__).parent / "js"
NODE_MAJOR = 20


def node_project() -> Path:
    """``tests/js`` with its packages installed; skips (fails under CI=true) without Node ≥ 20."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing("node and npm (Debian packages)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < NODE_MAJOR:
        missing(f"Node >= {NODE_MAJOR} (found {version})")
    modules, lock = JS_DIR / "node_modules", JS_DIR / "package-lock.json"
    stamp = modules / ".package-lock.json"  # npm writes it on every install
    # one install at a time (pytest-xdist runs test modules in two processes)
    with open(JS_DIR / ".npm-ci.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True,
                                  text=True, timeout=300)  # fmt: skip
            assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return JS_DIR


def run_node(args: list[str], env: dict[str, str], timeout: float = 240) -> dict[str, Any]:
    """Run ``node args…`` in tests/js and return the JSON object its last line prints."""
    done = subprocess.run(["node", *args], cwd=JS_DIR, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"node {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"node printed nothing:\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result
