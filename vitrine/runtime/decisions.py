"""Class probabilities -> the class to answer: the one rule evaluate scores and the service serves.

The most probable class is right most often; the class with the highest expected gain under the
value model (docs/concepts/value-model.md) earns the most. They differ when mistakes cost
differently: with a phone worth 1.5, a missed phone costing 1.0 and a laptop taken for a phone
0.5, a photo is worth calling a phone from p(phone) = 0.375 on. With equal values and equal
costs the two rules agree. numpy only: the service imports it.
"""

from __future__ import annotations

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
