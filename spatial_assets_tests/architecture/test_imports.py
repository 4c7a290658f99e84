"""The package's layering, checked by parsing imports (no module is imported).

* Dagster is imported only under ``spatial_assets/defs/`` and in ``definitions.py``: the science,
  platform, storage and CLI packages must run (and be tested) without it.
* No import cycle among the package's modules, counting every import (module level and inside
  functions), because a cycle hidden in a function still couples the two modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "spatial_assets"
DAGSTER_ROOTS = {"dagster", "dagster_aws", "dagster_webserver", "dagster_graphql", "dagster_postgres", "dagster_k8s", "dagster_pipes"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str) -> list[str]:
    """Absolute names of every module imported by the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]  # `from pkg import module`
    return out


def _internal_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imp in _imports(path, name):
            if imp in modules and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def test_dagster_only_in_defs_and_definitions():
    offenders = []
    for name, path in _modules().items():
        if name == "spatial_assets.definitions" or name.startswith("spatial_assets.defs"):
            continue
        for imp in _imports(path, name):
            if imp.split(".")[0] in DAGSTER_ROOTS:
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {imp}")
    assert not offenders, "Dagster imported outside defs/:\n" + "\n".join(sorted(set(offenders)))


def _find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out




def test_no_import_cycles():
    graph = _internal_graph()
    # a package's __init__ importing its own submodules is not a cycle of modules; a submodule
    # importing its parent package's __init__ back is, so only the parent→child edge is dropped
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    cycles = _find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a two-module loop and a three-module loop are both reported."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(map(tuple, _find_cycles(graph))) == [("a", "b"), ("c", "d", "e")]


def test_import_parser_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "spatial_assets" / "x"
    pkg.mkdir(parents=True)
    f = pkg / "m.py"
    f.write_text("def g():\n    import dagster as dg\n    from . import sibling\n    from ..core import ids\n")
    names = _imports(f, "spatial_assets.x.m")
    assert "dagster" in names and "spatial_assets.x.sibling" in names and "spatial_assets.core.ids" in names
