"""Class probabilities -> the answer: the one rule evaluate scores and the service serves.

Three steps, each from the value model (docs/concepts/value-model.md):

1. **The class** (`decide`). The most probable class is right most often; the class with the
   highest expected gain earns the most. They differ when mistakes cost differently: with a phone
   worth 1.5, a missed phone costing 1.0 and a laptop taken for a phone 0.5, a photo is worth
   calling a phone from p(phone) = 0.375 on. With equal values and equal costs they agree.
2. **Its threshold.** The class is answered when its probability reaches that class's threshold
   (fitted on val by vitrine.evaluation.thresholds: a class confused often, or costly when
   wrong, needs more confidence).
3. **Taxonomy back-off.** Otherwise each ancestor level is tried, deepest first: at that level
   the node of highest expected gain (answering `Fruit/Apple` earns the level's share of the
   photo's value when the photo is an apple, and costs the mean cost of the node's classes when
   it is not) is answered when that expected gain is at least a human review's; when no level
   pays, the photo is sent to review (abstain).

`rule` builds the Rule from what a packaged model.json records, for evaluate and the service
alike; `answer` applies it to (n, k) probabilities. numpy only: the service imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DECISIONS = ("argmax", "expected_value")


def decide(proba: np.ndarray, gain: np.ndarray | None) -> np.ndarray:
    """(n, k) probabilities -> (n,) class indices. With a gain matrix (gain[a, p]: what answering
    p earns for a photo of class a), argmax over p of sum over a of proba[a] * gain[a, p]: the
    Bayes decision. Without one, the most probable class. Ties go to the lower index."""
    return np.asarray(proba if gain is None else proba @ gain).argmax(axis=1)


def chosen(proba: np.ndarray, decided: np.ndarray) -> np.ndarray:
    """(n,) the probability of each photo's decided class: its answer's confidence."""
    return proba[np.arange(len(decided)), decided]


def taxonomy_nodes(
    classes: Sequence[str], separator: str, level: int
) -> tuple[tuple[str, ...], np.ndarray]:
    """The taxonomy's nodes at `level` (1 = coarsest: each class cut to its first `level`
    parts, Fruit/Apple/Granny-Smith -> Fruit/Apple at level 2), in order of first appearance,
    and (k,) the index of each class's node."""
    cut = [separator.join(c.split(separator)[:level]) for c in classes]
    nodes = tuple(dict.fromkeys(cut))
    index = {n: i for i, n in enumerate(nodes)}
    return nodes, np.array([index[c] for c in cut], dtype=np.int64)


def level_gain(value_gain: np.ndarray, node_of: np.ndarray, share: float) -> np.ndarray:
    """(k, m): what answering node N earns for a photo of class a: share * v(a) when a is under
    N, else minus the mean cost of answering one of N's classes, sum_{p in N} -g(a, p) / |N|.
    value_gain: the value model's (k, k) g(a, p) (v(a) on the diagonal, -c(a, p) elsewhere)."""
    m = int(node_of.max()) + 1
    sums = np.zeros((m, len(node_of)))
    np.add.at(sums, node_of, value_gain.T)  # sums[N, a] = sum over p in N of g(a, p)
    mean = sums.T / np.bincount(node_of, minlength=m)
    member = node_of[:, np.newaxis] == np.arange(m)
    return np.where(member, share * np.diag(value_gain)[:, np.newaxis], mean)


@dataclass(frozen=True)
class Level:
    """An ancestor level an unsure answer backs off to."""

    level: int  # 1 = coarsest
    nodes: tuple[str, ...]
    node_of: np.ndarray  # (k,) each class's node
    gain: np.ndarray  # (k, m) level_gain

    def summed(self, proba: np.ndarray) -> np.ndarray:
        """(n, m) each node's probability: the sum of its classes'."""
        member = self.node_of[:, np.newaxis] == np.arange(len(self.nodes))
        return proba @ member.astype(np.float64)


