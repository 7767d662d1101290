"""Scheduled runs: the `retrain`, `retrain_if_changed`, `monitor` and `score_catalog` deployments.

`python -m pipeline.deploy [PROJECT_DIR]` serves them in this process until stopped (Ctrl-C):
the two retraining flows on the crons of params.yaml's `flow:` block, the drift monitor on
`monitor.cron`, and, when `score.cron` and `score.source` are set, the scoring of that source
on `score.cron` (into `score.output`, dated), all in `flow.timezone`. Point PREFECT_API_URL at
a Prefect server first (`prefect server start`) to see runs in its UI; without one, Prefect's
ephemeral mode keeps the runs only while this process lives.

`python -m pipeline.deploy --work-pool POOL` instead registers the deployments with the
Prefect server and its process work pool POOL, and returns; a worker started with
`prefect worker start --pool POOL` on a machine with this repository and its venv runs them.
"""

from __future__ import annotations

import argparse
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from pipeline.config import load_flow_config
from pipeline.flows import REPO_ROOT, retrain, retrain_if_changed
from pipeline.monitor import load_monitor_config, monitor
from pipeline.score import load_score_config, score_catalog
from vitrine.config import run_cli


def build_deployments(project_dir: Path = REPO_ROOT) -> list[RunnerDeployment]:
    config = load_flow_config(project_dir)
    monitor_cron = load_monitor_config(project_dir).cron
    parameters = {"project_dir": str(project_dir)}
    # A module entrypoint (`pipeline.flows.retrain`) lets a process worker import the flow
    # from the installed package: no image and no code storage to set up.
    return [
        _built(
            retrain.to_deployment(
                name="scheduled",
                schedules=[Cron(config.retrain_cron, timezone=config.timezone)],
                description="Run every DVC stage; DVC skips what is up to date.",
                parameters=parameters,
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        ),
        _built(
            retrain_if_changed.to_deployment(
                name="on-change",
                schedules=[Cron(config.check_cron, timezone=config.timezone)],
                description="Retrain only if sources, params or code changed since the last run.",
                parameters=parameters,
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        ),
        _built(
            monitor.to_deployment(
                name="drift",
                schedules=[Cron(monitor_cron, timezone=config.timezone)],
                description="Recorded answers against the test set; retrain on drift.",
                parameters=parameters,
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        ),
        *_scoring(project_dir, config.timezone),
    ]


def _scoring(project_dir: Path, timezone: str) -> list[RunnerDeployment]:
    """The daily scoring of a catalog, when params.yaml's `score:` schedules one."""
    score = load_score_config(project_dir)
    if not (score.cron and score.source):
        return []
    return [
        _built(
            score_catalog.to_deployment(
                name="daily",
                schedules=[Cron(score.cron, timezone=timezone)],
                description="Every photo of score.source answered by the deployed model.",
                parameters={
                    "source": score.source,
                    "output": score.output,
                    "project_dir": str(project_dir),
                },
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    ]


def _built(
    deployment: RunnerDeployment | Coroutine[Any, Any, RunnerDeployment],
) -> RunnerDeployment:
    """Flow.to_deployment's result: it returns a coroutine instead when called in an event loop."""
    if isinstance(deployment, Coroutine):
        deployment.close()
        raise RuntimeError("build_deployments must be called outside a running event loop")
    return deployment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve or register the scheduled flows.")
    parser.add_argument("project_dir", nargs="?", type=Path, default=REPO_ROOT)
    parser.add_argument(
        "--work-pool", metavar="POOL", help="register with this process work pool, do not serve"
    )
    args = parser.parse_args(argv)
    deployments = build_deployments(args.project_dir.resolve())
    if args.work_pool:
        # RunnerDeployment.apply, not prefect.deploy: with the pinned fastapi, deploy's
        # check for online workers sends a request the server rejects (HTTP 422).
        for deployment in deployments:
            deployment.apply(work_pool_name=args.work_pool)
            print(f"registered {deployment.flow_name}/{deployment.name} in pool {args.work_pool}")
        print(f"the worker runs them in {args.project_dir.resolve()}: start it in that checkout")
    else:
        serve(*deployments)
    return 0


if __name__ == "__main__":
    run_cli(main)
