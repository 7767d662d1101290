"""The `monitor` flow: recorded answers of a recent window against the evaluated test set.

`python -m pipeline.monitor [PROJECT_DIR] [--until ISO-TIME]` runs it once (no Prefect server
needed, as for `python -m pipeline.flows`); `python -m pipeline.deploy` serves it on
`monitor.cron`. It reads the answers database (serve.record.url, or VITRINE_RECORD_URL; a
relative SQLite path is from the project folder) and the photos the service kept, evaluate's
test predictions (paths.predictions) and the prepared test photos (paths.prepared), and writes

- `monitor.report` (JSON): every figure, the thresholds and minimums, each check and whether it
  was crossed, and whether retraining was started;
- `monitor.page` (HTML): the same with plots (class mix, confidence, volume per hour);
- a Prefect Markdown artifact (key `monitor-report`) with the checks.

When a threshold is crossed and `monitor.retrain` is true it starts the `retrain` flow
(pipeline.flows) as a sub-flow; a retrain already running is left to finish, and said so.
An empty window, a database the service never wrote, or no evaluated model yet are reported,
never a crash.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import sqlalchemy as sa
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import (
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)

from pipeline.flows import REPO_ROOT, retrain
from pipeline.workspace import WorkspaceBusy
from vitrine.config import (
    Count,
    Positive,
    from_mapping,
    load_params,
    load_paths,
    params_block,
    run_cli,
    stage_config,
)
from vitrine.contracts import RecordConfig
from vitrine.images import Rejected, load_square
from vitrine.production import drift
from vitrine.production.drift_page import render_page
from vitrine.production.records import RecordStore, record_url

REPORT_KEY = "monitor-report"  # the artifact's key: the UI lists every version under it


@params_block
class MonitorConfig:
    """params.yaml `monitor:`."""

    cron: str  # the `monitor` deployment's schedule, in flow.timezone
    window_hours: Positive  # the recent window: answers of the last this many hours
    min_answers: Count  # fewer answers in the window: class mix, confidence, abstain not judged
    min_reviewed: Count  # fewer reviewed answers: reviewed accuracy not judged
    min_photos: Count  # fewer recent photos embedded: image drift not judged
    photo_sample: Count  # recent photos embedded (distinct photos of the window)
    test_sample: Count  # test photos embedded
    permutations: Count  # of the MMD test's p-value
    seed: int  # of the test photos drawn and of the permutations
    confidence_bins: Count  # of the confidence histograms
    retrain: bool  # start the retrain flow when a threshold is crossed
    report: str  # the JSON report
    page: str  # the HTML report
    thresholds: drift.Thresholds


class MonitorResult(TypedDict):
    crossed: list[str]
    retrain_started: bool
    report: str
    artifact_id: str


@dataclass(frozen=True)
class Inputs:
    url: str | None  # the answers database; None: a SQLite file that does not exist
    shown_url: str  # the URL without its password, for the report
    photos: Path
    predictions: Path
    test_images: Path
    image_size: int
    resize: str  # the prepared set's (vitrine.images.RESIZE_MODES), as the test photos were made


def load_monitor_config(project_dir: Path) -> MonitorConfig:
    return stage_config(MonitorConfig, "monitor", load_params(project_dir / "params.yaml"))


def inputs(project_dir: Path) -> Inputs:
    from vitrine.data.layout import prepared_resize, split_images_path

    params = load_params(project_dir / "params.yaml")
    paths = load_paths(params)
    record = from_mapping(RecordConfig, params["serve"].get("record") or {}, "serve.record")
    url = sa.make_url(record_url(record.url))
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = project_dir / url.database  # an absolute path stays itself
        url = url.set(database=str(database))
        found: str | None = url.render_as_string(hide_password=False) if database.exists() else None
    else:
        found = url.render_as_string(hide_password=False)
    return Inputs(
        url=found,
        shown_url=url.render_as_string(hide_password=True),
        photos=project_dir / record.photos,
        predictions=project_dir / paths.predictions,
        test_images=split_images_path(project_dir / paths.prepared, "test"),
        image_size=int(params["prepare"]["image_size"]),
        resize=prepared_resize(project_dir / paths.prepared),
    )


def embed_images(images: np.ndarray) -> np.ndarray:
    """Pooled ImageNet features of uint8 photos (vitrine.model.embeddings.embed); imported here
    so that scheduling the flows does not load torch."""
    from vitrine.model.embeddings import embed

    return embed(images)


@dataclass(frozen=True)
class Answers:
    summary: drift.AnswerSummary
    previous: int  # answers in the window of the same length just before
    reviewed: drift.ReviewedSummary
    photos: list[str]  # the sampled photos' SHA-256


@task(cache_policy=NO_CACHE)
def summarize_answers(
    url: str | None, since: datetime, until: datetime, config: MonitorConfig
) -> Answers:
    """The window's answers, counted in the database."""
    if url is None:
        empty = drift.AnswerSummary(confidence_histogram=(0,) * config.confidence_bins)
        return Answers(empty, 0, drift.ReviewedSummary(), [])
    store = RecordStore(url)
    try:
        return Answers(
            drift.summarize(store, since, until, config.confidence_bins),
            drift.count_answers(store, since - (until - since), since),
            drift.reviewed(store, since, until),
            # More than needed: photos that retention deleted are skipped.
            drift.photo_sample(store, since, until, 4 * config.photo_sample),
        )
    finally:
        store.close()


