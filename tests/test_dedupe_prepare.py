import dataclasses

import numpy as np
import pandas as pd
import pytest

import stages.dedupe
from stages.collect import CollectConfig, Source, collect
from stages.dedupe import (
    DedupeConfig,
    NoiseConfig,
    decisions_without_a_photo,
    dedupe,
    read_decisions,
    write_review_page,
)
from stages.prepare import (
    PrepareConfig,
    assign_split,
    leakage_report,
    leaked,
    pack_split,
    split_manifest,
)
from vitrine.curation.features import given_features
from vitrine.data.shards import ShardReader
from vitrine.ingest.download import DownloadConfig

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


CLASSES = ("laptop", "phone")
CONFIG = DedupeConfig(
    CLASSES,
    "largest",
    tiers=((6, 0.95), (20, 0.965), (64, 0.975)),
    embedding_batch_size=8,
    noise=NoiseConfig(folds=3, seed=0, min_outlier_score=3.0, max_candidates=10),
)
NO_DECISIONS = pd.DataFrame(columns=["id", "decision", "new_label", "note"])


def distinct_embeddings(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 32))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def far_hashes(n: int, seed: int = 0) -> list[int]:
    """n random 64-bit hashes (as int64) that are pairwise far apart."""
    rng = np.random.default_rng(seed)
    return [int(h) for h in rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)]


def frame(rows: list[dict]) -> pd.DataFrame:
    hashes = far_hashes(len(rows))
    return pd.DataFrame([{"phash": h, **r} for h, r in zip(hashes, rows, strict=True)])


def run(rows, decisions=NO_DECISIONS, embeddings=None):
    m = frame(rows)
    n_acc = int((m["status"] == "accepted").sum())
    emb = distinct_embeddings(n_acc) if embeddings is None else embeddings
    return dedupe(m, given_features(m, emb, emb), decisions, CONFIG).set_index("id")


def test_exact_copies_form_one_cluster_keeping_the_largest():
    d = run(
        [
            manifest_row("a.jpg", "phone", "f" * 64, 100, 80),
            manifest_row("b.jpg", "phone", "f" * 64, 200, 160),
            manifest_row("c.jpg", "phone", "e" * 64),
            manifest_row("bad.jpg", "phone", "", 0, 0, status="quarantined"),
        ]
    )
    assert (
        d.loc["a.jpg", "cluster_id"] == d.loc["b.jpg", "cluster_id"] != d.loc["c.jpg", "cluster_id"]
    )
    assert d.loc["b.jpg", "status"] == "kept"
    assert (d.loc["a.jpg", "status"], d.loc["a.jpg", "reason"]) == ("duplicate", "exact_duplicate")
    assert "b.jpg" in d.loc["a.jpg", "detail"]
    assert (d.loc["bad.jpg", "status"], d.loc["bad.jpg", "cluster_id"]) == ("quarantined", "")


def test_near_duplicates_need_hash_and_descriptor_to_agree():
    rows = [manifest_row(f"{i}.jpg", "phone", f"{i:x}" * 64) for i in range(5)]
    m = frame(rows)
    desc = distinct_embeddings(5)
    m.loc[1, "phash"] = m.loc[0, "phash"] ^ 0b111  # 3 bits from photo 0...
    desc[1] = desc[0] * 0.97 + desc[1] * 0.03  # ...and a close descriptor: tier 1
    desc[2] = desc[0] * 0.999 + desc[2] * 0.001  # descriptor alone nearly equal: tier 3
    m.loc[3, "phash"] = m.loc[0, "phash"] ^ 0b1  # hash alone close, descriptor far: no tier
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    d = dedupe(m, given_features(m, desc, distinct_embeddings(5)), NO_DECISIONS, CONFIG).set_index(
        "id"
    )
    assert (
        d.loc["0.jpg", "cluster_id"] == d.loc["1.jpg", "cluster_id"] == d.loc["2.jpg", "cluster_id"]
    )
    assert d.loc["3.jpg", "cluster_id"] != d.loc["0.jpg", "cluster_id"]
    assert d.loc["4.jpg", "cluster_id"] != d.loc["0.jpg", "cluster_id"]
    assert set(d.loc[["0.jpg", "1.jpg", "2.jpg"], "reason"]) == {"", "near_duplicate"}


