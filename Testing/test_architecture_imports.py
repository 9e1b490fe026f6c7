"""The package's import graph has no cycle among module-level imports.

Built from the source with `ast` (nothing is imported): an edge a -> b for each import that runs when
module a is loaded (module level, inside `try`/`if` too, but not under `if TYPE_CHECKING:`), plus the
packages whose `__init__` such an import runs on the way (not a's own parents: those are loading
already). Imports inside functions run later, when the importing module is complete; they are how a
module may call "upward", so they are not edges here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "UniversalSegLib"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (packages named by their __init__)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _load_time_imports(body: list[ast.stmt]):
    """Import statements that run while the module body runs (not in functions, classes' methods or TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _load_time_imports(node.body)
            yield from _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _load_time_imports(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            yield from _load_time_imports(node.body)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules an import statement loads (the named module, or `from X import submodule`)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: resolve against this module's package
            base = module.split(".")
            base = base if is_package else base[:-1]
            base = base[:len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = [source] + [f"{source}.{alias.name}" for alias in node.names]
    return {name for name in names if name in modules}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules its load-time imports load (with the packages' __init__ run on the way)."""
    files = module_names(root)
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        own_parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for node in _load_time_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            for target in _targets(node, module, is_package, modules):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    step = ".".join(parts[:i])
                    if step in modules and step not in own_parents and step != module:
                        graph[module].add(step)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted; [] when the graph is acyclic."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_graph_sees_the_package_init_an_import_runs(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text(f"from {PACKAGE}.top import x\n")
    (pkg / "sub" / "leaf.py").write_text("from . import sibling\n")
    (pkg / "sub" / "sibling.py").write_text("")
    (pkg / "top.py").write_text(f"from {PACKAGE}.sub.leaf import y\nif TYPE_CHECKING:\n    import {PACKAGE}.late\n")
    (pkg / "late.py").write_text("")
    graph = import_graph(pkg)
    assert graph[f"{PACKAGE}.top"] == {f"{PACKAGE}.sub", f"{PACKAGE}.sub.leaf"}  # not `late`: annotations only
    assert graph[f"{PACKAGE}.sub.leaf"] == {f"{PACKAGE}.sub.sibling"}  # its own package is loading already
    assert cycles(graph) == [[f"{PACKAGE}.sub", f"{PACKAGE}.top"]]


def test_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (module-level imports): " + "; ".join(" <-> ".join(c) for c in found)
