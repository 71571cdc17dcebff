"""The layering rules of ARCHITECTURE.md, checked on the source: a static import graph over training/, serving/ and
pipelines/, read with `ast` so that imports inside functions (the lazy imports that used to hide cycles) count too.

Rules checked here:
- no import cycle among these modules;
- nothing in training/ or serving/ imports pipelines/ (pipelines composes; nothing composes it);
- serving/ names neither torch nor training/, not even inside a function. tests/test_serving_imports.py checks the
  same at run time, where it also catches a third-party module that drags torch in; this file catches the lazy
  imports that the run-time probe never executes.

`if TYPE_CHECKING:` blocks are skipped: they never run, so they cannot form a cycle or pull torch into serving.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "serving", "pipelines")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_runtime(tree: ast.AST):
    """ast.walk without the bodies of `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imported_names(name: str) -> set[str]:
    """Every module `name` imports, anywhere in the file: dotted names as written, and for `from X import Y` also
    X.Y (which is a module when Y is a submodule). Relative imports are resolved against the package."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk_runtime(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@cache
def graph() -> dict[str, frozenset[str]]:
    """Edges between our own modules only. `from training import loop` → training.loop; `import training.x` →
    training.x (the package __init__ files are empty or re-export within their package, so they are nodes too)."""
    known = modules()
    return {name: frozenset(m for m in imported_names(name) if m in known and m != name) for name in known}


def find_cycle(edges: dict[str, frozenset[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None. Iterative DFS with colours."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(edges, white)
    for start in sorted(edges):
        if colour[start] != white:
            continue
        path = [start]
        iterators = [iter(sorted(edges[start]))]
        colour[start] = grey
        while iterators:
            nxt = next(iterators[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iterators.pop()
            elif colour[nxt] == grey:
                return [*path[path.index(nxt) :], nxt]
            elif colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                iterators.append(iter(sorted(edges[nxt])))
    return None


def test_the_graph_sees_imports_inside_functions() -> None:
    # pipelines.cli imports its commands' modules lazily; a graph without them would be vacuous.
    assert len(modules()) > 50
    assert any(graph()[name] for name in graph() if name.startswith("pipelines."))
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"})}) == ["a", "b", "c", "a"]


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_nothing_imports_pipelines() -> None:
    offenders = sorted(
        f"{name} -> {target}"
        for name in modules()
        if not name.startswith("pipelines")
        for target in imported_names(name)
        if target.split(".")[0] == "pipelines"
    )
    assert not offenders, "training/ and serving/ must not import pipelines/: " + ", ".join(offenders)


def test_serving_names_neither_torch_nor_training() -> None:
    offenders = sorted(
        f"{name} -> {target}"
        for name in modules()
        if name.split(".")[0] == "serving"
        for target in imported_names(name)
        if target.split(".")[0] in ("torch", "training")
    )
    assert not offenders, "serving/ must stay torch-free and training-free: " + ", ".join(offenders)
