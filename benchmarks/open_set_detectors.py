"""Could a detector beside the classifier catch the off-category photos that the other class
misses? Scores of "none of these" compared on the folds of a three-class cross-validation.

    python benchmarks/open_set_detectors.py --prepared <three-class prepared set>
                                            --cv <its benchmarks/cv_accuracy.py results folder>

Run cv_accuracy.py first with the other class switched on (docs/concepts/value-model.md); the
class names come from its folds' model cards. For each fold, every score ranks that fold's test
photos, off-category against known, and is fitted on the fold's training photos (and prepare's
val photos) only:
- p(other): the fold's three-class network, its calibrated probability (cv_accuracy's
  proba.npz);
- ImageNet logistic regression: frozen ImageNet EfficientNet-Lite0 embeddings (the 1280-d ones
  dedupe computes, vitrine.model.embeddings.embed), a balanced logistic regression of other
  against known photos;
- ImageNet k-NN: the cosine to the 5th-nearest off-category training photo minus that to the
  5th-nearest known one, on the same embeddings;
- rank average: the mean of the first two scores' ranks within the fold.
Prints, pooled over the folds, each score's AUROC and the share of off-category photos it
catches when it flags 1, 2, 5 and 8% of the known ones. The thresholds are read off the test
photos themselves, so the recalls are upper bounds of what a threshold fitted elsewhere gives.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from vitrine.contracts import MODEL_INFO_FILE
from vitrine.data.layout import prepared_manifest_path, split_images_path
from vitrine.model.embeddings import embed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cv_accuracy import gathered, pooled_photos
from options import at_least

FLAGGED = (0.01, 0.02, 0.05, 0.08)  # shares of known photos flagged
NEIGHBOUR = 5  # the k of the k-NN score


def kth_cosine(queries: np.ndarray, references: np.ndarray, k: int) -> np.ndarray:
    """Each query's cosine to its k-th most similar reference (unit-norm rows)."""
    return -np.sort(-(queries @ references.T), axis=1)[:, k - 1]


def fold_scores(train: np.ndarray, off_train: np.ndarray, test: np.ndarray) -> dict:
    """The embedding scores of one fold's test photos, fitted on its training photos."""
    regression = LogisticRegression(max_iter=2000, class_weight="balanced")
    regression.fit(train, off_train)
    return {
        "ImageNet logistic regression": regression.predict_proba(test)[:, 1],
        "ImageNet k-NN": kth_cosine(test, train[off_train], NEIGHBOUR)
        - kth_cosine(test, train[~off_train], NEIGHBOUR),
    }


def recall_at(scores: np.ndarray, off: np.ndarray, flagged: float) -> float:
    """The share of off-category photos scoring above the threshold that flags `flagged` of
    the known ones."""
    known = np.sort(scores[~off])[::-1]
    return float((scores[off] > known[int(flagged * len(known))]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--cv", type=Path, required=True, help="cv_accuracy's results folder")
    parser.add_argument("--folds", type=at_least(2), default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--other-class", default="other", help="the off-category class's name")
    args = parser.parse_args()
    other = args.other_class
    classes = json.loads((args.cv / "fold0" / "model" / MODEL_INFO_FILE).read_text())["classes"]
    if other not in classes:
        raise SystemExit(f"{args.cv}: its networks have no class {other!r}, only {classes}")
    rows = pooled_photos(args.prepared, args.folds, args.seed)
    manifest = pd.read_parquet(prepared_manifest_path(args.prepared))
    val_off = (manifest.loc[manifest["split"] == "val", "label"] == other).to_numpy()
    print(f"embedding {len(rows) + len(val_off)} photos (frozen ImageNet EfficientNet-Lite0)")
    features = embed(gathered(args.prepared, rows))
    val_features = embed(np.load(split_images_path(args.prepared, "val")))
    pooled: dict[str, list[np.ndarray]] = {}
    offs = []
    for fold in range(args.folds):
        in_test = (rows["fold"] == fold).to_numpy()
        off = (rows.loc[in_test, "label"] == other).to_numpy()
        saved = np.load(args.cv / f"fold{fold}" / "proba.npz")
        if len(saved["test"]) != in_test.sum():
            raise SystemExit(f"{args.cv}: fold {fold} was not scored on these photos")
        train = np.concatenate([features[~in_test], val_features])
        off_train = np.concatenate([(rows.loc[~in_test, "label"] == other).to_numpy(), val_off])
        scores = {"p(other)": saved["test"][:, classes.index(other)]}
        scores |= fold_scores(train, off_train, features[in_test])
        # Ranks as fractions of the fold, so folds of different sizes pool on one scale.
        scores["rank average"] = (
            rankdata(scores["p(other)"]) + rankdata(scores["ImageNet logistic regression"])
        ) / (2 * len(off))
        for name, values in scores.items():
            pooled.setdefault(name, []).append(values)
        offs.append(off)
    off = np.concatenate(offs)
    print(f"{off.sum()} off-category and {(~off).sum()} known test photos in {args.folds} folds")
    header = " | ".join(f"{f:.0%} flagged" for f in FLAGGED)
    print(f"| score | AUROC | {header} |")
    for name, parts in pooled.items():
        values = np.concatenate(parts)
        recalls = " | ".join(f"{recall_at(values, off, f):.0%}" for f in FLAGGED)
        print(f"| {name} | {roc_auc_score(off, values):.3f} | {recalls} |")


if __name__ == "__main__":
    main()
