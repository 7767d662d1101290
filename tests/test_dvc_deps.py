"""dvc.yaml lists, for every stage, each project module its command imports, however indirectly.

A module left out is code DVC does not watch: a change to it would leave the stage "up to date"
and its outputs stale. The imports are read with ast, so nothing is executed.
"""

import pytest
import yaml

from tests.helpers import REPO
from tests.helpers.imports import holds_code, import_closure, imported_modules


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


def test_package_deps_hold_the_service_the_bento_runs() -> None:
    """package builds the Bento around the service: its code, and the answers database's
    migrations the service runs (loaded by Alembic from their folder, not imported)."""
    needed = import_closure("service/service.py")
    needed = {f for f in needed if not f.endswith("__init__.py") or holds_code(REPO / f)}
    migrations = REPO / "vitrine/production/migrations"
    needed |= {
        p.relative_to(REPO).as_posix()
        for p in [*migrations.glob("*.py"), *migrations.glob("versions/*.py")]
        if holds_code(p)
    }
    assert "vitrine/production/migrations/env.py" in needed
    assert sorted(needed - set(stages()["package"]["deps"])) == []


def test_the_closure_follows_imports_through_other_modules() -> None:
    # dedupe reaches vitrine/ingest/hashing.py only through vitrine/ingest/sources.py.
    assert "vitrine/ingest/hashing.py" not in imported_modules(REPO / "stages/dedupe.py")
    assert "vitrine/ingest/hashing.py" in import_closure("stages/dedupe.py")
