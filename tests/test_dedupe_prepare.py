import numpy as np
import pandas as pd
import pytest

from stages.collect import CollectConfig, Source, collect
from stages.dedupe import DedupeConfig, dedupe, dedupe_report
from stages.prepare import PrepareConfig, assign_split, pack_split, split_manifest
from vitrine.shards import ShardReader

PREP = PrepareConfig(
    ("laptop", "phone"), image_size=32, val_fraction=0.2, test_fraction=0.2, seed=7
)


def manifest_row(id_, label, sha, w=100, h=80, status="accepted", source="folder:x"):
    return dict(
        id=id_,
        label=label,
        source=source,
        status=status,
        reason="",
        detail="",
        sha256=sha,
        width=w,
        height=h,
    )


def test_exact_copies_form_one_cluster_keeping_the_largest():
    m = pd.DataFrame(
        [
            manifest_row("a.jpg", "phone", "f" * 64, 100, 80),
            manifest_row("b.jpg", "phone", "f" * 64, 200, 160),
            manifest_row("c.jpg", "phone", "e" * 64),
            manifest_row("bad.jpg", "phone", "", 0, 0, status="quarantined"),
        ]
    )
    d = dedupe(m, DedupeConfig("largest")).set_index("id")
    assert (
        d.loc["a.jpg", "cluster_id"] == d.loc["b.jpg", "cluster_id"] != d.loc["c.jpg", "cluster_id"]
    )
    assert d.loc["b.jpg", "status"] == "kept"
    assert d.loc["a.jpg", "status"] == "duplicate"
    assert "b.jpg" in d.loc["a.jpg", "detail"]
    assert d.loc["bad.jpg", "status"] == "quarantined"
    assert dedupe_report(d.reset_index()) == {
        "records": 4,
        "kept": 2,
        "duplicates": 1,
        "label_conflicts": 0,
        "clusters": 2,
        "clusters_with_copies": 1,
    }


def test_ties_are_broken_by_id_whatever_the_input_order():
    rows = [manifest_row(f"{n}.jpg", "laptop", "a" * 64) for n in ("z", "m", "b")]
    for order in (rows, rows[::-1]):
        d = dedupe(pd.DataFrame(order), DedupeConfig("largest")).set_index("id")
        assert d.loc["b.jpg", "status"] == "kept"


def test_same_photo_with_two_labels_is_a_conflict_not_a_guess():
    m = pd.DataFrame(
        [manifest_row("a.jpg", "phone", "c" * 64), manifest_row("b.jpg", "laptop", "c" * 64)]
    )
    d = dedupe(m, DedupeConfig("largest"))
    assert set(d["status"]) == {"label_conflict"}
    assert "laptop" in d["detail"].iloc[0] and "phone" in d["detail"].iloc[0]


def test_unknown_keep_policy_is_refused():
    with pytest.raises(ValueError, match="largest"):
        DedupeConfig("random")


def test_split_depends_only_on_cluster_and_seed():
    assert assign_split("abc", PREP) == assign_split("abc", PREP)
    splits = [assign_split(f"{i:016x}", PREP) for i in range(4000)]
    fractions = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(fractions["test"] - 0.2) < 0.03 and abs(fractions["val"] - 0.2) < 0.03


def test_adding_photos_never_moves_old_ones():
    old = pd.DataFrame(
        [
            {
                **manifest_row(f"{i}.jpg", "phone", f"{i:064x}"),
                "status": "kept",
                "cluster_id": f"{i:016x}",
            }
            for i in range(200)
        ]
    )
    new = pd.concat(
        [old, old.assign(id=lambda d: "new-" + d["id"], cluster_id=lambda d: d["cluster_id"] + "n")]
    )
    for frame in (old, new):
        frame[["shard", "offset", "length"]] = ("", 0, 0)
    before = split_manifest(old, PREP).set_index("id")["split"]
    after = split_manifest(new, PREP).set_index("id")["split"]
    assert (after[before.index] == before).all()


def test_prepare_packs_each_split_from_the_shards(class_folder, tmp_path):
    cfg = CollectConfig(
        ("laptop", "phone"), (Source("folder", "photos"),), 32, 10**7, 10**6, 10, 5.0
    )
    collected = collect(cfg, class_folder.parent, tmp_path / "c")
    prepared = split_manifest(dedupe(collected, DedupeConfig("largest")), PREP)
    assert len(prepared) == 24 and set(prepared["split"]) <= {"train", "val", "test"}
    train = prepared[prepared["split"] == "train"]
    with ShardReader(tmp_path / "c" / "shards") as shards:
        pack_split(train, shards, 32, tmp_path / "train.npy")
    arr = np.load(tmp_path / "train.npy")
    assert arr.shape == (len(train), 32, 32, 3) and arr.dtype == np.uint8
    # distinct photos give distinct arrays, in manifest index order
    assert len({a.tobytes() for a in arr}) == len(train)
