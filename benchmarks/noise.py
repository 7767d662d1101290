"""Noise figures: how many of the photos a whole review took out the noise scores flag.

    .venv/bin/python benchmarks/noise.py            # dedupe's features, from its cache
    .venv/bin/python benchmarks/noise.py --no-cache # computed afresh (about a minute)

The photos dedupe would keep without any review decision (one per near-duplicate cluster of
collect's accepted photos, label conflicts out), scored as stages/dedupe.py scores them
(cleanlab's label issues on out-of-fold logistic regression, and the class outlier score at
params.yaml dedupe.noise.min_outlier_score), against the photos data/review/decisions.csv takes
out of the sources' classes (dropped, or decided `other`).
Needs data/collected (`dvc repro collect`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vitrine.config import load_params, load_paths
from vitrine.curation.features import accepted_features
from vitrine.curation.neardup import clusters, near_duplicate_pairs
from vitrine.curation.noise import class_outlier_scores, find_label_issues, out_of_fold_proba
from vitrine.data.shards import MANIFEST
from vitrine.ingest.sources import phash_from_int64


def kept_without_review(accepted: pd.DataFrame, descriptors: np.ndarray, tiers: Any) -> np.ndarray:
    """Positions in `accepted` of the photos dedupe keeps when no decision is applied: per
    cluster (same sha256, or a near-duplicate tier) the most pixels, then the smallest (source,
    id); none of a cluster whose members carry several labels."""
    hashes = np.array([phash_from_int64(int(h)) for h in accepted["phash"]], dtype=np.uint64)
    _, same = np.unique(accepted["sha256"].to_numpy(dtype=str), return_inverse=True)
    order = np.argsort(same, kind="stable")
    run = same[order][1:] == same[order][:-1]
    exact = np.stack([order[:-1][run], order[1:][run]], axis=1)
    pairs = np.concatenate([exact, near_duplicate_pairs(hashes, descriptors, tiers)])
    frame = accepted.reset_index(drop=True).assign(
        cluster=clusters(len(accepted), pairs),
        pixels=accepted["width"].to_numpy() * accepted["height"].to_numpy(),
        pos=np.arange(len(accepted)),
    )
    labels = frame.groupby("cluster")["label"].nunique()
    ordered = frame.sort_values(["cluster", "pixels", "source", "id"], ascending=[1, 0, 1, 1])
    first = ordered.groupby("cluster").head(1)
    return np.sort(first.loc[first["cluster"].map(labels).eq(1), "pos"].to_numpy())


def noise_figures(
    accepted: pd.DataFrame,
    descriptors: np.ndarray,
    embeddings: np.ndarray,
    dropped: set[str],
    params: dict[str, Any],
) -> dict[str, int]:
    """kept, cleanlab's flags and how many of them review dropped, the outlier score's flags
    (>= min_outlier_score) and theirs, and both together."""
    config = params["dedupe"]
    keep = kept_without_review(accepted, descriptors, config["tiers"])
    kept, emb = accepted.iloc[keep], embeddings[keep]
    # The classes the sources give: without the review no photo is labelled other_class.
    classes = [c for c in params["classes"] if c in set(kept["label"])]
    y = kept["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    noise = config["noise"]
    proba = out_of_fold_proba(emb, y, len(classes), noise["folds"], noise["seed"])
    issue = find_label_issues(proba, y).is_issue
    outlier = class_outlier_scores(emb, y) >= noise["min_outlier_score"]
    was_dropped = kept["id"].isin(dropped).to_numpy()
    return {
        "kept": len(kept),
        "dropped_kept": int(was_dropped.sum()),
        "cleanlab_flags": int(issue.sum()),
        "cleanlab_found": int((issue & was_dropped).sum()),
        "outlier_flags": int(outlier.sum()),
        "outlier_found": int((outlier & was_dropped).sum()),
        "both_flags": int((issue | outlier).sum()),
        "both_found": int(((issue | outlier) & was_dropped).sum()),
    }


def describe(name: str, figures: dict[str, int]) -> str:
    f = figures
    return (
        f"{name}: of {f['kept']:,} kept photos ({f['dropped_kept']} taken out by the review), "
        f"cleanlab flags {f['cleanlab_flags']}, {f['cleanlab_found']} of them taken out; "
        f"outlier score {f['outlier_flags']}, {f['outlier_found']}; "
        f"both {f['both_flags']}, {f['both_found']}"
    )


def load_inputs() -> tuple[pd.DataFrame, Path, set[str], dict[str, Any]]:
    params = load_params()
    paths = load_paths(params)
    manifest = pd.read_parquet(paths.collected / MANIFEST)
    decisions = pd.read_csv(paths.decisions, dtype=str, keep_default_na=False)
    # Taken out of the sources' classes: dropped, or moved to params.yaml other_class.
    out = decisions["decision"].isin(["drop", "other"])
    dropped = set(decisions.loc[out, "id"])
    return manifest, paths.collected, dropped, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-cache", action="store_true", help="compute the features afresh")
    args = parser.parse_args()
    manifest, collected, dropped, params = load_inputs()
    config = params["dedupe"]
    cache = None if args.no_cache or not config["cache_dir"] else Path(config["cache_dir"])
    features = accepted_features(manifest, collected, config["embedding_batch_size"], cache)
    accepted = manifest[manifest["status"] == "accepted"]
    rows = features.row_photo  # per accepted row, as the figures are counted
    figures = noise_figures(
        accepted, features.descriptors[rows], features.embeddings[rows], dropped, params
    )
    print(describe(f"{len(dropped)} photos taken out by the review", figures))


if __name__ == "__main__":
    main()
