"""prepare.split: column (a source's own train/val/test lists) against the default hash split."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from stages.collect import CollectConfig, Source, collect
from stages.dedupe import DedupeConfig, NoiseConfig, dedupe
from stages.prepare import (
    PrepareConfig,
    SplitError,
    assign_split,
    leakage_report,
    pack_split,
    split_manifest,
)
from vitrine.curation.features import given_features
from vitrine.data.shards import ShardReader
from vitrine.ingest.download import DownloadConfig

CLASSES = ("Fruit/Apple/Granny-Smith", "Vegetables/Mushroom/Brown-Cap-Mushroom")
HASH = PrepareConfig(CLASSES, image_size=32, val_fraction=0.2, test_fraction=0.2, seed=7)
COLUMN = dataclasses.replace(HASH, split="column")


def row(id_: str, cluster: str, split: str | None, status: str = "kept", label=CLASSES[0]):
    """A deduped manifest row whose catalog gave `split` (None: no split column at all)."""
    meta = json.dumps({"split": split, "price": "3"} if split is not None else {"price": "3"})
    return dict(
        id=id_,
        label=label,
        source="catalog:c.csv",
        status=status,
        cluster_id=cluster,
        sha256=id_ * 4,
        shard="",
        offset=0,
        length=0,
        meta=meta,
    )


def deduped(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def test_column_split_takes_each_photo_s_split_from_its_catalog():
    rows = [row(f"p{i}", f"c{i}", ("train", "val", "test")[i % 3]) for i in range(30)]
    prepared = split_manifest(deduped(*rows), COLUMN).set_index("id")
    assert (
        prepared["split"] == [("train", "val", "test")[int(i[1:]) % 3] for i in prepared.index]
    ).all()
    # each split's array index runs 0..n-1
    for _, group in prepared.groupby("split"):
        assert sorted(group["index"]) == list(range(len(group)))


def test_default_hash_split_ignores_the_catalog_column():
    rows = [row(f"p{i}", f"{i:016x}", "test") for i in range(200)]
    prepared = split_manifest(deduped(*rows), HASH)
    assert list(prepared["split"]) == [assign_split(c, HASH) for c in prepared["cluster_id"]]
    assert set(prepared["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize("bad", [None, "", "dev", "Train"])
def test_a_photo_without_a_valid_split_is_refused_not_dropped(bad):
    frame = deduped(row("ok", "c1", "train"), row("odd.jpg", "c2", bad))
    with pytest.raises(SplitError, match=r"1 of 2 photos have no 'split'.*odd\.jpg"):
        split_manifest(frame, COLUMN)


def test_a_duplicate_without_a_split_is_refused_too():
    # Not trained on, but the published split's leakage would be measured without it.
    frame = deduped(row("rep", "c1", "train"), row("copy", "c1", None, status="duplicate"))
    with pytest.raises(SplitError, match="copy"):
        split_manifest(frame, COLUMN)


def test_quarantined_rows_need_no_split():
    frame = deduped(row("ok", "c1", "val"), row("broken", "", None, status="quarantined"))
    assert list(split_manifest(frame, COLUMN)["split"]) == ["val"]


def test_the_split_column_is_configurable():
    frame = deduped(row("a", "c1", None))
    frame.loc[0, "meta"] = json.dumps({"subset": "test"})
    config = dataclasses.replace(COLUMN, split_column="subset")
    assert list(split_manifest(frame, config)["split"]) == ["test"]


def test_unknown_split_rule_is_refused():
    with pytest.raises(ValueError, match=r"prepare\.split must be one of"):
        dataclasses.replace(HASH, split="random")


def test_leakage_of_the_published_split_is_reported_honestly():
    frame = deduped(
        # a cluster across published splits: dedupe kept the train copy, dropped the test one
        row("a-train", "c1", "train"),
        row("a-test", "c1", "test", status="duplicate"),
        # copies within one split do not leak
        row("b-val", "c2", "val"),
        row("b-val-2", "c2", "val", status="duplicate"),
        row("c-test", "c3", "test"),
    )
    prepared = split_manifest(frame, COLUMN)
    report = leakage_report(frame, prepared, COLUMN)
    assert report["leaked_val_test_photos"] == 0  # what training sees after dedupe
    assert report["source_split"] == {
        "leaked_val_test_photos": 1,
        "val_test_photos": 4,
        "clusters_across_splits": 1,
        "not_kept_by_dedupe": {"train": 0, "val": 1, "test": 1},
    }


def test_hash_split_report_keeps_its_keys():
    frame = deduped(*(row(f"p{i}", f"{i:016x}", None) for i in range(50)))
    report = leakage_report(frame, split_manifest(frame, HASH), HASH)
    assert set(report) == {
        "leaked_val_test_photos",
        "naive_split_leaked_val_test_photos",
        "naive_split_val_test_photos",
    }


def test_taxonomy_catalog_through_collect_dedupe_and_prepare(class_folder, tmp_path):
    raw = class_folder.parent
    lines = ["id,label,path,split"]
    for n, photo in enumerate(sorted(class_folder.rglob("*.jpg"))):
        label = CLASSES[photo.parent.name == "phone"]
        lines.append(f"{n},{label},{photo.relative_to(raw)},{('train', 'val', 'test')[n % 3]}")
    (raw / "catalog.csv").write_text("\n".join(lines) + "\n")
    cfg = CollectConfig(
        CLASSES, (Source("catalog", "catalog.csv"),), 32, 10**7, 10**6, 10, 48, DownloadConfig()
    )
    collected = pd.read_parquet(collect(cfg, raw, tmp_path / "c", cache=tmp_path / "cache"))
    emb = np.random.default_rng(0).normal(size=(len(collected), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    no_decisions = pd.DataFrame(columns=["id", "decision", "new_label", "note"])
    noise = NoiseConfig(folds=3, seed=0, min_outlier_score=3.0, max_candidates=10)
    dedupe_config = DedupeConfig(CLASSES, "largest", ((6, 0.95),), 8, noise)
    prepared = split_manifest(
        dedupe(collected, given_features(collected, emb, emb), no_decisions, dedupe_config), COLUMN
    )
    assert len(prepared) == 24 and set(prepared["label"]) == set(CLASSES)
    assert (
        prepared["split"]
        == prepared["id"].astype(int).map(lambda n: ("train", "val", "test")[n % 3])
    ).all()
    test = prepared[prepared["split"] == "test"]
    with ShardReader(tmp_path / "c") as shards:
        pack_split(test, shards, 32, tmp_path / "test.npy")
    assert np.load(tmp_path / "test.npy").shape == (8, 32, 32, 3)
