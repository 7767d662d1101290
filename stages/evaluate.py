"""evaluate: score every candidate on the validation photos, pick the winner, test it.

Every candidate is scored as the service would run it: its checkpoint exported to ONNX
(vitrine/model/export.py) and run by ONNX Runtime behind the shared resize. A candidate listed in
`evaluate.int8` is also quantized to int8 and served so when its val primary metric loses at
most `int8_max_loss` against the float model; each served model.onnx is written to
<paths.served>/<candidate>/ with served.json (its precision and both val scores), and package
ships the winner's file as it is.

The winner is the candidate with the best `evaluate.primary_metric` on val (business-weighted
accuracy by default; ties: accuracy, then name); only the winner is scored on the test photos,
so the test set never influences a choice. Each served model's probabilities are calibrated on
val first (`evaluate.calibration`, vitrine/evaluation/calibration.py), the fitted map baked into its
model.onnx. On the winner's val predictions evaluate also fits
the abstain threshold: the confidence below which sending a photo to human review (at
`review_cost`) earns more than trusting the model. The service reads that threshold from the
packaged model.

Writes <paths.evaluate_report> (winner, its val and test scores, calibration, abstain), the
candidates table (<paths.candidates_report>, as Markdown <paths.candidates_table>), the winner's
test predictions (<paths.predictions>), the confusion and reliability plots' data and
<paths.evaluation_html>.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from stages.train import CHECKPOINT
from vitrine.config import Paths, load_params, load_paths, stage_config
from vitrine.data.splits import load_split, prepared_manifest_path
from vitrine.evaluation import metrics
from vitrine.evaluation.calibration import Calibration, check_method, fit_calibration
from vitrine.evaluation.report import TABLE_COLUMNS, render_report
from vitrine.model.export import (
    FP32,
    INT8,
    calibrated_onnx,
    calibration_photos,
    checkpoint_digest,
    export_onnx,
    quantizable_strides,
    quantize_int8,
    write_served,
)
from vitrine.model.networks import ImageClassifier, Predictor
from vitrine.runtime.decisions import chosen
from vitrine.runtime.onnx import OnnxPredictor

CALIBRATION_SEED = 0  # which train photos calibrate int8: the same ones every run
SCORE_TOLERANCE = 1e-12  # score differences below this are float noise


@dataclass(frozen=True)
class EvaluateConfig:
    classes: tuple[str, ...]
    batch_size: int
    primary_metric: str  # one of metrics.score_names(): picks the winner on val
    business_value: dict[str, float]  # per class; ignored when business_value_csv is set
    business_value_csv: str  # "" or a CSV with columns class,value (thousands of classes)
    cost_matrix: tuple[tuple[str, str, float], ...]  # [actual, predicted, cost] exceptions
    default_mistake_cost: float  # what any other wrong prediction costs
    review_cost: float  # what one human review of an abstained photo costs
    decision: str  # argmax | expected_value: how probabilities become an answer
    calibration: str  # none | temperature | temperature_bias, fitted on val (calibration.py)
    top_k: int
    calibration_bins: int
    promote_margin: float  # package: how much better than the champion a challenger must be
    taxonomy: metrics.Taxonomy
    mistakes_shown: int  # gallery of the costliest test mistakes in the HTML report
    int8: tuple[str, ...]  # candidates served, and so scored, as int8 ONNX when int8 holds up
    int8_calibration_photos: int  # train photos that set the int8 activation ranges
    int8_max_loss: float  # how far below the float model's val primary metric int8 may score


def load_config(params: Mapping[str, Any]) -> EvaluateConfig:
    return stage_config(EvaluateConfig, "evaluate", params)


def candidate_names(params: Mapping[str, Any]) -> tuple[str, ...]:
    names = tuple(params.get("candidates") or {})
    if not names:
        raise ValueError("params.yaml `candidates` is empty: there is nothing to evaluate")
    return names


def read_business_values(path: Path) -> dict[str, float]:
    """A CSV with columns class,value: one row per class."""
    if not path.is_file():
        raise ValueError(f"evaluate.business_value_csv: {path} is not a file")
    table = pd.read_csv(path, dtype={"class": str})
    if list(table.columns) != ["class", "value"]:
        raise ValueError(f"{path}: expected the columns class,value, got {list(table.columns)}")
    repeated = sorted(set(table.loc[table["class"].duplicated(), "class"]))
    if repeated:
        raise ValueError(f"{path}: class(es) listed more than once: {repeated[:10]}")
    value = pd.to_numeric(table["value"], errors="coerce")
    if value.isna().any():
        raise ValueError(f"{path}: no numeric value for {list(table.loc[value.isna(), 'class'])}")
    return dict(zip(table["class"], value.astype(float), strict=True))


def business_values(config: EvaluateConfig) -> dict[str, float]:
    if config.business_value_csv:
        return read_business_values(Path(config.business_value_csv))
    return config.business_value


def check_config(config: EvaluateConfig) -> metrics.ValueModel:
    """Every params mistake as one clear error before any model is loaded; the value model."""
    values = metrics.value_model(
        config.classes,
        business_values(config),
        config.cost_matrix,
        config.default_mistake_cost,
        config.review_cost,
        config.decision,
    )
    metrics.check_taxonomy(config.classes, config.taxonomy)
    check_method(config.calibration)
    names = metrics.score_names(len(config.classes), config.top_k)
    if config.primary_metric not in names:
        raise ValueError(
            f"evaluate.primary_metric {config.primary_metric!r} is not a score; one of {names}"
        )
    for name in ("batch_size", "top_k", "calibration_bins", "int8_calibration_photos"):
        if getattr(config, name) < 1:
            raise ValueError(f"evaluate.{name} must be at least 1")
    if config.int8_max_loss < 0:
        raise ValueError(f"evaluate.int8_max_loss must be >= 0, got {config.int8_max_loss}")
    return values


def check_int8(config: EvaluateConfig, candidates: tuple[str, ...]) -> None:
    unknown = sorted(set(config.int8) - set(candidates))
    if unknown:
        raise ValueError(f"evaluate.int8 names unknown candidate(s) {unknown}")


def labelled_split(
    prepared: Path, split: str, classes: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """load_split, after checking the split has photos and only photos of known classes."""
    manifest = pd.read_parquet(prepared_manifest_path(prepared), columns=["split", "label"])
    labels = manifest.loc[manifest["split"] == split, "label"]
    if labels.empty:
        raise ValueError(f"{prepared}: the {split} split has no photos")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{prepared}: {split} photos labelled {unknown[:10]}, not in `classes`")
    return load_split(prepared, split, list(classes))


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int, desc: str) -> np.ndarray:
    """Logits for uint8 (N, H, W, 3) images.

    `model` maps uint8 NHWC to logits: an OnnxPredictor (onnx_proba: the computation the service
    runs), or a Predictor or TorchScript model.
    """
    model.eval()
    starts = range(0, len(images), batch_size)
    out = [
        model(torch.from_numpy(np.array(images[i : i + batch_size])))
        for i in tqdm(starts, desc=desc, unit="batch", leave=False)
    ]
    return torch.cat(out).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, as the service computes it (torch, float32)."""
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def load_candidate(model_dir: Path, classes: tuple[str, ...]) -> Predictor:
    checkpoint = model_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise ValueError(f"{checkpoint} is missing: run `dvc repro train@{model_dir.name}`")
    module = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    if tuple(module.hparams.classes) != classes:
        raise ValueError(f"{checkpoint}: model classes {module.hparams.classes} != {classes}")
    return module.predictor


