"""evaluate: score every candidate on the validation photos, pick the winner, test it.

Every candidate is scored as the service would run it (vitrine.evaluation.candidates: its
checkpoint exported to ONNX, quantized when int8 holds up, its probabilities calibrated on val,
run by ONNX Runtime behind the shared resize); each served model.onnx is written to
<paths.served>/<candidate>/ with served.json (vitrine.contracts.ServedRecord), and package ships
the winner's file as it is.

The winner is the candidate with the best `evaluate.primary_metric` on val (business-weighted
accuracy by default; ties: accuracy, then name); only the winner is scored on the test photos,
so the test set never influences a choice. On the winner's val predictions evaluate also fits
the decision rule (vitrine.evaluation.thresholds): each class's confidence threshold, below
which the photo earns more with its taxonomy back-off answer or a human review (at
`review_cost`) than with the class, and reports one threshold, a threshold per class and a
threshold per class with back-off on val and test (evaluate.json `decisions`). The service
answers by the same rule, read from the packaged model. With an other class (params.yaml
other_class), the served rule's open-set figures on val and test (evaluate.json `open_set`,
vitrine.evaluation.openset): the off-category photos answered other or sent to review, and the
known photos called other. The test photos that come from the moderators' reviewed catalog
(params.yaml feedback.catalog, exported by pipeline/feedback.py) are scored on their own too:
how the winner does on production photos (evaluate.json `reviewed`). The winner's test answers
are also sliced by kind of photo (evaluate.json `slices`, vitrine.evaluation.slices: orientation,
size, source, catalog columns, from dedupe's manifest), and its costliest mistakes shown on the
page get Grad-CAM heat maps from its float network (vitrine.evaluation.heatmaps).

Writes <paths.evaluate_report> (vitrine.contracts.EvaluationReport), the candidates table
(<paths.candidates_report>, as Markdown <paths.candidates_table>), the winner's test predictions
(<paths.predictions>), the confusion and reliability plots' data and <paths.evaluation_html>.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vitrine.config import Paths, load_params, load_paths, run_cli
from vitrine.contracts import (
    CHECKPOINT,
    EvaluationReport,
    ReviewedScores,
    as_dict,
    write_evaluation,
    write_served,
)
from vitrine.data.layout import labelled_split, prepared_manifest_path
from vitrine.evaluation import metrics
from vitrine.evaluation.candidates import (
    ServedModel,
    abstain_summary,
    load_candidate,
    rank_candidates,
    served_model,
)
from vitrine.evaluation.heatmaps import mistake_heatmaps
from vitrine.evaluation.openset import RECALL, open_set_report
from vitrine.evaluation.report import TABLE_COLUMNS, THUMBNAIL_SIDE, costliest, render_report
from vitrine.evaluation.settings import (
    EvaluateConfig,
    candidate_names,
    check_config,
    check_int8,
    load_config,
    reviewed_source,
)
from vitrine.evaluation.slices import check_slices, report_slices
from vitrine.evaluation.thresholds import (
    CLASS_THRESHOLDS,
    ONE_THRESHOLD,
    WITH_BACKOFF,
    decision_report,
    earned,
    fit_rules,
)
from vitrine.runtime.decisions import Rule, answer, chosen
from vitrine.runtime.onnx import onnx_proba


@dataclass(frozen=True)
class Evaluation:
    report: EvaluationReport  # evaluate.json
    candidates: dict[str, dict[str, Any]]  # scalar val scores per candidate
    served: dict[str, ServedModel]  # per candidate, what the service would run
    predictions: pd.DataFrame  # the winner's test predictions, with `index` into test_images
    reliability: list[dict[str, float]]  # the winner's test reliability curve
    test_images: np.ndarray
    values: metrics.ValueModel
    heatmaps: dict[str, Any] = field(default_factory=dict)  # heatmaps.mistake_heatmaps


def evaluate(
    config: EvaluateConfig,
    candidates: tuple[str, ...],
    prepared: Path,
    models: Path,
    reviewed: str = "",
    deduped: Path | None = None,
) -> Evaluation:
    """reviewed: the manifest source of the moderators' reviewed production photos, whose test
    photos get their own figure (settings.reviewed_source); "" for none. deduped: dedupe's
    manifest, whose photos' sizes and catalog columns slice the test answers; None: no slices."""
    values = check_config(config)
    check_slices(config.slices)
    check_int8(config, candidates)
    val = labelled_split(prepared, "val", config.classes)
    y_val = val[1]
    x_test, y_test = labelled_split(prepared, "test", config.classes)
    x_train, _ = labelled_split(prepared, "train", config.classes)
    predictors = {name: load_candidate(models / name, config.classes) for name in candidates}
    served = {
        name: served_model(
            name, predictor, models / name / CHECKPOINT, val, x_train, config, values
        )
        for name, predictor in predictors.items()
    }
    val_proba = {name: model.val_proba for name, model in served.items()}
    table = {name: model.val_scores for name, model in served.items()}
    ranking = rank_candidates(table, config.primary_metric)
    winner = ranking[0]
    shipped = served[winner]
    test_proba = onnx_proba(
        shipped.onnx, shipped.input_size, x_test, config.batch_size, f"test {winner}"
    )
    test = metrics.scores(y_test, test_proba, values, config.top_k, config.taxonomy)
    bins = config.calibration_bins
    val_ece, _ = metrics.expected_calibration_error(y_val, val_proba[winner], bins)
    test_ece, curve = metrics.expected_calibration_error(y_test, test_proba, bins)
    on_val, on_test = (y_val, val_proba[winner]), (y_test, test_proba)
    fitted = fit_rules(*on_val, values, config.taxonomy, config.min_val_photos_per_class)
    abstain = abstain_summary(on_val, on_test, values, fitted)
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    predictions = predictions_table(manifest, test_proba, values, fitted.rule)
    open_set = open_set_report(
        config.other_class,
        fitted.rule,
        (y_val, answer(val_proba[winner], fitted.rule)),
        (y_test, answer(test_proba, fitted.rule)),
    )
    report = EvaluationReport(
        winner=winner,
        primary_metric=config.primary_metric,
        decision=config.decision,
        ranking=tuple(ranking),
        business_values=config.business_value_csv or "params",
        val=metrics.scalar_scores(table[winner]),
        test=test,
        calibration={"val_ece": val_ece, "test_ece": test_ece, "bins": bins},
        abstain=abstain,
        served={name: model.record for name, model in served.items()},
        reviewed=reviewed_scores(predictions, values, reviewed),
        decisions=decision_report(fitted, values, on_val, on_test),
        slices=report_slices(predictions, values, deduped, config.slices),
        open_set=open_set,
    )
    candidates_table = {name: metrics.scalar_scores(s) for name, s in table.items()}
    shown = costliest(predictions, config.mistakes_shown)
    heatmaps = mistake_heatmaps(predictors[winner], x_test, shown, config.classes, THUMBNAIL_SIDE)
    return Evaluation(
        report, candidates_table, served, predictions, curve, x_test, values, heatmaps
    )


