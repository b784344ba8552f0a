"""The core is a one-way stack: no import cycle among ``llmc_core`` modules, counting the imports
inside functions (they run too), not those under ``if TYPE_CHECKING:`` (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import llmc_core

SRC = Path(llmc_core.__file__).resolve().parent
ROOT_NAME = "llmc_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement except those in the body of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``llmc_core`` modules that ``name`` imports when it runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known and "." in t:  # ``import a.b.c`` of a name inside a module
                t = t.rpartition(".")[0]
            if t in known and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_sources():
    edges = graph()
    assert ROOT_NAME in edges and f"{ROOT_NAME}.run" in edges and len(edges) > 20
    # a module-level import, a function-level one, and one skipped under TYPE_CHECKING
    assert f"{ROOT_NAME}.errors" in edges[f"{ROOT_NAME}.config"]
    assert f"{ROOT_NAME}.checkpoint" in edges[f"{ROOT_NAME}.run"]
    assert f"{ROOT_NAME}.run" not in edges[f"{ROOT_NAME}.hookspecs"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_llmc_core_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle in llmc_core: " + " -> ".join(cycle)


def test_only_cli_and_run_import_run():
    """Plugins, savers, the checkpoint and the report are typed against ``llmc_core.state.RunState``."""
    files = sorted(SRC.rglob("*.py")) + sorted((SRC.parent / "llmc_plugins").rglob("*.py"))
    allowed = {SRC / "cli.py", SRC / "run.py"}
    users = [str(p.relative_to(SRC.parent)) for p in files if p not in allowed and _names_run(p)]
    assert users == [], f"modules that import llmc_core.run.Run (plugins get a RunState): {users}"


def _names_run(path: Path) -> bool:
    """Whether ``path`` imports ``Run`` from ``llmc_core.run`` anywhere (TYPE_CHECKING included)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == f"{ROOT_NAME}.run" and any(a.name == "Run" for a in node.names):
            return True
    return False
