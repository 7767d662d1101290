"""The architecture, checked from the import graph: stages are independent programs over the
library, the service runs only the library's runtime, and every module stays readable."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO
from tests.helpers.imports import holds_code, import_closure, imported_names, is_docstring

MAX_LINES = 500
CODE = ("vitrine", "stages", "service", "pipeline")


def modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def top_packages(source: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_names(source)}


@pytest.mark.parametrize("source", modules("stages"), ids=rel)
def test_a_stage_imports_no_other_stage_and_no_service(source: Path) -> None:
    assert not {"stages", "service", "pipeline"} & top_packages(source)


@pytest.mark.parametrize("source", modules("benchmarks", "pipeline", "scripts"), ids=rel)
def test_benchmarks_and_flows_use_the_library_not_stage_internals(source: Path) -> None:
    """They call vitrine, or a stage's command line (`python -m stages.<name>`)."""
    assert not {"stages", "service"} & top_packages(source)


@pytest.mark.parametrize("source", modules("vitrine"), ids=rel)
def test_the_library_imports_no_stage_service_or_flow(source: Path) -> None:
    assert not {"stages", "service", "pipeline", "benchmarks", "scripts"} & top_packages(source)


@pytest.mark.parametrize("source", modules("service"), ids=rel)
def test_the_service_runs_the_library_runtime_only(source: Path) -> None:
    """What the Bento ships: service/, vitrine's top-level modules, vitrine.runtime (the model
    as evaluate ran it) and vitrine.production (the record of every answer, which the service
    writes as it answers); never the training side (model, data, curation, evaluation...)."""
    assert not {"stages", "pipeline"} & top_packages(source)
    library = {n for n in imported_names(source) if n.startswith("vitrine.")}
    allowed = (
        "vitrine.contracts",
        "vitrine.config",
        "vitrine.images",
        "vitrine.runtime",
        "vitrine.production",
    )
    assert sorted(n for n in library if not n.startswith(allowed)) == []


def test_the_bento_ships_every_module_the_service_imports() -> None:
    """bentofile.yaml's include patterns cover the service's import closure and the answers
    database's migrations, which Alembic loads from their folder at the service's start."""
    patterns = yaml.safe_load((REPO / "bentofile.yaml").read_text())["include"]
    shipped = {p.relative_to(REPO).as_posix() for g in patterns for p in REPO.glob(g)}
    needed = import_closure("service/service.py")
    needed |= {rel(p) for p in (REPO / "vitrine/production/migrations").rglob("*.py")}
    assert "vitrine/production/migrations/versions/v0001_answers.py" in needed
    assert sorted(needed - shipped) == []


@pytest.mark.parametrize("source", modules(*CODE), ids=rel)
def test_no_module_is_over_500_lines(source: Path) -> None:
    assert len(source.read_text().splitlines()) <= MAX_LINES


@pytest.mark.parametrize("package", sorted((REPO / "vitrine").glob("*/__init__.py")), ids=rel)
def test_each_library_package_says_what_it_owns_and_holds_no_code(package: Path) -> None:
    body = ast.parse(package.read_text()).body
    assert body and is_docstring(body[0]) and "Owns" in ast.get_docstring(ast.Module(body, []))
    assert not holds_code(package)


@pytest.mark.parametrize("source", modules("tests"), ids=rel)
def test_tests_share_helpers_through_tests_helpers_only(source: Path) -> None:
    shared = {n for n in imported_names(source) if n.startswith("tests.")}
    assert sorted(n for n in shared if not n.startswith("tests.helpers")) == []


def test_an_import_inside_a_function_is_seen(tmp_path: Path) -> None:
    source = tmp_path / "sneaky.py"
    source.write_text("def f():\n    from stages.train import main\n    import service.core\n")
    assert {"stages", "service"} <= top_packages(source)


def test_every_page_template_is_package_data() -> None:
    """The pages render from the installed package too (the Bento, a wheel), not only here."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["vitrine"]
    shipped = {path.resolve() for p in patterns for path in (REPO / "vitrine").glob(p)}
    templates = {path.resolve() for path in (REPO / "vitrine").rglob("*.j2")}
    assert len(templates) >= 2 and templates <= shipped
