"""dedupe: cluster exact and near-duplicate photos, keep one per cluster, flag noise for review.

Re-uploads of the same photo (byte-identical, resized, recompressed, cropped, captioned) would
otherwise land in both train and test and inflate the scores. Three signals find them: sha256
for exact copies; for near copies, tiers that each require both a 64-bit pHash distance
(searched by multi-index hashing) and a cosine similarity of a photo-level EfficientNet-Lite0
descriptor (mid-level features at 96 px, so two different laptops shot alike stay apart).
Pairs are merged transitively into clusters. Every collect row is carried over, so the
manifest still accounts for every input; human decisions (data/review/decisions.csv) override
the automatic choices.

The two networks are nearly all of the stage's time. They run under ONNX Runtime on the Dask
workers of compute.scheduler (vitrine.curation.features; local worker processes by default), and
each distinct photo's features are cached by sha256 in dedupe.cache_dir, so a run after new
photos arrived runs them on those only, with the outputs of a run without the cache. The
near-copy search keeps its candidates there too (vitrine.curation.pair_index): new photos are
searched against all, not all against all.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import pydantic

from vitrine.compute import ComputeConfig
from vitrine.config import (
    ConfigError,
    Count,
    NonNegative,
    NonNegativeInt,
    from_mapping,
    load_params,
    load_paths,
    params_block,
    run_cli,
    stage_config,
)
from vitrine.curation.features import PhotoFeatures, accepted_features
from vitrine.curation.neardup import HASH_SEARCH_MAX_DISTANCE, clusters, near_duplicate_pairs
from vitrine.curation.noise import class_outlier_scores, find_label_issues, out_of_fold_proba
from vitrine.curation.pair_index import PAIRS_FILE, indexed_pairs
from vitrine.curation.review import render_review
from vitrine.data.shards import MANIFEST, ShardReader
from vitrine.ingest.sources import phash_from_int64

# other: the photo is none of the classes (a charger, a box, a screenshot): with params.yaml's
# other_class set, an example of that class, its copies too; without, dropped like `drop`.
DECISIONS = ("keep", "drop", "relabel", "other")
EMBEDDINGS = "embeddings.npy"


@params_block
class NoiseConfig:
    folds: Annotated[int, pydantic.Field(ge=2)]  # k of the out-of-fold logistic regression
    seed: int
    min_outlier_score: float  # robust z-score within the class
    max_candidates: NonNegativeInt  # on the review page, most suspicious first
    max_fit: NonNegativeInt = (
        0  # photos the regressions are fitted on, at most (noise.fit_sample); 0: all
    )


@params_block
class DedupeConfig:
    classes: tuple[str, ...]
    keep: str  # which member represents a cluster: "largest" (most pixels, ties by id)
    # A pair is a near duplicate if any tier holds: pHash distance <= bits and cosine >= min.
    tiers: tuple[tuple[int, float], ...]
    embedding_batch_size: Count
    noise: NoiseConfig
    cache_dir: str = ""  # each photo's features (vitrine.curation.features); "": none kept
    cache_keep_days: NonNegative = 30.0  # a photo no run has had for this long leaves the cache
    other_class: str = ""  # params.yaml's other_class: what an `other` decision labels ("": drop)
    review_clusters: NonNegativeInt = 0  # clusters on the review page, the largest first (0: all)

    def __post_init__(self) -> None:
        if self.keep != "largest":
            raise ValueError(f"dedupe.keep: only 'largest' is supported, got {self.keep!r}")
        for bits, cosine in self.tiers:  # a 64-bit pHash; a cosine of unit vectors
            if not (0 <= bits <= 64 and -1 <= cosine <= 1):
                raise ValueError(f"dedupe.tiers: [bits 0-64, cosine -1 to 1], got {[bits, cosine]}")


# --- clusters ------------------------------------------------------------------------------


def exact_pairs(sha256: pd.Series) -> np.ndarray:
    """Each photo paired with the first photo of the same bytes (positions in `sha256`)."""
    codes = pd.factorize(sha256.to_numpy())[0]
    first = np.unique(codes, return_index=True)[1]  # each distinct sha256's first position
    pairs = np.stack([first[codes], np.arange(len(sha256))], axis=1)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def duplicate_pairs(
    accepted: pd.DataFrame,
    features: PhotoFeatures,
    config: DedupeConfig,
    pair_index: Path | None = None,
) -> np.ndarray:
    """All evidence that two accepted photos are the same photo, as (i, j) positions in
    `accepted`: rows of the same bytes, and near copies searched among the distinct photos
    (with `pair_index`, new photos against the index of the last run's)."""
    first_row = np.unique(features.row_photo, return_index=True)[1]  # photo -> its first row
    phash = accepted["phash"].to_numpy()[first_row]
    hashes = np.array([phash_from_int64(int(h)) for h in phash], dtype=np.uint64)
    wide = [c for d, c in config.tiers if d > HASH_SEARCH_MAX_DISTANCE]
    scored = None
    if wide:
        scored = indexed_pairs(
            features.digests, features.descriptors, min(wide), pair_index, features.version
        )
    near = near_duplicate_pairs(hashes, features.descriptors, config.tiers, scored=scored)
    return np.concatenate([exact_pairs(accepted["sha256"]), first_row[near]])


def cluster_keys(accepted: pd.DataFrame, labels: np.ndarray) -> pd.Series:
    """A cluster's id is its smallest member sha256 prefix: independent of input order, and a
    new photo changes it only when it joins that very cluster (so old splits stay put)."""
    prefix = accepted["sha256"].str[:16].to_numpy()
    smallest = pd.Series(prefix).groupby(labels).transform("min")
    return pd.Series(smallest.to_numpy(), index=accepted.index)


# --- human decisions -------------------------------------------------------------------------


def read_decisions(path: Path, classes: tuple[str, ...]) -> pd.DataFrame:
    """The reviewer's decisions; a malformed file is an error, not something to skip (a
    ConfigError: the command says it in one line, as it does a bad setting)."""
    decisions = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"id", "decision", "new_label", "note"} - set(decisions.columns)
    if missing:
        raise ConfigError(f"{path}: missing column(s) {sorted(missing)}")
    bad = decisions[~decisions["decision"].isin(DECISIONS)]
    if len(bad):
        raise ConfigError(f"{path}: decision must be one of {DECISIONS}: {bad.to_dict('records')}")
    relabel = decisions["decision"] == "relabel"
    wrong = decisions[relabel & ~decisions["new_label"].isin(classes)]
    if len(wrong):
        raise ConfigError(
            f"{path}: new_label must be one of {list(classes)}: {wrong.to_dict('records')}"
        )
    repeated = sorted(decisions.loc[decisions["id"].duplicated(), "id"])
    if repeated:
        raise ConfigError(f"{path}: several decisions for {repeated}")
    return decisions