def test_cluster_id_does_not_depend_on_input_order():
    rows = [manifest_row(f"{n}.jpg", "laptop", "a" * 64) for n in ("z", "m", "b")]
    for order in (rows, rows[::-1]):
        d = run(order)
        assert d.loc["b.jpg", "status"] == "kept" and d.loc["b.jpg", "cluster_id"] == "a" * 16


def test_same_photo_with_two_labels_is_a_conflict_not_a_guess():
    d = run([manifest_row("a.jpg", "phone", "c" * 64), manifest_row("b.jpg", "laptop", "c" * 64)])
    assert set(d["status"]) == {"label_conflict"}
    assert "laptop" in d["detail"].iloc[0] and "phone" in d["detail"].iloc[0]


def test_review_decisions_override_and_raw_rows_stay(tmp_path):
    rows = [
        manifest_row("rep.jpg", "phone", "a" * 64, 200, 200),
        manifest_row("copy.jpg", "phone", "a" * 64),
        manifest_row("charger.jpg", "phone", "b" * 64),
        manifest_row("mislabelled.jpg", "phone", "c" * 64),
        manifest_row("conflict-1.jpg", "phone", "d" * 64),
        manifest_row("conflict-2.jpg", "laptop", "d" * 64),
    ]
    path = tmp_path / "decisions.csv"
    path.write_text(
        "id,decision,new_label,note\n"
        "rep.jpg,drop,,blurry\n"
        "charger.jpg,drop,,accessory not a phone\n"
        "mislabelled.jpg,relabel,laptop,it is a laptop\n"
        "conflict-2.jpg,relabel,phone,\n"
    )
    d = run(rows, read_decisions(path, CLASSES))
    assert len(d) == 6  # nothing disappears
    assert (d.loc["charger.jpg", "status"], d.loc["charger.jpg", "detail"]) == (
        "dropped",
        "accessory not a phone",
    )
    # A drop takes the photo's copies with it (same photo, other ids)...
    assert d.loc["rep.jpg", "status"] == "dropped" and d.loc["copy.jpg", "status"] == "dropped"
    assert d.loc["copy.jpg", "detail"] == "copy of rep.jpg"
    assert (d.loc["mislabelled.jpg", "label"], d.loc["mislabelled.jpg", "given_label"]) == (
        "laptop",
        "phone",
    )
    assert set(d.loc[["conflict-1.jpg", "conflict-2.jpg"], "status"]) == {"kept", "duplicate"}


