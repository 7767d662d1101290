"""evaluate: score every candidate on the validation photos, pick the winner, test it.

Every candidate is scored as the service would run it (vitrine.evaluation.candidates: its
checkpoint exported to ONNX, quantized when int8 holds up, its probabilities calibrated on val,
run by ONNX Runtime behind the shared resize); each served model.onnx is written to
<paths.served>/<candidate>/ with served.json (vitrine.contracts.ServedRecord), and package ships
the winner's file as it is.

The winner is the candidate with the best `evaluate.primary_metric` on val (business-weighted
accuracy by default; ties: accuracy, then name); only the winner is scored on the test photos,
so the test set never influences a choice. On the winner's val predictions evaluate also fits
the abstain threshold: the confidence below which sending a photo to human review (at
`review_cost`) earns more than trusting the model. The service reads that threshold from the
packaged model. The test photos that come from the moderators' reviewed catalog
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

from vitrine.config import Paths, load_params, load_paths
from vitrine.contracts import (
    CHECKPOINT,
    EvaluationReport,
    ReviewedScores,
    as_dict,
    write_evaluation,
    write_served,
)
from vitrine.data.splits import labelled_split, prepared_manifest_path
from vitrine.evaluation import metrics
from vitrine.evaluation.candidates import (
    ServedModel,
    abstain_summary,
    load_candidate,
    rank_candidates,
    served_model,
)
from vitrine.evaluation.heatmaps import mistake_heatmaps
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
from vitrine.runtime.decisions import chosen
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
    abstain = abstain_summary(y_val, val_proba[winner], y_test, test_proba, values)
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    predictions = predictions_table(manifest, test_proba, values, abstain["threshold"])
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
        slices=report_slices(predictions, values, deduped, config.slices),
    )
    candidates_table = {name: metrics.scalar_scores(s) for name, s in table.items()}
    shown = costliest(predictions, config.mistakes_shown)
    heatmaps = mistake_heatmaps(predictors[winner], x_test, shown, config.classes, THUMBNAIL_SIDE)
    return Evaluation(
        report, candidates_table, served, predictions, curve, x_test, values, heatmaps
    )


def predictions_table(
    manifest: pd.DataFrame, proba: np.ndarray, values: metrics.ValueModel, threshold: float
) -> pd.DataFrame:
    """One row per test photo: truth, prediction, confidence, what the prediction earned,
    whether the service would abstain, and every class probability (p_<class>)."""
    classes = values.classes
    rows = manifest[manifest["split"] == "test"].sort_values("index").reset_index(drop=True)
    table = rows[["id", "source", "label", "index"]].copy()
    y_true = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    y_pred = values.decide(proba)
    table["predicted"] = [classes[i] for i in y_pred]
    table["confidence"] = chosen(proba, y_pred)
    table["gain"] = values.gain()[y_true, y_pred]
    table["abstained"] = table["confidence"] < threshold
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
    reviewed = report.reviewed
    if reviewed.n:
        weighted = reviewed.business_weighted_accuracy
        print(
            f"evaluate: {reviewed.n} reviewed production photo(s) among the test photos: "
            f"accuracy {reviewed.accuracy:.4f}, business-weighted accuracy "
            + ("null" if weighted is None else f"{weighted:.4f}")
        )


if __name__ == "__main__":
    main()
