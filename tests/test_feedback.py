"""The moderators' labels back into training (pipeline/feedback.py): the reviewed answers exported
as a catalog under paths.raw, then read by collect like any other source; on SQLite and on a real
PostgreSQL server."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline.feedback import (
    FeedbackError,
    catalog_text,
    export_from_params,
    export_reviewed,
    main,
)
from stages.dedupe import DedupeConfig, NoiseConfig, dedupe
from stages.prepare import (
    PrepareConfig,
    assign_split,
    clustered_splits,
    leakage_report,
    split_manifest,
)
from tests.helpers import REPO
from tests.helpers.collect_runs import config, run
from tests.helpers.feedback import feedback_params, record_answer
from tests.helpers.photos import encode
from tests.helpers.records import sample_answer
from vitrine.curation.features import given_features
from vitrine.ingest.inventory import inventory_digest
from vitrine.ingest.records import Source
from vitrine.production.photos import PhotoStore
from vitrine.production.recorder import photo_sha256
from vitrine.production.records import RECORD_URL_ENV, RecordStore
from vitrine.production.reviews import add_review

REVIEWED = Source("catalog", "reviewed/catalog.csv")


def catalog_rows(catalog: Path) -> pd.DataFrame:
    return pd.read_csv(catalog, dtype=str, keep_default_na=False).set_index("id")


def test_recorded_reviewed_answers_reach_the_collected_manifest(
    store: RecordStore, tmp_path: Path
) -> None:
    photos, raw = tmp_path / "photos", tmp_path / "raw"
    a, b, c = (record_answer(store, photos, seed) for seed in (1, 2, 3))
    gone = record_answer(store, photos, 4, keep_photo=False)  # retention deleted its photo
    record_answer(store, photos, 5)  # answered, never reviewed: not exported
    add_review(store, a.request_id, "phone", "ana")
    time.sleep(0.01)
    add_review(store, a.request_id, "laptop", "boris")  # supersedes ana's
    add_review(store, b.request_id, "phone", "ana")
    add_review(store, c.request_id, "laptop", "ana")
    add_review(store, gone.request_id, "phone", "ana")

    report = export_reviewed(store, photos, raw / "reviewed" / "catalog.csv")

    assert (report["reviewed"], report["exported"], report["left_out"]) == (4, 3, 1)
    assert report["missing"] == [
        {
            "request_id": gone.request_id,
            "label": "phone",
            "image_sha256": gone.image_sha256,
            "reason": "missing_photo",
        }
    ]
    assert report["by_label"] == {
        "laptop": {"exported": 2},
        "phone": {"exported": 1, "missing_photo": 1},
    }
    rows = catalog_rows(raw / "reviewed" / "catalog.csv")
    assert list(rows.index) == sorted([a.request_id, b.request_id, c.request_id])
    assert rows.loc[a.request_id, "path"] == f"photos/{a.image_sha256}.jpg"
    assert (rows.loc[a.request_id, "reviewer"], rows.loc[a.request_id, "model_label"]) == (
        "boris",
        a.label,
    )
    assert sorted(p.name for p in (raw / "reviewed" / "photos").iterdir()) == sorted(
        f"{x.image_sha256}.jpg" for x in (a, b, c)
    )

    manifest = run(config(REVIEWED), raw, tmp_path)

    assert set(manifest["status"]) == {"accepted"}
    assert set(manifest["source"]) == {"catalog:reviewed/catalog.csv"}
    assert manifest["label"].to_dict() == {
        a.request_id: "laptop",  # the standing decision, not the first one
        b.request_id: "phone",
        c.request_id: "laptop",
    }
    meta = json.loads(manifest.loc[a.request_id, "meta"])
    assert meta["request_id"] == a.request_id and meta["reviewer"] == "boris"
    assert meta["model_label"] == a.label and meta["reviewed_at"].endswith("+00:00")
    assert set(manifest["sha256"]) == {a.image_sha256, b.image_sha256, c.image_sha256}


def test_an_unchanged_review_set_exports_byte_identical_files(
    store: RecordStore, tmp_path: Path
) -> None:
    photos, raw = tmp_path / "photos", tmp_path / "raw"
    for seed in (1, 2):
        answer = record_answer(store, photos, seed)
        add_review(store, answer.request_id, "phone", "ana")
    export_reviewed(store, photos, raw / "reviewed" / "catalog.csv")
    catalog = (raw / "reviewed" / "catalog.csv").read_bytes()
    listing = inventory_digest(raw)

    again = export_reviewed(store, photos, raw / "reviewed" / "catalog.csv")

    assert (raw / "reviewed" / "catalog.csv").read_bytes() == catalog
    assert inventory_digest(raw) == listing  # DVC's view of paths.raw: no change
    assert (again["photos_copied"], again["photos_removed"]) == (0, 0)
    newer = record_answer(store, photos, 3)
    add_review(store, newer.request_id, "laptop", "ana")
    export_reviewed(store, photos, raw / "reviewed" / "catalog.csv")
    assert inventory_digest(raw) != listing


def test_an_exported_photo_outlives_the_retention_sweep(store: RecordStore, tmp_path: Path) -> None:
    photos, catalog = tmp_path / "photos", tmp_path / "raw" / "reviewed" / "catalog.csv"
    answer = record_answer(store, photos, 1)
    add_review(store, answer.request_id, "phone", "ana")
    export_reviewed(store, photos, catalog)
    (photos / answer.image_sha256[:2] / answer.image_sha256).unlink()  # swept

    report = export_reviewed(store, photos, catalog)

    assert (report["exported"], report["left_out"]) == (1, 0)
    assert (catalog.parent / "photos" / f"{answer.image_sha256}.jpg").is_file()


def test_an_export_that_would_drop_exported_rows_is_refused_unless_replacing(
    store: RecordStore, tmp_path: Path
) -> None:
    photos, catalog = tmp_path / "photos", tmp_path / "raw" / "reviewed" / "catalog.csv"
    answer = record_answer(store, photos, 1)
    add_review(store, answer.request_id, "phone", "ana")
    export_reviewed(store, photos, catalog)
    other = RecordStore(f"sqlite:///{tmp_path / 'other.sqlite'}")  # another, empty database
    other.migrate()
    try:
        with pytest.raises(FeedbackError, match=r"1 answer.*exported before"):
            export_reviewed(other, photos, catalog)
        assert answer.request_id in catalog.read_text()

        report = export_reviewed(other, photos, catalog, replace=True)
    finally:
        other.close()

    assert report["exported"] == 0
    assert catalog.read_text() == catalog_text([])
    assert not (catalog.parent / "photos").exists()  # as in a fresh clone


def test_the_shipped_catalog_is_a_header_that_collect_reads_as_no_record(tmp_path: Path) -> None:
    shipped = REPO / "data" / "raw" / "reviewed" / "catalog.csv"
    assert shipped.read_text() == catalog_text([])
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    listed = {"kind": "catalog", "path": params["feedback"]["catalog"]}
    assert listed in params["collect"]["sources"]
    (tmp_path / "raw" / "reviewed").mkdir(parents=True)
    (tmp_path / "raw" / "reviewed" / "catalog.csv").write_bytes(shipped.read_bytes())

    assert run(config(REVIEWED), tmp_path / "raw", tmp_path).empty


def test_export_from_params_reads_serve_record_relative_to_the_project(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "project"
    feedback_params(project, "sqlite:///answers.sqlite")
    store = RecordStore(f"sqlite:///{project / 'answers.sqlite'}")
    store.migrate()
    try:
        kept = record_answer(store, project / "photos", 1)
        gone = record_answer(store, project / "photos", 2, keep_photo=False)
        for answer in (kept, gone):
            add_review(store, answer.request_id, "phone", "ana")
    finally:
        store.close()

    assert main([str(project)]) == 0

    out = capsys.readouterr().out
    assert "2 reviewed answer(s): 1 exported into raw/reviewed/catalog.csv" in out
    assert f"left out: {gone.request_id} (phone): missing_photo {gone.image_sha256}" in out
    report = json.loads((project / "reports" / "feedback.json").read_text())
    assert (report["exported"], report["by_reason"]) == (1, {"missing_photo": 1})
    assert report["read_by_collect"] and report["source"] == "catalog:reviewed/catalog.csv"
    assert kept.request_id in (project / "raw" / "reviewed" / "catalog.csv").read_text()


def test_no_database_or_no_recording_is_an_error_that_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    feedback_params(project, "sqlite:///data/production/answers.sqlite")
    with pytest.raises(FeedbackError, match=r"no answers database at .*answers\.sqlite"):
        export_from_params(project)
    assert not (project / "data").exists() and not (project / "raw").exists()

    monkeypatch.setenv(RECORD_URL_ENV, f"sqlite:///{tmp_path / 'elsewhere.sqlite'}")
    with pytest.raises(FeedbackError, match=r"elsewhere\.sqlite"):
        export_from_params(project)
    monkeypatch.setenv(RECORD_URL_ENV, "mysql://db.example/answers")
    with pytest.raises(FeedbackError, match="only sqlite and postgresql"):
        export_from_params(project)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["serve"]["record"]["enabled"] = False
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(FeedbackError, match=r"serve\.record\.enabled is false"):
        export_from_params(project)


def near_copy(photo: bytes, quality: int) -> bytes:
    """The photo as a seller uploads it again: slightly smaller, recompressed."""
    image = Image.open(io.BytesIO(photo))
    return encode(image.resize((image.width - 6, image.height - 4)), "JPEG", quality=quality)


def test_a_reviewed_near_copy_of_a_test_photo_lands_in_the_test_split(
    class_folder: Path, tmp_path: Path
) -> None:
    """Dedupe clusters a reviewed photo with its near copies from other sources, and the cluster
    split puts it with them: a production photo of a test product never trains the model."""
    raw = tmp_path  # the folder source "photos" (class_folder) and the reviewed catalog
    prep = PrepareConfig(("laptop", "phone"), 32, val_fraction=0.2, test_fraction=0.2, seed=7)
    sources = (Source("folder", "photos"), REVIEWED)
    before = run(config(sources[0]), raw, tmp_path / "before")
    tested = next(
        (i, r) for i, r in before.iterrows() if assign_split(r["sha256"][:16], prep) == "test"
    )
    original = (class_folder / tested[0]).read_bytes()
    # A copy whose sha256 sorts after the original's keeps the cluster's key (its smallest
    # member's): the cluster, and the split drawn from that key, stay what they were.
    copy = next(
        c
        for q in range(60, 100)
        if photo_sha256(c := near_copy(original, q))[:16] > tested[1]["sha256"][:16]
    )
    store = RecordStore(f"sqlite:///{tmp_path / 'answers.sqlite'}")
    store.migrate()
    try:
        answer = dataclasses.replace(sample_answer(1), image_sha256=photo_sha256(copy))
        store.insert([answer])
        PhotoStore(tmp_path / "store", 0, 0).keep(copy, answer.image_sha256)
        add_review(store, answer.request_id, tested[1]["label"], "ana")
        export_reviewed(store, tmp_path / "store", raw / "reviewed" / "catalog.csv")
    finally:
        store.close()

    manifest = run(config(*sources), raw, tmp_path / "after").reset_index()
    accepted = manifest[manifest["status"] == "accepted"]
    descriptors = np.random.default_rng(0).normal(size=(len(accepted), 16)).astype(np.float32)
    position = {row_id: n for n, row_id in enumerate(accepted["id"])}
    descriptors[position[answer.request_id]] = descriptors[position[tested[0]]]  # alike
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    noise = NoiseConfig(folds=3, seed=0, min_outlier_score=3.0, max_candidates=10)
    dedupe_config = DedupeConfig(("laptop", "phone"), "largest", ((6, 0.95),), 8, noise)
    no_decisions = pd.DataFrame(columns=["id", "decision", "new_label", "note"])
    deduped = dedupe(
        manifest, given_features(manifest, descriptors, descriptors), no_decisions, dedupe_config
    )

    rows = deduped.set_index("id")
    assert rows.loc[answer.request_id, "cluster_id"] == rows.loc[tested[0], "cluster_id"]
    assert {rows.loc[answer.request_id, "status"], rows.loc[tested[0], "status"]} == {
        "kept",
        "duplicate",
    }
    splits = clustered_splits(deduped, prep)
    by_id = pd.Series(splits.to_numpy(), index=deduped.loc[splits.index, "id"])
    assert by_id[answer.request_id] == by_id[tested[0]] == "test"
    prepared = split_manifest(deduped, prep)
    assert leakage_report(deduped, prepared, prep)["leaked_val_test_photos"] == 0
