"""Rules of the tree that a reviewer would otherwise have to remember (docs/architecture.md).

- No tracked Python file edits the import path (`sys.path.insert/append/...`, assigning to or slicing
  sys.path, `site.addsitedir`), not even in a string handed to `python -c`: scripts import the package
  and their own folder's modules, experiments run as `python -m experiments...` from the repository
  root, tests get extra folders from pytest's `pythonpath` (pyproject.toml), subprocesses from PYTHONPATH.
- Tests import neither experiments/ (one-off scripts, not the product) nor benchmarks/.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATH_EDIT_IN_TEXT = re.compile(r"\bsys\.path\s*(\.\s*(insert|append|extend|remove|pop|clear)\b|\[|\+?=(?!=))")
IMPORTS_SYS = re.compile(r"\bimport\s+(?:[\w.]+\s*,\s*)*sys\b")  # `import sys`, `import json, sys, time`
PATH_METHODS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__", "__iadd__"}


def tracked_python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, encoding="utf-8")
    if listed.returncode != 0:  # not a git checkout (an sdist): every .py file under the tree
        return [p for p in REPO.rglob("*.py") if ".venv" not in p.parts]
    return [REPO / line for line in listed.stdout.splitlines() if (REPO / line).exists()]


def _is_sys_path(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "path" and \
        isinstance(node.value, ast.Name) and node.value.id == "sys"


def path_edits(source: str) -> list[int]:
    """Line numbers where `source` edits sys.path: in code, or in a string of code run elsewhere (one that
    imports sys, as `python -c` code must). Prose about sys.path in docstrings and comments is fine.

    Args:
        source: a Python module's text.
    """
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func
            if target.attr in PATH_METHODS and _is_sys_path(target.value):
                lines.append(node.lineno)
            elif target.attr == "addsitedir" and isinstance(target.value, ast.Name) and target.value.id == "site":
                lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if _is_sys_path(t) or (isinstance(t, ast.Subscript) and _is_sys_path(t.value)):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and IMPORTS_SYS.search(node.value) \
                and PATH_EDIT_IN_TEXT.search(node.value):  # code for `python -c`, which must import sys itself
            lines.append(node.lineno)
    return sorted(set(lines))


SYS_PATH = "sys." + "path"  # spelled apart: this file's examples are not edits of its own


@pytest.mark.parametrize("code", ["import sys\n{p}.insert(0, 'x')", "import sys\n{p}[:0] = ['x']",
                                  "import sys\n{p} += ['x']", "import sys\n{p}.append('x')",
                                  "import site\nsite.addsitedir('x')",
                                  "code = 'import sys; {p}[:0] = [1]; import t'",
                                  "CHILD = '''import json, sys\n{p}.insert(0, \"x\")'''"])
def test_the_check_sees_each_kind_of_path_edit(code):
    assert path_edits(code.format(p=SYS_PATH))


def test_the_check_leaves_reading_sys_path_alone():
    code = f"import sys\nprint({SYS_PATH}[0], 'x' in {SYS_PATH})\n# {SYS_PATH}.insert in a comment"
    prose = f'"""Never call {SYS_PATH}.insert(0, folder) here."""'
    assert path_edits(code) == [] and path_edits(prose) == []


def test_no_tracked_python_file_edits_sys_path():
    found = {str(p.relative_to(REPO)): lines for p in tracked_python_files()
             if (lines := path_edits(p.read_text(encoding="utf-8")))}
    assert found == {}, f"sys.path edited at (file: lines) {found}; see docs/architecture.md, 'Imports'"


def test_tests_import_neither_experiments_nor_benchmarks():
    imports = {}
    for path in sorted((REPO / "Testing").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split(".")[0] in ("experiments", "benchmarks", "_common")]
            if bad:
                imports.setdefault(path.name, []).extend(bad)
    assert imports == {}
