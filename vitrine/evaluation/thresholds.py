"""The decision rule fitted on val: a threshold per class and taxonomy back-off, and what each
rule earns (docs/concepts/value-model.md#per-class-thresholds).

A photo's class (vitrine.runtime.decisions.decide) is answered when its probability reaches
that class's threshold; otherwise the taxonomy's ancestor levels are tried (back-off), then
review. Each class's threshold maximises the value earned on the val photos answered with that
class, where a refused photo earns what it gets instead (its back-off answer, or a review): a
class confused often, or costly when wrong, gets a higher one. A class answered for fewer than
`evaluate.min_val_photos_per_class` val photos takes the threshold fitted on all val photos
(the shared one): a handful of photos would fit noise. Per class, the fitted threshold's val
value is never below the shared threshold's, which is one of its candidates.

The rule is built by vitrine.runtime.decisions.rule, from the same inputs package records in
model.json, so the service answers as evaluate scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitrine.contracts import BackoffLevel
from vitrine.evaluation import metrics
from vitrine.runtime import decisions

# The rules evaluate compares, by name: the one it serves is the last.
ONE_THRESHOLD = "one_threshold"  # one shared threshold, no back-off
CLASS_THRESHOLDS = "class_thresholds"  # a threshold per class, no back-off
WITH_BACKOFF = "class_thresholds_backoff"  # a threshold per class, then taxonomy back-off


def backoff_levels(classes: Sequence[str], taxonomy: metrics.Taxonomy) -> tuple[BackoffLevel, ...]:
    """The ancestor levels an unsure answer backs off to, deepest first, each with its share
    of the value (evaluate.taxonomy.level_values, checked by metrics.check_taxonomy); () for
    flat classes."""
    depth = metrics.taxonomy_depth(classes, taxonomy.separator)
    if depth < 2:
        return ()
    levels = []
    for level in range(depth - 1, 0, -1):
        nodes, node_of = decisions.taxonomy_nodes(classes, taxonomy.separator, level)
        share = float(taxonomy.level_values[level - 1])
        levels.append(BackoffLevel(level, share, nodes, tuple(node_of.tolist())))
    return tuple(levels)


def build_rule(
    values: metrics.ValueModel,
    thresholds: Sequence[float] | np.ndarray,
    backoff: Sequence[BackoffLevel] = (),
) -> decisions.Rule:
    """The rule evaluate scores, built as the service builds it from model.json
    (vitrine.contracts.PackagedModel.rule)."""
    return decisions.rule(
        values.classes,
        values.decision_gain(),
        thresholds,
        values.gain(),
        values.review_cost,
        [(b.level, b.value_share, b.node_of) for b in backoff],
        [b.nodes for b in backoff],
    )


def earned(
    given: decisions.Answers, y_true: np.ndarray, values: metrics.ValueModel, rule: decisions.Rule
) -> np.ndarray:
    """(n,) what each answer earns for photos of class y_true: a class answer its gain, an
    ancestor answer its level's gain, an abstained photo a review's."""
    out = values.gain()[y_true, given.node]
    for tier in rule.backoff:
        at = given.level == tier.level
        out[at] = tier.gain[y_true[at], given.node[at]]
    return np.where(given.abstain, rule.review_gain[y_true], out)


def answered_correctly(
    given: decisions.Answers, y_true: np.ndarray, rule: decisions.Rule
) -> np.ndarray:
    """(n,) bool: the answered class, or ancestor, holds the photo's class (abstained: False)."""
    right = given.node == y_true
    for tier in rule.backoff:
        at = given.level == tier.level
        right[at] = tier.node_of[y_true[at]] == given.node[at]
    return right & ~given.abstain


@dataclass(frozen=True)
class Thresholds:
    shared: float  # fitted on all val photos; classes with too few take it
    per_class: np.ndarray  # (k,) what each class is answered from
    photos: np.ndarray  # (k,) val photos answered with each class (before any threshold)
    fitted: np.ndarray  # (k,) bool: the class has a threshold of its own


