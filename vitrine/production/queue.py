"""The moderators' review queue: recorded answers ranked by what a review of each is worth.

Under the value model (docs/concepts/value-model.md; evaluate's gain matrix g(a, p), value v(a)
on its diagonal, and evaluate.review_cost, which package writes into model.json), for one
answer with class probabilities p(a):

    review value = sum_a p(a) v(a)         a moderator files the photo right: earns v(a)
                 - sum_a p(a) g(a, s)      what the category that stands without review earns
                 - review_cost

The category that stands without review, s:
  - /check_category: the seller's declared category (the service only suggests another; the
    listing keeps the declared one until someone changes it), so a confident mismatch is worth
    a review, and more so the costlier the confusion;
  - an abstained /classify answer: none (earns 0): the answer was withheld, nothing is filed
    until a person files it;
  - any other answer: its label; a taxonomy ancestor (back-off: Fruit/Apple) earns its level's
    gain (vitrine.runtime.decisions.level_gain), so a right ancestor still leaves a review worth
    the value its class adds.
So abstained answers, mismatches and low-confidence answers rank high; a review worth nothing
or less (value <= 0, a confident plain answer) stays out of the queue, as do answers already
reviewed (vitrine.production.reviews). Answers are valued under the serving model's value
model: probabilities of classes it does not know count for nothing.

`rank` is the pure ranking; `review_queue` reads the candidates from the answers database: the
SCAN most recent unreviewed answers that can be worth a review (abstained, mismatched, or below
the confidence from which no review pays: `ReviewTerms.confidence_bound`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from vitrine.contracts import PackagedModel
from vitrine.production.records import AnswerRecord, RecordStore, answers
from vitrine.production.reviews import reviews
from vitrine.runtime.decisions import Level

SCAN = 10_000  # most recent unreviewed candidate answers ranked per queue request
BOUND_MARGIN = 1e-9  # the confidence bound's slack against rounding


@dataclass(frozen=True)
class ReviewTerms:
    """The value model as the queue weighs answers with it."""

    classes: tuple[str, ...]
    gain: np.ndarray  # (k, k): g(a, p), rows actual, columns answered
    review_cost: float
    backoff: tuple[Level, ...] = ()  # the ancestor levels the model answers (back-off)

    @classmethod
    def of(cls, info: PackagedModel) -> ReviewTerms:
        """A packaged model's: its value_gain, else its decision_gain, else plain accuracy (a
        right answer earns 1, a mistake costs nothing) for a model packaged without either."""
        if info.value_gain:
            gain = np.array(info.value_gain, np.float64)
        elif info.decision_gain is not None:
            gain = np.array(info.decision_gain, np.float64)
        else:
            gain = np.eye(len(info.classes))
        return cls(tuple(info.classes), gain, float(info.review_cost), info.rule.backoff)

    def standing_gain(self, standing: str | None) -> np.ndarray | None:
        """(k,) what the standing category earns per actual class (None: nothing stands, or a
        category the model does not know)."""
        if standing in self.classes:
            return self.gain[:, self.classes.index(standing)]
        for tier in self.backoff:
            if standing in tier.nodes:
                return tier.gain[:, tier.nodes.index(standing)]
        return None

    @property
    def value(self) -> np.ndarray:
        """(k,) v(a): what a right answer for a photo of class a earns."""
        return np.diag(self.gain)

    def confidence_bound(self) -> float:
        """A plain answer (not abstained, no declared category) at or above this confidence is
        worth no review: its value is at most (1 - confidence) * max over a != s of
        (v(a) - g(a, s)), minus the review cost."""
        loss = self.value[:, np.newaxis] - self.gain
        np.fill_diagonal(loss, -np.inf)
        worst = float(loss.max()) if len(self.classes) > 1 else 0.0
        if worst <= 0:
            return 0.0
        return min(1.0, 1.0 - self.review_cost / worst + BOUND_MARGIN)


@dataclass(frozen=True)
class Ranked:
    answer: AnswerRecord
    value: float  # of a review, in the value model's units


def standing_category(answer: AnswerRecord) -> str | None:
    """The category that stands without a review (see the module's docstring); None: none."""
    if answer.declared_category is not None:
        return answer.declared_category
    return None if answer.abstain else answer.label


def review_value(answer: AnswerRecord, terms: ReviewTerms) -> float:
    """What a moderator's review of this answer is expected to earn, net of its cost."""
    p = np.array([float(answer.probabilities.get(c, 0.0)) for c in terms.classes])
    reviewed = float(p @ terms.value)
    standing = terms.standing_gain(standing_category(answer))
    earned = 0.0 if standing is None else float(p @ standing)
    return reviewed - earned - terms.review_cost


def rank(
    candidates: Iterable[AnswerRecord], terms: ReviewTerms, limit: int, min_value: float = 0.0
) -> list[Ranked]:
    """The `limit` answers whose review is worth most (above min_value), best first; equal
    values oldest first."""
    ranked = [Ranked(a, review_value(a, terms)) for a in candidates]
    ranked = [r for r in ranked if r.value > min_value]
    ranked.sort(key=lambda r: (-r.value, r.answer.answered_at, r.answer.request_id))
    return ranked[:limit]


def unreviewed_candidates(
    store: RecordStore, terms: ReviewTerms, scan: int = SCAN
) -> list[AnswerRecord]:
    """The `scan` most recent answers nobody reviewed that a review can pay for."""
    reviewed = sa.exists().where(reviews.c.request_id == answers.c.request_id)
    doubtful: list[sa.ColumnElement[bool]] = [answers.c.abstain.is_(True)]
    doubtful.append(answers.c.matches.is_(False))
    bound = terms.confidence_bound()
    if bound > 0:
        doubtful.append(answers.c.confidence < bound)
    if terms.backoff:  # an ancestor answer leaves its class to find, at any confidence
        doubtful.append(answers.c.label.notin_(terms.classes))
    query = (
        sa.select(answers)
        .where(~reviewed, sa.or_(*doubtful))
        .order_by(answers.c.answered_at.desc(), answers.c.request_id.desc())
        .limit(scan)
    )
    with store.engine.connect() as connection:
        return [AnswerRecord.from_row(row) for row in connection.execute(query)]


def review_queue(
    store: RecordStore, terms: ReviewTerms, limit: int, scan: int = SCAN
) -> list[Ranked]:
    """The answers most worth a moderator's review, best first."""
    return rank(unreviewed_candidates(store, terms, scan), terms, limit)
