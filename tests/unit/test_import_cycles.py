"""No import cycles among membrane's modules: layers stay layers (trace never reaches into the
CLI, the demo's parts do not lean on each other), and a module can always be imported alone.

The graph is read from the source with `ast`, not by importing, so it also sees imports
inside functions (they run later, but they are dependencies all the same) and costs no
kernel, no root and no heavy import. Imports under `if TYPE_CHECKING:` never run and are
left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import membrane

SRC = Path(membrane.__file__).resolve().parent
ROOT = "membrane"


def module_files() -> dict[str, Path]:
    """Module name → file, for every module and package of membrane."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those only a type checker runs."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _import_nodes(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _import_nodes(node)


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The membrane modules `name` imports: for `from X import Y` the submodule X.Y when
    there is one, else X itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            # `import a.b.c` depends on the most specific membrane module it names
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith(ROOT) and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {name: imports_of(name, path, names) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each strongly connected component of more than one
    module (Tarjan's algorithm, iterative), as a path a -> b -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return [_shortest_cycle(graph, set(c), c[0]) for c in components]


def _shortest_cycle(graph: dict[str, set[str]], within: set[str], start: str) -> list[str]:
    """Breadth-first from `start` back to itself, staying inside its component."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & within):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in a component without a cycle")


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    graph = import_graph()
    # cli/probe.py imports membrane.bpf.probe inside its command function
    assert "membrane.bpf.probe" in graph["membrane.cli.probe"]
    assert "membrane.errors" in graph["membrane.api.client"]


def test_the_cycle_finder_reports_paths() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "e2", "e"]]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_nothing_below_the_cli_imports_it() -> None:
    """The CLI is the top layer: what it and another package both need lives below both."""
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        if not name.startswith(f"{ROOT}.cli") and name != f"{ROOT}.__main__"
        for target in targets
        if target.startswith(f"{ROOT}.cli")
    )
    assert not upward, "imports of the CLI from below it:\n" + "\n".join(upward)