@dataclass(frozen=True)
class ServedModel:
    """A candidate as the service would run it."""

    onnx: bytes  # model.onnx
    input_size: int
    val_proba: np.ndarray  # its val probabilities
    val_scores: dict[str, Any]  # metrics.scores of them: what the candidate is ranked on
    record: dict[str, Any]  # served.json: precision, and for int8 candidates both val scores


def onnx_logits(
    model: Path | bytes, input_size: int, images: np.ndarray, batch_size: int, desc: str
) -> np.ndarray:
    """Logits under ONNX Runtime (model.onnx, as a file or its bytes) behind the shared resize,
    on every core: the same bits as the service's single thread."""
    predictor = OnnxPredictor(model, input_size, threads=torch.get_num_threads())
    return predict_logits(predictor, images, batch_size, desc)


def onnx_proba(
    model: Path | bytes, input_size: int, images: np.ndarray, batch_size: int, desc: str
) -> np.ndarray:
    """onnx_logits, softmaxed: the probabilities the service answers from."""
    return softmax(onnx_logits(model, input_size, images, batch_size, desc))


def served_precision(
    name: str,
    predictor: Predictor,
    val: tuple[np.ndarray, np.ndarray],
    train_images: np.ndarray,
    config: EvaluateConfig,
    values: metrics.ValueModel,
) -> tuple[bytes, np.ndarray, dict[str, Any]]:
    """The candidate exported to ONNX, quantized when listed in evaluate.int8 and int8 loses
    at most int8_max_loss of the val primary metric, with one more stage in float if need be
    (else the float model is served; the record gives the last int8 model tried); its val
    logits, and served.json's record of the choice."""
    x_val, y_val = val
    size = predictor.input_size

    def scored(model: bytes, desc: str) -> tuple[np.ndarray, dict[str, Any]]:
        logits = onnx_logits(model, size, x_val, config.batch_size, desc)
        return logits, metrics.scores(y_val, softmax(logits), values, config.top_k, config.taxonomy)

    fp32 = export_onnx(predictor, x_val.shape[1])
    fp32_logits, fp32_scores = scored(fp32, f"val {name}")
    if name not in config.int8:
        return fp32, fp32_logits, {"precision": FP32}
    photos = calibration_photos(train_images, config.int8_calibration_photos, CALIBRATION_SEED)
    metric = config.primary_metric
    fp32_score = fp32_scores[metric]
    # Int8 as planned first; if it loses, each coarser stage in float in turn (a network's
    # most rounding-sensitive stage differs from one training run to the next).
    for float_strides in [(), *((s,) for s in quantizable_strides(fp32))]:
        int8 = quantize_int8(fp32, photos, size, float_strides)
        int8_logits, int8_scores = scored(int8, f"val {name} int8")
        holds = int8_scores[metric] >= fp32_score - config.int8_max_loss - SCORE_TOLERANCE
        if holds:
            break
    changed = values.decide(softmax(fp32_logits)) != values.decide(softmax(int8_logits))
    record = {
        "precision": INT8 if holds else FP32,
        f"val_{metric}_fp32": fp32_score,
        f"val_{metric}_int8": int8_scores[metric],
        "val_answers_changed_by_int8": int(changed.sum()),
        "int8_float_strides": list(float_strides),
        "calibration_photos": len(photos),
    }
    return (int8, int8_logits, record) if holds else (fp32, fp32_logits, record)


