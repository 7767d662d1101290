"""train: fit a candidate network with Lightning; keep the best checkpoint by validation loss."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from vitrine.config import load_params, load_paths, stage_config
from vitrine.data import PackedDataModule, split_images_path
from vitrine.models import ImageClassifier, model_spec

CHECKPOINT = "best.ckpt"
MODEL_CARD = "model.json"


@dataclass(frozen=True)
class EarlyStoppingConfig:
    monitor: str
    mode: str
    patience: int
    min_delta: float


@dataclass(frozen=True)
class TrainConfig:
    classes: tuple[str, ...]
    model: str
    seed: int
    batch_size: int
    lr: float
    weight_decay: float
    max_epochs: int
    num_workers: int
    augment: tuple[dict[str, Any], ...]
    early_stopping: EarlyStoppingConfig
    trainer: dict[str, Any]  # passed through to lightning.Trainer


class History(Callback):
    """Per-epoch train/val metrics, for the DVC training-curve plot."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # Lightning runs the validation loop before this hook, so val metrics are present.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.rows.append({"epoch": trainer.current_epoch, **metrics})


@dataclass(frozen=True)
class TrainResult:
    best_checkpoint: Path
    history: list[dict[str, float]]
    metrics: dict[str, Any]


def train(config: TrainConfig, prepared: Path, out: Path) -> TrainResult:
    L.seed_everything(config.seed, workers=True)
    data = PackedDataModule(
        prepared,
        list(config.classes),
        config.batch_size,
        config.num_workers,
        list(config.augment),
        config.seed,
    )
    module = ImageClassifier(config.model, list(config.classes), config.lr, config.weight_decay)
    es = config.early_stopping
    stopper = EarlyStopping(
        monitor=es.monitor, mode=es.mode, patience=es.patience, min_delta=es.min_delta
    )
    best = ModelCheckpoint(
        dirpath=out,
        filename=Path(CHECKPOINT).stem,
        monitor=es.monitor,
        mode=es.mode,
        save_top_k=1,
        enable_version_counter=False,
    )
    history = History()
    trainer = L.Trainer(
        max_epochs=config.max_epochs,
        callbacks=[stopper, best, history],
        logger=False,
        num_sanity_val_steps=0,
        deterministic=True,
        enable_model_summary=False,
        default_root_dir=out,
        **config.trainer,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    best_row = min(history.rows, key=lambda r: r[es.monitor] * (1 if es.mode == "min" else -1))
    metrics = {
        "model": config.model,
        "best_epoch": int(best_row["epoch"]),
        "best_" + es.monitor: best_row[es.monitor],
        "best_val_acc": best_row.get("val_acc"),
        "epochs_run": len(history.rows),
        "stopped_by": "early_stopping" if stopper.stopped_epoch > 0 else "max_epochs",
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    return TrainResult(Path(best.best_model_path), history.rows, metrics)


def model_card(config: TrainConfig, prepared: Path) -> dict[str, Any]:
    """What a consumer of the checkpoint needs to feed it: classes and image sizes."""
    image_size = int(np.load(split_images_path(prepared, "train"), mmap_mode="r").shape[1])
    return {
        "model": config.model,
        "classes": list(config.classes),
        "image_size": image_size,
        "input_size": model_spec(config.model).input_size,
    }


def write_history(rows: list[dict[str, float]], path: Path) -> None:
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k != "epoch", k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), stage_config(TrainConfig, "train", params)
    result = train(config, paths.prepared, paths.model)
    (paths.model / MODEL_CARD).write_text(json.dumps(model_card(config, paths.prepared), indent=2))
    write_history(result.history, paths.train_history)
    paths.train_report.write_text(json.dumps(result.metrics, indent=2) + "\n")
    print(f"train: {result.metrics}")


if __name__ == "__main__":
    main()
