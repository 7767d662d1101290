"""Finding mislabelled and off-category photos: confident learning on frozen embeddings.

A logistic regression on the frozen embeddings gives every photo out-of-fold class probabilities
(predicted by a model that never saw it), which is what confident learning expects. cleanlab
(Northcutt, Jiang & Chuang, 2021) turns them into label issues: `cleanlab.filter.find_label_issues`
with `filter_by="prune_by_noise_rate"`, its default and the paper's prune-by-noise-rate method
(the confident joint estimates how many photos of each given class belong to another; that many
are flagged per pair of classes, those with the largest margin for the other class first). The
score is cleanlab's self-confidence label quality, turned so that higher is more suspicious.

Confident learning only sees the classes it is given, so a charger under "phone" is flagged only
when the model finds it more laptop-like than the phones. An embedding outlier score per class
catches what fits no class at all, and on the Avito photos it adds recall: of the 3,429 photos
that would be kept without the human review, cleanlab flags 34, among them 11 of the 135 that the
review dropped as off-category; the outlier score (>= 4, params.yaml dedupe.noise) flags 6,
among them 4 other dropped ones, which cleanlab misses: 15 of the 135 with both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cleanlab.filter import find_label_issues as cleanlab_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

# cleanlab's default filter and score, named so that a change of its defaults changes nothing here.
FILTER_BY = "prune_by_noise_rate"
QUALITY_SCORE = "self_confidence"  # p(given class); for two classes it ranks as the margin does


PREDICT_CHUNK = 16384  # photos predicted at a time outside the fitted sample


def fit_sample(labels: np.ndarray, max_fit: int, seed: int, min_per_class: int = 50) -> np.ndarray:
    """The sorted rows the regressions are fitted on: all of them when there are at most
    `max_fit` (or max_fit is 0), else a stratified draw of about that many that keeps every
    photo of a class with fewer than `min_per_class` and at least that many of the others."""
    n = len(labels)
    if not max_fit or n <= max_fit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        quota = max(round(max_fit * len(members) / n), min_per_class)
        chosen.append(rng.permutation(members)[: min(len(members), quota)])
    return np.sort(np.concatenate(chosen))


def out_of_fold_proba(
    embeddings: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    folds: int,
    seed: int,
    rows: np.ndarray | None = None,
    max_fit: int = 0,
) -> np.ndarray:
    """(n, n_classes) probabilities, each predicted by a model that never saw that photo.
    `rows`: photo i's row of `embeddings` (None: row i), so that a caller holding one row per
    distinct photo needs no per-photo copy of them (0.75 GB at 160,000 photos).

    `max_fit` bounds the regressions' cost in a large catalog (0: no bound): the folds split
    a stratified sample of that many photos (fit_sample), and each photo outside it gets the
    mean of the folds' models, none of which saw it. At most max_fit photos, the sample is
    all of them and the folds are those of a plain k-fold.
    """
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    fitted = fit_sample(labels, max_fit, seed)
    rest = np.setdiff1d(np.arange(len(labels)), fitted, assume_unique=True)
    proba = np.zeros((len(labels), n_classes), dtype=np.float64)
    min_count = np.bincount(labels[fitted], minlength=n_classes).min()
    n_splits = min(folds, max(2, min_count))
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train_idx, test_idx in splitter.split(np.zeros(len(fitted)), labels[fitted]):
        train, test = fitted[train_idx], fitted[test_idx]
        model = LogisticRegression(max_iter=2000, C=1.0)
        model.fit(embeddings[rows[train]], labels[train])
        proba[np.ix_(test, model.classes_)] = model.predict_proba(embeddings[rows[test]])
        for start in range(0, len(rest), PREDICT_CHUNK):
            chunk = rest[start : start + PREDICT_CHUNK]
            share = model.predict_proba(embeddings[rows[chunk]]) / n_splits
            proba[np.ix_(chunk, model.classes_)] += share
    return proba


@dataclass(frozen=True)
class LabelIssues:
    is_issue: np.ndarray  # bool (n,): flagged by confident learning
    suggested: np.ndarray  # int (n,): the most probable class for an issue, else the given one
    score: np.ndarray  # float (n,): 1 - label quality, higher = more suspicious


def find_label_issues(proba: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """cleanlab's label issues and label quality for out-of-fold `proba` (n, n_classes)."""
    is_issue = cleanlab_label_issues(
        labels,
        proba,
        filter_by=FILTER_BY,
        # One process: with a handful of classes a worker pool costs more than it saves.
        n_jobs=1,
    )
    quality = get_label_quality_scores(labels, proba, method=QUALITY_SCORE)
    # Only a flagged photo gets another label suggested: elsewhere the given one stands.
    suggested = np.where(is_issue, proba.argmax(axis=1), labels)
    return LabelIssues(is_issue, suggested, 1.0 - quality)


def class_outlier_scores(
    embeddings: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """Robust z-score of each photo's cosine distance to its class's mean embedding: how far
    from everything else in its class a photo is (an accessory among phones). `rows` as in
    out_of_fold_proba."""
    rows = np.arange(len(labels)) if rows is None else np.asarray(rows)
    scores = np.zeros(len(labels))
    for c in np.unique(labels):
        members = labels == c
        own = embeddings[rows[members]]
        centroid = own.mean(axis=0)
        centroid /= np.linalg.norm(centroid) or 1.0
        distance = 1.0 - own @ centroid
        median = np.median(distance)
        mad = np.median(np.abs(distance - median)) * 1.4826 or 1e-9
        scores[members] = (distance - median) / mad
    return scores
