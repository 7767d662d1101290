"""The project's import graph, read with ast so that nothing is executed."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("stages", "vitrine", "service", "pipeline", "benchmarks", "scripts")


def imported_names(source: Path) -> set[str]:
    """Every absolute module name `source` imports, at any depth (functions included), and for
    `from pkg import name` also pkg.name, which may be a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imported_modules(source: Path) -> set[str]:
    """Project files that `source` imports: modules and, for `from pkg import mod`, mod itself."""
    files = set()
    for name in imported_names(source):
        parts = name.split(".")
        if parts[0] not in PACKAGES:
            continue
        # Importing a.b runs a/__init__.py first.
        files.update(f"{'/'.join(parts[:i])}/__init__.py" for i in range(1, len(parts)))
        files.add("/".join(parts) + ".py")
    return {f for f in files if (REPO / f).is_file()}


def import_closure(entry: str) -> set[str]:
    """`entry` and every project file it imports, however indirectly."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_modules(REPO / path))
    return seen


def holds_code(source: Path) -> bool:
    """Whether a file does more than document itself (a docstring-only __init__ changes nothing)."""
    body = ast.parse(source.read_text()).body
    return any(not is_docstring(node) for node in body)


def is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
