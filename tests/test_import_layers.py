"""The modules of d2r_sb3 import each other in layers: no import cycle, function-level (lazy) imports included.

The graph is read from the source with :mod:`ast`, so it sees every ``import`` statement wherever it stands
(module level, inside a function, under ``if TYPE_CHECKING``), not only those that ran. An edge goes from a module
to the module it names: ``from d2r_sb3.a import b`` points at ``d2r_sb3.a.b`` when that is a module, else at
``d2r_sb3.a``. The parent packages that Python initialises on the way (``d2r_sb3``, ``d2r_sb3.a``) are not edges:
every submodule would otherwise sit in a cycle with a package ``__init__`` that re-exports it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "d2r_sb3"
ROOT = Path(__file__).resolve().parents[1]


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (``d2r_sb3.common`` for ``d2r_sb3/common/__init__.py``)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of a ``from ... import`` (resolving ``from . import x`` and ``from ..a import x``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """``(imported module of the package, line)`` for every import statement in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, is_package)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    yield submodule, node.lineno
                elif source in modules:
                    yield source, node.lineno


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``graph[a][b]`` = a line of ``a`` that imports ``b``."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        for target, line in imports_of(name, path, modules):
            graph[name].setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(
    component: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path], root: Path = ROOT
) -> str:
    members = set(component)
    edges = [
        f"  {source} -> {target}  ({modules[source].relative_to(root)}:{line})"
        for source in component
        for target, line in sorted(graph[source].items())
        if target in members
    ]
    return "import cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


def test_the_package_has_no_import_cycle():
    modules = module_files()
    graph = import_graph(modules)
    found = cycles(graph)
    assert not found, "\n\n".join(describe(component, graph, modules) for component in found)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """A cycle closed by an import inside a function, or by a relative import, is still a cycle."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from pkg.high import g\n    return g\n")
    (package / "high.py").write_text("from . import low\n\ndef g():\n    return low\n")
    (package / "alone.py").write_text("from pkg import low\nimport pkg.high\n")
    modules = module_files(tmp_path, "pkg")
    graph = import_graph(modules)
    assert graph["pkg.alone"] == {"pkg.low": 1, "pkg.high": 2}
    assert cycles(graph) == [["pkg.high", "pkg.low"]]
    with pytest.raises(AssertionError, match=r"pkg.low -> pkg.high  \(pkg/low.py:2\)"):
        assert not cycles(graph), describe(cycles(graph)[0], graph, modules, tmp_path)