def test_keep_decision_saves_a_copy_of_a_dropped_photo(tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_text("id,decision,new_label,note\nrep.jpg,drop,,blurry\ncopy.jpg,keep,,sharp\n")
    rows = [
        manifest_row("rep.jpg", "phone", "a" * 64, 200, 200),
        manifest_row("copy.jpg", "phone", "a" * 64),
    ]
    d = run(rows, read_decisions(path, CLASSES))
    assert d.loc["rep.jpg", "status"] == "dropped" and d.loc["copy.jpg", "status"] == "kept"


def test_keep_decision_overrides_duplicate(tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_text("id,decision,new_label,note\ncopy.jpg,keep,,two angles\n")
    rows = [
        manifest_row("rep.jpg", "phone", "a" * 64, 200, 200),
        manifest_row("copy.jpg", "phone", "a" * 64),
    ]
    d = run(rows, read_decisions(path, CLASSES))
    assert (d.loc["copy.jpg", "status"], d.loc["copy.jpg", "reason"]) == ("kept", "review_keep")


def test_decisions_naming_no_collected_photo_are_listed(tmp_path):
    path = tmp_path / "decisions.csv"
    path.write_text(
        "id,decision,new_label,note\n"
        "phone/1.jpg,drop,,a charger\n"
        "phone/l.jpg,drop,,typo: an l for a 1\n"
        "laptop/gone.jpg,relabel,phone,no longer in the source\n"
    )
    manifest = pd.DataFrame([manifest_row("phone/1.jpg", "phone", "a" * 64)])
    orphans = decisions_without_a_photo(manifest, read_decisions(path, CLASSES))
    assert orphans == ["laptop/gone.jpg", "phone/l.jpg"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("x.jpg,maybe,,", "decision must be one of"),
        ("x.jpg,relabel,tablet,", "new_label must be one of"),
    ],
)
def test_malformed_decisions_are_refused(tmp_path, line, message):
    path = tmp_path / "decisions.csv"
    path.write_text(f"id,decision,new_label,note\n{line}\n")
    with pytest.raises(ValueError, match=message):
        read_decisions(path, CLASSES)


def test_unknown_keep_policy_is_refused():
    with pytest.raises(ValueError, match="largest"):
        dataclasses.replace(CONFIG, keep="random")


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
        ("laptop", "phone"),
        (Source("folder", "photos"),),
        32,
        10**7,
        10**6,
        10,
        48,
        DownloadConfig(),
    )
    collected = pd.read_parquet(
        collect(cfg, class_folder.parent, tmp_path / "c", cache=tmp_path / "cache")
    )
    emb = distinct_embeddings(len(collected))
    deduped = dedupe(collected, given_features(collected, emb, emb), NO_DECISIONS, CONFIG)
    prepared = split_manifest(deduped, PREP)
    assert len(prepared) == 24 and set(prepared["split"]) <= {"train", "val", "test"}
    train = prepared[prepared["split"] == "train"]
    with ShardReader(tmp_path / "c") as shards:
        pack_split(train, shards, 32, tmp_path / "train.npy")
    arr = np.load(tmp_path / "train.npy")
    assert arr.shape == (len(train), 32, 32, 3) and arr.dtype == np.uint8
    # distinct photos give distinct arrays, in manifest index order
    assert len({a.tobytes() for a in arr}) == len(train)


def test_no_cluster_spans_two_splits_and_leakage_is_measured():
    # 300 clusters of 1-3 copies each; a keep decision can keep several copies of a cluster.
    rows = []
    for c in range(300):
        for k in range(1 + c % 3):
            rows.append(
                {
                    **manifest_row(f"{c}-{k}.jpg", "phone", f"{c:064x}"),
                    "status": "kept",
                    "cluster_id": f"{c:016x}",
                }
            )
    deduped = pd.DataFrame(rows)
    deduped[["shard", "offset", "length"]] = ("", 0, 0)
    prepared = split_manifest(deduped, PREP)
    assert (prepared.groupby("cluster_id")["split"].nunique() == 1).all()
    report = leakage_report(deduped, prepared, PREP)
    assert report["leaked_val_test_photos"] == 0
    # a photo-by-photo split puts copies on both sides
    assert report["naive_split_leaked_val_test_photos"] > 0


def test_leaked_counts_val_test_photos_with_a_cluster_mate_in_train():
    split = pd.Series(["train", "val", "test", "val"])
    cluster = pd.Series(["a", "a", "b", "a"])
    assert leaked(split, cluster) == 2


def test_the_review_page_shows_the_largest_clusters_and_counts_them_all(tmp_path, monkeypatch):
    cluster_id = ["c1", "c1", "c2", "c2", "c2", "c3", "c3", "c4", ""]
    deduped = pd.DataFrame(
        {
            "id": [f"p{i}.jpg" for i in range(len(cluster_id))],
            "label": "phone",
            "status": "kept",
            "reason": "",
            "cluster_id": cluster_id,
        }
    )
    seen = {}

    def render(candidates, members, thumb, decisions, other_class, total):
        seen.update(clusters=sorted(set(members["cluster_id"])), total=total)
        return "page"

    monkeypatch.setattr(stages.dedupe, "render_review", render)
    review = tmp_path / "review"
    write_review_page(deduped, deduped.head(0), tmp_path, review, tmp_path / "d.csv", "", 2)
    # c2 has the most photos; c1 and c3 tie and c1 comes first by id; c4 is one photo alone
    assert seen == {"clusters": ["c1", "c2"], "total": 3}
    assert (review / "index.html").read_text() == "page"
    write_review_page(deduped, deduped.head(0), tmp_path, review, tmp_path / "d.csv", "", 0)
    assert seen == {"clusters": ["c1", "c2", "c3"], "total": 3}
