"""The import structure of the code, read from its source with ``ast`` (imports inside functions included).

The rules ("The house in order"):

1. no import circle among the modules of ``farm/``, ``tasks/``, ``models/`` and ``db/``;
2. nothing under ``farm/`` imports ``tasks/`` (only the CLI may: ``farm/cli.py``, ``farm/commands/``);
3. nothing outside ``farm/api/`` imports ``farm/api/`` (the CLI aside);
4. ``models/`` imports neither ``db/``, ``tasks/`` nor ``farm/api/``;
5. no module of the code (migrations and tests aside) past 400 lines;
6. no two modules of those packages share a file name (``__init__.py`` aside): a reader who sees
   ``usage.py`` or ``protocol.py`` in a traceback knows which one it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("farm", "tasks", "models", "db")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The module of ours that ``name`` (a module, or a name inside one) lives in."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every module's imports of our modules, lazy ones included (an edge per imported module)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[: len(up) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                found = _resolve(target, mods)
                if found and found != mod:
                    edges[mod].add(found)
    return edges


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _is_cli(mod: str) -> bool:
    return mod == "farm.cli" or mod.startswith("farm.commands")


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return _imports(_modules())


def test_the_rules_see_every_package_and_lazy_imports(edges):
    # the checker itself: it finds our modules, and an import inside a function counts
    assert {"farm.cli", "farm.config", "db.session"} <= set(edges)
    source = "def f():\n    from farm.config import get_settings\n"
    lazy = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert lazy and lazy[0].module == "farm.config"
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle(edges):
    assert _circles(edges) == []


def test_nothing_under_farm_imports_tasks_but_the_cli(edges):
    wrong = [f"{m} -> {t}" for m, outs in edges.items() for t in outs
             if m.startswith("farm") and not _is_cli(m) and t.split(".")[0] == "tasks"]
    assert wrong == []


def test_nothing_outside_the_api_imports_it(edges):
    wrong = [f"{m} -> {t}" for m, outs in edges.items() for t in outs
             if t.startswith("farm.api") and not m.startswith("farm.api") and not _is_cli(m)]
    assert wrong == []


def test_models_import_no_infrastructure(edges):
    wrong = [f"{m} -> {t}" for m, outs in edges.items() for t in outs
             if m.startswith("models") and (t.split(".")[0] in ("db", "tasks") or t.startswith("farm.api"))]
    assert wrong == []


def test_no_module_past_400_lines():
    code = [p for d in (*PACKAGES, "benchmarks") for p in (ROOT / d).rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in code if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_two_modules_share_a_name():
    seen: dict[str, list[str]] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name != "__init__.py":
                seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in seen.items() if len(paths) > 1} == {}


def test_each_package_says_what_it_holds_and_may_import():
    packages = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py")]
    silent = [str(p.relative_to(ROOT)) for p in packages
              if not (doc := ast.get_docstring(ast.parse(p.read_text())) or "") or "import" not in doc]
    assert silent == []


def test_the_readme_folder_table_names_every_module_and_nothing_else():
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Where the code lives", 1)[1].split("\n#", 1)[0]
    named = set(re.findall(r"`([a-z_/]+(?:\.py|/))`", section))
    assert [p for p in named if not (ROOT / p).exists()] == []
    folders = {p for p in named if p.endswith("/")}
    unnamed = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if p.name != "__init__.py" and str(p.relative_to(ROOT)) not in named
               and not any(str(p.relative_to(ROOT)).startswith(f) for f in folders if f.count("/") > 1
                           or f not in {f"{pkg}/" for pkg in PACKAGES})]
    assert unnamed == []