@task(cache_policy=NO_CACHE)
def image_drift(
    photos: list[str], source: Inputs, config: MonitorConfig, test_available: bool
) -> dict[str, Any]:
    """Embeddings of up to photo_sample recent photos against test_sample test photos."""
    pixels: list[np.ndarray] = []
    missing = unreadable = 0
    for sha in photos:
        if len(pixels) == config.photo_sample:
            break
        path = source.photos / sha[:2] / sha
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            missing += 1  # deleted by retention; its answer's row outlives it
            continue
        try:
            pixels.append(load_square(data, source.image_size, source.resize))
        except (Rejected, OSError, ValueError):
            unreadable += 1
    figures: dict[str, Any] = {
        "looked_up": len(pixels) + missing + unreadable,
        "missing": missing,
        "unreadable": unreadable,
        "embedded": len(pixels),
        "test_photos": 0,
        "mmd2": None,
        "p_value": None,
        "bandwidth": None,
        "permutations": config.permutations,
    }
    if not test_available or len(pixels) < max(config.min_photos, 2):
        return figures
    test = np.load(source.test_images, mmap_mode="r")
    rng = np.random.default_rng(config.seed)
    drawn = np.sort(rng.choice(len(test), min(config.test_sample, len(test)), replace=False))
    result = drift.mmd_test(
        embed_images(np.stack(pixels)),
        embed_images(np.asarray(test[drawn])),
        config.permutations,
        config.seed,
    )
    figures["test_photos"] = len(drawn)
    if result is not None:
        figures.update(mmd2=result.mmd2, p_value=result.p_value, bandwidth=result.bandwidth)
    return figures


def read_baseline(source: Inputs, bins: int) -> drift.Baseline | None:
    if not source.predictions.exists():
        return None
    return drift.baseline(pd.read_parquet(source.predictions), bins)


def _shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: n / total for k, n in counts.items()} if total else {}


def _hist_shares(histogram: tuple[int, ...]) -> list[float]:
    total = sum(histogram)
    return [n / total if total else 0.0 for n in histogram]


