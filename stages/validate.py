"""Validate the collect manifest with a Great Expectations suite before anything trains on it.

Three tables are checked: the whole manifest, its accepted rows (plus a computed aspect ratio)
and a per-class count table. Each expectation carries `meta.blocking`: a failed blocking one
fails the stage (exit status 1); a failed warning one is reported but lets the pipeline go on.
The JSON report and the Data Docs site are written either way, so a failure can be inspected.
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context import AbstractDataContext
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.datasource.fluent import PandasDatasource
from great_expectations.expectations.metadata_types import FailureSeverity

from vitrine.config import (
    Count,
    NonNegativeInt,
    Positive,
    Share,
    load_params,
    load_paths,
    params_block,
    run_cli,
    stage_config,
)
from vitrine.data.shards import MANIFEST

REQUIRED_COLUMNS = ("id", "label", "source", "status", "sha256", "width", "height")
SUITE_PREFIX = "vitrine_"
DOCS_SITE = "vitrine"
SHA256_HEX = r"^[0-9a-f]{64}$"
STATUSES = ["accepted", "quarantined"]
# Notes render on the Data Docs suite pages, where meta does not.
BLOCKING_NOTE = "**Blocking**: a failure fails the validate stage."
WARNING_NOTE = "**Warning**: a failure is reported but does not fail the stage."


@params_block
class ValidateConfig:
    min_images_per_class: NonNegativeInt
    max_quarantine_rate: Share
    min_side: Count
    max_side: Count
    max_aspect_ratio: Positive
    min_file_bytes: NonNegativeInt
    max_file_bytes: Count
    max_class_imbalance: Positive  # largest class count / this class's count
    classes: tuple[str, ...]
    # params.yaml's top-level other_class: its photos come mostly from review decisions, which
    # dedupe applies after this stage, so its count is not checked here ("": none).
    other_class: str = ""

    @property
    def counted(self) -> tuple[str, ...]:
        """The classes whose accepted photos are counted: all but the other class."""
        return tuple(c for c in self.classes if c != self.other_class)


@dataclass(frozen=True)
class Table:
    noun: str  # what one row is, for the failure summary
    key: tuple[str, ...]  # columns that name a failing row in results and docs
    about: str  # shown on the suite's Data Docs page


TABLES = {
    "manifest": Table(
        "manifest rows", ("source", "id"), "Every input record of the collect manifest."
    ),
    "accepted_images": Table(
        "accepted rows",
        ("source", "id"),
        "Accepted manifest rows, with aspect_ratio = long side / short side.",
    ),
    "class_counts": Table(
        "classes", ("class",), "Accepted images per configured class, including empty ones."
    ),
}


def _blank_to_null(column: pd.Series) -> pd.Series:
    # collect writes '' for an unknown string; for these checks it is as missing as a null.
    return column.mask(column == "")


def accepted_images(manifest: pd.DataFrame) -> pd.DataFrame:
    """Accepted rows with an `aspect_ratio` column (long side / short side).

    A zero side gives NaN rather than infinity: the size expectations already flag it, and NaN
    keeps the results JSON-serialisable.
    """
    accepted = manifest[manifest["status"] == "accepted"].reset_index(drop=True)
    long_side = accepted[["width", "height"]].max(axis=1)
    short_side = accepted[["width", "height"]].min(axis=1)
    return accepted.assign(
        sha256=_blank_to_null(accepted["sha256"]),
        aspect_ratio=long_side / short_side.where(short_side > 0),
    )


def class_counts(manifest: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """One row per configured class, with its number of accepted images (0 if none)."""
    labels = manifest.loc[manifest["status"] == "accepted", "label"]
    counts = labels.value_counts().reindex(list(classes), fill_value=0).to_numpy(dtype="int64")
    # An empty class gets NaN, not infinity: the count expectation already flags it.
    imbalance = counts.max(initial=0) / pd.Series(counts).where(lambda c: c > 0)
    return pd.DataFrame({"class": list(classes), "count": counts, "imbalance": imbalance})


def tables(manifest: pd.DataFrame, classes: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """The frames the suites run on, keyed like TABLES."""
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing}")
    return {
        "manifest": manifest.assign(id=_blank_to_null(manifest["id"])),
        "accepted_images": accepted_images(manifest),
        "class_counts": class_counts(manifest, classes),
    }


def blocking(kind: type[gxe.Expectation], **kwargs: Any) -> gxe.Expectation:
    """An expectation whose failure fails the stage."""
    return kind(**kwargs, meta={"blocking": True}, notes=BLOCKING_NOTE)


def warning(kind: type[gxe.Expectation], **kwargs: Any) -> gxe.Expectation:
    """An expectation whose failure is reported but lets the pipeline go on."""
    return kind(
        **kwargs, meta={"blocking": False}, notes=WARNING_NOTE, severity=FailureSeverity.WARNING
    )


def manifest_expectations(config: ValidateConfig) -> list[gxe.Expectation]:
    return [
        blocking(gxe.ExpectTableRowCountToBeBetween, min_value=1),
        blocking(gxe.ExpectColumnValuesToNotBeNull, column="id"),
        # Ids only need to be unique within a source: two archives may both hold "0001.jpg".
        blocking(gxe.ExpectCompoundColumnsToBeUnique, column_list=["source", "id"]),
        # "In set" skips nulls, so a null status needs its own expectation.
        blocking(gxe.ExpectColumnValuesToNotBeNull, column="status"),
        blocking(gxe.ExpectColumnValuesToBeInSet, column="status", value_set=STATUSES),
        # Many quarantined inputs mean a broken source or scraper, not a few bad photos.
        blocking(
            gxe.ExpectColumnValuesToBeInSet,
            column="status",
            value_set=["accepted"],
            mostly=1.0 - config.max_quarantine_rate,
            description=f"quarantine rate at most {config.max_quarantine_rate:.1%}",
        ),
    ]


def accepted_expectations(config: ValidateConfig) -> list[gxe.Expectation]:
    classes = list(config.classes)
    sides = {"min_value": config.min_side, "max_value": config.max_side}
    return [
        blocking(gxe.ExpectColumnValuesToNotBeNull, column="label"),
        blocking(gxe.ExpectColumnValuesToBeInSet, column="label", value_set=classes),
        blocking(
            gxe.ExpectColumnDistinctValuesToContainSet,
            column="label",
            value_set=list(config.counted),
        ),
        # collect should already have quarantined anything outside these bounds, so a violation
        # means collect and validate disagree: stop rather than train on it.
        blocking(gxe.ExpectColumnValuesToBeBetween, column="width", **sides),
        blocking(gxe.ExpectColumnValuesToBeBetween, column="height", **sides),
        # Long thin product shots (cables, banners) are legitimate, just worth a look.
        warning(
            gxe.ExpectColumnValuesToBeBetween,
            column="aspect_ratio",
            max_value=config.max_aspect_ratio,
        ),
        # A few hundred bytes is a placeholder or an icon; tens of MB a raw scan, not an ad photo.
        blocking(
            gxe.ExpectColumnValuesToBeBetween,
            column="bytes",
            min_value=config.min_file_bytes,
            max_value=config.max_file_bytes,
        ),
        # dedupe clusters on the sha256 prefix: a missing or malformed digest would silently
        # leave the image out of deduplication.
        blocking(gxe.ExpectColumnValuesToNotBeNull, column="sha256"),
        blocking(gxe.ExpectColumnValuesToMatchRegex, column="sha256", regex=SHA256_HEX),
    ]


def class_count_expectations(config: ValidateConfig) -> list[gxe.Expectation]:
    return [
        blocking(
            gxe.ExpectColumnValuesToBeBetween,
            column="count",
            min_value=config.min_images_per_class,
        ),
        # A class many times rarer than the largest one is barely learnt: fix the data first.
        blocking(
            gxe.ExpectColumnValuesToBeBetween,
            column="imbalance",
            max_value=config.max_class_imbalance,
        ),
    ]


def expectations(config: ValidateConfig) -> dict[str, list[gxe.Expectation]]:
    """The suite for each table, keyed like TABLES."""
    return {
        "manifest": manifest_expectations(config),
        "accepted_images": accepted_expectations(config),
        "class_counts": class_count_expectations(config),
    }


def _context(docs_dir: Path) -> AbstractDataContext:
    """An in-memory context whose only Data Docs site is `docs_dir`."""
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(docs_dir.resolve()),
        },
    }
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={DOCS_SITE: site},
        # The per-expectation "Calculating Metrics" tqdm bars drown the stage's own output.
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _run_suite(
    context: AbstractDataContext,
    table: str,
    frame: pd.DataFrame,
    suite_expectations: list[gxe.Expectation],
    run_id: RunIdentifier,
) -> dict[str, Any]:
    """Validate one frame against its suite; the result is kept in the context for the docs."""
    source = context.data_sources.get("vitrine")
    assert isinstance(source, PandasDatasource)  # run_suites added it with add_pandas
    batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(
        gx.ExpectationSuite(name=SUITE_PREFIX + table, notes=TABLES[table].about)
    )
    for expectation in suite_expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=SUITE_PREFIX + table, data=batch, suite=suite)
    )
    # Naming failing rows by their key, not their position, makes results and docs actionable.
    result_format = {
        "result_format": "SUMMARY",
        "unexpected_index_column_names": list(TABLES[table].key),
    }
    result = definition.run(
        batch_parameters={"dataframe": frame}, result_format=result_format, run_id=run_id
    )
    return result.to_json_dict()


def run_suites(
    frames: dict[str, pd.DataFrame],
    suites: dict[str, list[gxe.Expectation]],
    docs_dir: Path,
) -> dict[str, dict[str, Any]]:
    """Validate each frame against its suite and build the Data Docs site into `docs_dir`.

    Returns each table's suite validation result as a JSON dict.
    """
    context = _context(docs_dir)
    context.data_sources.add_pandas("vitrine")
    run_id = RunIdentifier(run_name="validate", run_time=datetime.datetime.now(datetime.UTC))
    results = {
        table: _run_suite(context, table, frame, suites[table], run_id)
        for table, frame in frames.items()
    }
    # The context is in memory, so the site holds this run only; drop pages of earlier runs.
    shutil.rmtree(docs_dir, ignore_errors=True)
    context.build_data_docs(site_names=[DOCS_SITE])
    return results


def observed(result: dict[str, Any]) -> Any:
    """The compact observation behind one expectation result."""
    exception = result.get("exception_info") or {}
    if exception.get("raised_exception"):
        return {"error": exception.get("exception_message")}
    found = result.get("result") or {}
    if "unexpected_count" in found:
        return {
            "element_count": found["element_count"],
            "unexpected_count": found["unexpected_count"],
            "unexpected_percent": found.get("unexpected_percent"),
            "unexpected_values": [c["value"] for c in found.get("partial_unexpected_counts", [])],
            "unexpected_rows": found.get("partial_unexpected_index_list", []),
        }
    if found.get("observed_value") is not None:
        return found["observed_value"]
    return {k: v for k, v in found.items() if k != "observed_value"}


def entry(table: str, result: dict[str, Any]) -> dict[str, Any]:
    """One expectation's line in the JSON report."""
    config = result["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    out: dict[str, Any] = {"expectation": config["type"], "table": table}
    if "column" in kwargs:
        out["column"] = kwargs.pop("column")
    if "column_list" in kwargs:
        out["columns"] = kwargs.pop("column_list")
    if config.get("description"):
        out["description"] = config["description"]
    return {
        **out,
        "kwargs": kwargs,
        "blocking": bool((config.get("meta") or {}).get("blocking", True)),
        "success": bool(result["success"]),
        "observed": observed(result),
    }


def build_report(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The stage report: `success` is false only when a blocking expectation failed."""
    entries = [entry(t, r) for t, suite in results.items() for r in suite["results"]]
    failed = [e for e in entries if not e["success"]]
    failed_blocking = sum(e["blocking"] for e in failed)
    return {
        "success": failed_blocking == 0,
        "evaluated": len(entries),
        "failed_blocking": failed_blocking,
        "failed_warning": len(failed) - failed_blocking,
        "expectations": entries,
    }


def validate_manifest(
    manifest: pd.DataFrame, config: ValidateConfig, docs_dir: Path
) -> dict[str, Any]:
    """Run every suite on `manifest`, build the docs into `docs_dir`, return the report."""
    results = run_suites(tables(manifest, config.counted), expectations(config), docs_dir)
    return build_report(results)


def _num(value: Any) -> str:
    # GX stores bounds as floats; 50.0 reads worse than 50 in a message.
    return f"{value:g}" if isinstance(value, float) else str(value)


def _unexpected_phrase(e: dict[str, Any]) -> str:
    """What the unexpected rows are, e.g. "outside ['laptop', 'phone']" or "below 50"."""
    kind, kwargs = e["expectation"], e["kwargs"]
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if kind.endswith("_to_be_between") and high is None:
        return f"below {_num(low)}"
    if kind.endswith("_to_be_between") and low is None:
        return f"above {_num(high)}"
    if kind.endswith("_to_be_between"):
        return f"outside [{_num(low)}, {_num(high)}]"
    if kind.endswith("_to_be_in_set"):
        return f"outside {kwargs['value_set']}"
    if kind.endswith("_to_not_be_null"):
        return "null or empty"
    if kind.endswith("_to_be_unique"):
        return "duplicated"
    if kind.endswith("_to_match_regex"):
        return f"not matching {kwargs['regex']}"
    return "unexpected"


def _unexpected_text(e: dict[str, Any]) -> str:
    """E.g. "3 of 4280 accepted rows outside [...]: ['tablet'] (e.g. source=a.tar id=7)"."""
    seen, table = e["observed"], TABLES[e["table"]]
    text = f"{seen['unexpected_count']} of {seen['element_count']} {table.noun} "
    text += _unexpected_phrase(e)
    if e["kwargs"].get("mostly", 1) < 1:
        text += f" ({seen['unexpected_percent']:.1f}%)"
    values = seen["unexpected_values"]
    if any(v is not None for v in values):
        text += f": {values}"
    names = {" ".join(f"{k}={row.get(k)}" for k in table.key) for row in seen["unexpected_rows"]}
    if names:
        text += f" (e.g. {', '.join(sorted(names)[:3])})"
    return text


def describe(e: dict[str, Any]) -> str:
    """One human line for a failed expectation, naming what was observed."""
    target = e.get("column") or ", ".join(e.get("columns", []))
    head = f"{e['expectation']}({target})" if target else e["expectation"]
    if e.get("description"):
        head += f" [{e['description']}]"
    seen = e["observed"]
    if not isinstance(seen, dict):
        return f"{head} — observed {seen}"
    if "error" in seen:
        return f"{head} — error: {seen['error']}"
    if "unexpected_count" in seen:
        return f"{head} — {_unexpected_text(e)}"
    return f"{head} — missing {seen.get('partial_missing_list', seen)}"


def failure_summary(report: dict[str, Any]) -> str:
    """Failed expectations, blocking first, for stderr; empty when none failed."""
    lines = []
    for is_blocking, heading in ((True, "FAILED"), (False, "WARNING")):
        failed = [
            e for e in report["expectations"] if e["blocking"] is is_blocking and not e["success"]
        ]
        if failed:
            kind = "blocking" if is_blocking else "warning"
            plural = "s" if len(failed) > 1 else ""
            lines.append(f"validate: {heading} {len(failed)} {kind} expectation{plural}:")
            lines += [f"  {describe(e)}" for e in failed]
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), stage_config(ValidateConfig, "validate", params)
    report = validate_manifest(
        pd.read_parquet(paths.collected / MANIFEST), config, paths.validation_docs
    )
    write_report(report, paths.validate_report)
    if summary := failure_summary(report):
        print(summary, file=sys.stderr)
    print(
        f"validate: {report['evaluated']} expectations, {report['failed_blocking']} blocking "
        f"and {report['failed_warning']} warning failures; docs in {paths.validation_docs}"
    )
    if not report["success"]:
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
