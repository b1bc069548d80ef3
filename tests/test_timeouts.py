"""The per-test time limits (tests/timeouts.py) name tests that exist, and reach the tests they name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.timeouts import LONG_SECONDS, SLOW_SECONDS

REPO = Path(__file__).resolve().parent.parent


def test_every_long_test_in_the_table_exists() -> None:
    for key in LONG_SECONDS:
        path, _, name = key.partition("::")
        source = (REPO / path).read_text()
        assert not name or f"def {name}(" in source, f"{key} is listed in tests/timeouts.py but not defined"


def test_the_limits_reach_the_collected_tests(tmp_path: Path) -> None:
    """Collected for real: a listed test, a slow test and a plain one carry 420, 600 and no extra limit."""
    (tmp_path / "timeout_probe.py").write_text(
        "def pytest_collection_finish(session):\n"
        "    for item in session.items:\n"
        "        mark = item.get_closest_marker('timeout')\n"
        "        print('LIMIT', item.nodeid, mark.args[0] if mark else None)\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "timeout_probe",
         "tests/test_bulk.py", "tests/test_faults.py", "tests/test_schemas.py"],
        cwd=REPO, capture_output=True, text=True, timeout=100, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    limits = dict(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("LIMIT "))
    assert limits, done.stdout[-2000:] + done.stderr[-2000:]
    assert limits["tests/test_bulk.py::test_bulk_task_from_plain_celery_with_a_bulk_worker"] == "420"
    assert {v for k, v in limits.items() if k.startswith("tests/test_faults.py::")} == {str(SLOW_SECONDS)}
    assert {v for k, v in limits.items() if k.startswith("tests/test_schemas.py::")} == {"None"}
