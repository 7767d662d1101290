"""Scores that say what a classifier is worth to the marketplace, not only how often it is right.

The value model: a correct prediction of a photo of class a earns value[a]; predicting p instead
costs cost[a, p] (the cost matrix, default `default_mistake_cost`); a photo sent to human review
earns value[a] - review_cost (a person then files it correctly). Every function here is pure and
works on class indices, so tests can check it against hand-computed cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support

from vitrine.config import params_block
from vitrine.runtime.decisions import DECISIONS, chosen, decide

# Confidence threshold that sends every photo to review: above any softmax probability.
REVIEW_ALL = float(np.nextafter(1.0, 2.0))
LOG_FLOOR = 1e-15  # a float32 softmax can round a probability to 0; log(0) would be -inf


@dataclass(frozen=True)
class ValueModel:
    classes: tuple[str, ...]
    value: np.ndarray  # (k,) worth of a correct prediction, per actual class
    cost: np.ndarray  # (k, k) cost of predicting column p for actual row a (diagonal unused)
    review_cost: float  # cost of one human review
    decision: str = "argmax"  # how probabilities become an answer: one of decisions.DECISIONS

    def gain(self) -> np.ndarray:
        """(k, k) what predicting p for actual a earns: value on the diagonal, -cost elsewhere."""
        gain = -self.cost.astype(np.float64)
        np.fill_diagonal(gain, self.value)
        return gain

    def review_gain(self) -> np.ndarray:
        """(k,) what an abstained photo of each actual class earns once a person files it."""
        return self.value - self.review_cost

    def decision_gain(self) -> np.ndarray | None:
        """What decisions.decide weighs the probabilities with (None: the most probable class)."""
        return self.gain() if self.decision == "expected_value" else None

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """(n, k) probabilities -> (n,) the answered class of each photo, by `decision`."""
        return decide(proba, self.decision_gain())


@params_block
class Taxonomy:
    """How class names encode a taxonomy path (Fruit/Apple/Granny-Smith) and how to weigh it."""

    separator: str  # between levels of a class path
    level_weights: tuple[float, ...]  # one per level, coarsest first; flat classes: [1.0]
    # One per level, coarsest first, the last 1: the share of a photo's value that a right
    # answer at that level earns (taxonomy back-off, vitrine.runtime.decisions; 0: a level that
    # earns nothing). Flat classes may leave it empty.
    level_values: tuple[float, ...] = ()


def value_model(
    classes: Sequence[str],
    business_value: Mapping[str, float],
    cost_matrix: Sequence[tuple[str, str, float]],
    default_mistake_cost: float,
    review_cost: float,
    decision: str = "argmax",
) -> ValueModel:
    """Checked construction from params: every class valued, every cost naming known classes."""
    if decision not in DECISIONS:
        raise ValueError(f"evaluate.decision {decision!r} is not one of {list(DECISIONS)}")
    missing = [c for c in classes if c not in business_value]
    unknown = sorted(set(business_value) - set(classes))
    if missing or unknown:
        raise ValueError(
            f"business values must cover exactly the classes: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unknown {unknown[:10]}"
        )
    value = np.array([business_value[c] for c in classes], dtype=np.float64)
    if not np.isfinite(value).all() or value.sum() <= 0 or (value < 0).any():
        raise ValueError("business values must be finite, non-negative and not all zero")
    index = {c: i for i, c in enumerate(classes)}
    cost = np.full((len(classes), len(classes)), float(default_mistake_cost))
    for actual, predicted, amount in cost_matrix:
        for name in (actual, predicted):
            if name not in index:
                raise ValueError(
                    f"cost matrix entry [{actual}, {predicted}, {amount}] names unknown class "
                    f"{name!r}; classes: {list(classes)[:10]}"
                )
        if actual == predicted:
            raise ValueError(f"cost matrix entry [{actual}, {predicted}] is not a mistake")
        cost[index[actual], index[predicted]] = amount
    return ValueModel(tuple(classes), value, cost, float(review_cost), decision)


def business_weighted_accuracy(y_true: np.ndarray, y_pred: np.ndarray, value: np.ndarray) -> float:
    """Value of the correctly classified photos over the value of all photos."""
    worth = value[y_true]
    return float((worth * (y_true == y_pred)).sum() / worth.sum())


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of each of the k classes (0 where undefined)."""
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(k)), zero_division=0
    )
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def seen_classes(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """(k,) bool: classes that occur as truth or prediction, the ones macro averages cover.

    The same rule as scikit-learn's macro average: a class absent from both has no score.
    """
    seen = np.zeros(k, dtype=bool)
    seen[y_true] = True
    seen[y_pred] = True
    return seen


def value_weighted(per_class: np.ndarray, value: np.ndarray, seen: np.ndarray) -> float:
    """Mean of a per-class score over the seen classes, weighted by their business values."""
    weights = value * seen
    return float((per_class * weights).sum() / weights.sum()) if weights.sum() > 0 else 0.0


def expected_value_per_1000(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    gain: np.ndarray,
    abstained: np.ndarray | None = None,
    review_gain: np.ndarray | None = None,
) -> float:
    """Mean gain of a prediction, times 1000; abstained photos earn review_gain[actual]."""
    earned = gain[y_true, y_pred]
    if abstained is not None and review_gain is not None:
        earned = np.where(abstained, review_gain[y_true], earned)
    return float(1000 * earned.mean()) if len(earned) else 0.0


def top_k_accuracy(y_true: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Share of photos whose class is among the k most probable (ties: lower index first)."""
    k = min(k, proba.shape[1])
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return float((top == y_true[:, None]).any(axis=1).mean())


def log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log-probability of the true class (what calibration minimises on val)."""
    picked = proba[np.arange(len(y_true)), y_true]
    return float(-np.log(np.clip(picked, LOG_FLOOR, None)).mean())


def expected_calibration_error(
    y_true: np.ndarray, proba: np.ndarray, bins: int
) -> tuple[float, list[dict[str, float]]]:
    """ECE over equal-width confidence bins, and the reliability curve (non-empty bins).

    ECE = sum over bins of (photos in bin / photos) * |accuracy in bin - mean confidence in bin|.
    """
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    # Bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to bin 0.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece, curve = 0.0, []
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        conf, acc = float(confidence[members].mean()), float(correct[members].mean())
        ece += members.mean() * abs(acc - conf)
        curve.append({"bin": b, "confidence": conf, "accuracy": acc, "count": int(members.sum())})
    return float(ece), curve


def best_threshold(
    confidence: np.ndarray, trusted: np.ndarray, otherwise: np.ndarray
) -> tuple[float, float]:
    """The confidence threshold that maximises the photos' total gain when a photo at or above
    it earns `trusted` (its answer's gain) and one below it `otherwise` (a review's, or what
    taxonomy back-off answers instead), and that total.

    Candidates: 0 (answer every photo), the midpoint between each two neighbouring observed
    confidences (any threshold between them splits these photos alike; the midpoint leaves new
    photos the most room on either side) and REVIEW_ALL. Ties go to the lowest threshold, so no
    photo is refused its answer unless that pays. One sort and two cumulative sums: O(n log n).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    order = np.argsort(confidence, kind="stable")
    trusted, otherwise = np.asarray(trusted)[order], np.asarray(otherwise)[order]
    levels = np.unique(confidence)
    thresholds = np.concatenate([[0.0], (levels[:-1] + levels[1:]) / 2, [REVIEW_ALL]])
    below = np.searchsorted(confidence[order], thresholds, side="left")  # count below each
    trusted_before = np.concatenate([[0.0], np.cumsum(trusted)])
    otherwise_before = np.concatenate([[0.0], np.cumsum(otherwise)])
    total = otherwise_before[below] + trusted_before[-1] - trusted_before[below]
    best = int(np.flatnonzero(total >= total.max() - 1e-9)[0])
    return float(thresholds[best]), float(total[best])


def best_abstain_threshold(
    y_true: np.ndarray, proba: np.ndarray, values: ValueModel
) -> tuple[float, float]:
    """The confidence threshold (abstain below it) that maximises expected value, and that value
    per 1000 photos. A photo's confidence is the probability of the class it is answered with
    (values.decide); an abstained photo earns a review's gain (best_threshold)."""
    decided = values.decide(proba)
    confidence = chosen(proba, decided)
    trusted = values.gain()[y_true, decided]
    threshold, total = best_threshold(confidence, trusted, values.review_gain()[y_true])
    return threshold, 1000 * total / len(confidence)


def taxonomy_depth(classes: Sequence[str], separator: str) -> int:
    return max(len(c.split(separator)) for c in classes)


def level_labels(classes: Sequence[str], separator: str, level: int) -> list[str]:
    """Each class truncated to its first `level` taxonomy nodes (Fruit/Apple/X -> Fruit/Apple)."""
    return [separator.join(c.split(separator)[:level]) for c in classes]


def check_taxonomy(classes: Sequence[str], taxonomy: Taxonomy) -> None:
    """A clear error unless there is one non-negative weight per level, not all zero."""
    if not taxonomy.separator:
        raise ValueError("evaluate.taxonomy.separator must not be empty")
    depth = taxonomy_depth(classes, taxonomy.separator)
    weights = np.array(taxonomy.level_weights, dtype=np.float64)
    if len(weights) != depth:
        raise ValueError(
            f"evaluate.taxonomy.level_weights has {len(weights)} weight(s), but the classes have "
            f"{depth} taxonomy level(s) (separator {taxonomy.separator!r}, e.g. {classes[0]!r})"
        )
    if (weights < 0).any() or weights.sum() <= 0:
        raise ValueError("evaluate.taxonomy.level_weights must be non-negative, not all zero")
    shares = np.array(taxonomy.level_values or (1.0,) * (depth == 1), dtype=np.float64)
    if len(shares) != depth:
        raise ValueError(
            f"evaluate.taxonomy.level_values has {len(shares)} value(s), but the classes have "
            f"{depth} taxonomy level(s): one per level, coarsest first"
        )
    if shares[-1] != 1.0 or (shares < 0).any() or (shares > 1).any():
        raise ValueError(
            "evaluate.taxonomy.level_values are shares of a photo's value: each in [0, 1], "
            f"the last (the class itself) 1, got {list(taxonomy.level_values)}"
        )


def taxonomy_scores(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], taxonomy: Taxonomy
) -> dict[str, Any]:
    """Accuracy and macro F1 at each taxonomy level (level 1 = coarsest), and the
    depth-weighted accuracy: sum_l w_l * accuracy_l / sum_l w_l."""
    check_taxonomy(classes, taxonomy)
    levels = []
    for level in range(1, len(taxonomy.level_weights) + 1):
        names = np.array(level_labels(classes, taxonomy.separator, level))
        t, p = names[y_true], names[y_pred]
        levels.append(
            {
                "level": level,
                "classes": len(set(names)),
                "accuracy": float((t == p).mean()),
                "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)),
            }
        )
    weights = np.array(taxonomy.level_weights, dtype=np.float64)
    accuracies = np.array([lv["accuracy"] for lv in levels])
    return {
        "levels": levels,
        "depth_weighted_accuracy": float((weights * accuracies).sum() / weights.sum()),
    }


def top_k_name(top_k: int, k: int) -> str:
    return f"top{min(top_k, k)}_accuracy"


def score_names(k: int, top_k: int) -> tuple[str, ...]:
    """The scalar scores scores() returns for k classes; all larger-is-better."""
    return (
        "accuracy",
        "macro_f1",
        top_k_name(top_k, k),
        "business_weighted_accuracy",
        "business_weighted_precision",
        "business_weighted_recall",
        "business_weighted_f1",
        "expected_value_per_1000",
        "depth_weighted_accuracy",
    )


def scores(
    y_true: np.ndarray,
    proba: np.ndarray,
    values: ValueModel,
    top_k: int,
    taxonomy: Taxonomy,
    y_pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every score of one set of predictions (no abstaining): n, the score_names() scalars,
    per_class {class: precision, recall, f1, support} and taxonomy {levels, ...}. The answers
    are y_pred when given (a packaged model's own), else values.decide(proba)."""
    y_pred = values.decide(proba) if y_pred is None else y_pred
    k = len(values.classes)
    per_class = per_class_scores(y_true, y_pred, k)
    seen = seen_classes(y_true, y_pred, k)
    tax = taxonomy_scores(y_true, y_pred, values.classes, taxonomy)
    return {
        "n": len(y_true),
        "accuracy": float((y_true == y_pred).mean()),
        "macro_f1": float(per_class["f1"][seen].mean()),
        top_k_name(top_k, k): top_k_accuracy(y_true, proba, top_k),
        "business_weighted_accuracy": business_weighted_accuracy(y_true, y_pred, values.value),
        "business_weighted_precision": value_weighted(per_class["precision"], values.value, seen),
        "business_weighted_recall": value_weighted(per_class["recall"], values.value, seen),
        "business_weighted_f1": value_weighted(per_class["f1"], values.value, seen),
        "expected_value_per_1000": expected_value_per_1000(y_true, y_pred, values.gain()),
        "depth_weighted_accuracy": tax["depth_weighted_accuracy"],
        "per_class": {
            c: {name: float(per_class[name][i]) for name in ("precision", "recall", "f1")}
            | {"support": int(per_class["support"][i])}
            for i, c in enumerate(values.classes)
        },
        "taxonomy": {"levels": tax["levels"]},
    }


def scalar_scores(all_scores: Mapping[str, Any]) -> dict[str, float | int]:
    """The numbers of a scores() result, without per_class and taxonomy."""
    return {
        k: v
        for k, v in all_scores.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