def decisions_without_a_photo(manifest: pd.DataFrame, decisions: pd.DataFrame) -> list[str]:
    """Decided ids that name no collected photo (a typo, or a photo its source no longer
    holds): they change nothing, so the reviewer must hear of them."""
    return sorted(set(decisions["id"]) - set(manifest["id"]))


def as_other(decisions: pd.DataFrame, other_class: str) -> pd.DataFrame:
    """`other` decisions as dedupe applies them: a relabel to `other_class`, or without one a
    drop (the photo leaves the data set, as it did before the other class existed)."""
    other = decisions["decision"] == "other"
    if not other.any():
        return decisions
    if not other_class:
        return decisions.assign(decision=decisions["decision"].mask(other, "drop"))
    return decisions.assign(
        decision=decisions["decision"].mask(other, "relabel"),
        new_label=decisions["new_label"].mask(other, other_class),
    )


def label_copies_other(
    frame: pd.DataFrame, decisions: pd.DataFrame, other_class: str
) -> pd.DataFrame:
    """A photo a reviewer relabelled `other_class` takes its copies (its cluster's members with
    no decision of their own) along, as a drop takes them out: they are the same off-category
    photo, and a cluster of two labels would be held back as a label conflict."""
    if not other_class:
        return frame
    relabelled = decisions.loc[decisions["new_label"] == other_class, "id"]
    clustered = frame["cluster_id"] != ""
    hit = clustered & frame["id"].isin(relabelled)
    copies = frame["cluster_id"].isin(set(frame.loc[hit, "cluster_id"])) & clustered
    copies &= ~frame["id"].isin(decisions["id"])
    return frame.assign(label=frame["label"].mask(copies, other_class))