def calibrated(
    model: bytes, val_logits: np.ndarray, y_val: np.ndarray, config: EvaluateConfig
) -> tuple[bytes, Calibration | None]:
    """model with evaluate.calibration, fitted on its val logits, baked in."""
    calibration = fit_calibration(val_logits, y_val, config.calibration)
    if calibration is None:
        return model, None
    return calibrated_onnx(model, calibration), calibration


def served_model(
    name: str,
    predictor: Predictor,
    checkpoint: Path,
    val: tuple[np.ndarray, np.ndarray],
    train_images: np.ndarray,
    config: EvaluateConfig,
    values: metrics.ValueModel,
) -> ServedModel:
    """The candidate as the service would run it: served_precision's model, its probabilities
    calibrated on val, and scored on val so."""
    x_val, y_val = val
    size = predictor.input_size
    model, logits, record = served_precision(name, predictor, val, train_images, config, values)
    model, calibration = calibrated(model, logits, y_val, config)
    fitted: dict[str, Any] = {
        "method": config.calibration,
        "val_log_loss_uncalibrated": metrics.log_loss(y_val, softmax(logits)),
    }
    if calibration is not None:
        # Run the calibrated file rather than rescale the logits here: ONNX Runtime may fold
        # the division into the layer before it, and the scores must be the served bits.
        logits = onnx_logits(model, size, x_val, config.batch_size, f"val {name} calibrated")
        fitted["temperature"] = calibration.temperature
        fitted["bias"] = dict(zip(config.classes, calibration.bias, strict=True))
    proba = softmax(logits)
    fitted["val_log_loss"] = metrics.log_loss(y_val, proba)
    scores = metrics.scores(y_val, proba, values, config.top_k, config.taxonomy)
    record = {
        **record,
        "calibration": fitted,
        "checkpoint_sha256": checkpoint_digest(checkpoint),
    }
    return ServedModel(model, size, proba, scores, record)


