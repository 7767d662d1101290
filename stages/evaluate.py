"""evaluate: test-set scores of the trained model, weighted by what each class is worth."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score

from stages.train import CHECKPOINT
from vitrine.config import load_params, load_paths, stage_config
from vitrine.data import load_split, prepared_manifest_path
from vitrine.models import ImageClassifier, Predictor


@dataclass(frozen=True)
class EvaluateConfig:
    classes: tuple[str, ...]
    batch_size: int
    business_value: dict[str, float]

    def __post_init__(self) -> None:
        if set(self.business_value) != set(self.classes):
            raise ValueError(
                f"evaluate.business_value must give a value for exactly the classes "
                f"{list(self.classes)}, got {sorted(self.business_value)}"
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


def business_weighted_accuracy(y_true: np.ndarray, y_pred: np.ndarray, values: np.ndarray) -> float:
    """Sum of the values of correctly classified photos over the value of all photos."""
    worth = values[y_true]
    return float((worth * (y_true == y_pred)).sum() / worth.sum())


def scores(y_true: np.ndarray, y_pred: np.ndarray, config: EvaluateConfig) -> dict[str, Any]:
    values = np.array([config.business_value[c] for c in config.classes])
    labels = list(range(len(config.classes)))
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "n_test": len(y_true),
        "accuracy": float((y_true == y_pred).mean()),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "business_weighted_accuracy": business_weighted_accuracy(y_true, y_pred, values),
        "f1_per_class": {c: float(f) for c, f in zip(config.classes, per_class, strict=True)},
    }


def predictions_table(
    manifest: pd.DataFrame, proba: np.ndarray, classes: tuple[str, ...]
) -> pd.DataFrame:
    """One row per test photo: truth, prediction, confidence and every class probability."""
    rows = manifest[manifest["split"] == "test"].sort_values("index").reset_index(drop=True)
    table = rows[["id", "source", "label"]].copy()
    table["predicted"] = [classes[i] for i in proba.argmax(axis=1)]
    table["confidence"] = proba.max(axis=1)
    for i, c in enumerate(classes):
        table[f"p_{c}"] = proba[:, i]
    return table


def evaluate(config: EvaluateConfig, prepared: Path, model_dir: Path) -> tuple[dict, pd.DataFrame]:
    module = ImageClassifier.load_from_checkpoint(model_dir / CHECKPOINT, map_location="cpu")
    if tuple(module.hparams.classes) != config.classes:
        raise ValueError(f"model classes {module.hparams.classes} != params {config.classes}")
    images, y_true = load_split(prepared, "test", list(config.classes))
    proba = predict_proba(module.predictor, images, config.batch_size)
    table = predictions_table(
        pd.read_parquet(prepared_manifest_path(prepared)), proba, config.classes
    )
    return scores(y_true, proba.argmax(axis=1), config), table


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), stage_config(EvaluateConfig, "evaluate", params)
    metrics, predictions = evaluate(config, paths.prepared, paths.model)
    predictions.to_parquet(paths.predictions, index=False)
    predictions.rename(columns={"label": "actual"})[["actual", "predicted"]].to_csv(
        paths.confusion, index=False
    )
    paths.evaluate_report.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"evaluate: {metrics}")


if __name__ == "__main__":
    main()
