"""The `retrain` and `retrain_if_changed` flows run against throwaway DVC projects in tmp_path."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.testing.utilities import prefect_test_harness

from pipeline.config import FlowConfig, load_flow_config
from pipeline.flows import (
    REPORT_KEY,
    VENV_BIN,
    StageError,
    main,
    report_markdown,
    retrain,
    retrain_if_changed,
)
from pipeline.project import read_pipeline
from pipeline.workspace import OverrideError, WorkspaceBusy, release_dead_dvc_locks
from tests.helpers import PREFECT_START_TIMEOUT_S
from tests.helpers.feedback import record_answer
from vitrine.production.records import RecordStore
from vitrine.production.reviews import add_review

REPO = Path(__file__).resolve().parents[1]

# Each stage appends its name to order.log (the run order, which DVC does not track),
# records which python ran it, and writes its DVC out from its deps.
STEP = """\
import sys
from pathlib import Path

name, out, *deps = sys.argv[1:]
print(f"stage {name} running")
with open("order.log", "a") as log:
    log.write(f"{name} {sys.executable}\\n")
Path(out).write_text("".join(Path(d).read_text() for d in deps if Path(d).is_file()) + name)
"""

# Records the value of params `x` it sees, and pauses while a file named `hang` exists.
SEE_PARAM = """\
import os, time, yaml
from pathlib import Path

Path("started").write_text(str(os.getpid()))
with open("runs.log", "a") as log:
    log.write(f"{os.getpid()}\\n")
while Path("hang").exists():
    time.sleep(0.1)
Path("seen.txt").write_text(str(yaml.safe_load(open("params.yaml"))["x"]))
"""

FLOW = {
    "timezone": "UTC",
    "retrain_cron": "0 3 * * 1",
    "check_cron": "*/15 * * * *",
    "timeout_s": {"default": 120},
    "retries": {},
    "retry_backoff_s": 0,
    "lock_wait_s": 0,
    "commit_lock": False,
    "push_remote": "",
}


@pytest.fixture(scope="session", autouse=True)
def prefect_backend() -> Iterator[None]:
    # One temporary Prefect API + SQLite DB for the whole session: a fresh one per test
    # would pay the server start-up each time.
    with prefect_test_harness(server_startup_timeout=PREFECT_START_TIMEOUT_S):
        yield


@pytest.fixture(scope="module", autouse=True)
def bare_path() -> Iterator[None]:
    # No venv on PATH: stages can only find the venv's python/dvc if the flow adds it.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"]))
        mp.setenv("DVC_NO_ANALYTICS", "1")
        for who in ("AUTHOR", "COMMITTER"):
            mp.setenv(f"GIT_{who}_NAME", "flow test")
            mp.setenv(f"GIT_{who}_EMAIL", "flow@test")
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


def git(project: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=project, check=True, capture_output=True, text=True
    ).stdout


def make_project(
    root: Path,
    stages: dict[str, dict[str, Any]],
    flow: dict[str, Any] | None = None,
    **params: Any,
) -> Path:
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "photos.csv").write_text("id,label\n1,phone\n")
    (root / "step.py").write_text(STEP)
    (root / "see_param.py").write_text(SEE_PARAM)
    all_params = {"paths": {"raw": "raw"}, **params, "flow": {**FLOW, **(flow or {})}}
    (root / "params.yaml").write_text(
        "# committed parameters\n" + yaml.safe_dump(all_params, sort_keys=False)
    )
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    git(root, "init", "-q")
    subprocess.run([VENV_BIN / "dvc", "init", "-q"], cwd=root, check=True)
    return root


def step(name: str, deps: list[str], out: str | None = None) -> dict[str, Any]:
    out = out or f"{name}.txt"
    return {"cmd": f"python step.py {name} {out} {' '.join(deps)}", "deps": deps, "outs": [out]}


def chain_stages() -> dict[str, dict[str, Any]]:
    """Written out of alphabetical order, with a foreach stage whose items are unsorted."""
    alpha = step("alpha@${item}", ["zeta.txt"], out="alpha_${item}.txt")
    return {
        "zeta": step("zeta", ["raw"]),
        "alpha": {"foreach": "${models}", "do": alpha},
        "mid": step("mid", ["alpha_y.txt", "alpha_x.txt"]),
    }


CHAIN_ORDER = ["zeta", "alpha@y", "alpha@x", "mid"]
CHAIN_OUTS = ["zeta.txt", "alpha_y.txt", "alpha_x.txt", "mid.txt"]


def out_mtimes(project: Path) -> dict[str, int]:
    return {out: (project / out).stat().st_mtime_ns for out in CHAIN_OUTS}


def run_order(project: Path) -> list[str]:
    log = project / "order.log"
    return [line.split(" ", 1)[0] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One full run, shared: the ordering and the up-to-date tests both start from it."""
    root = tmp_path_factory.mktemp("flows") / "chain"
    project = make_project(root, chain_stages(), models=["y", "x"])
    return project, retrain(project_dir=project)


