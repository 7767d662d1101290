"""The decision rule against hand-computed cases: thresholds per class fitted on val, and
taxonomy back-off (vitrine.runtime.decisions, vitrine.evaluation.thresholds), and the packaged
model answering by the same rule (vitrine.runtime.answers).

The taxonomy: two apples under A (A/x, A/y) and one B (B/z); every class is worth 1, every
mistake costs 1, a review 0.8 (a reviewed photo earns 1 - 0.8 = 0.2), and a right answer at
level 1 (A or B) earns half a photo's value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.candidates import PROVENANCE, SERVE
from vitrine.contracts import PackagedModel, as_dict, read_packaged, write_packaged
from vitrine.evaluation import metrics, thresholds
from vitrine.evaluation.metrics import Taxonomy
from vitrine.runtime import answers, decisions

TREE = ("A/x", "A/y", "B/z")
TREE_TAXONOMY = Taxonomy("/", (1.0, 1.0), (0.5, 1.0))
TREE_VALUES = metrics.value_model(
    TREE, dict.fromkeys(TREE, 1.0), [], 1.0, 0.8, decision="expected_value"
)
FLAT = ("a", "b")
FLAT_VALUES = metrics.value_model(FLAT, {"a": 1.0, "b": 1.0}, [], 1.0, 0.5)


def tree_rule(cut: float = 0.6) -> decisions.Rule:
    backoff = thresholds.backoff_levels(TREE, TREE_TAXONOMY)
    return thresholds.build_rule(TREE_VALUES, [cut] * 3, backoff)


# --- back-off ---------------------------------------------------------------------------------


def test_the_taxonomy_nodes_of_each_level() -> None:
    assert decisions.taxonomy_nodes(TREE, "/", 1)[0] == ("A", "B")
    assert decisions.taxonomy_nodes(TREE, "/", 1)[1].tolist() == [0, 0, 1]
    assert decisions.taxonomy_nodes(TREE, "/", 2)[0] == TREE
    [level] = thresholds.backoff_levels(TREE, TREE_TAXONOMY)
    assert (level.level, level.value_share, level.nodes, level.node_of) == (
        1,
        0.5,
        ("A", "B"),
        (0, 0, 1),
    )
    assert thresholds.backoff_levels(FLAT, Taxonomy("/", (1.0,), (1.0,))) == ()


def test_an_ancestor_earns_its_share_when_right_and_the_mean_cost_of_its_classes_when_wrong():
    # z taken for x costs 2, for y the default 1: answering A for a z costs (2 + 1) / 2.
    values = metrics.value_model(
        TREE, {"A/x": 1.0, "A/y": 2.0, "B/z": 4.0}, [("B/z", "A/x", 2.0)], 1.0, 0.8
    )
    _, node_of = decisions.taxonomy_nodes(TREE, "/", 1)
    gain = decisions.level_gain(values.gain(), node_of, 0.5)
    assert gain.tolist() == [[0.5, -1.0], [1.0, -1.0], [-1.5, 2.0]]


def test_the_parent_is_answered_when_the_leaf_is_unsure_but_the_parent_is_sure() -> None:
    proba = np.array(
        [
            [0.80, 0.10, 0.10],  # sure of A/x: the class, at level 2
            [0.45, 0.45, 0.10],  # A/x or A/y: A earns 0.9 * 0.5 - 0.1 * 1 = 0.35 >= 0.2
            [0.40, 0.30, 0.30],  # A: 0.7 * 0.5 - 0.3 = 0.05 < 0.2 a review earns: abstain
            [0.50, 0.35, 0.15],  # A/x's 0.5 < 0.6; A: 0.85 * 0.5 - 0.15 = 0.275 >= 0.2
            [0.05, 0.05, 0.90],  # sure of B/z
        ]
    )
    given = decisions.answer(proba, tree_rule())
    assert given.labels == ("A/x", "A", "A/x", "A", "B/z")
    assert given.level.tolist() == [2, 1, 2, 1, 2]
    assert given.abstain.tolist() == [False, False, True, False, False]
    assert given.confidence == pytest.approx([0.8, 0.9, 0.4, 0.85, 0.9])
    assert given.decided.tolist() == [0, 0, 0, 0, 2]
    # What each answer earns when the photos are A/y, A/y, A/y, B/z, B/z: a wrong class -1, a
    # right A 0.5, a review 0.2, a wrong A -1, a right class 1; and whether it was right.
    y = np.array([1, 1, 1, 2, 2])
    rule = tree_rule()
    assert thresholds.earned(given, y, TREE_VALUES, rule) == pytest.approx([-1, 0.5, 0.2, -1, 1])
    assert thresholds.answered_correctly(given, y, rule).tolist() == [
        False,
        True,
        False,
        False,
        True,
    ]
    scored = thresholds.rule_scores(y, proba, TREE_VALUES, rule)
    assert scored["expected_value_per_1000"] == pytest.approx(1000 * -0.3 / 5)
    assert scored["abstain_rate"] == pytest.approx(1 / 5)
    assert scored["accuracy_when_answered"] == pytest.approx(2 / 4)
    assert scored["levels"] == [
        {"level": 1, "answers": 2, "accuracy": 0.5},
        {"level": 2, "answers": 2, "accuracy": 0.5},
    ]


def test_flat_classes_answer_at_level_one_or_abstain() -> None:
    rule = thresholds.build_rule(FLAT_VALUES, [0.7, 0.7])
    given = decisions.answer(np.array([[0.9, 0.1], [0.4, 0.6]]), rule)
    assert rule.leaf_level == 1 and rule.backoff == ()
    assert given.labels == ("a", "b") and given.level.tolist() == [1, 1]
    assert given.abstain.tolist() == [False, True]


def test_a_rule_that_does_not_fit_its_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="1 class threshold"):
        decisions.rule(TREE, None, [0.5])
    with pytest.raises(ValueError, match="back-off needs the value model"):
        decisions.rule(TREE, None, [0.5] * 3, None, 0.0, [(1, 0.5, (0, 0, 1))], [("A", "B")])
    with pytest.raises(ValueError, match="node_of does not map"):
        decisions.rule(
            TREE, None, [0.5] * 3, TREE_VALUES.gain(), 0.8, [(1, 0.5, (0, 0, 2))], [("A", "B")]
        )


@pytest.mark.parametrize(
    ("shares", "message"),
    [
        ((0.5,), r"has 1 value\(s\), but the classes have 2"),
        ((0.5, 0.9), "the last"),
        ((-0.1, 1.0), r"in \[0, 1\]"),
    ],
)
def test_bad_level_values_are_clear_errors(shares: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metrics.check_taxonomy(TREE, Taxonomy("/", (1.0, 1.0), shares))


# --- thresholds per class ---------------------------------------------------------------------

# Flat a/b, a mistake costs 1, a review 0.5 (earning 0.5). The photos, by confidence:
# answered a: 0.65 wrong, 0.7 wrong, 0.9 right; answered b: 0.55 right, 0.6 right.
FLAT_PROBA = np.array([[0.65, 0.35], [0.7, 0.3], [0.9, 0.1], [0.45, 0.55], [0.4, 0.6]])
FLAT_Y = np.array([1, 1, 0, 1, 1])


def test_one_threshold_by_hand() -> None:
    # Below 0.8 (between 0.7 and 0.9) four photos go to review: 4 * 0.5 + 1 = 3, the best of
    # 1 (none), 0.5, 0, 1.5, 3 and 2.5 (all).
    fitted = thresholds.fit_thresholds(FLAT_Y, FLAT_PROBA, FLAT_VALUES, (), min_photos=3)
    assert fitted.shared == pytest.approx(0.8)
    assert fitted.photos.tolist() == [3, 2] and fitted.fitted.tolist() == [True, False]
    # a: below 0.8 its two wrong ones go to review (0.5 + 0.5 + 1 = 2); b has 2 photos < 3, so
    # it takes the shared threshold, and its two right answers go to review too.
    assert fitted.per_class == pytest.approx([0.8, 0.8])


def test_a_threshold_per_class_earns_at_least_the_shared_one_on_val() -> None:
    fitted = thresholds.fit_thresholds(FLAT_Y, FLAT_PROBA, FLAT_VALUES, (), min_photos=2)
    # b's own threshold: 0, both its answers are right (2 against 2 * 0.5 reviewed).
    assert fitted.per_class == pytest.approx([0.8, 0.0])
    one = thresholds.build_rule(FLAT_VALUES, [fitted.shared] * 2)
    own = thresholds.build_rule(FLAT_VALUES, fitted.per_class)
    shared_ev = thresholds.rule_scores(FLAT_Y, FLAT_PROBA, FLAT_VALUES, one)[
        "expected_value_per_1000"
    ]
    own_ev = thresholds.rule_scores(FLAT_Y, FLAT_PROBA, FLAT_VALUES, own)["expected_value_per_1000"]
    assert shared_ev == pytest.approx(1000 * 3 / 5) and own_ev == pytest.approx(1000 * 4 / 5)
    assert metrics.best_abstain_threshold(FLAT_Y, FLAT_PROBA, FLAT_VALUES) == pytest.approx(
        (0.8, 600.0)
    )


def test_thresholds_are_fitted_against_what_back_off_answers_instead() -> None:
    # One photo of A/y answered A/x at 0.45 (wrong: -1). Refused, it earns 0.2 reviewed, or
    # 0.5 as A with back-off: both refuse it, and back-off earns more.
    proba, y = np.array([[0.45, 0.45, 0.10]]), np.array([1])
    fitted = thresholds.fit_rules(y, proba, TREE_VALUES, TREE_TAXONOMY, min_photos=1)
    assert fitted.served.per_class[0] > 1 and fitted.served.fitted.tolist() == [True, False, False]
    report = thresholds.decision_report(fitted, TREE_VALUES, (y, proba), (y, proba))
    ev = {name: r["val"]["expected_value_per_1000"] for name, r in report["rules"].items()}
    assert ev == pytest.approx(
        {"one_threshold": 200.0, "class_thresholds": 200.0, "class_thresholds_backoff": 500.0}
    )
    assert report["test_levels"] == [
        {"level": 1, "answers": 1, "accuracy": 1.0},
        {"level": 2, "answers": 0, "accuracy": None},
    ]
    assert report["class_thresholds"]["A/x"] == {
        "threshold": fitted.served.per_class[0],
        "val_photos": 1,
        "fitted": True,
    }
    assert report["backoff_levels"] == [{"level": 1, "value_share": 0.5, "nodes": 2}]


# --- the packaged model answers by the same rule -----------------------------------------------


def tree_package(cut: float = 0.6) -> PackagedModel:
    return PackagedModel(
        "cnn64",
        TREE,
        128,
        64,
        "cnn64-x",
        cut,
        SERVE,
        PROVENANCE,
        decision_gain=tuple(map(tuple, TREE_VALUES.gain().tolist())),
        value_gain=tuple(map(tuple, TREE_VALUES.gain().tolist())),
        review_cost=0.8,
        class_thresholds=(cut,) * 3,
        backoff=thresholds.backoff_levels(TREE, TREE_TAXONOMY),
    )


def test_the_packaged_model_answers_the_parent_with_its_level() -> None:
    info = tree_package()
    given = answers.classify_answer([0.45, 0.45, 0.10], info)
    assert given["label"] == "A" and given["level"] == 1 and not given["abstain"]
    assert given["confidence"] == pytest.approx(0.9)
    sure = answers.classify_answer([0.8, 0.1, 0.1], info)
    assert (sure["label"], sure["level"], sure["abstain"]) == ("A/x", 2, False)
    # A right parent: the declared class stands; a wrong one suggests the parent's likeliest.
    assert answers.category_check("A/y", given, info) == (True, "A/y")
    assert answers.category_check(
        "B/z", answers.classify_answer([0.44, 0.45, 0.11], info), info
    ) == (False, "A/y")
    assert answers.category_check("B/z", sure, info) == (False, "A/x")


def test_an_older_model_without_class_thresholds_or_back_off_answers_from_its_threshold(
    tmp_path: Path,
) -> None:
    info = tree_package()
    write_packaged(info, tmp_path)
    data = json.loads((tmp_path / "model.json").read_text())
    del data["class_thresholds"], data["backoff"]
    (tmp_path / "model.json").write_text(json.dumps(data))
    old = read_packaged(tmp_path)
    assert old.rule.thresholds.tolist() == [0.6] * 3 and old.rule.backoff == ()
    unsure = answers.classify_answer([0.45, 0.45, 0.10], old)
    assert (unsure["label"], unsure["level"], unsure["abstain"]) == ("A/x", 1, True)


def test_a_model_json_whose_rule_does_not_fit_its_classes_is_refused(tmp_path: Path) -> None:
    write_packaged(dataclasses.replace(tree_package(), class_thresholds=(0.5,)), tmp_path)
    with pytest.raises(ValueError, match=r"model.json: 1 class threshold\(s\) for 3 classes"):
        read_packaged(tmp_path)


def test_the_rule_evaluate_builds_is_the_one_the_packaged_model_rebuilds() -> None:
    info = tree_package()
    assert as_dict(info)["backoff"][0]["nodes"] == ["A", "B"]
    served, scored = info.rule, tree_rule()
    assert served.classes == scored.classes and served.leaf_level == scored.leaf_level == 2
    for a, b in [(served.thresholds, scored.thresholds), (served.review_gain, scored.review_gain)]:
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(served.backoff[0].gain, scored.backoff[0].gain)
    rng = np.random.default_rng(0)
    proba = rng.dirichlet([1, 1, 1], 300)
    mine, theirs = decisions.answer(proba, scored), decisions.answer(proba, served)
    assert mine.labels == theirs.labels and (mine.abstain == theirs.abstain).all()
    assert {1, 2} <= set(mine.level.tolist()) and mine.abstain.any()
