"""The `retrain` flow run against a throwaway three-stage DVC project in tmp_path."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from pipeline.flows import VENV_BIN, StageError, retrain

# Written out of alphabetical order, so a flow that sorted the names would fail the test.
CHAIN = {"zeta": [], "alpha": ["zeta.txt"], "mid": ["alpha.txt"]}

# Each stage appends its name to order.log (the run order, which DVC does not track),
# records which python ran it, and writes <name>.txt (its DVC out) from its deps.
STEP = """\
import sys
from pathlib import Path

name, *deps = sys.argv[1:]
print(f"stage {name} running")
with open("order.log", "a") as log:
    log.write(f"{name} {sys.executable}\\n")
Path(f"{name}.txt").write_text("".join(Path(d).read_text() for d in deps) + name)
"""


@pytest.fixture(scope="session", autouse=True)
def prefect_backend() -> Iterator[None]:
    # One temporary Prefect API + SQLite DB for the whole session: a fresh one per test
    # would pay the server start-up each time.
    with prefect_test_harness():
        yield


@pytest.fixture(scope="module", autouse=True)
def bare_path() -> Iterator[None]:
    # No venv on PATH: stages can only find the venv's python/dvc if the flow adds it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"]))
        mp.setenv("DVC_NO_ANALYTICS", "1")
        yield


class LineCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def task_log() -> Iterator[LineCollector]:
    """Lines sent to the Prefect task-run logger, i.e. the streamed `dvc repro` output."""
    handler = LineCollector()
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def make_project(root: Path, stages: dict[str, dict[str, object]]) -> Path:
    root.mkdir()
    (root / "step.py").write_text(STEP)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([VENV_BIN / "dvc", "init", "-q"], cwd=root, check=True)
    return root


def chain_stages() -> dict[str, dict[str, object]]:
    return {
        name: {
            "cmd": f"python step.py {name} {' '.join(deps)}",
            "deps": deps,
            "outs": [f"{name}.txt"],
        }
        for name, deps in CHAIN.items()
    }


def out_mtimes(project: Path) -> dict[str, int]:
    return {name: (project / f"{name}.txt").stat().st_mtime_ns for name in CHAIN}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One full run, shared: the ordering and the up-to-date tests both start from it."""
    project = make_project(tmp_path_factory.mktemp("flows") / "chain", chain_stages())
    return project, retrain(project_dir=project)


def test_stages_run_in_dvc_yaml_order(first_run: tuple[Path, dict]) -> None:
    project, summary = first_run
    order = list(CHAIN)
    assert summary["stages"] == order
    assert list(summary["durations_s"]) == order
    assert all(seconds > 0 for seconds in summary["durations_s"].values())

    log = [line.split(" ", 1) for line in (project / "order.log").read_text().splitlines()]
    assert [name for name, _ in log] == order
    assert {Path(exe).parent for _, exe in log} == {VENV_BIN}
    mtimes = out_mtimes(project)
    assert sorted(mtimes, key=mtimes.__getitem__) == order
    assert (project / "mid.txt").read_text() == "zetaalphamid"


def test_second_run_on_up_to_date_project_reruns_nothing(
    first_run: tuple[Path, dict], task_log: LineCollector
) -> None:
    project, _ = first_run
    before = out_mtimes(project), (project / "order.log").read_text()

    summary = retrain(project_dir=project)

    assert summary["stages"] == list(CHAIN)
    assert (out_mtimes(project), (project / "order.log").read_text()) == before
    for name in CHAIN:
        assert f"Stage '{name}' didn't change, skipping" in task_log.lines
    assert not any(line.startswith("stage ") for line in task_log.lines)


def test_failing_stage_fails_flow_naming_stage_and_output(
    tmp_path: Path, task_log: LineCollector
) -> None:
    stages = chain_stages()
    stages["alpha"]["cmd"] = "python -c \"import sys; print('boom'); sys.exit(3)\""
    project = make_project(tmp_path / "broken", stages)

    state = retrain(project_dir=project, return_state=True)

    assert state.is_failed()
    with pytest.raises(StageError, match="'alpha'") as err:
        state.result()
    assert "boom" in str(err.value)
    assert "boom" in task_log.lines  # streamed as it happened, not only in the error
    assert (project / "zeta.txt").exists()
    assert not (project / "mid.txt").exists()  # nothing runs after the failed stage
