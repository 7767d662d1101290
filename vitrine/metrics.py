"""Scores that say what a classifier is worth to the marketplace, not only how often it is right.

The value model: a correct prediction of a photo of class a earns value[a]; predicting p instead
costs cost[a, p] (the cost matrix, default `default_mistake_cost`); a photo sent to human review
earns value[a] - review_cost (a person then files it correctly). Every function here is pure and
works on class indices, so tests can check it against hand-computed cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support


@dataclass(frozen=True)
class ValueModel:
    classes: tuple[str, ...]
    value: np.ndarray  # (k,) worth of a correct prediction, per actual class
    cost: np.ndarray  # (k, k) cost of predicting column p for actual row a (diagonal unused)
    review_cost: float  # cost of one human review

    def gain(self) -> np.ndarray:
        """(k, k) what predicting p for actual a earns: value on the diagonal, -cost elsewhere."""
        gain = -self.cost.astype(np.float64)
        np.fill_diagonal(gain, self.value)
        return gain


def value_model(
    classes: tuple[str, ...],
    business_value: dict[str, float],
    cost_matrix: list[tuple[str, str, float]],
    default_mistake_cost: float,
    review_cost: float,
) -> ValueModel:
    """Checked construction from params: every class valued, every cost naming known classes."""
    missing = sorted(set(classes) - set(business_value))
    unknown = sorted(set(business_value) - set(classes))
    if missing or unknown:
        raise ValueError(f"business values: missing classes {missing}, unknown classes {unknown}")
    index = {c: i for i, c in enumerate(classes)}
    cost = np.full((len(classes), len(classes)), float(default_mistake_cost))
    for actual, predicted, amount in cost_matrix:
        for name in (actual, predicted):
            if name not in index:
                raise ValueError(f"cost matrix names unknown class {name!r}")
        if actual == predicted:
            raise ValueError(f"cost matrix entry {actual!r} -> {predicted!r} is not a mistake")
        cost[index[actual], index[predicted]] = amount
    value = np.array([business_value[c] for c in classes], dtype=np.float64)
    return ValueModel(tuple(classes), value, cost, float(review_cost))


def business_weighted_accuracy(y_true: np.ndarray, y_pred: np.ndarray, value: np.ndarray) -> float:
    """Value of the correctly classified photos over the value of all photos."""
    worth = value[y_true]
    return float((worth * (y_true == y_pred)).sum() / worth.sum())


def per_class_scores(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict[str, np.ndarray]:
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(k)), zero_division=0
    )
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def value_weighted(per_class: np.ndarray, value: np.ndarray) -> float:
    """Mean of a per-class score weighted by the classes' business values."""
    return float((per_class * value).sum() / value.sum())


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
    k = min(k, proba.shape[1])
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return float((top == y_true[:, None]).any(axis=1).mean())


def expected_calibration_error(
    y_true: np.ndarray, proba: np.ndarray, bins: int
) -> tuple[float, list[dict[str, float]]]:
    """ECE over equal-width confidence bins, and the reliability curve (non-empty bins)."""
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


def best_abstain_threshold(
    y_true: np.ndarray, proba: np.ndarray, values: ValueModel
) -> tuple[float, float]:
    """The confidence threshold (abstain below it) that maximises expected value, and that value.

    Tries 0 (never abstain) and every observed confidence; ties go to the lowest threshold, so
    no photo is sent to review unless it pays.
    """
    gain, review = values.gain(), values.value - values.review_cost
    confidence = proba.max(axis=1)
    y_pred = proba.argmax(axis=1)
    best = (0.0, expected_value_per_1000(y_true, y_pred, gain))
    for t in np.unique(confidence):
        ev = expected_value_per_1000(y_true, y_pred, gain, confidence < t, review)
        if ev > best[1] + 1e-12:
            best = (float(t), ev)
    return best


def taxonomy_levels(classes: tuple[str, ...], separator: str) -> int:
    return max(len(c.split(separator)) for c in classes)


def level_labels(classes: tuple[str, ...], separator: str, level: int) -> list[str]:
    """Each class truncated to its first `level` taxonomy nodes (Fruit/Apple/X -> Fruit/Apple)."""
    return [separator.join(c.split(separator)[:level]) for c in classes]


def taxonomy_scores(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: tuple[str, ...],
    separator: str,
    level_weights: tuple[float, ...],
) -> dict[str, Any]:
    """Accuracy and macro F1 at each taxonomy level, and their depth-weighted accuracy."""
    depth = taxonomy_levels(classes, separator)
    if len(level_weights) != depth:
        raise ValueError(
            f"evaluate.taxonomy.level_weights has {len(level_weights)} weights, but the classes "
            f"have {depth} taxonomy level(s)"
        )
    levels = []
    for level in range(1, depth + 1):
        names = np.array(level_labels(classes, separator, level))
        t, p = names[y_true], names[y_pred]
        levels.append(
            {
                "level": level,
                "classes": len(set(names)),
                "accuracy": float((t == p).mean()),
                "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)),
            }
        )
    weights = np.array(level_weights, dtype=np.float64)
    accuracies = np.array([lv["accuracy"] for lv in levels])
    return {
        "levels": levels,
        "depth_weighted_accuracy": float((weights * accuracies).sum() / weights.sum()),
    }


def scores(y_true: np.ndarray, proba: np.ndarray, values: ValueModel, top_k: int) -> dict[str, Any]:
    """Every score of one set of predictions (no abstaining)."""
    y_pred = proba.argmax(axis=1)
    k = len(values.classes)
    per_class = per_class_scores(y_true, y_pred, k)
    return {
        "n": len(y_true),
        "accuracy": float((y_true == y_pred).mean()),
        "macro_f1": float(per_class["f1"].mean()),
        f"top{min(top_k, k)}_accuracy": top_k_accuracy(y_true, proba, top_k),
        "business_weighted_accuracy": business_weighted_accuracy(y_true, y_pred, values.value),
        "business_weighted_precision": value_weighted(per_class["precision"], values.value),
        "business_weighted_recall": value_weighted(per_class["recall"], values.value),
        "business_weighted_f1": value_weighted(per_class["f1"], values.value),
        "expected_value_per_1000": expected_value_per_1000(y_true, y_pred, values.gain()),
        "per_class": {
            c: {name: float(per_class[name][i]) for name in ("precision", "recall", "f1")}
            | {"support": int(per_class["support"][i])}
            for i, c in enumerate(values.classes)
        },
    }