def predictions_table(
    manifest: pd.DataFrame, proba: np.ndarray, values: metrics.ValueModel, rule: Rule
) -> pd.DataFrame:
    """One row per test photo: truth, predicted class, its confidence and what it earns, the
    service's answer under the served rule (`answer`: the class or taxonomy ancestor, its
    `level`, `abstained`, and what it `earned`: a review's gain when abstained), and every class
    probability (p_<class>)."""
    classes = values.classes
    rows = manifest[manifest["split"] == "test"].sort_values("index").reset_index(drop=True)
    table = rows[["id", "source", "label", "index"]].copy()
    y_true = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    given = answer(proba, rule)
    y_pred = given.decided
    table["predicted"] = [classes[i] for i in y_pred]
    table["confidence"] = chosen(proba, y_pred)
    table["gain"] = values.gain()[y_true, y_pred]
    table["abstained"] = given.abstain
    table["answer"] = list(given.labels)
    table["level"] = given.level
    table["earned"] = earned(given, y_true, values, rule)
    for i, c in enumerate(classes):
        table[f"p_{c}"] = proba[:, i]
    return table


def reviewed_scores(
    predictions: pd.DataFrame, values: metrics.ValueModel, source: str
) -> ReviewedScores:
    """The winner's answers on the test photos from `source` alone (its accuracy and
    business-weighted accuracy over them); null scores when there are none."""
    rows = predictions[predictions["source"] == source] if source else predictions.iloc[:0]
    if rows.empty:
        return ReviewedScores(source=source)
    index = {c: i for i, c in enumerate(values.classes)}
    y_true = rows["label"].map(index).to_numpy()
    y_pred = rows["predicted"].map(index).to_numpy()
    worth = float(values.value[y_true].sum())
    return ReviewedScores(
        source=source,
        n=len(rows),
        accuracy=float((y_true == y_pred).mean()),
        business_weighted_accuracy=(
            metrics.business_weighted_accuracy(y_true, y_pred, values.value) if worth else None
        ),
    )


