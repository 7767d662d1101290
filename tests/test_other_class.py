"""The other class (params.yaml other_class): photos of none of the categories, learnt from
review's `other` decisions, answered by the three-class decision rule, scored on the open set and
compared by the promotion gate; switched off, everything is as without it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages import validate
from stages.dedupe import DedupeConfig, NoiseConfig, as_other, dedupe, read_decisions
from tests.helpers.validate_config import validate_config
from vitrine.config import ConfigError, stage_config
from vitrine.contracts import (
    EvaluationReport,
    PackagedModel,
    Provenance,
    ServeConfig,
    write_evaluation,
    write_packaged,
)
from vitrine.curation.features import given_features
from vitrine.curation.review import render_review
from vitrine.evaluation import metrics
from vitrine.evaluation.openset import (
    KNOWN_AS_OTHER,
    RECALL,
    answered_other,
    open_set_report,
    open_set_scores,
    scalar_open_set,
)
from vitrine.evaluation.promotion import Contender, decide
from vitrine.evaluation.thresholds import backoff_levels, build_rule, fit_rules
from vitrine.production.curation import BadDecision, checked_decision
from vitrine.runtime.answers import category_check, classify_answer
from vitrine.runtime.decisions import answer, rule

CLASSES = ("laptop", "phone", "other")
LAPTOP, PHONE, OTHER = range(3)
# A charger passed as a phone costs more than a phone flagged as other (a moderator looks).
VALUES = metrics.value_model(
    CLASSES,
    {"laptop": 1.0, "phone": 1.5, "other": 1.0},
    [
        ("phone", "laptop", 1.0),
        ("laptop", "phone", 0.5),
        ("other", "phone", 1.5),
        ("other", "laptop", 1.0),
        ("phone", "other", 0.5),
        ("laptop", "other", 0.3),
    ],
    0.5,
    0.4,
    "expected_value",
)


# --- the three-class decision rule ---------------------------------------------------------


def test_each_class_answers_from_its_own_threshold_and_other_is_one_of_them() -> None:
    r = rule(CLASSES, None, [0.6, 0.6, 0.8])
    proba = np.array(
        [
            [0.05, 0.05, 0.90],  # other, sure: answered other
            [0.10, 0.15, 0.75],  # other, below other's 0.8: review
            [0.70, 0.10, 0.20],  # laptop from 0.6 on
            [0.30, 0.25, 0.45],  # other below its threshold: review
        ]
    )
    given = answer(proba, r)
    assert list(given.labels) == ["other", "other", "laptop", "other"]
    assert given.abstain.tolist() == [False, True, False, True]
    assert answered_other(given, r, OTHER).tolist() == [True, False, False, False]


def test_the_value_model_calls_other_before_it_is_the_most_probable() -> None:
    """Passing a charger as a phone costs 1.5, flagging a phone other 0.5: other is worth
    answering from p(other) = 4/9 against phone (1.5 - 3p = 1.5p - 0.5)."""
    proba = np.array([[0.0, 0.54, 0.46], [0.0, 0.57, 0.43]])
    assert VALUES.decide(proba).tolist() == [OTHER, PHONE]
    gain = VALUES.gain()
    assert -gain[OTHER, PHONE] > -gain[PHONE, OTHER]


def test_taxonomy_back_off_never_hides_other_under_a_product_node() -> None:
    classes = ("Electronics/laptop", "Electronics/phone", "other")
    taxonomy = metrics.Taxonomy("/", (1.0, 1.0), (0.9, 1.0))
    values = dataclasses.replace(VALUES, classes=classes)
    levels = backoff_levels(classes, taxonomy)
    assert [b.nodes for b in levels] == [("Electronics", "other")]
    r = build_rule(values, [0.9, 0.9, 0.9], levels)
    proba = np.array(
        [
            [0.48, 0.48, 0.04],  # a product, which one unsure: Electronics
            [0.02, 0.03, 0.95],  # other, sure
            [0.05, 0.10, 0.85],  # other below its threshold: its level-1 node, other alone
        ]
    )
    given = answer(proba, r)
    assert list(given.labels) == ["Electronics", "other", "other"]
    assert given.level.tolist() == [1, 2, 1] and not given.abstain.any()
    assert answered_other(given, r, OTHER).tolist() == [False, True, True]
    # other does not answer "matches" for a declared product, at any level
    info = packaged(classes, r, other="other", backoff=levels)
    for p in proba[1:]:
        matches, suggested = category_check("Electronics/phone", classify(p, info), info)
        assert (matches, suggested) == (False, "other")


def test_fitted_rules_give_other_its_threshold_and_the_open_set_figures() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([LAPTOP, PHONE, OTHER], [60, 60, 40])
    proba = rng.dirichlet([1, 1, 1], size=len(y)) * 0.4
    proba[np.arange(len(y)), y] += 0.6  # mostly right
    fitted = fit_rules(y, proba, VALUES, metrics.Taxonomy("/", (1.0,)), 30)
    assert fitted.served.fitted.tolist() == [True, True, True]
    given = answer(proba, fitted.rule)
    figures = open_set_scores(y, given, fitted.rule, OTHER)
    assert figures["off_category_photos"] == 40 and figures["known_photos"] == 120
    assert figures["answered_other"] + figures["abstained"] <= 40
    caught = figures["answered_other"] + figures["abstained"]
    assert figures[RECALL] == pytest.approx(caught / 40)
    assert figures[KNOWN_AS_OTHER] == pytest.approx(figures["known_called_other"] / 120)
    assert figures[RECALL] > 0.8


def test_open_set_figures_by_hand() -> None:
    r = rule(CLASSES, None, [0.5, 0.5, 0.5])
    y = np.array([OTHER, OTHER, OTHER, OTHER, PHONE, LAPTOP])
    proba = np.array(
        [
            [0.1, 0.1, 0.8],  # answered other
            [0.3, 0.3, 0.4],  # abstained
            [0.1, 0.8, 0.1],  # passed as a phone: missed
            [0.0, 0.2, 0.8],  # answered other
            [0.1, 0.2, 0.7],  # a phone called other
            [0.9, 0.1, 0.0],
        ]
    )
    report = open_set_report("other", r, (y, answer(proba, r)), (y[:0], answer(proba[:0], r)))
    assert report["val"] == {
        "off_category_photos": 4,
        "answered_other": 2,
        "abstained": 1,
        RECALL: 0.75,
        "known_photos": 2,
        "known_called_other": 1,
        KNOWN_AS_OTHER: 0.5,
    }
    assert report["test"][RECALL] is None  # no photo: no share
    assert open_set_report("", r, (y, answer(proba, r)), (y, answer(proba, r))) == {}
    assert scalar_open_set(y, answer(proba, r), r, "other") == {RECALL: 0.75, KNOWN_AS_OTHER: 0.5}
    assert scalar_open_set(y, answer(proba, r), r, "") == {}


# --- the gate -------------------------------------------------------------------------------

METRIC = "business_weighted_accuracy"


def contender(version: str, score: float, recall: float, known: float) -> Contender:
    scores = {METRIC: score, RECALL: recall, KNOWN_AS_OTHER: known}
    return Contender(version, version, "cnn64", "c", CLASSES, 32, scores)


@pytest.mark.parametrize(
    ("recall", "known", "promoted"),
    [
        (0.85, 0.01, True),  # as good on the open set
        (0.84, 0.02, True),  # within the allowed loss
        (0.80, 0.01, False),  # catches fewer off-category photos
        (0.85, 0.05, False),  # calls more real products other
    ],
)
def test_the_gate_compares_on_the_open_set_too(recall: float, known: float, promoted: bool):
    champion = contender("old", 0.80, 0.85, 0.01)
    decision = decide(contender("new", 0.90, recall, known), champion, METRIC, 0.005, 0.02)
    assert decision.promoted is promoted
    if not promoted:
        assert "open set" in decision.reason and "champion is kept" in decision.reason


def test_the_gate_without_open_set_figures_is_the_metric_alone() -> None:
    new = Contender("new", "new", "cnn64", "c", CLASSES, 32, {METRIC: 0.9})
    old = Contender("old", "old", "cnn64", "c", CLASSES, 32, {METRIC: 0.8, RECALL: 1.0})
    assert decide(new, old, METRIC, 0.005, 0.02).promoted


# --- review decisions and dedupe ------------------------------------------------------------

DEDUPE = DedupeConfig(
    CLASSES,
    "largest",
    tiers=((6, 0.95),),
    embedding_batch_size=8,
    noise=NoiseConfig(folds=2, seed=0, min_outlier_score=3.0, max_candidates=10),
    other_class="other",
)


def collected(n_per_class: int = 4) -> pd.DataFrame:
    """Accepted photos of laptops and phones; the first phone has an exact copy."""
    rows = []
    for label in ("laptop", "phone"):
        for i in range(n_per_class):
            rows.append((f"{label}/{i}.jpg", label, f"{label}{i}".ljust(64, "0")))
    rows.append(("phone/copy.jpg", "phone", rows[n_per_class][2]))
    rng = np.random.default_rng(1)
    return pd.DataFrame(
        {
            "id": [r[0] for r in rows],
            "label": [r[1] for r in rows],
            "source": "folder:x",
            "status": "accepted",
            "reason": "",
            "detail": "",
            "sha256": [r[2] for r in rows],
            "width": 100,
            "height": 80,
            "phash": rng.integers(-(2**63), 2**63 - 1, size=len(rows), dtype=np.int64),
        }
    )


def embeddings(n: int) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(n, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def decisions(*rows: tuple[str, str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        [(i, d, label, "neither a laptop nor a phone") for i, d, label in rows],
        columns=["id", "decision", "new_label", "note"],
    )


def run_dedupe(config: DedupeConfig, decided: pd.DataFrame) -> pd.DataFrame:
    m = collected()
    emb = embeddings(len(m))
    return dedupe(m, given_features(m, emb, emb), decided, config).set_index("id")


def test_an_other_decision_makes_an_example_of_the_other_class_with_its_copies() -> None:
    d = run_dedupe(DEDUPE, decisions(("phone/0.jpg", "other", ""), ("laptop/1.jpg", "other", "")))
    assert d.loc["phone/0.jpg", "label"] == d.loc["phone/copy.jpg", "label"] == "other"
    assert d.loc["phone/0.jpg", "given_label"] == "phone"  # the source's label stays
    assert {d.loc["phone/0.jpg", "status"], d.loc["phone/copy.jpg", "status"]} == {
        "kept",
        "duplicate",
    }  # the copy is a duplicate of it, not a label conflict
    assert (d.loc["laptop/1.jpg", "label"], d.loc["laptop/1.jpg", "status"]) == ("other", "kept")
    relabel = run_dedupe(DEDUPE, decisions(("laptop/1.jpg", "relabel", "other")))
    assert (relabel.loc["laptop/1.jpg", "label"], relabel.loc["laptop/1.jpg", "status"]) == (
        "other",
        "kept",
    )


def test_without_an_other_class_an_other_decision_is_a_drop() -> None:
    off = dataclasses.replace(DEDUPE, classes=("laptop", "phone"), other_class="")
    as_other_ = run_dedupe(off, decisions(("phone/0.jpg", "other", "")))
    as_drop = run_dedupe(off, decisions(("phone/0.jpg", "drop", "")))
    pd.testing.assert_frame_equal(as_other_, as_drop)
    assert as_drop.loc["phone/copy.jpg", "status"] == "dropped"
    assert as_other(decisions(("a", "other", "")), "")["decision"].tolist() == ["drop"]


def test_the_decisions_file_accepts_other(tmp_path: Path) -> None:
    path = tmp_path / "decisions.csv"
    path.write_text("id,decision,new_label,note\nlaptop/1.jpg,other,,a charger\n")
    assert read_decisions(path, ("laptop", "phone"))["decision"].tolist() == ["other"]
    assert checked_decision("laptop/1.jpg", "other", "", "charger", CLASSES).decision == "other"
    with pytest.raises(BadDecision, match="relabel only"):
        checked_decision("laptop/1.jpg", "other", "phone", "", CLASSES)


def test_the_review_page_offers_other_only_with_an_other_class() -> None:
    m = collected().assign(
        suggested_label="phone",
        noise_score=0.9,
        outlier_score=5.0,
        cluster_id="c",
        status="kept",
        reason="",
    )
    pages = {
        other: render_review(m.head(2), m.head(2), lambda r: b"jpeg", "decisions.csv", other)
        for other in ("", "other")
    }
    assert "laptop/0.jpg,other,," in pages["other"] and ",other,," not in pages[""]
    assert "decision is keep, drop or relabel)" in pages[""]
    assert render_review(m.head(2), m.head(2), lambda r: b"jpeg", "decisions.csv") == pages[""]


# --- params, validate, reports ---------------------------------------------------------------


def test_other_class_must_be_one_of_the_classes() -> None:
    params = {"classes": ["laptop", "phone"], "other_class": "other", "dedupe": {}}
    with pytest.raises(ConfigError, match="other_class 'other' is not one of the classes"):
        stage_config(DedupeConfig, "dedupe", params)


VALIDATE = validate_config(classes=CLASSES, other_class="other")


def validate_rows(per_class: int) -> pd.DataFrame:
    rows = collected(per_class).drop(columns=["phash"])
    rows["sha256"] = [f"{i:064x}" for i in range(len(rows))]
    return rows.assign(bytes=50_000, format="JPEG")


def test_validate_does_not_count_the_other_class_which_review_fills_later(tmp_path: Path):
    """No photo is labelled other at collect: the class's examples come from dedupe's review
    decisions, so validate counts the other classes only."""
    manifest = validate_rows(4)
    report = validate.validate_manifest(manifest, VALIDATE, tmp_path / "docs")
    assert report["success"], report
    counted = dataclasses.replace(VALIDATE, other_class="")
    assert not validate.validate_manifest(manifest, counted, tmp_path / "docs2")["success"]


def test_reports_leave_out_what_a_two_class_project_has_no_use_for(tmp_path: Path) -> None:
    report = EvaluationReport(
        "c", METRIC, "argmax", ("c",), "params", {}, {}, {}, {"threshold": 0.0}, {}
    )
    write_evaluation(report, tmp_path / "two.json")
    assert "open_set" not in json.loads((tmp_path / "two.json").read_text())
    with_other = dataclasses.replace(report, open_set={"other_class": "other"})
    write_evaluation(with_other, tmp_path / "three.json")
    assert json.loads((tmp_path / "three.json").read_text())["open_set"] == {"other_class": "other"}
    r = rule(("laptop", "phone"), None, [0.5, 0.5])
    info = packaged(("laptop", "phone"), r)
    write_packaged(info, tmp_path)
    assert "other_class" not in json.loads((tmp_path / "model.json").read_text())
    info3 = packaged(CLASSES, rule(CLASSES, None, [0.5] * 3), other="other")
    write_packaged(info3, tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["other_class"] == "other"


# --- the service's answer -------------------------------------------------------------------


def packaged(classes, r, other: str = "", backoff=()) -> PackagedModel:
    serve = ServeConfig(20_000_000, 40_000_000, 32, 16, 50_000_000, 4, 2.0, 1, 1)
    return PackagedModel(
        model="cnn64",
        classes=tuple(classes),
        image_size=32,
        input_size=32,
        model_version="v",
        abstain_threshold=0.0,
        serve=serve,
        card=Provenance({}, {"path": "p", "md5": "m"}, "g"),
        decision_gain=None,
        value_gain=tuple(map(tuple, VALUES.gain().tolist())),
        review_cost=VALUES.review_cost,
        class_thresholds=tuple(float(t) for t in r.thresholds),
        backoff=tuple(backoff),
        other_class=other,
    )


def classify(p: np.ndarray, info: PackagedModel) -> dict:
    return classify_answer(p.tolist(), info)


def test_check_category_answers_a_charger_under_phone_with_other() -> None:
    info = packaged(CLASSES, rule(CLASSES, None, [0.6, 0.6, 0.6]), other="other")
    charger = classify(np.array([0.05, 0.15, 0.8]), info)
    assert charger["label"] == "other" and not charger["abstain"]
    assert category_check("phone", charger, info) == (False, "other")
    unsure = classify(np.array([0.2, 0.35, 0.45]), info)  # other, but sent to review
    assert unsure["label"] == "other" and unsure["abstain"]
    assert category_check("phone", unsure, info) == (False, "phone")  # nothing new suggested
