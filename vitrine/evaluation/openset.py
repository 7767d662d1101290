"""Open-set figures: what the served decision rule does with photos of none of the categories.

With params.yaml's `other_class` set, one class is "none of these" (chargers, boxes, screenshots
uploaded as a phone), trained from the photos review labelled so. On held-out photos two
figures say how well the model keeps them out of the categories
(docs/concepts/value-model.md#the-other-class):

- **open-set recall**: of the held-out off-category photos (labelled `other_class`), the share
  answered `other_class` or sent to review (abstained); either way none is passed as a product;
- **known called other**: of the photos of the known classes, the share answered `other_class`
  (a seller's real phone flagged as not a phone).

An answer "is" the other class when its answered node holds it: the class itself, or with
taxonomy back-off an ancestor node whose only class it is. evaluate reports both on val and
test (evaluate.json `open_set`); package's champion/challenger gate compares them
(vitrine.evaluation.promotion). numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vitrine.runtime.decisions import Answers, Rule

RECALL = "open_set_recall"  # the scalar scores package compares, beside the primary metric
KNOWN_AS_OTHER = "known_called_other_rate"


def answered_other(given: Answers, rule: Rule, other: int) -> np.ndarray:
    """(n,) bool: the answer (not abstained) is the other class, or an ancestor node holding
    only it."""
    hit = (given.level == rule.leaf_level) & (given.node == other)
    for tier in rule.backoff:
        alone = int((tier.node_of == tier.node_of[other]).sum()) == 1
        if alone:
            hit |= (given.level == tier.level) & (given.node == tier.node_of[other])
    return hit & ~given.abstain


def open_set_scores(
    y_true: np.ndarray, given: Answers, rule: Rule, other: int
) -> dict[str, float | int | None]:
    """The figures on one split: counts, open-set recall and known-called-other rate (None
    when there is no photo to take the share of)."""
    off = np.asarray(y_true) == other
    called = answered_other(given, rule, other)
    caught, held = int((off & called).sum()), int((off & given.abstain).sum())
    wrong = int((~off & called).sum())
    n_off, n_known = int(off.sum()), int((~off).sum())
    return {
        "off_category_photos": n_off,
        "answered_other": caught,
        "abstained": held,
        RECALL: (caught + held) / n_off if n_off else None,
        "known_photos": n_known,
        "known_called_other": wrong,
        KNOWN_AS_OTHER: wrong / n_known if n_known else None,
    }


def open_set_report(
    other_class: str,
    rule: Rule,
    val: tuple[np.ndarray, Answers],
    test: tuple[np.ndarray, Answers],
) -> dict[str, Any]:
    """evaluate.json `open_set`: the figures on val and test under the served rule; {} without
    an other class (the report then has no such key)."""
    if not other_class:
        return {}
    other = rule.classes.index(other_class)
    return {
        "other_class": other_class,
        "val": open_set_scores(*val, rule, other),
        "test": open_set_scores(*test, rule, other),
    }


def scalar_open_set(
    y_true: np.ndarray, given: Answers, rule: Rule, other_class: str
) -> dict[str, float]:
    """The two shares as the scalar scores package's gate compares ({} without an other
    class; a share with no photo to take it of is left out)."""
    if not other_class:
        return {}
    scores = open_set_scores(y_true, given, rule, rule.classes.index(other_class))
    return {k: float(v) for k in (RECALL, KNOWN_AS_OTHER) if (v := scores[k]) is not None}
