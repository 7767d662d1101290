"""Each candidate as the service would run it, scored on val: what evaluate ranks.

A candidate's checkpoint is exported to ONNX (vitrine.model.export); listed in `evaluate.int8`,
it is quantized and served so when its val primary metric loses at most `int8_max_loss` against
the float model. Its probabilities are then calibrated on val (`evaluate.calibration`,
vitrine.evaluation.calibration), the fitted map baked into model.onnx, and the val scores are
those of that very file under ONNX Runtime.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitrine.contracts import CHECKPOINT, FP32, INT8, Int8Trial, Precision, ServedRecord
from vitrine.evaluation import metrics, thresholds
from vitrine.evaluation.calibration import Calibration, fit_calibration
from vitrine.evaluation.settings import EvaluateConfig
from vitrine.model.export import (
    calibrated_onnx,
    calibration_photos,
    checkpoint_digest,
    export_onnx,
    quantizable_strides,
    quantize_int8,
)
from vitrine.model.networks import ImageClassifier, Predictor
from vitrine.runtime.onnx import onnx_logits, softmax

CALIBRATION_SEED = 0  # which train photos calibrate int8: the same ones every run
SCORE_TOLERANCE = 1e-12  # score differences below this are float noise


def load_candidate(model_dir: Path, classes: tuple[str, ...]) -> Predictor:
    checkpoint = model_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise ValueError(f"{checkpoint} is missing: run `dvc repro train@{model_dir.name}`")
    module = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    if tuple(module.hparams["classes"]) != classes:
        raise ValueError(f"{checkpoint}: model classes {module.hparams['classes']} != {classes}")
    return module.predictor


@dataclass(frozen=True)
class ServedModel:
    """A candidate as the service would run it."""

    onnx: bytes  # model.onnx
    input_size: int
    val_proba: np.ndarray  # its val probabilities
    val_scores: dict[str, Any]  # metrics.scores of them: what the candidate is ranked on
    record: ServedRecord  # served.json


def served_precision(
    name: str,
    predictor: Predictor,
    val: tuple[np.ndarray, np.ndarray],
    train_images: np.ndarray,
    config: EvaluateConfig,
    values: metrics.ValueModel,
) -> tuple[bytes, np.ndarray, Precision, Int8Trial | None]:
    """The candidate exported to ONNX, quantized when listed in evaluate.int8 and int8 loses
    at most int8_max_loss of the val primary metric, with one more stage in float if need be
    (else the float model is served; the trial records the last int8 model tried); its val
    logits, its precision and the int8 trial."""
    x_val, y_val = val
    size = predictor.input_size

    def scored(model: bytes, desc: str) -> tuple[np.ndarray, dict[str, Any]]:
        logits = onnx_logits(model, size, x_val, config.batch_size, desc)
        return logits, metrics.scores(y_val, softmax(logits), values, config.top_k, config.taxonomy)

    fp32 = export_onnx(predictor, x_val.shape[1])
    fp32_logits, fp32_scores = scored(fp32, f"val {name}")
    if name not in config.int8:
        return fp32, fp32_logits, FP32, None
    photos = calibration_photos(train_images, config.int8_calibration_photos, CALIBRATION_SEED)
    metric = config.primary_metric
    fp32_score = fp32_scores[metric]
    # Int8 as planned first; if it loses, each coarser stage in float in turn (a network's
    # most rounding-sensitive stage differs from one training run to the next), every try on
    # the ranges the first calibrated.
    with tempfile.TemporaryDirectory(prefix="vitrine-ranges-") as tmp:
        for float_strides in [(), *((s,) for s in quantizable_strides(fp32))]:
            int8 = quantize_int8(fp32, photos, size, float_strides, Path(tmp) / "ranges.json")
            int8_logits, int8_scores = scored(int8, f"val {name} int8")
            holds = int8_scores[metric] >= fp32_score - config.int8_max_loss - SCORE_TOLERANCE
            if holds:
                break
    changed = values.decide(softmax(fp32_logits)) != values.decide(softmax(int8_logits))
    trial = Int8Trial(
        metric=metric,
        val_fp32=fp32_score,
        val_int8=int8_scores[metric],
        val_answers_changed=int(changed.sum()),
        float_strides=tuple(float_strides),
        calibration_photos=len(photos),
    )
    return (int8, int8_logits, INT8, trial) if holds else (fp32, fp32_logits, FP32, trial)


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
    model, logits, precision, trial = served_precision(
        name, predictor, val, train_images, config, values
    )
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
    record = ServedRecord(precision, checkpoint_digest(checkpoint), fitted, trial)
    return ServedModel(model, size, proba, scores, record)


def rank_candidates(table: Mapping[str, Mapping[str, Any]], primary: str) -> list[str]:
    """Candidate names, best first: primary metric, then accuracy, then name."""
    return sorted(table, key=lambda n: (-table[n][primary], -table[n]["accuracy"], n))


def abstain_summary(
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    values: metrics.ValueModel,
    fitted: thresholds.FittedRules,
) -> dict[str, Any]:
    """The served rule's shared threshold, fitted on val (the threshold of every class with too
    few val photos for its own), and what the served rule (thresholds per class, taxonomy
    back-off) does on val and test: evaluate.json `abstain`."""
    on_val = thresholds.rule_scores(*val, values, fitted.rule)
    on_test = thresholds.rule_scores(*test, values, fitted.rule)
    return {
        "threshold": fitted.served.shared,
        "review_cost": values.review_cost,
        "classes_with_own_threshold": int(fitted.served.fitted.sum()),
        "val_expected_value_per_1000": on_val["expected_value_per_1000"],
        "val_abstain_rate": on_val["abstain_rate"],
        "test_expected_value_per_1000": on_test["expected_value_per_1000"],
        "test_abstain_rate": on_test["abstain_rate"],
        "test_accuracy_when_decided": on_test["accuracy_when_answered"],
    }
