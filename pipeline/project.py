"""What the flows read from DVC: the stages, their reports, metrics and status.

Everything comes from dvc.yaml through DVC itself (its Python index for the stage graph,
its CLI for metrics and status), so foreach/matrix stages, templated paths and new stages
need no change here.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DVC_YAML = "dvc.yaml"


@dataclass(frozen=True)
class Pipeline:
    stages: list[str]  # foreach/matrix items expanded (`train@cnn64`), upstream first
    reports: list[Path]  # metrics, plots and other uncached outputs, relative to the project


def read_pipeline(project_dir: Path) -> Pipeline:
    """The stages of the project's dvc.yaml in an order that runs every stage after its
    upstream stages and otherwise keeps the file's order (DVC expands foreach and matrix
    stages in place, so `train@a`, `train@b` sit where `train` is written)."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    dvc_yaml = (project_dir / DVC_YAML).resolve()
    with Repo(str(project_dir)) as repo:
        stages = [
            s
            for s in repo.index.stages
            if isinstance(s, PipelineStage) and Path(s.path).resolve() == dvc_yaml
        ]
        graph = repo.index.graph  # points from a stage to the stages it depends on
        ordered: list[PipelineStage] = []
        while len(ordered) < len(stages):
            # The first stage in file order whose upstream stages have all been placed.
            ordered.append(
                next(
                    s
                    for s in stages
                    if s not in ordered
                    and all(u in ordered for u in graph.successors(s) if u in stages)
                )
            )
        reports = [
            Path(out.def_path)
            for stage in ordered
            for out in stage.outs
            if out.metric or out.plot or not out.use_cache
        ]
    return Pipeline(stages=[s.name for s in ordered], reports=reports)


def _dvc_json(project_dir: Path, *args: str, env: dict[str, str]) -> Any:
    result = subprocess.run(
        ["dvc", "--wait-for-lock", *args, "--json"],
        cwd=project_dir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed: {result.stderr.strip()}")
    return json.loads(result.stdout or "{}")


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        return [row for key, value in data.items() for row in flatten(value, f"{prefix}{key}.")]
    if isinstance(data, str | int | float | bool):
        return [(prefix.rstrip("."), data)]
    return []  # lists (per-class tables, histories) belong in the report files themselves


def metrics(project_dir: Path, env: dict[str, str]) -> list[tuple[str, str, Any]]:
    """(file, metric, value) for every scalar in `dvc metrics show` of the workspace."""
    shown = _dvc_json(project_dir, "metrics", "show", env=env)
    files = shown.get("", {}).get("data", {})
    return [
        (file, name, value)
        for file, content in files.items()
        for name, value in flatten(content.get("data", {}))
    ]


def describe_change(change: str | dict[str, dict[str, str]]) -> str:
    if isinstance(change, str):
        return change  # e.g. "always changed"
    return "; ".join(
        f"{kind} " + ", ".join(f"{path} ({state})" for path, state in items.items())
        for kind, items in change.items()
    )


def status(project_dir: Path, env: dict[str, str]) -> list[str]:
    """One line per stage that `dvc status` reports out of date, saying what changed. A stage
    that is only "always changed" (the inventory, which runs every time to see what changed)
    is left out: what it finds shows in the stages after it."""
    changed = _dvc_json(project_dir, "status", env=env)
    return [
        f"{stage}: " + "; ".join(describe_change(c) for c in changes)
        for stage, changes in changed.items()
        if changes != ["always changed"]
    ]
