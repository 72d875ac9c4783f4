"""The planner's modules import one way (the planner house): cp_search.py (the loop over context-parallel degrees)
drives search, search drives; the ILP, predict.py, staging.py and layers.py are called; shared types (candidate.py)
and prices sit below them. A cycle, even one hidden behind TYPE_CHECKING, means a module reaches back up to its
driver."""

from __future__ import annotations

import ast
from pathlib import Path

PLANNER = Path(__file__).resolve().parents[1] / "autopar" / "planner"


def _imports(path: Path) -> set[str]:
    """Planner modules `path` imports anywhere in it (module level, functions, TYPE_CHECKING blocks)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autopar.planner."):
            out.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module == "autopar.planner":
            out.update(alias.name for alias in node.names)
    return out


def test_planner_modules_import_without_cycles():
    graph = {p.stem: _imports(p) for p in PLANNER.glob("*.py")}
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", " -> ".join(path + [m])
        state[m] = "open"
        for dep in sorted(graph.get(m, ())):
            visit(dep, path + [m])
        state[m] = "done"

    for module in sorted(graph):
        visit(module, [])
    # The drivers: cp_search loops over cp degrees and calls search once per fold; nothing below reaches up to them.
    drivers = ("cp_search", "search")
    for i, driver in enumerate(drivers):
        above = drivers[:i + 1]
        assert driver not in set().union(*(deps for m, deps in graph.items() if m not in above)), driver