def test_stages_run_in_dvc_yaml_order_with_foreach_expanded(first_run: tuple[Path, dict]) -> None:
    project, summary = first_run
    assert summary["stages"] == CHAIN_ORDER
    assert list(summary["durations_s"]) == CHAIN_ORDER
    assert all(seconds > 0 for seconds in summary["durations_s"].values())

    log = [line.split(" ", 1) for line in (project / "order.log").read_text().splitlines()]
    assert [name for name, _ in log] == CHAIN_ORDER
    assert {Path(exe).parent for _, exe in log} == {VENV_BIN}
    mtimes = out_mtimes(project)
    assert sorted(mtimes, key=mtimes.__getitem__) == CHAIN_OUTS
    assert (project / "mid.txt").read_text() == "zetaalpha@yzetaalpha@xmid"


def test_stage_written_before_its_upstream_runs_after_it(tmp_path: Path) -> None:
    train = step("train@${item.size}", ["raw"], out="train_${item.size}.txt")
    stages = {
        "report": step("report", ["model.txt"]),
        "model": step("model", ["raw"]),
        "train": {"matrix": {"size": [2, 1]}, **train},
    }
    project = make_project(tmp_path / "p", stages)

    pipeline = read_pipeline(project)

    assert pipeline.stages == ["model", "report", "train@2", "train@1"]


def test_second_run_on_up_to_date_project_reruns_nothing(
    first_run: tuple[Path, dict], task_log: LineCollector
) -> None:
    project, _ = first_run
    before = out_mtimes(project), (project / "order.log").read_text()

    summary = retrain(project_dir=project)

    assert summary["stages"] == CHAIN_ORDER
    assert (out_mtimes(project), (project / "order.log").read_text()) == before
    for name in CHAIN_ORDER:
        assert f"Stage '{name}' didn't change, skipping" in task_log.lines
    assert not any(line.startswith("stage ") for line in task_log.lines)


def test_failing_stage_fails_flow_naming_stage_and_output(
    tmp_path: Path, task_log: LineCollector
) -> None:
    stages = chain_stages()
    stages["alpha"]["do"]["cmd"] = "python -c \"import sys; print('boom'); sys.exit(3)\""
    project = make_project(tmp_path / "broken", stages, models=["y", "x"])

    state = retrain(project_dir=project, return_state=True)

    assert state.is_failed()
    with pytest.raises(StageError, match="'alpha@y' failed") as err:
        state.result()
    assert "boom" in str(err.value)
    assert "boom" in task_log.lines  # streamed as it happened, not only in the error
    assert (project / "zeta.txt").exists()
    assert not (project / "mid.txt").exists()  # nothing runs after the failed stage


def test_collect_is_retried_with_backoff_until_it_succeeds(tmp_path: Path) -> None:
    # Fails on its first attempt only, like a download hitting a transient error.
    flaky = (
        "python -c \"from pathlib import Path; p = Path('attempts'); "
        "n = int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n)); "
        'raise SystemExit(n == 1)" && python step.py collect collect.txt'
    )
    stages = {"collect": {"cmd": flaky, "outs": ["collect.txt"]}, "train": step("train", [])}
    project = make_project(tmp_path / "p", stages, flow={"retries": {"collect": 2}})

    summary = retrain(project_dir=project)

    assert summary["stages"] == ["collect", "train"]
    assert (project / "attempts").read_text() == "2"
    assert run_order(project) == ["collect", "train"]


def test_retries_and_timeouts_apply_to_every_item_of_a_foreach_stage() -> None:
    timeouts = {"default": 60.0, "train": 600.0}
    config = FlowConfig(
        **{**FLOW, "timeout_s": timeouts, "retries": {"collect": 3}, "retry_backoff_s": 5.0}
    )
    assert config.stage_timeout_s("train@cnn64") == 600
    assert config.stage_timeout_s("evaluate") == 60
    assert config.retry_delays_s("collect") == [5, 10, 20]
    assert config.retry_delays_s("train@cnn64") == []


