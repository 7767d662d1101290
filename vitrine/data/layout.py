"""Where a prepared set keeps its splits, and how a split is read back.

Kept apart from the training data module so that prepare, evaluate and the
monitor can name the files without importing torch, Lightning and
albumentations (about 3 s and 1 GB of start-up per process).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from vitrine.images import SQUEEZE

SPLITS = ("train", "val", "test")


def split_images_path(prepared: Path, split: str) -> Path:
    return Path(prepared) / f"{split}.npy"


def prepared_manifest_path(prepared: Path) -> Path:
    return Path(prepared) / "manifest.parquet"


def preprocessing_path(prepared: Path) -> Path:
    return Path(prepared) / "preprocessing.json"


def write_preprocessing(prepared: Path, image_size: int, resize: str) -> None:
    """How the squares were made, for train to hand on to the packaged model."""
    data = {"image_size": image_size, "resize": resize}
    preprocessing_path(prepared).write_text(json.dumps(data, indent=2) + "\n")


def prepared_resize(prepared: Path) -> str:
    """The resize rule of a prepared set (vitrine.images.RESIZE_MODES); a set prepared before
    the rule was recorded squeezed."""
    path = preprocessing_path(prepared)
    return str(json.loads(path.read_text())["resize"]) if path.is_file() else SQUEEZE


def load_split(prepared: Path, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped images of one split and their class indices, in array order."""
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    rows = manifest[manifest["split"] == split].sort_values("index")
    labels = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    images = np.load(split_images_path(prepared, split), mmap_mode="r")
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} manifest rows")
    return images, labels


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
