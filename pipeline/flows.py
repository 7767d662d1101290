"""Prefect flows that run the DVC pipeline: `retrain` and `retrain_if_changed`.

Each dvc.yaml stage (foreach/matrix items expanded) is one task running
`dvc repro --single-item <stage>`, upstream stages first, so DVC alone decides what is
out of date and a Prefect run and a hand-run `dvc repro` always agree. Before the stages,
when params.yaml records answers (serve.record), a task exports the moderators' reviewed
labels into the catalog collect reads (pipeline/feedback.py); the run's report says how many
reviewed photos went in.

`python -m pipeline.flows [PROJECT_DIR] [-S key=value ...] [--if-changed]` runs once,
locally. No Prefect server needs to be set up: with no PREFECT_API_URL, Prefect 3's
ephemeral mode starts a temporary API server for the run and stops it at exit.
`python -m pipeline.deploy` serves both flows on their schedules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import sysconfig
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, TypedDict

import psutil
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import (
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)

from pipeline import feedback, project
from pipeline.config import FlowConfig, load_flow_config
from pipeline.workspace import (
    OverrideError,
    WorkspaceBusy,
    fingerprint,
    load_last_success,
    params_overridden,
    record_success,
    release_dead_dvc_locks,
    restore_interrupted_overrides,
    workspace_lock,
)
from vitrine.config import add_overrides_option, load_params, run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
# The bin dir of the interpreter running this flow (`make flow` uses .venv/bin/python):
# first on PATH, it makes `dvc` and the stages' `python -m stages.x` resolve to the venv
# even when the caller's shell never activated it.
VENV_BIN = Path(sysconfig.get_path("scripts"))
TAIL_LINES = 20
KILL_GRACE_S = 10  # between SIGTERM and SIGKILL for a stage that ran past its timeout
REPORT_KEY = "retrain-report"  # the artifact's key: the UI lists every version under it


class StageError(RuntimeError):
    """A `dvc repro <stage>` subprocess failed or ran past its timeout."""


class PublishError(RuntimeError):
    """`dvc push` or `git commit` after a promotion failed."""


class FeedbackOutcome(TypedDict):
    """What the export of the moderators' labels did (pipeline/feedback.py)."""

    exported: int  # reviewed answers in the catalog, each with its photo
    left_out: int  # reviewed answers without a photo (retention deleted it before an export)
    catalog: str
    skipped: str  # why nothing was exported ("" when it ran): the previous catalog stands


class RetrainSummary(TypedDict):
    stages: list[str]
    durations_s: dict[str, float]
    promoted: bool
    published: list[str]  # what was done after a promotion (push, commit)
    artifact_id: str
    feedback: FeedbackOutcome | None  # None: recording is not configured in params.yaml


class ChangeCheck(TypedDict):
    retrained: bool
    reasons: list[str]  # why it retrained, or why not
    summary: RetrainSummary | None


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # Stages write to a pipe here, which Python block-buffers: unbuffered, their lines
    # reach the run log as they happen instead of all at once when the stage exits.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def failure_message(stage: str, problem: str, tail: deque[str]) -> str:
    lines = "\n".join(tail)
    return f"DVC stage {stage!r} {problem}; output tail:\n{lines}"


