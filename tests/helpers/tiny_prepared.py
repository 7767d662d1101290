"""Tiny prepared datasets and project folders for the training tests.

A prepared dataset is what the prepare stage writes: manifest.parquet plus {train,val,test}.npy
uint8 (N, S, S, 3) arrays. The signal is learnable but not trivial: noise with a slightly
brighter top half for phones and bottom half for laptops (a horizontal flip keeps the label).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from tests.helpers import REPO
from vitrine.data.layout import prepared_manifest_path, split_images_path

CLASSES = ("laptop", "phone")
SPLIT_SIZES = {"train": 32, "val": 16, "test": 16}


def write_prepared(
    root: Path,
    size: int = 32,
    split_sizes: dict[str, int] = SPLIT_SIZES,
    phone_share: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write a prepared dataset under root; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in split_sizes.items():
        phones = round(n * phone_share)
        labels = rng.permutation(np.r_[np.ones(phones, int), np.zeros(n - phones, int)])
        images = rng.integers(0, 220, (n, size, size, 3), dtype=np.uint8)
        for image, label in zip(images, labels, strict=True):
            bright = slice(0, size // 2) if label == 1 else slice(size // 2, size)
            image[bright] += 30
        np.save(split_images_path(root, split), images)
        rows += [
            {
                "id": f"{split}-{i}",
                "label": CLASSES[label],
                "source": "tiny",
                "cluster_id": f"{split}-{i}",
                "split": split,
                "index": i,
                "sha256": f"{split}-{i}".ljust(64, "0"),
            }
            for i, label in enumerate(labels)
        ]
    pd.DataFrame(rows).to_parquet(prepared_manifest_path(root))
    return root


def trainer_args(**overrides: Any) -> dict[str, Any]:
    """params.yaml `train.trainer` for a quiet CPU run."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "log_every_n_steps": 1,
        **overrides,
    }


def candidate_params(**overrides: Any) -> dict[str, Any]:
    """A small cnn64 candidate block (params.yaml `candidates.<name>`)."""
    return {
        "model": "cnn64",
        "options": {},
        "input_size": 32,
        "batch_size": 8,
        "lr": 0.001,
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "cosine_schedule": False,
        "max_epochs": 4,
        "augment": [{"name": "HorizontalFlip", "p": 0.5}],
        **overrides,
    }


def train_params(**overrides: Any) -> dict[str, Any]:
    """params.yaml `train` (without `classes`, which stage_config adds)."""
    return {
        "seed": 7,
        "num_workers": 0,
        "imbalance": "loss_weights",
        "early_stopping": {"monitor": "val_loss", "mode": "min", "patience": 10, "min_delta": 0.0},
        "trainer": trainer_args(),
        **overrides,
    }


def write_project(
    root: Path, candidates: dict[str, dict[str, Any]], train: dict[str, Any] | None = None
) -> Path:
    """A folder to run `python -m stages.train <name>` in: params.yaml (the repository's paths,
    relative, so every output lands under root) and a prepared dataset at paths.prepared."""
    repo_params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = {
        "classes": list(CLASSES),
        "paths": repo_params["paths"],
        "train": train or train_params(),
        "candidates": candidates,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_prepared(root / params["paths"]["prepared"])
    return root