def test_stage_past_its_timeout_is_stopped_and_named(tmp_path: Path) -> None:
    slow = "python -c \"import os, time; open('pid', 'w').write(str(os.getpid())); time.sleep(60)\""
    stages = {"slow": {"cmd": slow, "outs": ["never.txt"]}}
    project = make_project(tmp_path / "p", stages, flow={"timeout_s": {"default": 120, "slow": 2}})

    start = time.monotonic()
    state = retrain(project_dir=project, return_state=True)

    assert time.monotonic() - start < 30
    with pytest.raises(StageError, match="'slow' ran past its 2 s timeout"):
        state.result()
    pid = int((project / "pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def see_param_project(root: Path, **flow: Any) -> Path:
    stages = {"see": {"cmd": "python see_param.py", "params": ["x"], "outs": ["seen.txt"]}}
    return make_project(root, stages, flow=flow, x=1, unused=0)


def test_overrides_reach_the_stage_and_leave_params_yaml_untouched(tmp_path: Path) -> None:
    project = see_param_project(tmp_path / "p")
    committed = (project / "params.yaml").read_bytes()

    retrain(project_dir=project, overrides={"x": 5})

    assert (project / "seen.txt").read_text() == "5"
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["see"]["params"] == {
        "params.yaml": {"x": 5}
    }
    assert (project / "params.yaml").read_bytes() == committed


def test_override_of_a_missing_key_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    project = see_param_project(tmp_path / "p")
    committed = (project / "params.yaml").read_bytes()

    state = retrain(project_dir=project, overrides={"train.lr": 0.1}, return_state=True)

    with pytest.raises(OverrideError, match="no key 'train'"):
        state.result()
    assert (project / "params.yaml").read_bytes() == committed
    assert not (project / "seen.txt").exists()


def start_flow_process(project: Path, *args: str) -> subprocess.Popen[str]:
    """`python -m pipeline.flows` in its own process group, against the test's Prefect API."""
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.flows", str(project), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.slow
def test_run_killed_mid_stage_is_repaired_by_the_next_run(tmp_path: Path) -> None:
    project = see_param_project(tmp_path / "p")
    committed = (project / "params.yaml").read_bytes()
    (project / "hang").touch()
    proc = start_flow_process(project, "-S", "x=7")
    wait_for(project / "started")
    stage_pid = int((project / "started").read_text())

    os.killpg(proc.pid, signal.SIGKILL)  # the run, dvc and the stage, as a killed worker
    proc.wait()
    assert (project / "params.yaml").read_bytes() != committed  # left overridden
    assert not psutil.pid_exists(stage_pid) or psutil.Process(stage_pid).status() == "zombie"
    (project / "hang").unlink()

    retrain(project_dir=project)

    assert (project / "params.yaml").read_bytes() == committed
    assert (project / "seen.txt").read_text() == "1"
    assert subprocess.run([VENV_BIN / "dvc", "status", "-q"], cwd=project).returncode == 0


def test_dvc_locks_of_killed_processes_are_released_even_as_zombies(tmp_path: Path) -> None:
    project = see_param_project(tmp_path / "p")
    killed = subprocess.Popen(["sleep", "60"])
    killed.kill()  # not waited for: a zombie until reaped, which psutil still lists
    wait_until = time.monotonic() + 10
    while psutil.Process(killed.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < wait_until
        time.sleep(0.05)
    rwlock = {
        "write": {"seen.txt": {"pid": killed.pid, "cmd": "dvc repro see"}},
        "read": {"params.yaml": [{"pid": os.getpid(), "cmd": "dvc status"}]},
    }
    (project / ".dvc" / "tmp" / "rwlock").write_text(json.dumps(rwlock))

    released = release_dead_dvc_locks(project)
    killed.wait()

    assert released == [f"dvc repro see (pid {killed.pid})"]
    left = json.loads((project / ".dvc" / "tmp" / "rwlock").read_text())
    assert left == {
        "write": {},
        "read": {"params.yaml": [{"pid": os.getpid(), "cmd": "dvc status"}]},
    }


def test_second_run_while_one_runs_exits_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = see_param_project(tmp_path / "p")
    (project / "hang").touch()
    first: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: first.update(retrain(project_dir=project)))
    runner.start()
    try:
        wait_for(project / "started")

        state = retrain(project_dir=project, return_state=True)
        check = retrain_if_changed(project_dir=project)
        capsys.readouterr()
        assert main([str(project)]) == 1  # the command: one line, before any flow run
        said = capsys.readouterr().err.strip().splitlines()
    finally:
        (project / "hang").unlink()
        runner.join(60)

    with pytest.raises(WorkspaceBusy, match=r"another retrain is running .*pid \d+"):
        state.result()
    assert check["retrained"] is False
    assert "another retrain is running" in check["reasons"][0]
    assert len(said) == 1 and said[0].startswith("error: another retrain is running in")
    assert first["stages"] == ["see"]
    assert (project / "seen.txt").read_text() == "1"


@pytest.mark.slow
def test_second_process_waits_for_the_first_then_finds_nothing_to_do(tmp_path: Path) -> None:
    project = see_param_project(tmp_path / "p", lock_wait_s=120)
    (project / "hang").touch()
    first = start_flow_process(project)
    wait_for(project / "started")
    second = start_flow_process(project)
    time.sleep(3)  # the second is now waiting for the lock, not running the stage
    assert second.poll() is None
    (project / "hang").unlink()

    outputs = [proc.communicate(timeout=120)[0] for proc in (first, second)]

    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert "Stage 'see' didn't change, skipping" in outputs[1]
    assert len((project / "runs.log").read_text().splitlines()) == 1  # the stage ran once


def test_retrain_if_changed_runs_only_when_sources_or_params_changed(tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"zeta": step("zeta", ["raw"])}, unused=0)

    first = retrain_if_changed(project_dir=project)
    unchanged = retrain_if_changed(project_dir=project)
    (project / "raw" / "photos.csv").write_text("id,label\n1,phone\n2,laptop\n")
    source_changed = retrain_if_changed(project_dir=project)
    params = (project / "params.yaml").read_text().replace("unused: 0", "unused: 1")
    (project / "params.yaml").write_text(params)
    params_changed = retrain_if_changed(project_dir=project)

    assert first["retrained"] and first["reasons"][-1] == "no successful flow run recorded yet"
    assert not unchanged["retrained"]
    assert unchanged["reasons"][0].startswith("nothing changed since the last successful run")
    assert source_changed["retrained"]
    assert any(r.startswith("zeta: changed deps raw") for r in source_changed["reasons"])
    assert params_changed["retrained"]
    assert len(params_changed["reasons"]) == 1
    assert params_changed["reasons"][0].startswith("params.yaml changed since the last")
    assert run_order(project) == ["zeta", "zeta"]  # the params change reran nothing in DVC


def test_an_override_run_is_not_a_baseline_so_the_next_check_retrains(tmp_path: Path) -> None:
    project = see_param_project(tmp_path / "p")
    retrain(project_dir=project)
    retrain(project_dir=project, overrides={"x": 3})

    check = retrain_if_changed(project_dir=project)

    assert check["retrained"]
    assert any(r.startswith("see: changed deps params.yaml") for r in check["reasons"])
    assert (project / "seen.txt").read_text() == "1"


def recording_project(root: Path) -> Path:
    """A one-stage project whose params record answers into answers.sqlite, photos in photos/,
    and export the reviewed ones to raw/reviewed/catalog.csv."""
    project = make_project(root, {"zeta": step("zeta", ["raw"])})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["serve"] = {"record": {"url": "sqlite:///answers.sqlite", "photos": "photos"}}
    params["feedback"] = {"catalog": "reviewed/catalog.csv", "report": "feedback.json"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def review_new_answer(project: Path, seed: int, label: str) -> None:
    store = RecordStore(f"sqlite:///{project / 'answers.sqlite'}")
    try:
        store.migrate()
        add_review(store, record_answer(store, project / "photos", seed).request_id, label, "ana")
    finally:
        store.close()


def test_reviewed_labels_are_exported_before_the_stages_and_reported(tmp_path: Path) -> None:
    project = recording_project(tmp_path / "p")
    review_new_answer(project, 1, "phone")

    summary = retrain(project_dir=project)
    unchanged = retrain_if_changed(project_dir=project)
    review_new_answer(project, 2, "laptop")
    reviewed = retrain_if_changed(project_dir=project)

    assert summary["feedback"] == {
        "exported": 1,
        "left_out": 0,
        "catalog": "raw/reviewed/catalog.csv",
        "skipped": "",
    }
    with get_client(sync_client=True) as client:
        path = {"id": summary["artifact_id"]}
        markdown = client.request("GET", "/artifacts/{id}", path_params=path).json()["data"]
    assert "## Reviewed labels" in markdown
    assert "1 reviewed production photo(s) with the moderators' labels went in" in markdown
    assert not unchanged["retrained"]  # the same reviews export the same bytes
    assert reviewed["retrained"]
    assert any(r.startswith("zeta: changed deps raw") for r in reviewed["reasons"])
    # what `dvc status` cannot see behind the inventory stage, the sources' fingerprint does
    assert any(r.startswith("sources under raw changed") for r in reviewed["reasons"])
    assert reviewed["summary"] and reviewed["summary"]["feedback"]
    assert reviewed["summary"]["feedback"]["exported"] == 2
    assert run_order(project) == ["zeta", "zeta"]


def test_a_retrain_without_the_answers_database_trains_on_the_last_export(tmp_path: Path) -> None:
    project = recording_project(tmp_path / "p")

    summary = retrain(project_dir=project)

    assert summary["feedback"] is not None
    assert summary["feedback"]["exported"] == 0
    assert summary["feedback"]["skipped"].startswith("no answers database at")
    assert run_order(project) == ["zeta"]
    assert not (project / "answers.sqlite").exists()


def test_a_project_that_records_no_answers_exports_nothing(first_run: tuple[Path, dict]) -> None:
    _, summary = first_run
    assert summary["feedback"] is None


def publishing_project(root: Path, promoted: bool, remote: Path) -> Path:
    evaluate = (
        'python -c "import json; '
        "json.dump({'accuracy': 0.875, 'per_class': {'phone': 0.9}}, open('metrics.json', 'w')); "
        f"json.dump({{'promoted': {promoted}, 'reason': 'beats the champion'}}, "
        "open('promotion.json', 'w'))\""
    )
    stages = {
        "evaluate": {
            "cmd": evaluate,
            "deps": ["raw"],
            "outs": [{"promotion.json": {"cache": False}}],
            "metrics": [{"metrics.json": {"cache": False}}],
        },
        "package": step("package", ["metrics.json"]),
    }
    project = make_project(root, stages, flow={"commit_lock": True, "push_remote": "store"})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["paths"]["promotion"] = "promotion.json"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(
        [VENV_BIN / "dvc", "remote", "add", "-q", "store", remote], cwd=project, check=True
    )
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "initial")
    return project


def test_promotion_pushes_outputs_and_commits_dvc_lock(tmp_path: Path) -> None:
    project = publishing_project(tmp_path / "p", promoted=True, remote=tmp_path / "remote")

    summary = retrain(project_dir=project)

    assert summary["promoted"]
    assert summary["published"] == ["pushed outputs to DVC remote 'store'", "committed dvc.lock"]
    assert git(project, "log", "-1", "--name-only", "--format=%s").split("\n")[2] == "dvc.lock"
    assert git(project, "status", "--porcelain", "--", "dvc.lock") == ""
    status = subprocess.run(
        [VENV_BIN / "dvc", "status", "-c", "-r", "store", "--json"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout.strip() == "{}"  # every output is on the remote
    assert any((tmp_path / "remote").rglob("*"))


def test_no_promotion_publishes_nothing(tmp_path: Path) -> None:
    project = publishing_project(tmp_path / "p", promoted=False, remote=tmp_path / "remote")
    head = git(project, "rev-parse", "HEAD")

    summary = retrain(project_dir=project)

    assert not summary["promoted"]
    assert summary["published"] == []
    assert git(project, "rev-parse", "HEAD") == head
    assert not (tmp_path / "remote").exists()


def test_report_artifact_holds_metrics_promotion_and_links(tmp_path: Path) -> None:
    project = publishing_project(tmp_path / "p", promoted=True, remote=tmp_path / "remote")

    summary = retrain(project_dir=project)

    with get_client(sync_client=True) as client:
        path = {"id": summary["artifact_id"]}
        artifact = client.request("GET", "/artifacts/{id}", path_params=path).json()
    assert artifact["key"] == REPORT_KEY
    markdown = artifact["data"]
    assert "| metrics.json | accuracy | 0.875 |" in markdown
    assert "| metrics.json | per_class.phone | 0.9 |" in markdown
    assert "**promoted**" in markdown and "| reason | beats the champion |" in markdown
    assert f"[metrics.json]({(project / 'metrics.json').as_uri()})" in markdown
    assert "| evaluate |" in markdown and "| package |" in markdown


def test_report_without_promotion_says_so() -> None:
    markdown = report_markdown({"train": 1.0}, [], None, [], {"train.lr": 0.1})
    assert "No promotion decision" in markdown
    assert 'overrides for this run only: `{"train.lr": 0.1}`' in markdown


def test_repository_params_have_a_valid_flow_block() -> None:
    config = load_flow_config(REPO)
    assert config.stage_timeout_s("train@cnn64") >= config.stage_timeout_s("collect") > 0
