"""dvc.yaml lists, for every stage, each project module its command imports, however indirectly.

A module left out is code DVC does not watch: a change to it would leave the stage "up to date"
and its outputs stale. The imports are read with ast, so nothing is executed.
"""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "vitrine", "service")


def imported_modules(source: Path) -> set[str]:
    """Project files that `source` imports: modules and, for `from pkg import mod`, mod itself."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    files = set()
    for name in names:
        parts = name.split(".")
        if parts[0] not in PACKAGES:
            continue
        # Importing a.b runs a/__init__.py first.
        files.update(f"{'/'.join(parts[:i])}/__init__.py" for i in range(1, len(parts)))
        files.add("/".join(parts) + ".py")
    return {f for f in files if (REPO / f).is_file()}


def holds_code(source: Path) -> bool:
    """Whether a file does more than document itself (a docstring-only __init__ changes nothing)."""
    body = ast.parse(source.read_text()).body
    return any(not is_docstring(node) for node in body)


def is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)


def import_closure(entry: str) -> set[str]:
    seen: set[str] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_modules(REPO / path))
    return seen


def stages() -> dict[str, dict]:
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in raw.items()}


def entry_module(cmd: str) -> str:
    """`python -m stages.train ${key}` -> stages/train.py."""
    words = cmd.split()
    return words[words.index("-m") + 1].replace(".", "/") + ".py"


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_hold_every_project_module_it_imports(name: str) -> None:
    stage = stages()[name]
    needed = import_closure(entry_module(stage["cmd"]))
    needed = {f for f in needed if not f.endswith("__init__.py") or holds_code(REPO / f)}
    assert sorted(needed - set(stage["deps"])) == []


def test_the_closure_follows_imports_through_other_modules() -> None:
    # dedupe reaches vitrine/ingest/hashing.py only through vitrine/ingest/sources.py.
    assert "vitrine/ingest/hashing.py" not in imported_modules(REPO / "stages/dedupe.py")
    assert "vitrine/ingest/hashing.py" in import_closure("stages/dedupe.py")
