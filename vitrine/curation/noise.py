"""Finding mislabelled and off-category photos: confident learning on frozen embeddings.

Out-of-fold probabilities from a linear model on the embeddings feed confident learning
(Northcutt et al., 2021): a photo whose given class is less likely, by the model, than another
class's own average confidence is a label-issue candidate. An embedding outlier score per class
catches what fits no class at all (chargers, cases, VR headsets under "phone").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold


def out_of_fold_proba(
    embeddings: np.ndarray, labels: np.ndarray, n_classes: int, folds: int, seed: int
) -> np.ndarray:
    """(n, n_classes) probabilities, each predicted by a model that never saw that photo."""
    proba = np.zeros((len(labels), n_classes), dtype=np.float64)
    min_count = np.bincount(labels, minlength=n_classes).min()
    splitter = StratifiedKFold(
        n_splits=min(folds, max(2, min_count)), shuffle=True, random_state=seed
    )
    for train_idx, test_idx in splitter.split(embeddings, labels):
        model = LogisticRegression(max_iter=2000, C=1.0)
        model.fit(embeddings[train_idx], labels[train_idx])
        proba[np.ix_(test_idx, model.classes_)] = model.predict_proba(embeddings[test_idx])
    return proba


@dataclass(frozen=True)
class LabelIssues:
    is_issue: np.ndarray  # bool (n,): off-diagonal of the confident joint
    suggested: np.ndarray  # int (n,): the class the model is confident about instead
    score: np.ndarray  # float (n,): 1 - p(given class), higher = more suspicious


def confident_learning(proba: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """Confident-joint label issues: p(j) >= t_j for some j != given, where t_j is the mean
    probability of class j over the photos labelled j (its per-class threshold)."""
    n_classes = proba.shape[1]
    thresholds = np.array(
        [proba[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(n_classes)]
    )
    confident = proba >= thresholds[None, :]
    # Among classes above their threshold, the most probable one is the "confident" label.
    masked = np.where(confident, proba, -1.0)
    suggested = masked.argmax(axis=1)
    has_confident = confident.any(axis=1)
    is_issue = has_confident & (suggested != labels)
    score = 1.0 - proba[np.arange(len(labels)), labels]
    return LabelIssues(is_issue, np.where(has_confident, suggested, labels), score)


def class_outlier_scores(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Robust z-score of each photo's cosine distance to its class's mean embedding: how far
    from everything else in its class a photo is (an accessory among phones)."""
    scores = np.zeros(len(labels))
    for c in np.unique(labels):
        members = labels == c
        centroid = embeddings[members].mean(axis=0)
        centroid /= np.linalg.norm(centroid) or 1.0
        distance = 1.0 - embeddings[members] @ centroid
        median = np.median(distance)
        mad = np.median(np.abs(distance - median)) * 1.4826 or 1e-9
        scores[members] = (distance - median) / mad
    return scores