def stop_process_tree(pid: int) -> None:
    """SIGTERM `dvc` and everything it started (the stage, its workers), SIGKILL stragglers."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=KILL_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


# NO_CACHE: DVC alone decides whether a stage is up to date, so Prefect must always ask it.
@task(task_run_name="dvc repro {stage}", cache_policy=NO_CACHE)
def repro_stage(stage: str, project_dir: Path, timeout_s: float) -> float:
    """Run `dvc repro --single-item <stage>` in project_dir, streaming its output to the run
    log; stop it after timeout_s. Return the seconds taken.

    The timeout is enforced here, not with Prefect's timeout_seconds: that one cannot
    interrupt a thread blocked reading a pipe, and would leave `dvc` and the stage running.
    """
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    timed_out = threading.Event()
    start = time.perf_counter()
    # Given env, Popen looks `dvc` up on that env's PATH, so the venv's dvc runs.
    # --single-item: upstream stages ran as the tasks before this one.
    with subprocess.Popen(
        ["dvc", "--wait-for-lock", "repro", "--single-item", stage],
        cwd=project_dir,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream keeps errors in order with the output
        text=True,
        errors="replace",
        bufsize=1,
    ) as proc:

        def stop() -> None:
            timed_out.set()
            stop_process_tree(proc.pid)

        watchdog = threading.Timer(timeout_s, stop)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                if line:
                    tail.append(line)
                    logger.info(line)
        except BaseException:  # cancelled or interrupted: leave no stage running behind
            stop_process_tree(proc.pid)
            raise
        finally:
            watchdog.cancel()
    # Whatever dvc's exit code after the watchdog's SIGTERM, the stage did not finish.
    if timed_out.is_set():
        raise StageError(failure_message(stage, f"ran past its {timeout_s:g} s timeout", tail))
    if proc.returncode != 0:
        raise StageError(failure_message(stage, f"failed (exit code {proc.returncode})", tail))
    return round(time.perf_counter() - start, 3)


@task(task_run_name="export reviewed labels", cache_policy=NO_CACHE)
def export_reviewed_labels(project_dir: Path) -> FeedbackOutcome:
    """The moderators' labels as the catalog collect reads (pipeline/feedback.py), written
    before anything looks at paths.raw. An export that cannot run (no answers database on this
    machine, the database down, another database) is a warning, not a failure: the last
    export's catalog stands and the run trains on it."""
    logger = get_run_logger()
    try:
        report = feedback.export_from_params(project_dir)
    except feedback.FeedbackError as err:
        catalog = feedback.catalog_path(project_dir)
        logger.warning("Reviewed labels not exported: %s; the last export's catalog stands", err)
        return {
            "exported": len(feedback.previous_ids(catalog)),
            "left_out": 0,
            "catalog": str(catalog.relative_to(project_dir)),
            "skipped": str(err),
        }
    for line in feedback.summary_lines(report):
        logger.info(line)
    return {
        "exported": report["exported"],
        "left_out": report["left_out"],
        "catalog": report["catalog"],
        "skipped": "",
    }


def export_if_recorded(project_dir: Path) -> FeedbackOutcome | None:
    """export_reviewed_labels when params.yaml records answers (serve.record) and has a
    feedback block; None otherwise."""
    if feedback.recording_problem(load_params(project_dir / "params.yaml")):
        return None
    return export_reviewed_labels(project_dir)


def run_stages(project_dir: Path, stages: list[str], config: FlowConfig) -> dict[str, float]:
    durations = {}
    for stage in stages:
        delays = config.retry_delays_s(stage)
        task_for_stage = repro_stage.with_options(retries=len(delays), retry_delay_seconds=delays)
        # A direct task call blocks and re-raises on failure, so stages run strictly in
        # order and nothing after a failed stage starts.
        durations[stage] = task_for_stage(stage, project_dir, config.stage_timeout_s(stage))
    return durations


def read_promotion(project_dir: Path, paths: dict[str, Any]) -> dict[str, Any] | None:
    """evaluate's promotion decision (`paths.promotion`), if the pipeline writes one."""
    path = project_dir / paths["promotion"] if "promotion" in paths else None
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text())


def report_link(project_dir: Path, report: Path) -> str | None:
    target = project_dir / report
    if target.is_dir():
        target = target / "index.html"
    return f"[{report}]({target.resolve().as_uri()})" if target.exists() else None


