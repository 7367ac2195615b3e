"""The package's shape (docs/architecture.md): stage packages whose imports point down the stages, no import
cycles, module-level and in-function imports alike."""

from __future__ import annotations

import ast
from pathlib import Path

import ofa_lib

PKG = Path(ofa_lib.__file__).parent
# bottom to top; a module may import its own stage and the stages below it
STAGES = ("foundations", "data", "models", "train", "results", "merge", "analysis", "grid")
FOUNDATIONS = {"paths", "io", "tasks", "progress", "locks", "slurm_cluster"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    top = module.split(".")[1] if module.count(".") else ""
    return "foundations" if top in FOUNDATIONS or not top else top


def import_graph() -> dict[str, set[str]]:
    """module → the ofa_lib modules it imports anywhere in its body (``from ofa_lib.x import name`` counts
    ``ofa_lib.x``, and ``ofa_lib.x.name`` too when that is a module)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py") if "metric_modules" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base == "ofa_lib" or base.startswith("ofa_lib."):
                    deps.add(base)
                    deps.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("ofa_lib"))
        graph[name] = {d for d in deps if d in files and d != name and d != "ofa_lib"}
    return graph


def test_imports_point_down_the_stages():
    wrong = [f"{m} ({_stage(m)}) imports {d} ({_stage(d)})" for m, deps in import_graph().items() for d in deps
             if STAGES.index(_stage(d)) > STAGES.index(_stage(m))]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" → ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_foundations_import_nothing_of_the_stages():
    graph = import_graph()
    assert all(_stage(d) == "foundations" for m in graph if _stage(m) == "foundations" for d in graph[m])