def build_report(
    since: datetime,
    until: datetime,
    answers: Answers,
    test: drift.Baseline | None,
    images: dict[str, Any],
    config: MonitorConfig,
    notes: list[str],
) -> dict[str, Any]:
    """Every figure, check and note, as the JSON report (and the page) hold them."""
    s, r = answers.summary, answers.reviewed
    mix_psi = drift.psi(test.by_label, s.by_label) if test else None
    chi2 = drift.chi_square(test.by_label, s.by_label) if test else None
    confidence_psi = (
        drift.psi(
            drift.histogram_counts(test.confidence_histogram),
            drift.histogram_counts(s.confidence_histogram),
        )
        if test
        else None
    )
    recent_mean = s.mean_confidence
    drop = test.mean_confidence - recent_mean if test and recent_mean is not None else None
    figures = {
        "answers": s.answers,
        "checked": s.checked,
        "reviewed": r.reviewed,
        "photos": images["embedded"],
        "psi": mix_psi,
        "chi2_p_value": chi2[1] if chi2 else None,
        "mmd_p_value": images["p_value"],
        "confidence_drop": drop,
        "abstain_rate": s.abstain_rate,
        "mismatch_rate": s.mismatch_rate,
        "reviewed_accuracy": r.accuracy,
    }
    minimums = {"answers": config.min_answers, "photos": config.min_photos}
    minimums["reviewed"] = config.min_reviewed
    checks = drift.judge(figures, config.thresholds, minimums)
    first_hour = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "window": {
            "since": since.isoformat(),
            "until": until.isoformat(),
            "hours": config.window_hours,
            "first_hour": first_hour.isoformat(),
        },
        "answers": {
            "answers": s.answers,
            "previous_window_answers": answers.previous,
            "per_hour": drift.hourly_series(s, since, until),
            "per_day": s.by_day(),
            "by_label": s.by_label,
            "by_model_version": s.by_model_version,
            "by_endpoint": s.by_endpoint,
            "abstained": s.abstained,
        },
        "test": None if test is None else asdict(test),
        "class_mix": {
            "recent": _shares(s.by_label),
            "test": _shares(test.by_label) if test else {},
            "psi": mix_psi,
            "chi2": chi2[0] if chi2 else None,
            "chi2_p_value": chi2[1] if chi2 else None,
        },
        "confidence": {
            "recent_mean": s.mean_confidence,
            "test_mean": test.mean_confidence if test else None,
            "drop": drop,
            "bins": config.confidence_bins,
            "recent_histogram": _hist_shares(s.confidence_histogram),
            "test_histogram": _hist_shares(test.confidence_histogram) if test else [],
            "psi": confidence_psi,
        },
        "abstain": {"recent_rate": s.abstain_rate, "test_rate": test and test.abstain_rate},
        "mismatch": {"checked": s.checked, "mismatched": s.mismatched, "rate": s.mismatch_rate},
        "images": images,
        "reviewed": {
            "reviewed": r.reviewed,
            "correct": r.correct,
            "accuracy": r.accuracy,
            "pairs": [[a, b, n] for (a, b), n in r.pairs.items()],
        },
        "thresholds": asdict(config.thresholds),
        "minimums": minimums,
        "checks": [asdict(c) for c in checks],
        "crossed": [c.name for c in checks if c.crossed],
        "retrain": {"wanted": any(c.crossed for c in checks), "enabled": config.retrain},
        "notes": notes,
    }


def report_markdown(report: dict[str, Any], page: Path) -> str:
    window = report["window"]
    lines = ["# Drift monitor", ""]
    answered = report["answers"]["answers"]
    lines += [f"Window: {window['since']} to {window['until']}, {answered} answers.", ""]
    if report["crossed"]:
        lines += [f"**Crossed: {', '.join(report['crossed'])}**", ""]
    else:
        lines += ["**No threshold crossed.**", ""]
    lines += [f"- {note}" for note in report["notes"]]
    lines += ["", "| check | value | crossed when | status |", "|---|---:|---|---|"]
    for c in report["checks"]:
        value = "–" if c["value"] is None else f"{c['value']:.4g}"
        status = ("**crossed**" if c["crossed"] else "ok") if c["judged"] else c["note"]
        lines.append(f"| {c['name']} | {value} | {c['rule']} {c['threshold']:g} | {status} |")
    lines += ["", f"[The report with its plots]({page.resolve().as_uri()})"]
    return "\n".join(lines) + "\n"


