"""`make demo` installs the project editable: the build backend must not warn while doing so.

pip (26 and later) shows the build backend's warnings even with ``--quiet``, so a deprecated
``project.license`` table or setuptools' notice about its editable meta path finder reached every
newcomer's first ``make demo``. This runs the very hooks pip calls for ``pip install --editable .``
(``setuptools.build_meta``, the venv's setuptools: what ``make`` installs) on a copy of the project,
without pip's isolated build environment (no download), and records every warning they raise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HOOKS = """
import json, sys, warnings
out, sys.argv = sys.argv[1], sys.argv[:1]  # setuptools reads sys.argv as setup.py's arguments
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import setuptools.build_meta as backend
    backend.get_requires_for_build_editable()
    meta = backend.prepare_metadata_for_build_editable(out)
    wheel = backend.build_editable(out, metadata_directory=f"{out}/{meta}")
print(json.dumps({"wheel": wheel, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def test_editable_install_builds_without_a_warning(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project / name)
    for package in ("farm", "tasks", "models", "db", "migrations"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", HOOKS, str(out)], cwd=project, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["warnings"] == [], report["warnings"]
    assert "Warning" not in done.stderr and "deprecated" not in done.stderr, done.stderr[-4000:]
    with zipfile.ZipFile(out / report["wheel"]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        pth = [wheel.read(n).decode() for n in names if n.endswith(".pth")]
    assert "License-Expression: Apache-2.0" in metadata.splitlines(), metadata[:600]
    assert "License-File: LICENSE" in metadata.splitlines(), metadata[:600]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    # a plain path entry to the project's root (no meta path finder module beside it)
    assert pth == [f"{project.resolve()}\n"], (pth, names)
    assert not any(n.endswith("_finder.py") for n in names), names