def rank_candidates(table: Mapping[str, Mapping[str, Any]], primary: str) -> list[str]:
    """Candidate names, best first: primary metric, then accuracy, then name."""
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
    y_pred = values.decide(p_test)
    abstained = chosen(p_test, y_pred) < threshold
    decided = ~abstained
    return {
        "threshold": threshold,
        "review_cost": values.review_cost,
        "val_expected_value_per_1000": val_ev,
        "val_abstain_rate": float((chosen(p_val, values.decide(p_val)) < threshold).mean()),
        "test_expected_value_per_1000": metrics.expected_value_per_1000(
            y_test, y_pred, values.gain(), abstained, values.review_gain()
        ),
        "test_abstain_rate": float(abstained.mean()),
        "test_accuracy_when_decided": float((y_pred[decided] == y_test[decided]).mean())
        if decided.any()
        else None,
    }


@dataclass(frozen=True)
class Evaluation:
    report: dict[str, Any]  # evaluate.json
    candidates: dict[str, dict[str, Any]]  # scalar val scores per candidate
    served: dict[str, ServedModel]  # per candidate, what the service would run
    predictions: pd.DataFrame  # the winner's test predictions, with `index` into test_images
    reliability: list[dict[str, float]]  # the winner's test reliability curve
    test_images: np.ndarray
    values: metrics.ValueModel


def evaluate(
    config: EvaluateConfig, candidates: tuple[str, ...], prepared: Path, models: Path
) -> Evaluation:
    values = check_config(config)
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
    report = {
        "winner": winner,
        "primary_metric": config.primary_metric,
        "decision": config.decision,
        "ranking": ranking,
        "business_values": config.business_value_csv or "params",
        "val": metrics.scalar_scores(table[winner]),
        "test": test,
        "calibration": {"val_ece": val_ece, "test_ece": test_ece, "bins": bins},
        "abstain": abstain,
        "served": {name: model.record for name, model in served.items()},
    }
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    predictions = predictions_table(manifest, test_proba, values, abstain["threshold"])
    candidates_table = {name: metrics.scalar_scores(s) for name, s in table.items()}
    return Evaluation(report, candidates_table, served, predictions, curve, x_test, values)


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


def candidates_markdown(
    table: Mapping[str, Mapping[str, Any]], ranking: list[str], primary: str
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
    paths.evaluate_report.write_text(json.dumps(report, indent=2) + "\n")
    paths.candidates_report.write_text(json.dumps(result.candidates, indent=2) + "\n")
    markdown = candidates_markdown(result.candidates, report["ranking"], report["primary_metric"])
    paths.candidates_table.write_text(markdown)
    predictions.drop(columns=["index"]).to_parquet(paths.predictions, index=False)
    confusion = predictions.rename(columns={"label": "actual"})[["actual", "predicted"]]
    confusion.to_csv(paths.confusion, index=False)
    write_csv(result.reliability, paths.reliability)
    page = render_report(
        report,
        result.candidates,
        predictions,
        result.reliability,
        result.test_images,
        result.values,
        mistakes_shown,
    )
    paths.evaluation_html.write_text(page)


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), load_config(params)
    result = evaluate(config, candidate_names(params), paths.prepared, paths.model)
    write_outputs(result, paths, config.mistakes_shown)
    report = result.report
    print(candidates_markdown(result.candidates, report["ranking"], config.primary_metric))
    print(
        f"evaluate: winner {report['winner']}: test {config.primary_metric} "
        f"{report['test'][config.primary_metric]:.4f}, accuracy {report['test']['accuracy']:.4f}, "
        f"abstain below {report['abstain']['threshold']:.3f}"
    )


if __name__ == "__main__":
    main()
