"""The validate stage: Great Expectations suites over the collect manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stages import validate
from stages.validate import ValidateConfig
from tests.helpers.validate_config import validate_config
from vitrine.config import load_params, stage_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = validate_config()


def row(id: str, label: str = "laptop", **overrides) -> dict:
    """One accepted manifest row, as collect writes it."""
    base = {
        "id": id,
        "label": label,
        "source": "shop.tar.gz",
        "status": "accepted",
        "reason": "",
        "detail": "",
        "sha256": hashlib.sha256(id.encode()).hexdigest(),
        "width": 640,
        "height": 480,
        "format": "JPEG",
        "bytes": 50_000,
        "shard": "shard-00000.bin",
        "offset": 0,
        "length": 50_000,
    }
    return {**base, **overrides}


def quarantined(id: str) -> dict:
    return row(id, status="quarantined", reason="too_small", sha256="", width=0, height=0)


def clean_rows(per_class: int = 5) -> list[dict]:
    return [row(f"{label}-{i}", label) for label in CONFIG.classes for i in range(per_class)]


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def run(rows: list[dict], tmp_path: Path, config: ValidateConfig = CONFIG) -> dict:
    return validate.validate_manifest(frame(rows), config, tmp_path / "docs")


def failed(report: dict) -> list[dict]:
    return [e for e in report["expectations"] if not e["success"]]


def test_params_yaml_validate_block_loads():
    config = stage_config(ValidateConfig, "validate", load_params(REPO / "params.yaml"))
    assert config.classes and config.min_images_per_class > 0


def test_accepted_images_computes_aspect_ratio_and_blanks_unknown_digests():
    rows = [
        row("a", width=800, height=200),
        row("b", width=0, height=50, sha256=""),
        quarantined("q"),
    ]
    accepted = validate.accepted_images(frame(rows))
    assert list(accepted["id"]) == ["a", "b"]
    assert accepted["aspect_ratio"][0] == 4.0
    assert math.isnan(accepted["aspect_ratio"][1])  # a zero side is left to the size checks
    assert pd.isna(accepted["sha256"][1])


def test_class_counts_lists_every_class_even_when_empty():
    rows = [row("a", "laptop"), row("b", "laptop"), quarantined("c"), row("d", "tablet")]
    counts = validate.class_counts(frame(rows), ("laptop", "phone"))
    assert counts[["class", "count"]].to_dict("records") == [
        {"class": "laptop", "count": 2},
        {"class": "phone", "count": 0},
    ]
    assert counts["imbalance"][0] == 1.0 and math.isnan(counts["imbalance"][1])


def test_missing_manifest_column_is_an_error():
    with pytest.raises(ValueError, match="sha256"):
        validate.tables(frame(clean_rows()).drop(columns="sha256"), CONFIG.classes)


def test_clean_manifest_passes(tmp_path):
    report = run([*clean_rows(), quarantined("q")], tmp_path)
    assert failed(report) == []
    assert report["success"] is True
    assert report["failed_blocking"] == report["failed_warning"] == 0
    assert report["evaluated"] == sum(len(s) for s in validate.expectations(CONFIG).values())
    assert validate.failure_summary(report) == ""
    json.dumps(report, allow_nan=False)  # the report must be plain JSON for dvc metrics


def test_every_expectation_is_tagged_blocking_or_warning():
    for suite in validate.expectations(CONFIG).values():
        for expectation in suite:
            assert isinstance(expectation.meta["blocking"], bool)


def test_unknown_label_fails_and_summary_names_it(tmp_path):
    report = run([*clean_rows(), row("t-1", "tablet")], tmp_path)
    assert report["success"] is False
    [failure] = failed(report)
    assert (failure["expectation"], failure["column"]) == (
        "expect_column_values_to_be_in_set",
        "label",
    )
    assert failure["blocking"] is True
    assert failure["observed"]["unexpected_values"] == ["tablet"]
    summary = validate.failure_summary(report)
    assert summary.startswith("validate: FAILED 1 blocking expectation:")
    assert "expect_column_values_to_be_in_set(label)" in summary
    assert "1 of 11 accepted rows outside ['laptop', 'phone']: ['tablet']" in summary


def test_the_classes_a_label_map_gave_are_checked_as_any_others(tmp_path):
    """A manifest collect.label_map made (ratings 1-5 as classes 0 and 1, with source_label):
    its classes pass, and a mapped label that is not a class fails, named."""
    config = dataclasses.replace(CONFIG, classes=("0", "1"))
    mapped = {"1": "0", "2": "0", "4": "1", "5": "1"}
    rows = [
        row(f"{rating}-{i}", mapped[rating], source_label=rating)
        for rating in mapped
        for i in range(3)
    ]
    assert run(rows, tmp_path / "ok", config)["success"] is True
    report = run([*rows, row("3-0", "2", source_label="3")], tmp_path / "bad", config)
    assert report["success"] is False
    assert "1 of 13 accepted rows outside ['0', '1']: ['2']" in validate.failure_summary(report)


def test_too_few_images_in_a_class_fails(tmp_path):
    rows = [r for r in clean_rows() if not (r["label"] == "phone" and r["id"] > "phone-1")]
    report = run(rows, tmp_path)
    assert report["success"] is False
    [failure] = failed(report)
    assert (failure["table"], failure["column"]) == ("class_counts", "count")
    assert failure["observed"]["unexpected_rows"] == [{"class": "phone", "count": 2}]
    assert "below 3: [2] (e.g. class=phone)" in validate.failure_summary(report)


def test_a_class_with_no_images_fails(tmp_path):
    config = dataclasses.replace(CONFIG, classes=("laptop", "phone", "tablet"))
    report = run(clean_rows(), tmp_path, config)
    kinds = {(e["table"], e["expectation"]) for e in failed(report)}
    assert kinds == {
        ("accepted_images", "expect_column_distinct_values_to_contain_set"),
        ("class_counts", "expect_column_values_to_be_between"),
    }
    assert "missing ['tablet']" in validate.failure_summary(report)


def test_quarantine_rate_above_limit_fails(tmp_path):
    rows = clean_rows(per_class=5)  # 10 accepted
    assert run([*rows, quarantined("q1")], tmp_path)["success"] is True  # 1 of 11 = 9%
    report = run([*rows, quarantined("q1"), quarantined("q2")], tmp_path)  # 2 of 12 = 17%
    assert report["success"] is False
    [failure] = failed(report)
    assert failure["description"] == "quarantine rate at most 10.0%"
    assert failure["observed"]["unexpected_count"] == 2
    assert "2 of 12 manifest rows outside ['accepted'] (16.7%)" in validate.failure_summary(report)


def test_warning_only_failure_does_not_fail(tmp_path):
    report = run([*clean_rows(), row("banner", width=2000, height=100)], tmp_path)
    assert report["success"] is True
    assert (report["failed_blocking"], report["failed_warning"]) == (0, 1)
    [failure] = failed(report)
    assert (failure["column"], failure["blocking"]) == ("aspect_ratio", False)
    assert validate.failure_summary(report).startswith("validate: WARNING 1 warning expectation:")


def test_duplicate_ids_within_a_source_fail(tmp_path):
    rows = clean_rows()
    report = run([*rows, row("laptop-0", sha256="0" * 64)], tmp_path)
    assert report["success"] is False
    [failure] = failed(report)
    assert (failure["expectation"], failure["columns"]) == (
        "expect_compound_columns_to_be_unique",
        ["source", "id"],
    )
    assert "duplicated" in validate.failure_summary(report)


def test_same_id_in_two_sources_is_fine(tmp_path):
    report = run([*clean_rows(), row("laptop-0", source="other.zip")], tmp_path)
    assert report["success"] is True


def test_blank_ids_and_digests_fail(tmp_path):
    report = run([*clean_rows(), row("", "phone"), row("x", sha256="")], tmp_path)
    columns = {(e["table"], e["column"]) for e in failed(report)}
    assert columns == {("manifest", "id"), ("accepted_images", "sha256")}


def test_data_docs_render_the_results(tmp_path):
    docs = tmp_path / "docs"
    (docs / "validations" / "stale").mkdir(parents=True)
    run([*clean_rows(), row("t-1", "tablet")], tmp_path)
    index = (docs / "index.html").read_text()
    for table in validate.TABLES:
        assert f"vitrine_{table}" in index
    [page] = (docs / "validations" / "vitrine_accepted_images").rglob("*.html")
    html = page.read_text()
    assert "tablet" in html and "Failed" in html
    assert not (docs / "validations" / "stale").exists()  # only this run's pages are kept


def write_project(tmp_path: Path, rows: list[dict]) -> dict:
    """A params.yaml (the repo's, with a small class minimum) and a manifest, in tmp_path."""
    params = load_params(REPO / "params.yaml")
    params["validate"]["min_images_per_class"] = CONFIG.min_images_per_class
    params["classes"] = list(CONFIG.classes)
    params["other_class"] = ""  # whatever the repo's: CONFIG's classes have none
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    collected = tmp_path / params["paths"]["collected"]
    collected.mkdir(parents=True)
    frame(rows).to_parquet(collected / validate.MANIFEST, index=False)
    return params["paths"]


def test_main_exits_1_on_blocking_failure_and_still_writes_outputs(tmp_path, monkeypatch, capsys):
    paths = write_project(tmp_path, [*clean_rows(), row("t-1", "tablet")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        validate.main()
    assert exit_info.value.code == 1
    assert "expect_column_values_to_be_in_set(label)" in capsys.readouterr().err
    report = json.loads((tmp_path / paths["validate_report"]).read_text())
    assert report["success"] is False and report["failed_blocking"] == 1
    assert (tmp_path / paths["validation_docs"] / "index.html").exists()


def test_main_succeeds_on_a_clean_manifest(tmp_path, monkeypatch, capsys):
    paths = write_project(tmp_path, clean_rows())
    monkeypatch.chdir(tmp_path)
    validate.main()
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / paths["validate_report"]).read_text())["success"] is True


def test_file_size_out_of_bounds_fails(tmp_path):
    report = run([*clean_rows(), row("icon", bytes=120)], tmp_path)
    assert report["success"] is False
    [failure] = failed(report)
    assert (failure["table"], failure["column"]) == ("accepted_images", "bytes")


def test_class_imbalance_above_limit_fails(tmp_path):
    rows = [row(f"laptop-{i}", "laptop") for i in range(10)] + [
        row(f"phone-{i}", "phone") for i in range(3)
    ]  # 10 / 3 = 3.3 > 3.0
    report = run(rows, tmp_path)
    assert report["success"] is False
    [failure] = failed(report)
    assert (failure["table"], failure["column"]) == ("class_counts", "imbalance")
    balanced = [*rows, row("phone-extra", "phone")]  # 10 / 4 = 2.5
    assert run(balanced, tmp_path)["success"] is True