def candidates_markdown(
    table: Mapping[str, Mapping[str, Any]], ranking: Sequence[str], primary: str
) -> str:
    columns = list(dict.fromkeys([primary, *TABLE_COLUMNS]))
    lines = [
        "| rank | candidate | " + " | ".join(columns) + " |",
        "|---:|---|" + "---:|" * len(columns),
    ]
    for rank, name in enumerate(ranking, 1):
        cells = " | ".join(f"{table[name][c]:.4f}" for c in columns)
        lines.append(f"| {rank} | {name} | {cells} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["bin", "confidence", "accuracy", "count"])
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(result: Evaluation, paths: Paths, mistakes_shown: int) -> None:
    shutil.rmtree(paths.served, ignore_errors=True)  # no candidate left over from earlier params
    for name, model in result.served.items():
        write_served(paths.served / name, model.onnx, model.record)
    for path in (
        paths.evaluate_report,
        paths.candidates_report,
        paths.predictions,
        paths.confusion,
        paths.reliability,
        paths.evaluation_html,
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
    report, predictions = result.report, result.predictions
    write_evaluation(report, paths.evaluate_report)
    paths.candidates_report.write_text(json.dumps(result.candidates, indent=2) + "\n")
    markdown = candidates_markdown(result.candidates, report.ranking, report.primary_metric)
    paths.candidates_table.write_text(markdown)
    predictions.drop(columns=["index"]).to_parquet(paths.predictions, index=False)
    confusion = predictions.rename(columns={"label": "actual"})[["actual", "predicted"]]
    confusion.to_csv(paths.confusion, index=False)
    write_csv(result.reliability, paths.reliability)
    page = render_report(
        as_dict(report),
        result.candidates,
        predictions,
        result.reliability,
        result.test_images,
        result.values,
        mistakes_shown,
        result.heatmaps,
    )
    paths.evaluation_html.write_text(page)


def decisions_summary(decisions: Mapping[str, Any]) -> str:
    """The decision rules' test value per 1,000 photos, and the served rule's answers per
    taxonomy level, as evaluate prints them."""
    rules = decisions["rules"]
    ev = {name: rules[name]["test"]["expected_value_per_1000"] for name in rules}
    own = sum(c["fitted"] for c in decisions["class_thresholds"].values())
    levels = ", ".join(
        f"level {lv['level']} {lv['answers']}"
        + ("" if lv["accuracy"] is None else f" ({100 * lv['accuracy']:.1f}% right)")
        for lv in decisions["test_levels"]
    )
    return (
        f"evaluate: test value per 1,000 photos: one threshold {ev[ONE_THRESHOLD]:.1f}, a "
        f"threshold per class ({own} of {len(decisions['class_thresholds'])} fitted) "
        f"{ev[CLASS_THRESHOLDS]:.1f}, with taxonomy back-off {ev[WITH_BACKOFF]:.1f} "
        f"({len(decisions['backoff_levels'])} ancestor level(s)); answers: {levels}"
    )


def open_set_summary(open_set: Mapping[str, Any]) -> str:
    """The open-set figures on test, as evaluate prints them."""
    test, other = open_set["test"], open_set["other_class"]
    recall = test[RECALL]
    return (
        f"evaluate: test open set: {test['answered_other']} of {test['off_category_photos']} "
        f"{other} photos answered {other}, {test['abstained']} sent to review (open-set recall "
        + ("n/a" if recall is None else f"{100 * recall:.1f}%")
        + f"); {test['known_called_other']} of {test['known_photos']} known photos called {other}"
    )


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), load_config(params)
    names = candidate_names(params)
    deduped = prepared_manifest_path(paths.deduped)  # dedupe's manifest.parquet
    result = evaluate(config, names, paths.prepared, paths.model, reviewed_source(params), deduped)
    write_outputs(result, paths, config.mistakes_shown)
    report = result.report
    print(candidates_markdown(result.candidates, report.ranking, config.primary_metric))
    print(
        f"evaluate: winner {report.winner}: test {config.primary_metric} "
        f"{report.test[config.primary_metric]:.4f}, accuracy {report.test['accuracy']:.4f}, "
        f"abstain below {report.abstain_threshold:.3f}"
    )
    print(decisions_summary(report.decisions))
    if report.open_set:
        print(open_set_summary(report.open_set))
    reviewed = report.reviewed
    if reviewed.n:
        weighted = reviewed.business_weighted_accuracy
        print(
            f"evaluate: {reviewed.n} reviewed production photo(s) among the test photos: "
            f"accuracy {reviewed.accuracy:.4f}, business-weighted accuracy "
            + ("null" if weighted is None else f"{weighted:.4f}")
        )


if __name__ == "__main__":
    run_cli(main)
