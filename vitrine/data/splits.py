"""Reading prepare's packed uint8 arrays for training and evaluation."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import pydantic
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    WeightedRandomSampler,
    get_worker_info,
)

from vitrine.data.layout import load_split

IMBALANCE = ("none", "loss_weights", "balanced_sampler")


def named_steps(steps: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """A candidate's `augment` list, e.g. [{name: HorizontalFlip, p: 0.5}], as (name, the
    transform's arguments) pairs; a step without a name is a ValueError."""
    pairs = []
    for i, step in enumerate(steps):
        arguments = dict(step)
        if "name" not in arguments:
            raise ValueError(f"step {i} has no name (a transform such as HorizontalFlip)")
        pairs.append((arguments.pop("name"), arguments))
    return pairs


def build_augment(steps: list[dict[str, Any]], seed: int) -> A.Compose | None:
    """An albumentations pipeline from params, e.g. [{name: HorizontalFlip, p: 0.5}].

    Albumentations 2 has its own random generator, untouched by seed_everything: seed it here
    so two runs with the same params augment identically.
    """
    if not steps:
        return None
    transforms = []
    for name, kwargs in named_steps(steps):
        if not hasattr(A, name):
            raise ValueError(f"unknown albumentations transform {name!r} in train augment")
        transforms.append(_transform(name, kwargs))
    return A.Compose(transforms, seed=seed)


def _transform(name: str, kwargs: dict[str, Any]) -> Any:
    """One albumentations transform; a value it refuses, or an argument it would only warn of
    and ignore (a misspelt `p`), is a ValueError naming the transform."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "error", message=r"Argument\(s\) .* are not valid", category=UserWarning
        )
        try:
            return getattr(A, name)(**kwargs)
        except UserWarning as err:
            raise ValueError(f"{name}: {err}") from None
        except ValueError as err:  # albumentations wraps pydantic's ValidationError
            cause = err.__cause__
            if not isinstance(cause, pydantic.ValidationError):
                raise ValueError(f"{name}: {str(err).splitlines()[0]}") from None
            first = cause.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{name}: {where}: {first['msg']}, got {first['input']!r}") from None


def class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """Inverse-frequency loss weights, mean 1 over the photos: n / (k * n_c)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        missing = [i for i in range(num_classes) if counts[i] == 0]
        raise ValueError(f"class index(es) {missing} have no training photo")
    return (len(labels) / (num_classes * counts)).tolist()


def balanced_sampler(labels: np.ndarray, generator: torch.Generator | None = None) -> Sampler[int]:
    """Draws every class equally often (with replacement), one epoch = len(labels) draws."""
    counts = np.bincount(labels)
    weights = (1.0 / counts[labels]).tolist()
    return WeightedRandomSampler(
        weights, num_samples=len(labels), replacement=True, generator=generator
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's random draws: a resumed run repeats them exactly."""
    return seed + epoch


def seed_worker_augment(worker_id: int) -> None:
    """Give a loader worker's copy of the augmentation its own seed.

    Every worker starts with a copy of the main process's generator, so without this all workers
    would draw the same flips and crops. torch's per-worker seed comes from the main process's
    torch generator when the epoch's workers start, which EpochSeed has just seeded: the
    augmentations of an epoch are then the same in a resumed run.
    """
    info = get_worker_info()
    if info is None or not isinstance(info.dataset, PackedImages):
        raise RuntimeError("seed_worker_augment is the worker_init_fn of a PackedImages loader")
    if info.dataset.augment is not None:
        info.dataset.augment.set_random_seed(info.seed % 2**32)


class PackedImages(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: A.Compose | None = None):
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        image = np.array(self.images[i])  # copy: the memmap is read-only
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        return image, int(self.labels[i])


def collate(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as uint8 (N, H, W, 3) images and int64 labels, stacked by numpy.

    The default collate's torch.stack runs a multi-threaded copy that took 30-400 ms per batch
    of 64 photos of 128 px on 2 busy cores (numpy: 2-10 ms); with num_workers 0 it runs in the
    training process, so it decided the loader's speed (benchmarks/loader.py).
    """
    images, labels = zip(*batch, strict=True)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


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
        self.augment = self.host_augment(augment or [], seed)
        self.imbalance = imbalance
        self.seed = seed
        # The loader's own generators, not torch's global one: when Lightning creates the
        # iterator (before or after the epoch's hooks) then shifts no draw of the network's.
        self.order_rng = torch.Generator()  # shuffle or balanced draws
        self.worker_rng = torch.Generator()  # seeds of the loader's worker processes

    def host_augment(self, steps: list[dict[str, Any]], seed: int) -> A.Compose | None:
        """What augments each training photo in the loader: build_augment's pipeline."""
        return build_augment(steps, seed)

    def reseed(self, seed: int) -> None:
        """Restart the train split's draws: order, worker seeds, augmentation (see EpochSeed)."""
        self.order_rng.manual_seed(seed)
        self.worker_rng.manual_seed(seed)
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
        """A loader of `dataset` in batches; `kwargs` add to or replace DataLoader's options
        (collate_fn: collate unless given)."""
        options: dict[str, Any] = {"collate_fn": collate, **kwargs}
        return DataLoader(
            dataset, batch_size=self.batch_size, num_workers=self.num_workers, **options
        )

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:
            # Lightning starts the first epoch's iterator (workers, their first batches) before
            # the epoch's hooks: seed it here too, for the epoch a resumed run starts at.
            self.reseed(epoch_seed(self.seed, self.trainer.current_epoch))
        if self.imbalance == "balanced_sampler":
            sampler = balanced_sampler(self.train_set.labels, self.order_rng)
        else:
            sampler = RandomSampler(self.train_set, generator=self.order_rng)
        # Fresh workers every epoch (not persistent): each copies the augmentation as reseeded
        # for this epoch, see seed_worker_augment.
        workers = {"worker_init_fn": seed_worker_augment} if self.num_workers else {}
        return self._loader(self.train_set, sampler=sampler, generator=self.worker_rng, **workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, persistent_workers=self.num_workers > 0)