def report_markdown(
    durations: dict[str, float],
    metric_rows: list[tuple[str, str, Any]],
    promotion: dict[str, Any] | None,
    links: list[str],
    overrides: dict[str, Any] | None,
    reviewed: FeedbackOutcome | None = None,
) -> str:
    """The run's Markdown artifact: reviewed labels, stages, metrics, promotion decision,
    report links."""
    lines = ["# Retrain report", ""]
    if overrides:
        lines += [f"Parameter overrides for this run only: `{json.dumps(overrides)}`", ""]
    if reviewed is not None:
        lines += ["## Reviewed labels", "", feedback_markdown(reviewed), ""]
    lines += ["## Stages", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in durations.items()]
    lines += ["", "## Metrics", "", "| file | metric | value |", "|---|---|---:|"]
    lines += [f"| {file} | {name} | {value} |" for file, name, value in metric_rows]
    lines += ["", "## Promotion", ""]
    if promotion is None:
        lines.append("No promotion decision: the pipeline wrote none.")
    else:
        verdict = "promoted" if promotion.get("promoted") else "not promoted (champion kept)"
        lines += [f"**{verdict}**", "", "| field | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in project.flatten(promotion)]
    lines += ["", "## Reports", ""]
    lines += [f"- {link}" for link in links]
    return "\n".join(lines) + "\n"


def feedback_markdown(reviewed: FeedbackOutcome) -> str:
    photos = f"{reviewed['exported']} reviewed production photo(s) with the moderators' labels"
    if reviewed["skipped"]:
        return (
            f"Not exported this run: {reviewed['skipped']}. The last export's catalog went in: "
            f"{photos} (`{reviewed['catalog']}`)."
        )
    gone = reviewed["left_out"]
    left_out = f"; {gone} reviewed answer(s) left out, their photo gone" if gone else ""
    return f"{photos} went in: `{reviewed['catalog']}`, a source collect reads{left_out}."


def _run(args: list[str], project_dir: Path, what: str) -> str:
    result = subprocess.run(
        args, cwd=project_dir, env=stage_env(), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise PublishError(f"{what} failed: {(result.stderr or result.stdout).strip()}")
    return result.stdout


@task(cache_policy=NO_CACHE)
def publish_promotion(project_dir: Path, config: FlowConfig) -> list[str]:
    """Push the promoted outputs to the DVC remote, then commit dvc.lock, as params say.
    Push first: a commit must never name data the remote does not have."""
    done = []
    if config.push_remote:
        _run(["dvc", "--wait-for-lock", "push", "-r", config.push_remote], project_dir, "dvc push")
        done.append(f"pushed outputs to DVC remote {config.push_remote!r}")
    if config.commit_lock:
        _run(["git", "add", "dvc.lock"], project_dir, "git add dvc.lock")
        if _run(["git", "status", "--porcelain", "--", "dvc.lock"], project_dir, "git status"):
            message = f"retrain: promote the new model (flow run {flow_run.get_name()})"
            _run(
                ["git", "commit", "-q", "-m", message, "--", "dvc.lock"], project_dir, "git commit"
            )
            done.append("committed dvc.lock")
    return done


def repair_interrupted_run(project_dir: Path) -> None:
    """Undo what a killed run can leave behind; DVC reruns its unfinished stage itself."""
    logger = get_run_logger()
    if restore_interrupted_overrides(project_dir):
        logger.warning("Restored params.yaml, left overridden by an interrupted run")
    # One line per dead dvc process, not per output it had locked (a killed repro holds many).
    for holder, entries in Counter(release_dead_dvc_locks(project_dir)).items():
        logger.warning(
            "Released DVC's locks on %d path(s) held by %s, which is no longer running",
            entries,
            holder,
        )


@flow(name="retrain")
def retrain(
    project_dir: Path = REPO_ROOT, overrides: dict[str, Any] | None = None
) -> RetrainSummary:
    """Run every dvc.yaml stage, upstream first; the first failing stage fails the flow.

    overrides: `{"candidates.cnn64.lr": 0.0005}`, applied for this run only, as `dvc exp run -S`
    would (see `params_overridden`); params.yaml is byte-identical afterwards. Such a run
    is an experiment: it does not count as the last successful run and never commits or
    pushes, since the committed params.yaml would not match its dvc.lock.
    """
    logger = get_run_logger()
    config = load_flow_config(project_dir)
    with workspace_lock(project_dir, config.lock_wait_s, owner=f"flow run {flow_run.get_name()}"):
        repair_interrupted_run(project_dir)
        # Before the fingerprint: the export is part of what this run trains on.
        reviewed = export_if_recorded(project_dir)
        paths = load_params(project_dir / "params.yaml")["paths"]
        started_from = fingerprint(project_dir, Path(paths["raw"]))
        with params_overridden(project_dir, overrides):
            pipeline = project.read_pipeline(project_dir)
            logger.info("DVC stages, in order: %s", ", ".join(pipeline.stages))
            durations = run_stages(project_dir, pipeline.stages, config)
            metric_rows = project.metrics(project_dir, stage_env())
        promotion = read_promotion(project_dir, paths)
        promoted = bool(promotion and promotion.get("promoted"))
        links = [link for r in pipeline.reports if (link := report_link(project_dir, r))]
        artifact_id = create_markdown_artifact(
            report_markdown(durations, metric_rows, promotion, links, overrides, reviewed),
            key=REPORT_KEY,
            description="Metrics, promotion decision and reports of a retrain",
        )
        published: list[str] = []
        if not overrides:
            record_success(project_dir, started_from)
            if promoted:
                published = publish_promotion(project_dir, config)
    return {
        "stages": list(durations),
        "durations_s": durations,
        "promoted": promoted,
        "published": published,
        "artifact_id": str(artifact_id),
        "feedback": reviewed,
    }


def why_retrain(project_dir: Path) -> list[str]:
    """What changed since the last successful run: stages `dvc status` finds out of date,
    and params.yaml or the raw sources differing from the hashes recorded at that run."""
    reasons = project.status(project_dir, stage_env())
    raw = Path(load_params(project_dir / "params.yaml")["paths"]["raw"])
    last = load_last_success(project_dir)
    if last is None:
        return [*reasons, "no successful flow run recorded yet"]
    now = fingerprint(project_dir, raw)
    if now.params != last.fingerprint.params:
        reasons.append(f"params.yaml changed since the last successful run ({last.finished_at})")
    if now.sources != last.fingerprint.sources:
        reasons.append(
            f"sources under {raw} changed since the last successful run ({last.finished_at})"
        )
    return reasons


@flow(name="retrain-if-changed")
def retrain_if_changed(project_dir: Path = REPO_ROOT) -> ChangeCheck:
    """Retrain only if sources, params or code changed since the last successful run.
    While another run is going, it does nothing: that run, or the next check, covers it."""
    logger = get_run_logger()
    config = load_flow_config(project_dir)
    owner = f"flow run {flow_run.get_name()}"
    try:
        with workspace_lock(project_dir, config.lock_wait_s, owner=owner):
            repair_interrupted_run(project_dir)
            export_if_recorded(project_dir)  # new reviews change the sources under paths.raw
            reasons = why_retrain(project_dir)
            if not reasons:
                last = load_last_success(project_dir)
                why = f"nothing changed since the last successful run ({last and last.finished_at})"
                logger.info("Not retraining: %s", why)
                return {"retrained": False, "reasons": [why], "summary": None}
            logger.info("Retraining because:\n%s", "\n".join(reasons))
            return {"retrained": True, "reasons": reasons, "summary": retrain(project_dir)}
    except WorkspaceBusy as busy:
        logger.info("Not retraining now: %s", busy)
        return {"retrained": False, "reasons": [str(busy)], "summary": None}


def quiet_logging() -> None:
    """Keep run logs (stage output) at INFO; drop Prefect's own INFO chatter, such as the
    'Starting temporary server' banner that ephemeral mode prints on every run."""
    logging.getLogger("prefect").setLevel(logging.WARNING)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the DVC pipeline as a Prefect flow.")
    parser.add_argument("project_dir", nargs="?", type=Path, default=REPO_ROOT)
    add_overrides_option(parser)
    parser.add_argument(
        "--if-changed", action="store_true", help="run retrain_if_changed instead of retrain"
    )
    args = parser.parse_args(argv)
    if args.if_changed and args.overrides:
        parser.error("--if-changed takes no overrides")
    quiet_logging()
    local_run = {
        # Heartbeats let a worker notice crashed runs; nothing watches a local run, and
        # stopping the heartbeat thread would add up to 1 s to every exit.
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
        # The temporary server's telemetry can only fail (and log an error) offline.
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    project_dir = args.project_dir.resolve()
    load_params(project_dir / "params.yaml", args.overrides)  # a bad file: one line, no flow run
    with temporary_settings(updates=local_run):
        try:
            if args.if_changed:
                check = retrain_if_changed(project_dir=project_dir)
                verdict = "retrained" if check["retrained"] else "not retrained"
                print("\n".join([verdict, *check["reasons"]]))
                summary = check["summary"]
            else:
                # A busy workspace said here is one line; raised inside the flow, Prefect logs
                # its traceback first. The flow takes the lock again for its whole run.
                wait_s = load_flow_config(project_dir).lock_wait_s
                with workspace_lock(project_dir, wait_s, owner="python -m pipeline.flows"):
                    pass
                summary = retrain(project_dir=project_dir, overrides=dict(args.overrides) or None)
        except (StageError, PublishError):
            return 1  # the run log above already holds the error and the stage's output
        except (WorkspaceBusy, OverrideError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    durations = summary["durations_s"] if summary else {}
    width = max(map(len, durations), default=0)
    for stage, seconds in durations.items():
        print(f"{stage:<{width}} {seconds:8.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
