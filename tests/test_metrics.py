"""vitrine.evaluation.metrics against hand-computed cases."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from vitrine.evaluation import metrics
from vitrine.evaluation.metrics import Taxonomy

FLAT = Taxonomy("/", (1.0,))
# laptop is worth 1, phone 1.5; showing a phone among laptops costs 1, the reverse 0.5.
VALUES = metrics.value_model(("laptop", "phone"), {"laptop": 1.0, "phone": 1.5}, [], 0.5, 0.3)


def one_hot_proba(y_pred: list[int], k: int, confidence: float = 0.9) -> np.ndarray:
    proba = np.full((len(y_pred), k), (1 - confidence) / (k - 1))
    proba[np.arange(len(y_pred)), y_pred] = confidence
    return proba


def test_business_weighted_accuracy_is_the_value_share_of_correct_photos():
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 0])
    # correct: one laptop (1) and one phone (3) out of 1 + 1 + 3 + 3
    value = np.array([1.0, 3.0])
    assert metrics.business_weighted_accuracy(y_true, y_pred, value) == pytest.approx(4 / 8)


def test_weighted_precision_recall_f1_follow_their_formulas():
    values = metrics.value_model(("a", "b", "c"), {"a": 1, "b": 2, "c": 3}, [], 1.0, 0.0)
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    s = metrics.scores(y_true, one_hot_proba(list(y_pred), 3), values, 2, FLAT)
    # per class: a P 1/2 R 1/2 F1 1/2; b P 2/3 R 1 F1 0.8; c P 1 R 1/2 F1 2/3
    assert s["per_class"]["b"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert s["business_weighted_precision"] == pytest.approx((0.5 + 2 * 2 / 3 + 3 * 1) / 6)
    assert s["business_weighted_recall"] == pytest.approx((0.5 + 2 * 1 + 3 * 0.5) / 6)
    assert s["business_weighted_f1"] == pytest.approx((0.5 + 2 * 0.8 + 3 * 2 / 3) / 6)
    assert s["business_weighted_accuracy"] == pytest.approx((1 + 2 + 2 + 3) / 12)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert s["n"] == 6


def test_equal_values_make_weighted_scores_the_macro_ones():
    values = metrics.value_model(("a", "b", "c"), {"a": 2, "b": 2, "c": 2}, [], 1.0, 0.0)
    y_true, y_pred = np.array([0, 1, 2, 2, 1]), np.array([0, 2, 2, 1, 1])
    s = metrics.scores(y_true, one_hot_proba(list(y_pred), 3), values, 1, FLAT)
    assert s["business_weighted_f1"] == pytest.approx(s["macro_f1"])
    assert s["business_weighted_accuracy"] == pytest.approx(s["accuracy"])


def test_expected_value_uses_the_cost_matrix_and_the_default_cost():
    values = metrics.value_model(
        ("laptop", "phone", "tablet"),
        {"laptop": 1.0, "phone": 1.5, "tablet": 2.0},
        [("phone", "laptop", 1.0), ("laptop", "phone", 0.25)],
        0.5,
        0.3,
    )
    assert values.gain() == pytest.approx(
        np.array([[1.0, -0.25, -0.5], [-1.0, 1.5, -0.5], [-0.5, -0.5, 2.0]])
    )
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 0, 0])
    # 1 - 0.25 + 1.5 - 1.0 - 0.5 = 0.75 over 5 photos
    ev = metrics.expected_value_per_1000(y_true, y_pred, values.gain())
    assert ev == pytest.approx(1000 * 0.75 / 5)
    # Abstaining on the last two photos earns phone 1.5 - 0.3 and tablet 2.0 - 0.3 instead.
    abstained = np.array([False, False, False, True, True])
    ev = metrics.expected_value_per_1000(
        y_true, y_pred, values.gain(), abstained, values.review_gain()
    )
    assert ev == pytest.approx(1000 * (1 - 0.25 + 1.5 + 1.2 + 1.7) / 5)


def test_top_k_accuracy_by_hand():
    proba = np.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    y_true = np.array([1, 0, 2])
    assert metrics.top_k_accuracy(y_true, proba, 1) == 0.0
    assert metrics.top_k_accuracy(y_true, proba, 2) == pytest.approx(2 / 3)
    assert metrics.top_k_accuracy(y_true, proba, 5) == 1.0  # k capped at the classes
    assert metrics.score_names(3, 5)[2] == "top3_accuracy"


def test_expected_calibration_error_by_hand():
    proba = np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1], [0.2, 0.8]])
    y_true = np.array([0, 0, 0, 1])
    ece, curve = metrics.expected_calibration_error(y_true, proba, bins=4)
    # bin (0.5, 0.75]: confidences 0.6, 0.7, one right: |0.5 - 0.65| * 2/4
    # bin (0.75, 1]: confidences 0.9, 0.8, both right: |1 - 0.85| * 2/4
    assert ece == pytest.approx(0.15)
    assert curve == [
        {"bin": 2, "confidence": pytest.approx(0.65), "accuracy": 0.5, "count": 2},
        {"bin": 3, "confidence": pytest.approx(0.85), "accuracy": 1.0, "count": 2},
    ]


def test_abstain_threshold_maximises_expected_value_by_hand():
    values = metrics.value_model(("a", "b"), {"a": 1.0, "b": 1.0}, [], 1.0, 0.5)
    # confidences 0.9 right, 0.8 right, 0.6 wrong, 0.55 wrong
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    y_true = np.array([0, 1, 1, 0])
    threshold, ev = metrics.best_abstain_threshold(y_true, proba, values)
    # never: 1 + 1 - 1 - 1 = 0; below 0.575: 1.5; below 0.7: 1 + 1 + 0.5 + 0.5 = 3 (best);
    # below 0.85: 2.5; everything: 2. The threshold is the midpoint of 0.6 and 0.8.
    assert threshold == pytest.approx(0.7)
    assert ev == pytest.approx(1000 * 3 / 4)


def test_no_abstaining_when_review_does_not_pay():
    values = metrics.value_model(("a", "b"), {"a": 1.0, "b": 1.0}, [], 1.0, 0.5)
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    threshold, ev = metrics.best_abstain_threshold(np.array([0, 1, 0]), proba, values)
    assert (threshold, ev) == (0.0, pytest.approx(1000.0))


def test_abstaining_everything_when_the_model_is_always_wrong():
    values = metrics.value_model(("a", "b"), {"a": 1.0, "b": 1.0}, [], 1.0, 0.5)
    proba = np.array([[0.9, 0.1], [0.2, 0.8]])
    threshold, ev = metrics.best_abstain_threshold(np.array([1, 0]), proba, values)
    assert threshold == metrics.REVIEW_ALL and threshold > 1.0
    assert ev == pytest.approx(500.0)


# The bundled value model: phone worth 1.5, a missed phone costs 1.0, a false one 0.5.
BY_VALUE = metrics.value_model(
    ("laptop", "phone"),
    {"laptop": 1.0, "phone": 1.5},
    [("phone", "laptop", 1.0)],
    0.5,
    0.3,
    "expected_value",
)


def test_expected_value_answers_phone_from_three_eighths():
    # gain(phone) = 1.5 p - 0.5 (1 - p) > gain(laptop) = (1 - p) - p  <=>  p > 0.375
    proba = np.array([[0.7, 0.3], [0.63, 0.37], [0.62, 0.38], [0.4, 0.6]])
    assert BY_VALUE.decide(proba).tolist() == [0, 0, 1, 1]
    assert VALUES.decide(proba).tolist() == [0, 0, 0, 1]  # decision "argmax": the likeliest


def test_with_equal_values_and_costs_expected_value_is_the_likeliest_class():
    classes = tuple("abcde")
    values = metrics.value_model(
        classes, dict.fromkeys(classes, 2.0), [], 1.0, 0.0, "expected_value"
    )
    proba = np.random.default_rng(0).dirichlet(np.ones(5), size=200)
    assert (values.decide(proba) == proba.argmax(axis=1)).all()


def test_scores_and_abstaining_follow_the_decision_rule():
    proba = np.array([[0.62, 0.38], [0.62, 0.38], [0.9, 0.1]])
    y_true = np.array([1, 0, 0])
    s = metrics.scores(y_true, proba, BY_VALUE, 2, FLAT)
    assert s["accuracy"] == pytest.approx(2 / 3)  # phone, phone, laptop answered
    assert s["expected_value_per_1000"] == pytest.approx(1000 * (1.5 - 0.5 + 1.0) / 3)
    # Confidence is the answered class's probability (0.38 for the two phones): reviewing
    # them (1.2 and 0.7 at review cost 0.3) beats trusting (1.5 - 0.5), so the threshold
    # falls between 0.38 and 0.9.
    threshold, ev = metrics.best_abstain_threshold(y_true, proba, BY_VALUE)
    assert threshold == pytest.approx((0.38 + 0.9) / 2)
    assert ev == pytest.approx(1000 * (1.2 + 0.7 + 1.0) / 3)


def test_an_unknown_decision_rule_is_refused():
    with pytest.raises(ValueError, match=r"evaluate\.decision 'vote'"):
        metrics.value_model(("a", "b"), {"a": 1.0, "b": 1.0}, [], 1.0, 0.0, "vote")


TREE = ("Fruit/Apple/Granny", "Fruit/Apple/Gala", "Fruit/Pear/Conference", "Veg/Carrot/Carrot")


def test_taxonomy_levels_and_depth_weighted_accuracy_by_hand():
    y_true, y_pred = np.array([0, 1, 2, 3]), np.array([1, 1, 0, 2])
    result = metrics.taxonomy_scores(
        y_true, y_pred, TREE, Taxonomy("/", (1.0, 2.0, 3.0), (0.3, 0.6, 1.0))
    )
    # level 1 (Fruit | Veg): 3 right; level 2 (Fruit/Apple ...): Apple->Apple twice right;
    # level 3: only Gala->Gala right.
    assert [(lv["level"], lv["classes"], lv["accuracy"]) for lv in result["levels"]] == [
        (1, 2, 0.75),
        (2, 3, 0.5),
        (3, 4, 0.25),
    ]
    assert result["depth_weighted_accuracy"] == pytest.approx((0.75 + 2 * 0.5 + 3 * 0.25) / 6)


def test_flat_classes_have_one_level_equal_to_accuracy():
    s = metrics.scores(np.array([0, 1, 1]), one_hot_proba([0, 1, 0], 2), VALUES, 2, FLAT)
    assert s["depth_weighted_accuracy"] == s["accuracy"] == pytest.approx(2 / 3)
    assert s["taxonomy"]["levels"][0]["classes"] == 2


@pytest.mark.parametrize(
    ("taxonomy", "message"),
    [
        (Taxonomy("/", (1.0, 1.0)), r"has 2 weight\(s\), but the classes have 3 taxonomy level"),
        (Taxonomy("/", (1.0, -1.0, 1.0)), "non-negative"),
        (Taxonomy("", (1.0,)), "separator must not be empty"),
    ],
)
def test_bad_level_weights_are_clear_errors(taxonomy, message):
    with pytest.raises(ValueError, match=message):
        metrics.check_taxonomy(TREE, taxonomy)


def test_value_model_refuses_bad_business_values_and_costs():
    classes = ("laptop", "phone")
    with pytest.raises(ValueError, match=r"missing \['phone'\], unknown \[\]"):
        metrics.value_model(classes, {"laptop": 1.0}, [], 0.5, 0.3)
    with pytest.raises(ValueError, match=r"unknown \['tablet'\]"):
        metrics.value_model(classes, {"laptop": 1, "phone": 1, "tablet": 1}, [], 0.5, 0.3)
    with pytest.raises(ValueError, match="not all zero"):
        metrics.value_model(classes, {"laptop": 0, "phone": 0}, [], 0.5, 0.3)
    with pytest.raises(ValueError, match="names unknown class 'tablet'"):
        metrics.value_model(classes, {"laptop": 1, "phone": 1}, [("tablet", "phone", 1)], 0.5, 0)
    with pytest.raises(ValueError, match="is not a mistake"):
        metrics.value_model(classes, {"laptop": 1, "phone": 1}, [("phone", "phone", 1)], 0.5, 0)
