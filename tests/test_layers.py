"""txguard's modules form layers: no module imports, directly or not, a module that imports it.

The graph holds every ``import``/``from ... import`` between txguard's modules, at module
level and inside functions; imports under ``if TYPE_CHECKING:`` name types only, never run,
and are left out. The package's ``__init__`` loads the public names lazily, and is the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import txguard

PACKAGE = Path(txguard.__file__).resolve().parent
MODULES = frozenset(path.stem for path in PACKAGE.glob("*.py"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, tree: ast.Module) -> set[str]:
    """Return the txguard modules that ``module``'s code imports when it runs."""
    found: set[str] = set()
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            if node.level == 0:
                parts = parts[1:] if parts[:1] == ["txguard"] else None
            elif node.level > 1:
                parts = None
            if parts is not None:
                # `from . import _x` and `from txguard import _x` import a module; any
                # other name comes from the package's __init__.
                found.update(
                    [parts[0]] if parts
                    else [a.name if a.name in MODULES else "__init__" for a in node.names]
                )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "txguard":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        stack.extend(ast.iter_child_nodes(node))
    return {name for name in found if name in MODULES and name != module}


def import_graph() -> dict[str, set[str]]:
    """Map each txguard module to the txguard modules it imports."""
    return {
        path.stem: _imported(path.stem, ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.glob("*.py"))
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Return one import cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state:
                cycle = visit(target)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle is not None:
                return cycle
    return None


def test_txguard_modules_import_each_other_without_a_cycle() -> None:
    """No txguard module imports, directly or through others, a module that imports it."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle among txguard's modules: " + " -> ".join(cycle or [])


def test_core_modules_never_import_the_package() -> None:
    """Private modules import the modules they need, never ``txguard`` itself (the top layer)."""
    graph = import_graph()
    assert not [
        name for name, targets in graph.items() if name.startswith("_") and "__init__" in targets
    ]


def test_the_cycle_finder_names_a_cycle() -> None:
    """The check can fail: a two-module cycle is found and named in order."""
    assert find_cycle({"_a": {"_b"}, "_b": {"_a"}, "_c": set()}) == ["_a", "_b", "_a"]


def test_the_cycle_finder_accepts_layers() -> None:
    """A graph whose edges all point down has no cycle."""
    assert find_cycle({"_top": {"_mid", "_low"}, "_mid": {"_low"}, "_low": set()}) is None
