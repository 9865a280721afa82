"""The import graph of our own modules: edges point one way, and nothing goes in circles.

Read from the source with `ast` (every import statement, also those inside
functions), so the test needs none of the packages it looks at. Imports under
``if TYPE_CHECKING:`` are left out: they never run, and an annotation may name
a type of a module that depends on this one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# Source roots and the part of the namespace each holds (generated wire code excluded).
ROOTS = {
    "client": REPO_ROOT / "client",
    "server": REPO_ROOT / "server",
    "trainer": REPO_ROOT / "trainer",
    "proto": REPO_ROOT / "proto",
}
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for root in ROOTS.values():
        for path in sorted((root / "convserve").rglob("*.py")):
            if not path.name.endswith(GENERATED):
                found[_module_name(root, path)] = path
    return found


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The modules of ours that `module` imports (a `from X import Y` of a submodule counts
    as importing X.Y)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if _type_checking_only(node):
            assert isinstance(node, ast.If)
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {name for name in found if name in known and name != module}


def _type_checking_only(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` block (or ``if typing.TYPE_CHECKING:``)."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", "")
    return name == "TYPE_CHECKING"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def test_the_graph_was_read(graph: dict[str, set[str]]) -> None:
    assert "convserve.server.served" in graph
    assert "convserve.server.engines" in graph["convserve.server.models"]
    assert "convserve.v1.tensor_codec" in graph["convserve.client.convert"]


def test_the_server_never_imports_the_client(graph: dict[str, set[str]]) -> None:
    wrong = {
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if module.startswith("convserve.server") and target.startswith("convserve.client")
    }
    assert wrong == set()


def test_the_client_and_the_wire_code_import_neither_server_nor_trainer(
    graph: dict[str, set[str]],
) -> None:
    wrong = {
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if module.startswith(("convserve.client", "convserve.v1"))
        and target.startswith(("convserve.server", "convserve.trainer"))
    }
    assert wrong == set()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
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
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others(graph: dict[str, set[str]]) -> None:
    assert _cycles(graph) == []


def test_a_cycle_would_be_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
