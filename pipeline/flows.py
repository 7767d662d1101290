"""Prefect flow `retrain`: every DVC stage of dvc.yaml, in file order, as `dvc repro <stage>`.

`python -m pipeline.flows [PROJECT_DIR]` runs one retrain locally. No Prefect server needs
to be set up: with no PREFECT_API_URL, Prefect 3's ephemeral mode starts a temporary API
server for the run and stops it at exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import sysconfig
import time
from collections import deque
from pathlib import Path
from typing import TypedDict

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import (
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The bin dir of the interpreter running this flow (`make flow` uses .venv/bin/python):
# first on PATH, it makes `dvc` and the stages' `python -m stages.x` resolve to the venv
# even when the caller's shell never activated it.
VENV_BIN = Path(sysconfig.get_path("scripts"))
TAIL_LINES = 20


class StageError(RuntimeError):
    """A `dvc repro <stage>` subprocess exited non-zero."""


class RetrainSummary(TypedDict):
    stages: list[str]
    durations_s: dict[str, float]


def read_stages(project_dir: Path) -> list[str]:
    """Stage names in dvc.yaml order: the file is written topologically, so no DAG walk."""
    with (project_dir / "dvc.yaml").open() as fh:
        return list(yaml.safe_load(fh)["stages"])


def stage_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.setdefault("DVC_NO_ANALYTICS", "1")
    # Stages write to a pipe here, which Python block-buffers: unbuffered, their lines
    # reach the run log as they happen instead of all at once when the stage exits.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def failure_message(stage: str, returncode: int, tail: deque[str]) -> str:
    lines = "\n".join(tail)
    return f"DVC stage {stage!r} failed (`dvc repro` exit code {returncode}); output tail:\n{lines}"


# NO_CACHE: DVC alone decides whether a stage is up to date, so Prefect must always ask it.
@task(task_run_name="dvc repro {stage}", cache_policy=NO_CACHE)
def repro_stage(stage: str, project_dir: Path) -> float:
    """Run `dvc repro <stage>` in project_dir, streaming its output; return seconds taken."""
    logger = get_run_logger()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    start = time.perf_counter()
    # Given env, Popen looks `dvc` up on that env's PATH, so the venv's dvc runs.
    with subprocess.Popen(
        ["dvc", "repro", stage],
        cwd=project_dir,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream keeps errors in order with the output
        text=True,
        errors="replace",
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                logger.info(line)
    if proc.returncode != 0:
        raise StageError(failure_message(stage, proc.returncode, tail))
    return round(time.perf_counter() - start, 3)


@flow(name="retrain")
def retrain(project_dir: Path = REPO_ROOT) -> RetrainSummary:
    """Run each dvc.yaml stage in order; the first failing stage fails the flow."""
    stages = read_stages(project_dir)
    get_run_logger().info("DVC stages, in order: %s", ", ".join(stages))
    # A direct task call blocks and re-raises on failure, so stages run strictly in
    # order and nothing after a failed stage starts.
    durations = {stage: repro_stage(stage, project_dir) for stage in stages}
    return {"stages": list(durations), "durations_s": durations}


def quiet_logging() -> None:
    """Keep run logs (stage output) at INFO; drop Prefect's own INFO chatter, such as the
    'Starting temporary server' banner that ephemeral mode prints on every run."""
    logging.getLogger("prefect").setLevel(logging.WARNING)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the DVC pipeline as a Prefect flow.")
    parser.add_argument("project_dir", nargs="?", type=Path, default=REPO_ROOT)
    args = parser.parse_args(argv)
    quiet_logging()
    local_run = {
        # Heartbeats let a worker notice crashed runs; nothing watches a local run, and
        # stopping the heartbeat thread would add up to 1 s to every exit.
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
        # The temporary server's telemetry can only fail (and log an error) offline.
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    with temporary_settings(updates=local_run):
        try:
            summary = retrain(project_dir=args.project_dir.resolve())
        except StageError:
            return 1  # the run log above already holds the error and the stage's output
    for stage, seconds in summary["durations_s"].items():
        print(f"{stage:<12} {seconds:8.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
