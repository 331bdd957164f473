"""The package's shape, checked from its source: no import cycles, few top-level modules, one reader of the
environment, and layers that import downwards only (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

import asyncsgd

PACKAGE = pathlib.Path(asyncsgd.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict:
    """{module name: path} of every module of the package."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: pathlib.Path, module: str, known) -> set:
    """The package modules that ``module`` (source at ``path``) imports, at any depth of its code (function-level
    imports count: a cycle through a lazy import is still a cycle); relative imports resolved; ``from P import M``
    counts M when P.M is a module."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()

    def nearest(name):
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in known else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known]
            # `from P import M` imports module P.M; `from P import name` imports P itself
            targets = submodules + ([source] if len(submodules) < len(node.names) else [])
        else:
            continue
        for target in targets:
            hit = nearest(target)
            if hit is not None and hit != module:
                found.add(hit)
    return found


def import_graph() -> dict:
    modules = _modules()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert sum(len(v) for v in graph.values()) > 100  # the graph was really read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    """The checker must see a cycle through relative, function-level and ``from package import module`` imports."""
    pkg = tmp_path / "asyncsgd"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "sub" / "b.py").write_text("from asyncsgd.sub.c import thing\n")
    (pkg / "sub" / "c.py").write_text("from ..sub import a\nthing = 1\n")
    modules = {_name(p, tmp_path): p for p in pkg.rglob("*.py")}
    graph = {n: imported_modules(p, n, modules) for n, p in modules.items()}
    assert cycles(graph) == [["asyncsgd.sub.a", "asyncsgd.sub.b", "asyncsgd.sub.c"]]


def _name(path, root):
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_at_most_eight_modules_at_the_top_level():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert 0 < len(flat) <= 8, flat


def test_the_environment_is_read_in_one_module():
    """Every ``ASYNCSGD_*`` variable name appears as a string in asyncsgd.runtime.env alone (docs/ARCHITECTURE.md)."""
    readers = set()
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"ASYNCSGD_[A-Z_]+", node.value):
                readers.add(name)
    assert readers == {"asyncsgd.runtime.env"}


@pytest.mark.parametrize("folder", ["algorithms", "store", "model", "backends", "rma", "ulfm", "data", "io"])
def test_library_layers_never_import_the_command_line(folder):
    graph = import_graph()
    inside = [m for m in graph if m.startswith(f"asyncsgd.{folder}")]
    assert inside
    for module in inside:
        bad = {m for m in graph[module] if m in ("asyncsgd.cli", "asyncsgd.train", "asyncsgd.evaluate", "asyncsgd.plot")}
        assert not bad, f"{module} imports {sorted(bad)}"
