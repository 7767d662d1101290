"""Reading prepare's packed uint8 arrays for training and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

SPLITS = ("train", "val", "test")
IMBALANCE = ("none", "loss_weights", "balanced_sampler")


def split_images_path(prepared: Path, split: str) -> Path:
    return Path(prepared) / f"{split}.npy"


def prepared_manifest_path(prepared: Path) -> Path:
    return Path(prepared) / "manifest.parquet"


def load_split(prepared: Path, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped images of one split and their class indices, in array order."""
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    rows = manifest[manifest["split"] == split].sort_values("index")
    labels = rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)
    images = np.load(split_images_path(prepared, split), mmap_mode="r")
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} manifest rows")
    return images, labels


def build_augment(steps: list[dict[str, Any]], seed: int) -> A.Compose | None:
    """An albumentations pipeline from params, e.g. [{name: HorizontalFlip, p: 0.5}].

    Albumentations 2 has its own random generator, untouched by seed_everything: seed it here
    so two runs with the same params augment identically.
    """
    if not steps:
        return None
    transforms = []
    for step in steps:
        kwargs = dict(step)
        name = kwargs.pop("name")
        if not hasattr(A, name):
            raise ValueError(f"unknown albumentations transform {name!r} in train augment")
        transforms.append(getattr(A, name)(**kwargs))
    return A.Compose(transforms, seed=seed)


def class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """Inverse-frequency loss weights, mean 1 over the photos: n / (k * n_c)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        missing = [i for i in range(num_classes) if counts[i] == 0]
        raise ValueError(f"class index(es) {missing} have no training photo")
    return (len(labels) / (num_classes * counts)).tolist()


def balanced_sampler(labels: np.ndarray) -> Sampler[int]:
    """Draws every class equally often (with replacement), one epoch = len(labels) draws."""
    counts = np.bincount(labels)
    weights = torch.from_numpy(1.0 / counts[labels])
    return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True)


class PackedImages(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: A.Compose | None = None):
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = np.array(self.images[i])  # copy: the memmap is read-only
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image)), int(self.labels[i])


class PackedDataModule(L.LightningDataModule):
    """Train (augmented, optionally class-balanced) and val loaders over prepare's arrays."""

    def __init__(
        self,
        prepared: Path,
        classes: list[str],
        batch_size: int,
        num_workers: int = 0,
        augment: list[dict[str, Any]] | None = None,
        seed: int = 0,
        imbalance: str = "none",
    ):
        super().__init__()
        if imbalance not in IMBALANCE:
            raise ValueError(f"imbalance must be one of {IMBALANCE}, got {imbalance!r}")
        self.prepared = Path(prepared)
        self.classes = classes
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = build_augment(augment or [], seed)
        self.imbalance = imbalance

    def reseed(self, seed: int) -> None:
        """Restart the augmentation generator (train calls it each epoch, see EpochSeed)."""
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = PackedImages(
            *load_split(self.prepared, "train", self.classes), self.augment
        )
        self.val_set = PackedImages(*load_split(self.prepared, "val", self.classes))

    def train_class_weights(self) -> list[float]:
        return class_weights(load_split(self.prepared, "train", self.classes)[1], len(self.classes))

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.imbalance == "balanced_sampler":
            return self._loader(self.train_set, sampler=balanced_sampler(self.train_set.labels))
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