@dataclass(frozen=True)
class Rule:
    classes: tuple[str, ...]
    decision_gain: np.ndarray | None  # decide's gain (None: the most probable class)
    thresholds: np.ndarray  # (k,) a class is answered from this probability on
    review_gain: np.ndarray  # (k,) what a reviewed photo of class a earns: v(a) - review cost
    backoff: tuple[Level, ...]  # ancestor levels, deepest first; (): none

    @property
    def leaf_level(self) -> int:
        """The level of a class answer: the taxonomy's depth (1 for flat classes)."""
        return len(self.backoff) + 1


def rule(
    classes: Sequence[str],
    decision_gain: np.ndarray | None,
    thresholds: Sequence[float] | np.ndarray,
    value_gain: np.ndarray | None = None,
    review_cost: float = 0.0,
    backoff: Sequence[tuple[int, float, Sequence[int]]] = (),
    nodes: Sequence[Sequence[str]] = (),
) -> Rule:
    """The Rule from what model.json records: thresholds per class; value_gain (the value
    model's g(a, p)) and review_cost, which back-off needs; backoff: (level, share of the value,
    node of each class) per ancestor level, deepest first, and `nodes` their node names. A clear
    error when they do not fit the classes."""
    k = len(classes)
    cut = np.asarray(thresholds, dtype=np.float64)
    if cut.shape != (k,):
        raise ValueError(f"{len(cut)} class threshold(s) for {k} classes")
    if backoff and (value_gain is None or np.shape(value_gain) != (k, k)):
        raise ValueError("taxonomy back-off needs the value model's gain matrix")
    if len(nodes) != len(backoff):
        raise ValueError(f"{len(nodes)} node lists for {len(backoff)} back-off level(s)")
    levels = []
    for (level, share, node_of), names in zip(backoff, nodes, strict=True):
        index = np.asarray(node_of, dtype=np.int64)
        if index.shape != (k,) or index.min() < 0 or index.max() >= len(names):
            raise ValueError(f"back-off level {level}: node_of does not map {k} classes")
        assert value_gain is not None
        levels.append(Level(level, tuple(names), index, level_gain(value_gain, index, share)))
    review = np.zeros(k) if value_gain is None else np.diag(value_gain) - review_cost
    return Rule(tuple(classes), decision_gain, cut, review, tuple(levels))


@dataclass(frozen=True)
class Answers:
    """One answer per photo."""

    decided: np.ndarray  # (n,) the class step 1 chose, whether answered or not
    level: np.ndarray  # (n,) the answer's taxonomy level (leaf_level: a class; also abstained)
    node: np.ndarray  # (n,) the answered node's index at its level (a class index at the leaf)
    confidence: np.ndarray  # (n,) the answered node's probability
    abstain: np.ndarray  # (n,) bool: no level pays, the photo goes to review
    labels: tuple[str, ...]  # the answered node's name (the decided class when abstained)


def answer(proba: np.ndarray, r: Rule) -> Answers:
    """(n, k) probabilities -> the answers: the decided class when its probability reaches its
    threshold, else the deepest ancestor whose expected gain is at least a review's, else
    abstain (with the decided class as the label)."""
    proba = np.asarray(proba)
    n = len(proba)
    decided = decide(proba, r.decision_gain)
    confidence = chosen(proba, decided).astype(np.float64)
    abstain = confidence < r.thresholds[decided]
    level = np.full(n, r.leaf_level, dtype=np.int64)
    node = decided.astype(np.int64)
    names: list[Sequence[str]] = [r.classes] * n
    pending = np.flatnonzero(abstain)
    if len(pending) and r.backoff:
        p = proba[pending]
        review = p @ r.review_gain
        for lv in r.backoff:
            expected = p @ lv.gain
            best = expected.argmax(axis=1)
            rows = np.arange(len(p))
            pays = np.flatnonzero(expected[rows, best] >= review)
            pays = pays[abstain[pending[pays]]]  # not answered at a deeper level already
            if not len(pays):
                continue
            taken = pending[pays]
            level[taken], node[taken] = lv.level, best[pays]
            confidence[taken] = lv.summed(p[pays])[np.arange(len(pays)), best[pays]]
            abstain[taken] = False
            for i in taken:
                names[i] = lv.nodes
    labels = tuple(names[i][node[i]] for i in range(n))
    return Answers(decided, level, node, confidence, abstain, labels)