def apply_relabels(frame: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """`label` becomes the reviewed label; `given_label` keeps what the source said."""
    out = frame.assign(given_label=frame["label"])
    new = decisions[decisions["decision"] == "relabel"].set_index("id")["new_label"]
    hit = out["id"].isin(new.index)
    out.loc[hit, "label"] = out.loc[hit, "id"].map(new)
    return out


# --- statuses --------------------------------------------------------------------------------


def pick_representatives(frame: pd.DataFrame) -> pd.Series:
    """Per cluster, the id of the kept row among the eligible ones: the most pixels first, then
    the smallest (source, id), so the choice does not depend on input order."""
    ordered = frame.assign(pixels=frame["width"] * frame["height"]).sort_values(
        ["cluster_id", "pixels", "source", "id"], ascending=[True, False, True, True]
    )
    return ordered.groupby("cluster_id").head(1).set_index("cluster_id")["id"]


def assign_statuses(frame: pd.DataFrame, decisions: pd.DataFrame) -> pd.DataFrame:
    """kept / duplicate / label_conflict / dropped for clustered rows, decisions last."""
    out = frame.copy()
    by_id = decisions.set_index("id")
    decided = out["id"].map(by_id["decision"]).astype(object).fillna("")
    note = out["id"].map(by_id["note"]).astype(object).fillna("")
    clustered = out["cluster_id"] != ""
    # Dropping a photo drops its copies too: they are the same photo under other ids.
    dropped_clusters = set(out.loc[clustered & (decided == "drop"), "cluster_id"])
    dropped = clustered & out["cluster_id"].isin(dropped_clusters) & (decided != "keep")
    copy_of_dropped = dropped & (decided != "drop")
    first_drop = out[decided == "drop"].drop_duplicates("cluster_id").set_index("cluster_id")["id"]
    note[copy_of_dropped] = "copy of " + out.loc[copy_of_dropped, "cluster_id"].map(first_drop)
    eligible = out[clustered & ~dropped]
    out["representative"] = out["cluster_id"].map(pick_representatives(eligible)).fillna("")
    n_labels = eligible.groupby("cluster_id")["label"].nunique()
    conflict = clustered & ~dropped & out["cluster_id"].map(n_labels).gt(1)
    duplicate = clustered & ~dropped & ~conflict & (out["id"] != out["representative"])
    rep_sha = out["representative"].map(out.drop_duplicates("id").set_index("id")["sha256"])
    out.loc[clustered, ["status", "reason", "detail"]] = ["kept", "", ""]
    out.loc[duplicate, "status"] = "duplicate"
    out.loc[duplicate, "reason"] = np.where(
        out.loc[duplicate, "sha256"] == rep_sha[duplicate], "exact_duplicate", "near_duplicate"
    )
    out.loc[duplicate, "detail"] = "copy of " + out.loc[duplicate, "representative"]
    # Same photo, different labels: a human decides; no copy is trained on meanwhile.
    labels = eligible.groupby("cluster_id")["label"].agg(lambda s: sorted(set(s)))
    out.loc[conflict, ["status", "reason"]] = ["label_conflict", "label_conflict"]
    out.loc[conflict, "detail"] = out.loc[conflict, "cluster_id"].map(
        lambda c: f"cluster labelled {labels[c]}"
    )
    out.loc[dropped, ["status", "reason"]] = ["dropped", "review_drop"]
    out.loc[dropped, "detail"] = note[dropped]
    # A reviewer's keep overrides every automatic choice (a copy is then trained on too; it
    # shares its cluster's split, so this cannot leak between splits).
    forced = clustered & (decided == "keep")
    out.loc[forced, ["status", "reason"]] = ["kept", "review_keep"]
    out.loc[forced, "detail"] = note[forced]
    return out


# --- noise -----------------------------------------------------------------------------------


def noise_scores(
    kept: pd.DataFrame, embeddings: np.ndarray, config: DedupeConfig, rows: np.ndarray | None = None
) -> pd.DataFrame:
    """Per kept photo: label-issue score and suggested label (cleanlab's confident learning on
    out-of-fold probabilities) and an outlier score within its class. `rows`: each kept photo's
    row of `embeddings` (None: in order)."""
    classes = list(config.classes)
    y = kept["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    counts = np.bincount(y, minlength=len(classes))
    scores = pd.DataFrame(index=kept.index)
    if (counts < 2).any():  # nothing to learn a class from: no scores rather than noise
        return scores.assign(
            noise_score=0.0, suggested_label=kept["label"], label_issue=False, outlier_score=0.0
        )
    noise = config.noise
    proba = out_of_fold_proba(
        embeddings, y, len(classes), noise.folds, noise.seed, rows, noise.max_fit
    )
    issues = find_label_issues(proba, y)
    return scores.assign(
        noise_score=issues.score,
        suggested_label=[classes[i] for i in issues.suggested],
        label_issue=issues.is_issue,
        outlier_score=class_outlier_scores(embeddings, y, rows),
    )


def dedupe(
    manifest: pd.DataFrame,
    features: PhotoFeatures,
    decisions: pd.DataFrame,
    config: DedupeConfig,
    pair_index: Path | None = None,
) -> pd.DataFrame:
    """The deduped manifest: every collect row, with cluster_id, representative, status and,
    for kept photos, noise scores. `features`: the accepted rows' photos' descriptors
    (near-duplicate search) and embeddings (semantic, for noise); `pair_index`: where the
    near-duplicate candidates are kept between runs (None: searched afresh). `other`
    decisions are applied as as_other says."""
    decisions = as_other(decisions, config.other_class)
    out = apply_relabels(manifest, decisions)
    accepted = out["status"] == "accepted"
    acc = out[accepted]
    labels = clusters(len(acc), duplicate_pairs(acc, features, config, pair_index))
    out["cluster_id"] = ""
    out.loc[accepted, "cluster_id"] = cluster_keys(acc, labels)
    out = label_copies_other(out, decisions, config.other_class)
    out = assign_statuses(out, decisions)
    kept = (out["status"] == "kept").to_numpy()
    kept_photos = features.row_photo[kept[accepted.to_numpy()]]
    scores = noise_scores(out[kept], features.embeddings, config, kept_photos)
    out = out.join(scores)
    out["noise_score"] = out["noise_score"].fillna(0.0)
    out["outlier_score"] = out["outlier_score"].fillna(0.0)
    out["suggested_label"] = out["suggested_label"].fillna("")
    out["label_issue"] = out["label_issue"].fillna(False).astype(bool)
    return out


def review_candidates(deduped: pd.DataFrame, config: DedupeConfig) -> pd.DataFrame:
    """Kept photos that look mislabelled or off-category, most suspicious first."""
    suspicious = deduped["label_issue"] | (
        deduped["outlier_score"] >= config.noise.min_outlier_score
    )
    ranked = deduped[suspicious & (deduped["status"] == "kept")].sort_values(
        ["label_issue", "noise_score", "outlier_score"], ascending=False
    )
    return ranked.head(config.noise.max_candidates)


def dedupe_report(
    deduped: pd.DataFrame, candidates: pd.DataFrame, orphans: list[str]
) -> dict[str, Any]:
    sizes = deduped[deduped["cluster_id"] != ""].groupby("cluster_id").size()
    status = deduped["status"].value_counts()
    reason = deduped["reason"].value_counts()
    return {
        "records": len(deduped),
        "kept": int(status.get("kept", 0)),
        "duplicates": int(status.get("duplicate", 0)),
        "exact_duplicates": int(reason.get("exact_duplicate", 0)),
        "near_duplicates": int(reason.get("near_duplicate", 0)),
        "label_conflicts": int(status.get("label_conflict", 0)),
        "dropped_by_review": int(status.get("dropped", 0)),
        "relabelled_by_review": int((deduped["label"] != deduped["given_label"]).sum()),
        "decisions_without_a_photo": len(orphans),
        "clusters": len(sizes),
        "clusters_with_copies": int((sizes > 1).sum()),
        "noise_candidates": len(candidates),
    }


# --- I/O -------------------------------------------------------------------------------------


def write_review_page(
    deduped: pd.DataFrame,
    candidates: pd.DataFrame,
    collected: Path,
    out: Path,
    decisions_path: Path,
    other_class: str = "",
    max_clusters: int = 0,
) -> None:
    """reports/review: the noise candidates, and the clusters of more than one photo (at most
    `max_clusters` of them, the largest, ties by id; 0: all): at catalog scale every cluster
    would make a page of hundreds of megabytes."""
    counts = deduped.loc[deduped["cluster_id"] != "", "cluster_id"].value_counts()
    sizes = counts[counts > 1].rename_axis("cluster").reset_index(name="photos")
    shown = sizes.sort_values(["photos", "cluster"], ascending=[False, True])["cluster"]
    if max_clusters:
        shown = shown[:max_clusters]
    members = deduped[deduped["cluster_id"].isin(shown)]
    with ShardReader(collected) as thumbs:

        def thumb(row: pd.Series) -> bytes:
            return thumbs.read(row["thumb_shard"], row["thumb_offset"], row["thumb_length"])

        page = render_review(
            candidates,
            members.sort_values(["cluster_id", "status"]),
            thumb,
            str(decisions_path),
            other_class,
            len(sizes),
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(page)


def save_row_embeddings(path: Path, features: PhotoFeatures, chunk: int = 8192) -> None:
    """Each accepted row's embedding, in manifest order, written in chunks: the per-row array
    is never whole in memory beside the per-photo one."""
    rows = np.lib.format.open_memmap(
        path,
        mode="w+",
        dtype=np.float32,
        shape=(len(features.row_photo), features.embeddings.shape[1]),
    )
    for start in range(0, len(rows), chunk):
        rows[start : start + chunk] = features.embeddings[features.row_photo[start : start + chunk]]
    rows.flush()
    del rows


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), stage_config(DedupeConfig, "dedupe", params)
    decisions = read_decisions(paths.decisions, config.classes)  # a bad file: before the work
    manifest = pd.read_parquet(paths.collected / MANIFEST)
    start = time.perf_counter()
    cache = Path(config.cache_dir) if config.cache_dir else None
    compute = from_mapping(ComputeConfig, params["compute"], "compute")
    features = accepted_features(
        manifest,
        paths.collected,
        config.embedding_batch_size,
        cache,
        scheduler=compute.scheduler,
        keep_s=config.cache_keep_days * 86400,
    )
    print(
        f"dedupe: per-photo work in {time.perf_counter() - start:.1f} s: {features.computed} "
        f"photos computed, {features.reused} from {config.cache_dir or 'no cache'}"
    )
    deduped = dedupe(manifest, features, decisions, config, cache / PAIRS_FILE if cache else None)
    candidates = review_candidates(deduped, config)
    paths.deduped.mkdir(parents=True, exist_ok=True)
    deduped.to_parquet(paths.deduped / MANIFEST, index=False)
    save_row_embeddings(paths.deduped / EMBEDDINGS, features)
    write_review_page(
        deduped,
        candidates,
        paths.collected,
        paths.review,
        paths.decisions,
        config.other_class,
        config.review_clusters,
    )
    orphans = decisions_without_a_photo(manifest, decisions)
    if orphans:
        print(
            f"dedupe: warning: {len(orphans)} decisions in {paths.decisions} name no collected "
            f"photo and change nothing: {', '.join(orphans)}",
            file=sys.stderr,
        )
    report = dedupe_report(deduped, candidates, orphans)
    paths.dedupe_report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"dedupe: {report}")


if __name__ == "__main__":
    run_cli(main)