def fit_thresholds(
    y_val: np.ndarray,
    p_val: np.ndarray,
    values: metrics.ValueModel,
    backoff: Sequence[BackoffLevel],
    min_photos: int,
) -> Thresholds:
    """Per-class thresholds maximising the val value, a refused photo earning what `backoff`
    (or a review, without it) gives it instead; the shared threshold for thin classes."""
    k = len(values.classes)
    refuse_all = build_rule(values, np.full(k, metrics.REVIEW_ALL), backoff)
    instead = earned(decisions.answer(p_val, refuse_all), y_val, values, refuse_all)
    decided = values.decide(p_val)
    confidence = decisions.chosen(p_val, decided)
    trusted = values.gain()[y_val, decided]
    shared, _ = metrics.best_threshold(confidence, trusted, instead)
    per_class = np.full(k, shared)
    photos = np.bincount(decided, minlength=k)
    fitted = photos >= min_photos
    for c in np.flatnonzero(fitted):
        mine = decided == c
        per_class[c], _ = metrics.best_threshold(confidence[mine], trusted[mine], instead[mine])
    return Thresholds(shared, per_class, photos, fitted)


def rule_scores(
    y_true: np.ndarray, proba: np.ndarray, values: metrics.ValueModel, rule: decisions.Rule
) -> dict[str, Any]:
    """What a rule does on photos: its value per 1000 photos, abstain rate, accuracy of the
    answers it gives, and the test answers per taxonomy level."""
    given = decisions.answer(proba, rule)
    right = answered_correctly(given, y_true, rule)
    gained = earned(given, y_true, values, rule)
    answered = ~given.abstain
    levels = []
    for level in range(1, rule.leaf_level + 1):
        at = answered & (given.level == level)
        share = float(right[at].mean()) if at.any() else None
        levels.append({"level": level, "answers": int(at.sum()), "accuracy": share})
    return {
        "expected_value_per_1000": float(1000 * gained.mean()) if len(gained) else 0.0,
        "abstain_rate": float(given.abstain.mean()) if len(gained) else 0.0,
        "accuracy_when_answered": float(right[answered].mean()) if answered.any() else None,
        "levels": levels,
    }


@dataclass(frozen=True)
class FittedRules:
    """The rules evaluate compares, fitted on val; `served` is what package ships."""

    rules: dict[str, decisions.Rule]
    served: Thresholds  # the thresholds of the served rule (WITH_BACKOFF)
    backoff: tuple[BackoffLevel, ...]
    min_photos: int

    @property
    def rule(self) -> decisions.Rule:
        return self.rules[WITH_BACKOFF]


def fit_rules(
    y_val: np.ndarray,
    p_val: np.ndarray,
    values: metrics.ValueModel,
    taxonomy: metrics.Taxonomy,
    min_photos: int,
) -> FittedRules:
    """One threshold, a threshold per class, and a threshold per class with back-off, each
    fitted on val against what a refused photo gets under it."""
    backoff = backoff_levels(values.classes, taxonomy)
    k = len(values.classes)
    alone = fit_thresholds(y_val, p_val, values, (), min_photos)
    served = fit_thresholds(y_val, p_val, values, backoff, min_photos)
    rules = {
        ONE_THRESHOLD: build_rule(values, np.full(k, alone.shared)),
        CLASS_THRESHOLDS: build_rule(values, alone.per_class),
        WITH_BACKOFF: build_rule(values, served.per_class, backoff),
    }
    return FittedRules(rules, served, backoff, min_photos)


def decision_report(
    fitted: FittedRules,
    values: metrics.ValueModel,
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """evaluate.json `decisions`: the served rule's thresholds per class, its back-off levels,
    every rule's scores on val and test (labels, probabilities), the served rule's test answers
    per taxonomy level."""
    served = fitted.served
    scored = {
        name: {"val": rule_scores(*val, values, rule), "test": rule_scores(*test, values, rule)}
        for name, rule in fitted.rules.items()
    }
    for split in scored.values():  # the levels are reported once, for the served rule
        for side in split.values():
            side.pop("levels")
    test_levels = rule_scores(*test, values, fitted.rule)["levels"]
    return {
        "served": WITH_BACKOFF,
        "min_val_photos_per_class": fitted.min_photos,
        "shared_threshold": served.shared,
        "class_thresholds": {
            c: {
                "threshold": float(served.per_class[i]),
                "val_photos": int(served.photos[i]),
                "fitted": bool(served.fitted[i]),
            }
            for i, c in enumerate(values.classes)
        },
        "backoff_levels": [
            {"level": b.level, "value_share": b.value_share, "nodes": len(b.nodes)}
            for b in fitted.backoff
        ],
        "rules": scored,
        "test_levels": test_levels,
    }
