"""The evaluate stage: candidates on val, the winner on test, the reports it writes.

The candidates are hand-built checkpoints whose behaviour is known (always laptop, always phone,
or dark = laptop / bright = phone), on a tiny prepared dataset of dark laptops and bright phones,
so every score here can be worked out by hand.
"""

from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from stages.evaluate import evaluate, predictions_table, write_outputs
from tests.helpers.candidates import (
    CLASSES,
    brightness_classifier,
    constant_classifier,
    quantized_weights,
    write_checkpoint,
    write_prepared,
)
from tests.helpers.candidates import evaluate_config as config
from vitrine.config import ConfigError, load_params, load_paths
from vitrine.contracts import as_dict, read_evaluation
from vitrine.data.layout import load_split, prepared_manifest_path
from vitrine.evaluation.candidates import rank_candidates
from vitrine.evaluation.metrics import Taxonomy, value_model
from vitrine.evaluation.report import MAX_MATRIX_CLASSES, confusion_section
from vitrine.evaluation.settings import (
    EvaluateConfig,
    candidate_names,
    check_config,
    load_config,
    reviewed_source,
)
from vitrine.evaluation.thresholds import build_rule
from vitrine.model.export import checkpoint_digest
from vitrine.model.networks import build_predictor
from vitrine.runtime.onnx import onnx_proba, predict_logits, softmax

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "prepared")


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_checkpoint(constant_classifier(0), root / "always_laptop")
    write_checkpoint(constant_classifier(1), root / "always_phone")
    write_checkpoint(brightness_classifier(), root / "bright")
    return root


def test_repository_params_load_and_check() -> None:
    params = load_params(REPO / "params.yaml")
    assert reviewed_source(params) == "catalog:reviewed/catalog.csv"
    assert {"kind": "catalog", "path": "reviewed/catalog.csv"} in params["collect"]["sources"]
    cfg = load_config(params)
    values = check_config(cfg)
    assert values.classes == tuple(params["classes"])
    assert set(candidate_names(params)) == set(params["candidates"])


def test_business_value_csv_replaces_the_params_values(tmp_path: Path) -> None:
    path = tmp_path / "values.csv"
    path.write_text("class,value\nphone,4\nlaptop,0.5\n")
    values = check_config(config(business_value_csv=str(path)))
    assert values.value.tolist() == [0.5, 4.0]  # in class order, not file order


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,value\nlaptop,1\nphone,2\n", "expected the columns class,value"),
        ("class,value\nlaptop,1\nphone,2\nphone,3\n", r"more than once: \['phone'\]"),
        ("class,value\nlaptop,1\nphone,lots\n", r"no numeric value for \['phone'\]"),
        ("class,value\nlaptop,1\n", r"missing \['phone'\]"),
    ],
)
def test_bad_business_value_csv_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "values.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        check_config(config(business_value_csv=str(path)))


def test_missing_business_value_csv_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a file"):
        check_config(config(business_value_csv=str(tmp_path / "nope.csv")))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cost_matrix": (("phone", "tablet", 1.0),)}, "names unknown class 'tablet'"),
        ({"business_value": {"laptop": 1.0}}, r"missing \['phone'\]"),
        ({"taxonomy": Taxonomy("/", (1.0, 0.5))}, "has 2 weight"),
        ({"primary_metric": "profit"}, "primary_metric 'profit' is not a score"),
        ({"primary_metric": "top5_accuracy"}, "is not a score"),  # 2 classes: top2_accuracy
        ({"decision": "mode"}, "evaluate.decision 'mode' is not one of"),
        # A negative or missing cost, or a pair priced twice, makes the value model say what
        # no one meant.
        ({"cost_matrix": (("phone", "laptop", -2.0),)}, r"\[phone, laptop\]: a finite cost"),
        ({"cost_matrix": (("phone", "laptop", float("inf")),)}, r"\[phone, laptop\]: a finite"),
        (
            {"cost_matrix": (("phone", "laptop", 1.0), ("phone", "laptop", 3.0))},
            r"each \[actual, predicted\] pair once",
        ),
    ],
)
def test_bad_params_are_clear_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):  # a stage prints it as one line
        check_config(config(**overrides))


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [
        ("calibration_bins", 0, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("int8_calibration_photos", 0, ">= 1"),
        ("int8_max_loss", -0.1, ">= 0"),
        # A negative margin would promote a worse challenger "by the margin".
        ("promote_margin", -0.5, ">= 0"),
        ("default_mistake_cost", -1.0, ">= 0"),
    ],
)
def test_settings_out_of_range_are_refused_at_load_with_their_key(
    key: str, value: float, bound: str
) -> None:
    params = load_params(REPO / "params.yaml")
    params["evaluate"][key] = value
    with pytest.raises(ConfigError, match=f"evaluate.{key}: expected a value {bound}"):
        load_config(params)


