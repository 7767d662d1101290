"""evaluate: score every candidate on the validation photos, pick the winner, test it.

The winner is the candidate with the best `evaluate.primary_metric` on val (business-weighted
accuracy by default); only the winner is scored on the test photos, so the test set never
influences a choice. On the winner's val predictions evaluate also fits the abstain threshold:
the confidence below which sending a photo to human review (at `review_cost`) earns more than
trusting the model. The service reads that threshold from the packaged model.

Writes <paths.evaluate_report> (winner, its test scores, calibration, abstain), the candidates
table (<paths.candidates_report> + .md), the winner's test predictions, the confusion and
reliability plots' data, and <paths.evaluation_html>.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from stages.train import CHECKPOINT
from vitrine import metrics
from vitrine.config import load_params, load_paths, stage_config
from vitrine.data import load_split, prepared_manifest_path
from vitrine.evaluation_report import render_report
from vitrine.models import ImageClassifier, Predictor


@dataclass(frozen=True)
class TaxonomyConfig:
    separator: str  # between levels of a class path, e.g. Fruit/Apple/Granny-Smith
    level_weights: tuple[float, ...]  # one per level, coarsest first; flat classes: [1.0]


@dataclass(frozen=True)
class EvaluateConfig:
    classes: tuple[str, ...]
    candidates: tuple[str, ...]  # the `candidates` block's names (set by load_config)
    batch_size: int
    primary_metric: str  # a key of metrics.scores(), larger is better
    business_value: dict[str, float]  # per class; ignored when business_value_csv is set
    business_value_csv: str  # "" or a CSV with columns class,value (thousands of classes)
    cost_matrix: tuple[tuple[str, str, float], ...]  # [actual, predicted, cost] exceptions
    default_mistake_cost: float  # what any other wrong prediction costs
    review_cost: float  # what one human review of an abstained photo costs
    top_k: int
    calibration_bins: int
    promote_margin: float  # package: how much better than the champion a challenger must be
    taxonomy: TaxonomyConfig
    mistakes_shown: int  # gallery of the costliest test mistakes in the HTML report


def load_config(params: dict[str, Any]) -> EvaluateConfig:
    block = dict(params["evaluate"], candidates=list(params.get("candidates") or {}))
    return stage_config(EvaluateConfig, "evaluate", {**params, "evaluate": block})


def business_values(config: EvaluateConfig) -> dict[str, float]:
    if not config.business_value_csv:
        return config.business_value
    table = pd.read_csv(config.business_value_csv)
    if list(table.columns[:2]) != ["class", "value"]:
        raise ValueError(f"{config.business_value_csv}: expected columns class,value")
    return dict(zip(table["class"].astype(str), table["value"].astype(float), strict=True))


def value_model(config: EvaluateConfig) -> metrics.ValueModel:
    return metrics.value_model(
        config.classes,
        business_values(config),
        list(config.cost_matrix),
        config.default_mistake_cost,
        config.review_cost,
    )


@torch.no_grad()
def predict_proba(predictor: Predictor, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for uint8 (N, H, W, 3) images: the computation the service runs."""
    predictor.eval()
    out = [
        torch.softmax(predictor(torch.from_numpy(np.array(images[i : i + batch_size]))), dim=1)
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def load_candidate(model_dir: Path, classes: tuple[str, ...]) -> Predictor:
    module = ImageClassifier.load_from_checkpoint(model_dir / CHECKPOINT, map_location="cpu")
    if tuple(module.hparams.classes) != classes:
        raise ValueError(f"{model_dir}: model classes {module.hparams.classes} != {classes}")
    return module.predictor


def rank_candidates(table: dict[str, dict[str, Any]], primary: str) -> list[str]:
    """Candidate names, best first: primary metric, then accuracy, then name (stable)."""
    return sorted(table, key=lambda n: (-table[n][primary], -table[n]["accuracy"], n))


def abstain_summary(
    y_val: np.ndarray,
    p_val: np.ndarray,
    y_test: np.ndarray,
    p_test: np.ndarray,
    values: metrics.ValueModel,
) -> dict[str, Any]:
    """The threshold fitted on val, and what it does on test."""
    threshold, val_ev = metrics.best_abstain_threshold(y_val, p_val, values)
    abstained = p_test.max(axis=1) < threshold
    y_pred = p_test.argmax(axis=1)
    decided = ~abstained
    return {
        "threshold": threshold,
        "review_cost": values.review_cost,
        "val_expected_value_per_1000": val_ev,
        "test_expected_value_per_1000": metrics.expected_value_per_1000(
            y_test, y_pred, values.gain(), abstained, values.value - values.review_cost
        ),
        "test_abstain_rate": float(abstained.mean()),
        "test_accuracy_when_decided": float((y_pred[decided] == y_test[decided]).mean())
        if decided.any()
        else None,
    }


@dataclass(frozen=True)
class Evaluation:
    report: dict[str, Any]  # evaluate.json
    candidates: dict[str, dict[str, Any]]  # val scores per candidate
    predictions: pd.DataFrame  # the winner's test predictions
    reliability: list[dict[str, float]]  # the winner's test reliability curve
    test_images: np.ndarray
    values: metrics.ValueModel


def evaluate(config: EvaluateConfig, prepared: Path, models: Path) -> Evaluation:
    values = value_model(config)
    classes = list(config.classes)
    x_val, y_val = load_split(prepared, "val", classes)
    val_proba, table = {}, {}
    for name in config.candidates:
        val_proba[name] = predict_proba(
            load_candidate(models / name, config.classes), x_val, config.batch_size
        )
        table[name] = metrics.scores(y_val, val_proba[name], values, config.top_k)
    if config.primary_metric not in next(iter(table.values())):
        raise ValueError(f"evaluate.primary_metric {config.primary_metric!r} is not a score")
    ranking = rank_candidates(table, config.primary_metric)
    winner = ranking[0]
    x_test, y_test = load_split(prepared, "test", classes)
    test_proba = predict_proba(
        load_candidate(models / winner, config.classes), x_test, config.batch_size
    )
    test = metrics.scores(y_test, test_proba, values, config.top_k)
    tax = config.taxonomy
    test["taxonomy"] = metrics.taxonomy_scores(
        y_test, test_proba.argmax(axis=1), config.classes, tax.separator, tax.level_weights
    )
    ece_val, _ = metrics.expected_calibration_error(
        y_val, val_proba[winner], config.calibration_bins
    )
    ece_test, curve = metrics.expected_calibration_error(
        y_test, test_proba, config.calibration_bins
    )
    report = {
        "winner": winner,
        "primary_metric": config.primary_metric,
        "ranking": ranking,
        "val": {k: v for k, v in table[winner].items() if k != "per_class"},
        "test": test,
        "calibration": {"val_ece": ece_val, "test_ece": ece_test, "bins": config.calibration_bins},
        "abstain": abstain_summary(y_val, val_proba[winner], y_test, test_proba, values),
    }
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    predictions = predictions_table(manifest, test_proba, config.classes, values)
    return Evaluation(report, table, predictions, curve, x_test, values)


def predictions_table(
    manifest: pd.DataFrame, proba: np.ndarray, classes: tuple[str, ...], values: metrics.ValueModel
) -> pd.DataFrame:
    """One row per test photo: truth, prediction, confidence, what the prediction earned, and
    every class probability (p_<class>)."""
    rows = manifest[manifest["split"] == "test"].sort_values("index").reset_index(drop=True)
    table = rows[["id", "source", "label", "index"]].copy()
    y_true = table["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    y_pred = proba.argmax(axis=1)
    table["predicted"] = [classes[i] for i in y_pred]
    table["confidence"] = proba.max(axis=1)
    table["gain"] = values.gain()[y_true, y_pred]
    for i, c in enumerate(classes):
        table[f"p_{c}"] = proba[:, i]
    return table


def candidates_markdown(table: dict[str, dict[str, Any]], ranking: list[str], primary: str) -> str:
    columns = [primary, "accuracy", "macro_f1", "expected_value_per_1000"]
    columns = list(dict.fromkeys(columns))
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
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["bin"])
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), load_config(params)
    result = evaluate(config, paths.prepared, paths.model)
    result.predictions.drop(columns=["index"]).to_parquet(paths.predictions, index=False)
    result.predictions.rename(columns={"label": "actual"})[["actual", "predicted"]].to_csv(
        paths.confusion, index=False
    )
    write_csv(result.reliability, paths.reliability)
    scalar = {
        n: {k: v for k, v in s.items() if k != "per_class"} for n, s in result.candidates.items()
    }
    paths.candidates_report.write_text(json.dumps(scalar, indent=2) + "\n")
    markdown = candidates_markdown(scalar, result.report["ranking"], config.primary_metric)
    paths.candidates_report.with_suffix(".md").write_text(markdown)
    paths.evaluate_report.write_text(json.dumps(result.report, indent=2) + "\n")
    page = render_report(
        result.report,
        scalar,
        result.predictions,
        result.reliability,
        result.test_images,
        result.values,
        config.mistakes_shown,
    )
    paths.evaluation_html.write_text(page)
    print(markdown)
    report = result.report
    print(f"evaluate: winner {report['winner']}, test accuracy {report['test']['accuracy']:.4f}")


if __name__ == "__main__":
    main()