def window_notes(
    source: Inputs, answers: Answers, test: drift.Baseline | None, images: dict[str, Any]
) -> list[str]:
    notes = []
    if source.url is None:
        notes.append(f"No answers database at {source.shown_url}: the service has recorded none.")
    elif answers.summary.answers == 0:
        notes.append("No answers in the window.")
    if test is None:
        notes.append(f"No evaluated test set ({source.predictions}): nothing to compare with.")
    if images["missing"]:
        notes.append(f"{images['missing']} sampled photos were deleted by retention.")
    if images["unreadable"]:
        notes.append(f"{images['unreadable']} sampled photos could not be decoded.")
    return notes


def write_reports(report: dict[str, Any], json_path: Path, page_path: Path) -> None:
    for path in (json_path, page_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    page_path.write_text(render_page(report))


@flow(name="monitor")
def monitor(
    project_dir: Path = REPO_ROOT, until: datetime | None = None, report_only: bool = False
) -> MonitorResult:
    """Compare the answers of the last monitor.window_hours (up to `until`, default now) with
    the evaluated test set; write the reports; retrain when a threshold is crossed, unless
    monitor.retrain is false or `report_only`."""
    logger = get_run_logger()
    config = load_monitor_config(project_dir)
    if report_only:
        config = dataclasses.replace(config, retrain=False)
    source = inputs(project_dir)
    until = until or datetime.now(UTC)
    until = (until if until.tzinfo else until.replace(tzinfo=UTC)).astimezone(UTC)
    since = until - timedelta(hours=config.window_hours)
    answers = summarize_answers(source.url, since, until, config)
    test = read_baseline(source, config.confidence_bins)
    test_available = test is not None and source.test_images.exists()
    images = image_drift(answers.photos, source, config, test_available)
    notes = window_notes(source, answers, test, images)
    report = build_report(since, until, answers, test, images, config, notes)
    started = bool(report["crossed"]) and config.retrain
    if report["crossed"] and not config.retrain:
        why = "--report-only" if report_only else "monitor.retrain: false"
        report["retrain"]["reason"] = f"Retraining is off ({why})."
    report["retrain"]["started"] = started
    json_path, page_path = project_dir / config.report, project_dir / config.page
    write_reports(report, json_path, page_path)
    artifact_id = create_markdown_artifact(
        report_markdown(report, page_path),
        key=REPORT_KEY,
        description="Recorded answers against the evaluated test set: drift checks",
    )
    logger.info("Drift checks crossed: %s", ", ".join(report["crossed"]) or "none")
    if started:
        logger.warning("Starting the retrain flow: %s crossed", ", ".join(report["crossed"]))
        try:
            retrain(project_dir=project_dir)
        except WorkspaceBusy as busy:
            logger.info("Not retraining now: %s", busy)
            started = False
            report["retrain"].update(started=False, reason=f"Not retrained now: {busy}")
            write_reports(report, json_path, page_path)
    return {
        "crossed": report["crossed"],
        "retrain_started": started,
        "report": str(json_path),
        "artifact_id": str(artifact_id),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare recent answers with the test set.")
    parser.add_argument("project_dir", nargs="?", type=Path, default=REPO_ROOT)
    parser.add_argument(
        "--until",
        type=datetime.fromisoformat,
        help="end of the window, ISO 8601 (default: now; without an offset: UTC)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the reports but start no retrain, whatever monitor.retrain says",
    )
    args = parser.parse_args(argv)
    logging.getLogger("prefect").setLevel(logging.WARNING)
    logging.getLogger("prefect.flow_runs").setLevel(logging.INFO)
    local_run = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None, PREFECT_SERVER_ANALYTICS_ENABLED: False}
    project_dir = args.project_dir.resolve()
    load_monitor_config(project_dir)  # a bad setting: one line, before any flow run
    with temporary_settings(updates=local_run):
        result = monitor(project_dir=project_dir, until=args.until, report_only=args.report_only)
    print(f"crossed: {', '.join(result['crossed']) or 'none'}; report: {result['report']}")
    return 0


if __name__ == "__main__":
    run_cli(main)