def test_a_cost_that_is_not_a_number_is_refused_at_load() -> None:
    params = load_params(REPO / "params.yaml")
    params["evaluate"]["review_cost"] = float("nan")
    with pytest.raises(
        ConfigError, match=r"evaluate\.review_cost: expected a finite number, got nan"
    ):
        load_config(params)


def test_bad_params_fail_before_any_model_is_read(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a score"):
        evaluate(config(primary_metric="f2"), ("absent",), prepared, tmp_path / "no-models")


def test_a_missing_checkpoint_names_its_train_stage(prepared: Path, models: Path) -> None:
    with pytest.raises(ValueError, match=r"run `dvc repro train@absent`"):
        evaluate(config(), ("bright", "absent"), prepared, models)


def test_predictions_are_batched_in_input_order_and_softmax_to_a_distribution() -> None:
    torch.manual_seed(0)
    predictor = build_predictor("cnn64", 2)
    images = np.random.default_rng(1).integers(0, 256, (5, 40, 40, 3)).astype(np.uint8)
    logits = predict_logits(predictor, images, batch_size=2, desc="t")
    proba = softmax(logits)
    assert proba.shape == (5, 2) and np.allclose(proba.sum(axis=1), 1, atol=1e-6)
    assert (proba.argmax(axis=1) == logits.argmax(axis=1)).all()
    single = predict_logits(predictor, images[3:4], batch_size=1, desc="t")
    assert np.allclose(single[0], logits[3], atol=1e-5)


def test_ranking_breaks_ties_by_accuracy_then_name() -> None:
    table = {
        "b": {"bwa": 0.5, "accuracy": 0.7},
        "a": {"bwa": 0.5, "accuracy": 0.7},
        "c": {"bwa": 0.5, "accuracy": 0.9},
        "d": {"bwa": 0.6, "accuracy": 0.1},
    }
    assert rank_candidates(table, "bwa") == ["d", "c", "a", "b"]


@pytest.mark.parametrize(
    ("laptop", "phone", "winner"), [(3.0, 1.0, "always_laptop"), (1.0, 3.0, "always_phone")]
)
def test_the_winner_follows_the_business_values(
    prepared: Path, models: Path, laptop: float, phone: float, winner: str
) -> None:
    """Both are right on half the val photos (4 laptops, 4 phones): the values decide."""
    cfg = config(business_value={"laptop": laptop, "phone": phone}, cost_matrix=())
    result = evaluate(cfg, ("always_laptop", "always_phone"), prepared, models)
    assert as_dict(result.report)["winner"] == winner
    table = result.candidates
    assert table["always_laptop"]["accuracy"] == table["always_phone"]["accuracy"] == 0.5
    expected = {
        "always_laptop": laptop / (laptop + phone),
        "always_phone": phone / (laptop + phone),
    }
    for name, bwa in expected.items():
        assert table[name]["business_weighted_accuracy"] == pytest.approx(bwa)


def test_the_primary_metric_picks_the_winner(prepared: Path, models: Path) -> None:
    # On val, always_laptop and always_phone are equally accurate; the values favour phones,
    # while a laptop-heavy value of the mistakes (expected value) favours always_laptop.
    cfg = config(
        business_value={"laptop": 1.0, "phone": 1.2},
        cost_matrix=(("laptop", "phone", 5.0),),
        primary_metric="expected_value_per_1000",
    )
    result = evaluate(cfg, ("always_laptop", "always_phone"), prepared, models)
    assert as_dict(result.report)["winner"] == "always_laptop"
    assert as_dict(result.report)["ranking"] == ["always_laptop", "always_phone"]
    bwa = config(
        primary_metric="business_weighted_accuracy",
        **{k: getattr(cfg, k) for k in ("business_value", "cost_matrix")},
    )
    assert (
        evaluate(bwa, ("always_laptop", "always_phone"), prepared, models).report.winner
        == "always_phone"
    )


def test_only_the_winner_is_tested(prepared: Path, models: Path) -> None:
    result = evaluate(config(), ("always_laptop", "bright", "always_phone"), prepared, models)
    report = as_dict(result.report)
    assert report["winner"] == "bright" and report["ranking"][0] == "bright"
    assert report["val"]["accuracy"] == 1.0 and report["test"]["accuracy"] == 1.0
    assert report["test"]["n"] == 8 and report["test"]["per_class"]["phone"]["support"] == 2
    # always_laptop on the 6 + 2 test photos would score 6/8; the report has the winner's.
    assert report["test"]["expected_value_per_1000"] == pytest.approx(1000 * (6 + 2 * 1.5) / 8)


def test_test_scores_of_the_winner_by_hand(prepared: Path, models: Path) -> None:
    """always_laptop alone: test has 6 laptops (right) and 2 phones (wrong, cost 1 each)."""
    result = evaluate(config(), ("always_laptop",), prepared, models)
    test = as_dict(result.report)["test"]
    assert test["accuracy"] == 0.75
    assert test["business_weighted_accuracy"] == pytest.approx(6 / (6 + 2 * 1.5))
    assert test["expected_value_per_1000"] == pytest.approx(1000 * (6 - 2 * 1.0) / 8)
    assert test["top2_accuracy"] == 1.0
    assert test["per_class"]["phone"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # Every confidence is softmax(2, 0) = 0.881: one calibration bin, 75% right.
    confidence = float(torch.softmax(torch.tensor([2.0, 0.0]), 0)[0])
    assert as_dict(result.report)["calibration"]["test_ece"] == pytest.approx(
        abs(0.75 - confidence)
    )
    assert result.reliability == [
        {"bin": 8, "confidence": pytest.approx(confidence), "accuracy": 0.75, "count": 8}
    ]
    # On val (4 + 4) trusting earns 4 - 4 = 0, reviewing everything 4 * 0.7 + 4 * 1.2 = 7.6.
    abstain = as_dict(result.report)["abstain"]
    assert abstain["threshold"] > 1.0 and abstain["val_abstain_rate"] == 1.0
    assert abstain["val_expected_value_per_1000"] == pytest.approx(1000 * 7.6 / 8)
    assert abstain["test_expected_value_per_1000"] == pytest.approx(1000 * (6 * 0.7 + 2 * 1.2) / 8)
    assert abstain["test_accuracy_when_decided"] is None


def test_the_report_holds_each_class_threshold_and_the_answers_per_level(
    prepared: Path, models: Path
) -> None:
    """always_laptop, each class its own threshold from 4 val answers on: laptop, answered for
    all 8 val photos (4 right: +4; 4 phones wrong: -4), is better reviewed (7.6); phone is
    never answered, so it takes the shared threshold. Flat classes: every answer at level 1."""
    result = evaluate(config(min_val_photos_per_class=4), ("always_laptop",), prepared, models)
    decisions = as_dict(result.report)["decisions"]
    laptop, phone = (decisions["class_thresholds"][c] for c in CLASSES)
    assert laptop["fitted"] and laptop["val_photos"] == 8 and laptop["threshold"] > 1.0
    assert not phone["fitted"] and phone["val_photos"] == 0
    assert phone["threshold"] == decisions["shared_threshold"]
    assert decisions["backoff_levels"] == [] and decisions["served"] == "class_thresholds_backoff"
    assert decisions["test_levels"] == [{"level": 1, "answers": 0, "accuracy": None}]
    for name in ("one_threshold", "class_thresholds", "class_thresholds_backoff"):
        rule = decisions["rules"][name]
        assert rule["val"]["expected_value_per_1000"] == pytest.approx(1000 * 7.6 / 8)
    bright = as_dict(
        evaluate(config(min_val_photos_per_class=4), ("bright",), prepared, models).report
    )
    assert bright["decisions"]["test_levels"] == [{"level": 1, "answers": 8, "accuracy": 1.0}]
    assert [c["threshold"] for c in bright["decisions"]["class_thresholds"].values()] == [0, 0]
    assert list(result.predictions["level"]) == [1] * 8


def test_reviewed_production_photos_get_their_own_test_figure(
    prepared: Path, models: Path, tmp_path: Path
) -> None:
    """always_laptop; the reviewed test photos: test-5 (a laptop, right), test-6 and test-7
    (phones, worth 1.5 each, wrong)."""
    source = "catalog:reviewed/catalog.csv"
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    manifest.loc[manifest["id"].isin(["test-5", "test-6", "test-7", "val-0"]), "source"] = source
    manifest.to_parquet(prepared_manifest_path(prepared))

    result = evaluate(config(), ("always_laptop",), prepared, models, reviewed=source)
    elsewhere = evaluate(config(), ("always_laptop",), prepared, models, reviewed="catalog:x.csv")

    assert as_dict(result.report)["reviewed"] == {
        "source": source,
        "n": 3,
        "accuracy": pytest.approx(1 / 3),
        "business_weighted_accuracy": pytest.approx(1 / (1 + 2 * 1.5)),
    }
    assert as_dict(elsewhere.report)["reviewed"] == {
        "source": "catalog:x.csv",
        "n": 0,
        "accuracy": None,
        "business_weighted_accuracy": None,
    }
    # A report written before the figure existed still loads, with no reviewed photos.
    old = as_dict(result.report)
    del old["reviewed"]
    (tmp_path / "evaluate.json").write_text(json.dumps(old))
    assert read_evaluation(tmp_path / "evaluate.json").reviewed.n == 0


def test_predictions_table_lines_up_with_the_test_photos(prepared: Path, models: Path) -> None:
    table = evaluate(config(), ("always_laptop",), prepared, models).predictions
    assert list(table["id"]) == [f"test-{i}" for i in range(8)]
    assert list(table["label"]) == ["laptop"] * 6 + ["phone"] * 2
    assert set(table["predicted"]) == {"laptop"}
    assert list(table["gain"]) == [1.0] * 6 + [-1.0] * 2
    assert np.allclose(table[["p_laptop", "p_phone"]].sum(axis=1), 1, atol=1e-6)


def test_predictions_table_answers_by_expected_value(prepared: Path) -> None:
    """p(phone) 0.4 everywhere: the likeliest class is laptop, but a phone is worth 1.5 and
    missing one costs 1.0 against 0.5, so the expected-value answer is phone, at confidence 0.4."""
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    proba = np.tile([0.6, 0.4], (8, 1))
    values = check_config(config(decision="expected_value"))
    table = predictions_table(manifest, proba, values, build_rule(values, [0.5, 0.5]))
    assert set(table["predicted"]) == {"phone"}
    assert list(table["confidence"]) == [0.4] * 8 and table["abstained"].all()
    assert list(table["gain"]) == [-0.5] * 6 + [1.5] * 2
    # Abstained: each earns a review's v(a) - 0.3; flat classes answer at level 1.
    assert list(table["earned"]) == pytest.approx([0.7] * 6 + [1.2] * 2)
    assert set(table["level"]) == {1} and list(table["answer"]) == ["phone"] * 8
    plain = check_config(config())
    likeliest = predictions_table(manifest, proba, plain, build_rule(plain, [0.5, 0.5]))
    assert set(likeliest["predicted"]) == {"laptop"} and not likeliest["abstained"].any()
    # A class threshold of its own: laptop answered from 0.7, so its 0.6 goes to review.
    strict = predictions_table(manifest, proba, plain, build_rule(plain, [0.7, 0.5]))
    assert strict["abstained"].all()


def test_unknown_labels_in_the_prepared_split_are_a_clear_error(prepared: Path, models: Path):
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    manifest.loc[manifest["split"] == "test", "label"] = "tablet"
    manifest.to_parquet(prepared_manifest_path(prepared))
    with pytest.raises(ValueError, match=r"test photos labelled \['tablet'\]"):
        evaluate(config(), ("bright",), prepared, models)


class PageParser(HTMLParser):
    """Headings, table rows (cell texts), images and svg elements of the report page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.svg: list[str] = []
        self.cards: list[str] = []
        self._text: list[str] | None = None
        self._card_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag in ("h2", "td", "th"):
            self._text = []
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag in ("svg", "circle", "path", "line"):
            self.svg.append(tag)
        if tag == "div" and "card" in (attrs.get("class") or "").split():
            self._card_depth = 1
            self.cards.append("")
        elif tag == "div" and self._card_depth:
            self._card_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self.headings.append("".join(self._text or []))
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._text or []))
        if tag in ("h2", "td", "th"):
            self._text = None
        if tag == "div" and self._card_depth:
            self._card_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)
        if self._card_depth:
            self.cards[-1] += data + " "


def stage_paths(tmp_path: Path):
    params = load_params(REPO / "params.yaml")
    rooted = {k: str(tmp_path / v) for k, v in params["paths"].items()}
    return load_paths({"paths": rooted})


def test_stage_writes_every_report(prepared: Path, models: Path, tmp_path: Path) -> None:
    cfg = config(mistakes_shown=1)
    names = ("always_laptop", "always_phone", "bright")
    result = evaluate(cfg, names, prepared, models)
    paths = stage_paths(tmp_path / "out")
    write_outputs(result, paths, cfg.mistakes_shown)

    report = json.loads(paths.evaluate_report.read_text())
    assert report["winner"] == "bright" and report["primary_metric"] == cfg.primary_metric
    assert {"val", "test", "calibration", "abstain", "ranking"} <= set(report)
    candidates = json.loads(paths.candidates_report.read_text())
    assert set(candidates) == set(names)
    assert "per_class" not in candidates["bright"] and candidates["bright"]["accuracy"] == 1.0
    markdown = paths.candidates_table.read_text().splitlines()
    assert markdown[0].startswith("| rank | candidate | business_weighted_accuracy |")
    assert markdown[2].startswith("| 1 | bright | 1.0000 |")
    predictions = pd.read_parquet(paths.predictions)
    assert {"id", "source", "label", "predicted", "confidence", "gain", "p_phone"} <= set(
        predictions.columns
    )
    confusion = pd.read_csv(paths.confusion)
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 8
    reliability = pd.read_csv(paths.reliability)
    assert list(reliability.columns) == ["bin", "confidence", "accuracy", "count"]
    assert reliability["count"].sum() == 8


def test_html_report_shows_candidates_confusion_reliability_and_mistakes(
    prepared: Path, models: Path, tmp_path: Path
) -> None:
    # phone is worth more than laptop: the matrix lists phone first.
    cfg = config(mistakes_shown=1)
    result = evaluate(cfg, ("always_laptop", "always_phone"), prepared, models)
    paths = stage_paths(tmp_path / "out")
    write_outputs(result, paths, cfg.mistakes_shown)
    page = PageParser()
    page.feed(paths.evaluation_html.read_text())

    assert page.headings[0].startswith("Candidates")
    candidates = page.tables[0]
    assert candidates[0][:3] == ["rank", "candidate", "business_weighted_accuracy"]
    assert [row[1] for row in candidates[1:]] == ["always_phone", "always_laptop"]
    assert candidates[1][2] == "0.6000"  # 4 phones x 1.5 of 4 x 1 + 4 x 1.5

    matrix_at = next(i for i, h in enumerate(page.headings) if h.startswith("Confusion matrix"))
    assert "by business value" in page.headings[matrix_at]
    matrix = next(t for t in page.tables if t[0] == ["", "phone", "laptop"])
    # always_phone on test: all 6 laptops and 2 phones predicted phone
    assert matrix[1:] == [["phone", "2", ""], ["laptop", "6", ""]]

    assert any(h.startswith("Calibration") for h in page.headings)
    assert {"svg", "circle", "line"} <= set(page.svg)

    mistakes = next(h for h in page.headings if h.startswith("Costliest mistakes"))
    assert "1 of 6 wrong test predictions" in mistakes
    assert len(page.cards) == 1 and len(page.images) == 3  # the photo and its two heat maps
    assert page.images[0].startswith("data:image/jpeg;base64,")
    assert all(src.startswith("data:image/png;base64,") for src in page.images[1:])
    card = " ".join(page.cards[0].split())
    assert "true laptop" in card and "predicted phone" in card and "cost 0.50" in card
    assert "test-0" in card
    # On val always_phone earns 4 x 1.5 - 4 x 0.5 = 4 trusted, 4 x 0.7 + 4 x 1.2 = 7.6 reviewed.
    assert "(sent to review)" in card
    assert "every photo goes to review" in paths.evaluation_html.read_text()
    assert "answered with its most probable class" in paths.evaluation_html.read_text()
    assert "Scored as the service runs it: model.onnx in fp32." in paths.evaluation_html.read_text()


def test_confusion_matrix_keeps_the_most_valuable_classes() -> None:
    classes = tuple(f"c{i:02d}" for i in range(60))
    values = value_model(classes, {c: float(i) for i, c in enumerate(classes)}, [], 1.0, 0.0)
    predictions = pd.DataFrame({"label": ["c59", "c00"], "predicted": ["c58", "c00"]})
    html = confusion_section(predictions, values)
    assert f"the {MAX_MATRIX_CLASSES} most valuable of 60" in html
    assert html.index(">c59<") < html.index(">c58<") and ">c09<" not in html


def test_config_fields_are_the_params_block() -> None:
    params = load_params(REPO / "params.yaml")
    fields = {f.name for f in dataclasses.fields(EvaluateConfig)}
    assert fields == set(params["evaluate"]) | {"classes", "other_class"}  # top-level keys


def op_types(model: bytes) -> set[str]:
    return {node.op_type for node in onnx.load_from_string(model).graph.node}


def test_int8_candidates_are_scored_as_the_quantized_model_they_ship(
    prepared: Path, models: Path, tmp_path: Path
) -> None:
    cfg = config(int8=("bright",), int8_calibration_photos=8, mistakes_shown=1)
    result = evaluate(cfg, ("always_laptop", "bright"), prepared, models)
    # evaluate.calibration none: the network's own softmax
    fitted = {name: r["calibration"] for name, r in as_dict(result.report)["served"].items()}
    assert {f["method"] for f in fitted.values()} == {"none"}
    assert all(f["val_log_loss"] == f["val_log_loss_uncalibrated"] for f in fitted.values())
    served = {
        name: {k: v for k, v in r.items() if k != "calibration"}
        for name, r in as_dict(result.report)["served"].items()
    }
    digest = checkpoint_digest(models / "always_laptop" / "best.ckpt")
    assert served["always_laptop"] == {
        "precision": "fp32",
        "checkpoint_sha256": digest,
        "int8": None,
    }
    assert served["bright"] == {
        "checkpoint_sha256": checkpoint_digest(models / "bright" / "best.ckpt"),
        "precision": "int8",
        "int8": {
            "metric": "business_weighted_accuracy",
            "val_fp32": 1.0,
            "val_int8": 1.0,
            "val_answers_changed": 0,
            "float_strides": [],
            "calibration_photos": 8,
        },
    }
    paths = stage_paths(tmp_path / "out")
    (paths.served / "retired").mkdir(parents=True)  # a candidate of earlier params
    write_outputs(result, paths, cfg.mistakes_shown)
    assert sorted(p.name for p in paths.served.iterdir()) == ["always_laptop", "bright"]
    folder = paths.served / "bright"
    assert (
        json.loads((folder / "served.json").read_text())
        == as_dict(result.report)["served"]["bright"]
    )
    page = paths.evaluation_html.read_text()
    assert "Scored as the service runs it: model.onnx in int8 (validation" in page
    assert "int8 changed 0 answers" in page
    assert "QuantizeLinear" in op_types((folder / "model.onnx").read_bytes())
    # The convolution that reads the pixels keeps float weights: no DequantizeLinear feeds it.
    assert quantized_weights((folder / "model.onnx").read_bytes())[0] is False
    # The val probabilities evaluate ranked on are the written file's, bit for bit.
    x_val, _ = load_split(prepared, "val", list(CLASSES))
    again = onnx_proba((folder / "model.onnx").read_bytes(), 64, x_val, 3, "t")
    assert np.array_equal(again, result.served["bright"].val_proba)


def test_calibration_is_fitted_on_val_and_served_in_the_model(
    prepared: Path, models: Path, tmp_path: Path
) -> None:
    """always_laptop says laptop at 0.88 for every photo; half the val photos are phones.
    temperature_bias learns that its answer carries no information: 0.5 for both classes."""
    cfg = config(calibration="temperature_bias")
    result = evaluate(cfg, ("always_laptop",), prepared, models)
    fitted = as_dict(result.report)["served"]["always_laptop"]["calibration"]
    assert fitted["method"] == "temperature_bias"
    p = 1 / (1 + np.exp(-2.0))  # softmax of the 2-logit gap
    assert fitted["val_log_loss_uncalibrated"] == pytest.approx(-np.log(p * (1 - p)) / 2)
    assert fitted["val_log_loss"] == pytest.approx(np.log(2), abs=1e-3)
    assert set(fitted["bias"]) == set(CLASSES) and fitted["temperature"] > 0
    served = result.served["always_laptop"]
    assert np.allclose(served.val_proba, 0.5, atol=1e-3)
    assert {"Div", "Add"} <= op_types(served.onnx)
    x_val, _ = load_split(prepared, "val", list(CLASSES))
    assert np.array_equal(onnx_proba(served.onnx, 64, x_val, 3, "t"), served.val_proba)
    # The test scores and the abstain threshold read the calibrated probabilities too.
    assert result.predictions["p_laptop"].to_numpy() == pytest.approx(0.5, abs=1e-3)
    paths = stage_paths(tmp_path / "out")
    write_outputs(result, paths, cfg.mistakes_shown)
    page = paths.evaluation_html.read_text()
    assert "calibrated on val (<code>temperature_bias</code>" in page


def test_int8_that_loses_on_val_is_not_served(prepared: Path, models: Path) -> None:
    """Calibrated on one dark laptop photo, int8 clips every bright photo's activations, so
    the quantized model answers laptop for the phones too: the float model is served."""
    cfg = config(int8=("bright",), int8_calibration_photos=1)
    result = evaluate(cfg, ("bright",), prepared, models)
    record = as_dict(result.report)["served"]["bright"]
    assert record["precision"] == "fp32"
    assert record["int8"]["metric"] == "business_weighted_accuracy"
    assert record["int8"]["val_int8"] < 1.0 - cfg.int8_max_loss
    assert record["int8"]["val_fp32"] == 1.0
    assert result.candidates["bright"]["business_weighted_accuracy"] == 1.0
    assert "QuantizeLinear" not in op_types(result.served["bright"].onnx)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"int8": ("absent",)}, r"evaluate.int8 names unknown candidate\(s\) \['absent'\]"),
    ],
)
def test_bad_int8_params_are_clear_errors(
    prepared: Path, models: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(config(**overrides), ("bright",), prepared, models)
