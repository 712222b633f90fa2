"""The house keeps its layers: no import circle among the project's modules, the web app's
imports and the jobs load no Prefect, and the jobs import nothing that orchestrates them.

The import graph counts every import statement in a file (at the top or inside a
function), as written; a package is not counted as importing its submodules unless its
``__init__`` says so.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {ROOT / "src": "backjobs", ROOT: "flows tasks"}

APP_MODULES = ("backjobs.outbox", "backjobs.outbox_admin", "backjobs.registration")
ABOVE_THE_JOBS = ("backjobs.orchestration", "backjobs.dashboard", "backjobs.stack", "backjobs.cli")


def _project_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for base, folders in SOURCES.items():
        for folder in folders.split():
            for path in (base / folder).rglob("*.py"):
                if "migrations" in path.parts:
                    continue  # Alembic loads these by path, not by import
                parts = list(path.relative_to(base).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            # `from pkg import name`: the submodule when `name` is one, else the package.
            targets = [t for t in targets[:-1] if t in known] or [base]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _project_modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
            if nxt in stack:
                low[node] = min(low[node], low[nxt])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_sees_the_projects_imports() -> None:
    graph = import_graph()
    # A blind graph would pass every check below: it must see what is known to be there.
    assert "backjobs.cli.common" in graph["backjobs.cli"]
    assert "backjobs.mail.smtp" in graph["backjobs.mail"]
    assert "backjobs.orchestration.jobbase" in graph["flows.cleanup"]
    assert "backjobs.net" in graph["backjobs.dashboard.server"]  # inside-function imports too


def test_the_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_among_the_projects_modules() -> None:
    assert _circles(import_graph()) == []


def test_the_dashboard_imports_nothing_of_the_stack() -> None:
    graph = import_graph()
    for name in graph:
        if name.startswith("backjobs.dashboard"):
            reached = _reachable(graph, name)
            assert not {m for m in reached if m.startswith("backjobs.stack")}, name


def test_the_jobs_import_nothing_that_orchestrates_them() -> None:
    graph = import_graph()
    jobs = [name for name in graph if name.startswith("backjobs.jobs")]
    assert len(jobs) > 5
    for name in jobs:
        above = {m for m in _reachable(graph, name) if m.startswith(ABOVE_THE_JOBS)}
        assert not above, f"{name} reaches {sorted(above)}"


@pytest.mark.parametrize(
    "modules",
    [
        APP_MODULES,
        tuple(sorted(n for n in _project_modules() if n.startswith("backjobs.jobs"))),
    ],
    ids=["the web app's imports", "every backjobs.jobs module"],
)
def test_loads_no_prefect_in_a_fresh_interpreter(modules: tuple[str, ...]) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
