"""The review queue (vitrine.production.queue): the value of a review under the value model, the
ranking as a pure function, and the candidates read from the answers database (SQLite and a
real PostgreSQL server), reviewed answers left out."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.candidates import PROVENANCE
from tests.helpers.records import sample_answer
from vitrine.contracts import BackoffLevel, PackagedModel, ServeConfig, as_dict, read_packaged
from vitrine.production.queue import ReviewTerms, rank, review_queue, review_value
from vitrine.production.records import AnswerRecord, RecordStore
from vitrine.production.reviews import add_review

CLASSES = ("laptop", "phone")
# The bundled value model: laptop 1.0, phone 1.5; a missed phone costs 1.0, a false phone 0.5.
GAIN = np.array([[1.0, -0.5], [-1.0, 1.5]])
TERMS = ReviewTerms(CLASSES, GAIN, 0.8)
SERVE = ServeConfig(1_000_000, 4_000_000, 32, 6, 2_000_000, 8, 2.0, 1, 1)
T0 = datetime(2025, 3, 1, tzinfo=UTC)


def answer(
    p_phone: float,
    label: str | None = None,
    abstain: bool = False,
    declared: str | None = None,
    minutes: int = 0,
) -> AnswerRecord:
    label = label or CLASSES[p_phone >= 0.5]
    return replace(
        sample_answer(0, at=T0 + timedelta(minutes=minutes), abstain=abstain, declared=declared),
        label=label,
        confidence=p_phone if label == "phone" else 1 - p_phone,
        probabilities={"laptop": 1 - p_phone, "phone": p_phone},
        matches=None if declared is None else declared == label,
    )


def test_a_review_is_worth_the_moderators_label_less_the_standing_answer_and_the_cost() -> None:
    # A plain answer: reviewed 0.4 * 1 + 0.6 * 1.5 = 1.3; "phone" earns 0.4 * -0.5 + 0.6 * 1.5.
    assert review_value(answer(0.6), TERMS) == pytest.approx(1.3 - 0.7 - 0.8)
    # Abstained: withheld, nothing filed until a person files it.
    assert review_value(answer(0.5, abstain=True), TERMS) == pytest.approx(1.25 - 0.8)
    # /check_category: the declared laptop stands; 0.9 phone makes it a missed phone.
    mismatch = answer(0.9, declared="laptop")
    assert mismatch.matches is False
    assert review_value(mismatch, TERMS) == pytest.approx(1.45 - (0.1 - 0.9) - 0.8)
    # The seller's matching category: valued as the answer itself.
    assert review_value(answer(0.9, declared="phone"), TERMS) == review_value(answer(0.9), TERMS)
    # A class the serving model does not know counts for nothing, and stands for nothing.
    foreign = replace(answer(0.5), label="tablet", probabilities={"tablet": 0.5, "phone": 0.5})
    assert review_value(foreign, TERMS) == pytest.approx(0.75 - 0.0 - 0.8)


def test_the_queue_puts_mismatches_abstentions_and_doubts_first_and_leaves_out_the_rest() -> None:
    confident = answer(0.99, minutes=0)
    doubtful = answer(0.45, minutes=1)  # laptop at 0.55: a review pays at 0.8
    abstained = answer(0.5, abstain=True, minutes=2)
    mismatch = answer(0.95, declared="laptop", minutes=3)
    older_twin = answer(0.5, abstain=True, minutes=-5)
    newer_twin = answer(0.5, abstain=True, minutes=9)
    ranked = rank([confident, doubtful, abstained, mismatch, newer_twin, older_twin], TERMS, 10)
    assert [r.answer for r in ranked] == [mismatch, older_twin, abstained, newer_twin, doubtful]
    assert all(r.value > 0 for r in ranked) and ranked[0].value > ranked[1].value
    assert [r.answer for r in rank([doubtful, mismatch], TERMS, 1)] == [mismatch]
    cheap = ReviewTerms(CLASSES, GAIN, 0.0)  # free reviews: any doubt at all is worth one
    assert confident in [r.answer for r in rank([confident], cheap, 10)]


@pytest.mark.parametrize("gain", [GAIN, np.array([[1.0, -1.0], [-1.0, 3.0]]), np.eye(2)])
@pytest.mark.parametrize("cost", [0.0, 0.3, 0.8, 5.0])
def test_no_plain_answer_from_the_confidence_bound_on_is_worth_a_review(
    gain: np.ndarray, cost: float
) -> None:
    terms = ReviewTerms(CLASSES, gain, cost)
    bound = terms.confidence_bound()
    for p in np.linspace(0, 1, 201):
        for label in CLASSES:
            a = answer(float(p), label=label)
            if a.confidence >= bound:
                assert review_value(a, terms) <= 1e-9, (p, label, bound)


def test_the_terms_come_from_the_packaged_model_and_older_packages_still_load(
    tmp_path: Path,
) -> None:
    info = PackagedModel("cnn64", CLASSES, 128, 64, "v", 0.6, SERVE, PROVENANCE)
    assert info.value_gain == () and info.review_cost == 0.0  # packaged before they existed
    np.testing.assert_array_equal(ReviewTerms.of(info).gain, np.eye(2))  # plain accuracy
    ruled = replace(info, decision_gain=tuple(map(tuple, GAIN)))
    np.testing.assert_array_equal(ReviewTerms.of(ruled).gain, GAIN)
    valued = replace(info, value_gain=((2.0, -1.0), (-1.0, 2.0)), review_cost=0.8)
    assert ReviewTerms.of(valued).review_cost == 0.8
    np.testing.assert_array_equal(ReviewTerms.of(valued).value, [2.0, 2.0])
    old = as_dict(info)
    del old["value_gain"], old["review_cost"], old["decision_gain"]
    (tmp_path / "model.json").write_text(json.dumps(old))
    assert read_packaged(tmp_path) == info


def test_a_standing_taxonomy_ancestor_earns_its_levels_gain(store: RecordStore) -> None:
    """Classes A/x, A/y, B/z worth 1, mistakes costing 1, a review 0.3, a right A or B half the
    value: an answer `A` at p = (0.45, 0.45, 0.10) earns 0.9 * 0.5 - 0.1 * 1 = 0.35, so its
    review is worth 1 - 0.35 - 0.3 = 0.35, and it is a candidate even at a confidence (0.9)
    above the bound from which no class answer is (1 - 0.3 / 2 = 0.85)."""
    tree = ("A/x", "A/y", "B/z")
    gain = np.full((3, 3), -1.0) + 2 * np.eye(3)
    level = BackoffLevel(1, 0.5, ("A", "B"), (0, 0, 1))
    info = PackagedModel(
        "cnn64",
        tree,
        128,
        64,
        "v",
        0.6,
        SERVE,
        PROVENANCE,
        value_gain=tuple(map(tuple, gain.tolist())),
        review_cost=0.3,
        backoff=(level,),
    )
    terms = ReviewTerms.of(info)
    assert terms.confidence_bound() == pytest.approx(0.85)
    probabilities = {"A/x": 0.45, "A/y": 0.45, "B/z": 0.10}
    ancestor = replace(answer(0.9, label="A"), confidence=0.9, probabilities=probabilities)
    assert review_value(ancestor, terms) == pytest.approx(1 - 0.35 - 0.3)
    unknown = replace(ancestor, label="C")  # nothing the model answers: nothing stands
    assert review_value(unknown, terms) == pytest.approx(1 - 0.3)
    store.insert([ancestor])
    assert [r.answer.request_id for r in review_queue(store, terms, 10)] == [ancestor.request_id]


def test_the_database_queue_is_the_ranking_of_every_unreviewed_answer(store: RecordStore) -> None:
    records = [answer((i % 20) / 20, minutes=i) for i in range(40)]
    records += [answer(0.5, abstain=True, minutes=50 + i) for i in range(3)]
    records += [answer(0.9, declared="laptop", minutes=60), answer(0.1, declared="phone")]
    store.insert(records)
    reviewed = [records[-1].request_id, records[41].request_id, records[5].request_id]
    for request_id in reviewed:
        add_review(store, request_id, "phone", "ana")
    add_review(store, reviewed[0], "laptop", "boris")  # a second decision: still reviewed once
    queue = review_queue(store, TERMS, 100)
    unreviewed = [r for r in records if r.request_id not in reviewed]
    expected = rank(unreviewed, TERMS, 100)
    assert [(r.answer.request_id, r.value) for r in queue] == [
        (r.answer.request_id, pytest.approx(r.value)) for r in expected
    ]
    assert queue[0].answer.request_id == records[-2].request_id  # the confident mismatch
    assert {r.answer.request_id for r in queue}.isdisjoint(reviewed)
    assert len(review_queue(store, TERMS, 3)) == 3
    assert len(review_queue(store, TERMS, 100, scan=2)) == 2  # the two latest candidates
