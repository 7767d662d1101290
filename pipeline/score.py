"""The `score_catalog` flow: every photo of a source answered by the deployed model.

    python -m pipeline.score SOURCE --output FILE.parquet [--model DIR]
        [--kind folder|archive|catalog] [--category-column NAME] [--scheduler ADDRESS]
        [--download-cache DIR]

scores a folder, an archive or a CSV/JSONL catalog (paths or URLs) with the packaged model
(default paths.package) and writes one Parquet row per record: the service's answer (label,
confidence, probabilities, abstain, model version) or, for a photo that cannot be read, its
quarantine reason; with a declared category column, whether the answer matches it. A killed
run, started again with the same arguments, resumes where it stopped. The per-photo work runs
on Dask (compute.scheduler); the chunk size, batch size and category column come from
params.yaml `score:`, URLs' download settings from collect.download. It prints a summary and
writes it beside the output (<stem>.summary.json). No Prefect server is needed for the command;
the flow runs the same code as a Prefect task and adds a Markdown artifact (key
`score-summary`). See docs/how-to/score-catalog.md and vitrine.scoring.
"""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from vitrine.config import (
    ConfigError,
    from_mapping,
    load_params,
    load_paths,
    params_block,
    run_cli,
    stage_config,
)
from vitrine.contracts import read_packaged
from vitrine.ingest.download import DownloadConfig
from vitrine.scoring.run import ScoreJob, score, summary_path
from vitrine.scoring.sources import KINDS, ScoreSource, guess_kind
from vitrine.scoring.summary import describe

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORT_KEY = "score-summary"  # the artifact's key: the UI lists every version under it


@params_block
class ScoreConfig:
    """params.yaml `score:`."""

    chunk_photos: int  # records per Dask task and per part file
    batch_size: int  # photos per ONNX Runtime call
    category_column: str  # the catalog column of declared categories
    cron: str = ""  # the score-catalog/daily deployment's schedule ("": none)
    source: str = ""  # what that deployment scores
    output: str = "reports/scores/{date}.parquet"  # where; {date}: the run's UTC date


def load_score_config(project_dir: Path) -> ScoreConfig:
    return stage_config(ScoreConfig, "score", load_params(project_dir / "params.yaml"))


def dated(output: str, now: datetime | None = None) -> str:
    """`output` with `{date}` replaced by the UTC date (YYYY-MM-DD): a scheduled run writes a
    file of its own each day, and a re-run on the same day resumes that day's file."""
    day = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d")
    return output.replace("{date}", day)


def _within(project_dir: Path, path: str | Path) -> Path:
    return Path(path) if Path(path).is_absolute() else project_dir / path


def load_job(
    project_dir: Path,
    source: str | Path,
    output: str | Path,
    *,
    model: str | Path | None = None,
    kind: str | None = None,
    category_column: str | None = None,
    scheduler: str | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> ScoreJob:
    """The job as params.yaml and the arguments say; relative paths are from project_dir."""
    params = load_params(project_dir / "params.yaml")
    paths = load_paths(params)
    config = stage_config(ScoreConfig, "score", params)
    configured = params["compute"]["scheduler"]
    if not isinstance(configured, str):
        raise ConfigError(f"compute.scheduler: expected str, got {configured!r}")
    download = from_mapping(DownloadConfig, params["collect"]["download"], "collect.download")
    where = _within(project_dir, source)
    return ScoreJob(
        source=ScoreSource(where, kind or guess_kind(where)),
        output=_within(project_dir, output),
        model=_within(project_dir, model if model is not None else paths.package),
        cache=_within(project_dir, cache if cache is not None else paths.download_cache),
        download=download,
        scheduler=configured if scheduler is None else scheduler,
        chunk_photos=config.chunk_photos,
        batch_size=config.batch_size,
        category_column=category_column or config.category_column,
        progress=progress,
    )


@task(cache_policy=NO_CACHE)
def score_source(job: ScoreJob) -> dict[str, Any]:
    return score(job)


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Scored {summary['source']}",
        "",
        f"Output: `{summary['output']}`",
        "",
        "```",
        describe(summary),
        "```",
    ]
    return "\n".join(lines) + "\n"


@flow(name="score-catalog")
def score_catalog(
    source: str,
    output: str,
    model: str | None = None,
    kind: str | None = None,
    category_column: str | None = None,
    cache: str | None = None,
    project_dir: Path = REPO_ROOT,
) -> dict[str, Any]:
    """Score every photo of `source` into `output` (Parquet; `{date}` in it becomes the run's
    UTC date) with the deployed model (or the packaged model folder `model`), catalog URLs
    fetched into `cache` (paths.download_cache); relative paths are from project_dir. Returns
    the summary and the artifact's id."""
    logger = get_run_logger()
    job = load_job(
        project_dir,
        source,
        dated(output),
        model=model,
        kind=kind,
        category_column=category_column,
        cache=cache,
    )
    summary = score_source(job)
    artifact_id = create_markdown_artifact(
        summary_markdown(summary), key=REPORT_KEY, description="A catalog scored by the model"
    )
    logger.info("%s", describe(summary))
    return {**summary, "artifact_id": str(artifact_id)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score every photo of a source with the model.")
    parser.add_argument("source", type=Path, help="a folder, an archive or a CSV/JSONL catalog")
    parser.add_argument("--output", type=Path, required=True, help="the Parquet file to write")
    parser.add_argument("--model", type=Path, help="a packaged model folder (paths.package)")
    parser.add_argument("--kind", choices=KINDS, help="default: from the path")
    parser.add_argument("--category-column", help="default: score.category_column")
    parser.add_argument("--scheduler", help="default: compute.scheduler")
    parser.add_argument("--download-cache", type=Path, help="default: paths.download_cache")
    parser.add_argument("--project-dir", type=Path, default=Path.cwd(), help="its params.yaml")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    project = args.project_dir.resolve()
    here = Path.cwd()
    try:
        job = load_job(
            project,
            here / args.source,
            here / args.output,
            model=here / args.model if args.model else None,
            kind=args.kind,
            category_column=args.category_column,
            scheduler=args.scheduler,
            cache=here / args.download_cache if args.download_cache else None,
            progress=not args.no_progress,
        )
        read_packaged(job.model)  # a folder that is no packaged model, before any photo
    except (ValueError, OSError) as err:  # a source, output, model or setting that cannot be
        parser.error(str(err).splitlines()[0] if str(err) else type(err).__name__)
    summary = score(job)
    print(describe(summary))
    print(f"output: {job.output}; summary: {summary_path(job.output)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
