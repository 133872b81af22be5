"""The shape of the code: one namespace, layers that import only downward, no import cycles.

Read from the source with ``ast`` (nothing is imported), so a violation is named with its file
and line. Every import counts, also those inside functions and under ``TYPE_CHECKING``: a cycle
that only closes at run time is still a cycle.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("calibration", "policies", "api", "migrations")  # root folders, installed as exitwise.<layer>
# what each layer may import from the others (the design's floors; migrations need the models)
ALLOWED = {
    "calibration": set(),
    "policies": {"calibration"},
    "api": {"calibration", "policies"},
    "migrations": {"policies"},
}
OUTSIDE = ("tests", "benchmarks", "examples", "scripts", "docs")


@dataclass(frozen=True)
class Import:
    source: str  # dotted name of the importing module
    target: str  # dotted name of the imported module (or package)
    path: Path
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["exitwise", *parts])


def _package_modules() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def _imports(path: Path, name: str) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            yield Import(name, mod, path, node.lineno)
            for alias in node.names:  # ``from pkg import module`` imports pkg.module
                yield Import(name, f"{mod}.{alias.name}", path, node.lineno)


def _graph() -> dict[str, set[str]]:
    modules = _package_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for imp in _imports(path, name):
            if imp.target in modules and imp.target != name:
                graph[name].add(imp.target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_of(module: str) -> str:
    """``exitwise.policies.db`` -> ``exitwise.policies``; a package ``__init__`` is its own package."""
    return module.rsplit(".", 1)[0]


def test_no_import_cycles() -> None:
    graph = _graph()
    # a package's __init__ importing its own submodules is how packages re-export, not a cycle
    # between modules of different jobs; drop those edges
    pruned = {m: {t for t in ts if not (t.startswith(m + ".") and _module_name_is_package(m))}
              for m, ts in graph.items()}
    assert _cycles(pruned) == []


def _module_name_is_package(name: str) -> bool:
    path = _package_modules()[name]
    return path.name == "__init__.py"


def test_layers_import_only_downward() -> None:
    bad = []
    for name, path in _package_modules().items():
        layer = name.split(".")[1]
        for imp in _imports(path, name):
            parts = imp.target.split(".")
            if parts[0] != "exitwise" or len(parts) < 2 or parts[1] == layer:
                continue
            if parts[1] not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{imp.line}: {layer} imports {imp.target}")
    assert bad == []


def test_migrations_are_found_as_data_not_imported_by_the_store() -> None:
    """The store locates the Alembic scripts as package data; only the scripts import the models."""
    offenders = [f"{p.relative_to(ROOT)}:{i.line}" for n, p in _package_modules().items()
                 if not n.startswith("exitwise.migrations")
                 for i in _imports(p, n) if i.target.startswith("exitwise.migrations")]
    assert offenders == []


@pytest.mark.parametrize("where", [*LAYERS, *OUTSIDE])
def test_nothing_imports_a_bare_layer_name(where: str) -> None:
    """Installed, the layers exist only as ``exitwise.<layer>``: a bare ``import calibration`` would
    find a host application's package of that name (or nothing)."""
    bad = []
    for path in sorted((ROOT / where).rglob("*.py")):
        for imp in _imports(path, _module_name(path) if where in LAYERS else path.stem):
            if imp.target.split(".")[0] in LAYERS:
                bad.append(f"{path.relative_to(ROOT)}:{imp.line}: {imp.target}")
    assert bad == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above is only as good as this: a two-module and a three-module cycle are found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_function_local_imports_say_why() -> None:
    """Imports go at the top of a module; one inside a function says why on the line above it
    (``# lazy: <reason, with the measured cost>``), or it is an optional extra's import (``require``)."""
    bad = []
    for path in _package_modules().values():
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    above = lines[max(node.lineno - 4, 0):node.lineno - 1]
                    if not any("# lazy:" in line for line in above):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert sorted(set(bad)) == []
