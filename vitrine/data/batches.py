"""Loaders that hand over whole batches: photos for augmentation on the device, cached features.

With `train.augment_on: device` (DeviceAugmentedData) the loader only reads: one sorted read of
the memory map per batch (PackedBatches, no Python per photo), in persistent worker processes
when `train.num_workers` > 0, into pinned memory when training on a GPU; the batch is augmented
after its transfer (vitrine.data.device_augment). With `host`, the default, PackedDataModule
augments photo by photo with albumentations, in fresh workers every epoch: what CPU training uses.
"""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from vitrine.data.device_augment import build_device_augment
from vitrine.data.layout import load_split
from vitrine.data.splits import (
    PackedDataModule,
    PackedImages,
    balanced_sampler,
    epoch_seed,
)

AUGMENT_ON = ("host", "device")
PREFETCH_BATCHES = 4  # per worker process


class PackedBatches(PackedImages):
    """PackedImages read a batch at a time, unaugmented: the DataLoader hands __getitems__ the
    batch's indices, read from the memory map in one sorted pass."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        wanted = np.asarray(indices, dtype=np.int64)
        order = np.argsort(wanted, kind="stable")
        images = np.empty((len(wanted), *self.images.shape[1:]), dtype=np.uint8)
        images[order] = self.images[wanted[order]]
        return torch.from_numpy(images), torch.from_numpy(self.labels[wanted])


def as_batched(batch: Any) -> Any:
    """The collate_fn of a dataset whose __getitems__ returns the batch already stacked."""
    return batch


def epoch_sampler(data: PackedDataModule, dataset: Sized, labels: np.ndarray) -> Sampler[int]:
    """One epoch's draws of a training set, as PackedDataModule draws its photos: shuffled, or
    class-balanced (`train.imbalance`), from the data module's order generator."""
    if data.imbalance == "balanced_sampler":
        return balanced_sampler(labels, data.order_rng)
    return RandomSampler(dataset, generator=data.order_rng)


def on_cuda(data: Any) -> bool:
    """Whether a data module's trainer trains on a CUDA device (its loaders then pin memory)."""
    return data.trainer is not None and data.trainer.strategy.root_device.type == "cuda"


class DeviceAugmentedData(PackedDataModule):
    """PackedDataModule for `augment_on: device`: unaugmented uint8 batches from the loader,
    the training batch augmented by kornia on the accelerator (on_after_batch_transfer)."""

    def host_augment(self, steps: list[dict[str, Any]], seed: int) -> None:
        """None: the loader hands the photos over as read. `steps` become the kornia pipeline
        that augments the training batch on the device (device_augment)."""
        self.device_augment = build_device_augment(steps)
        return None

    def setup(self, stage: str | None = None) -> None:
        self.train_set = PackedBatches(*load_split(self.prepared, "train", self.classes))
        self.val_set = PackedBatches(*load_split(self.prepared, "val", self.classes))

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return super()._loader(dataset, collate_fn=as_batched, pin_memory=on_cuda(self), **kwargs)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:  # as PackedDataModule.train_dataloader
            self.reseed(epoch_seed(self.seed, self.trainer.current_epoch))
        sampler = epoch_sampler(self, self.train_set, self.train_set.labels)
        # The workers only read, with no random draw: kept from epoch to epoch.
        workers = self.num_workers > 0
        return self._loader(
            self.train_set,
            sampler=sampler,
            persistent_workers=workers,
            prefetch_factor=PREFETCH_BATCHES if workers else None,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The training batch, on the accelerator, augmented there; val batches as they are."""
        if self.device_augment is None or self.trainer is None or not self.trainer.training:
            return batch
        images, labels = batch
        return self.device_augment(images), labels


def photo_data(
    augment_on: str,
    prepared: Path,
    classes: list[str],
    batch_size: int,
    num_workers: int,
    augment: list[dict[str, Any]],
    seed: int,
    imbalance: str,
) -> PackedDataModule:
    """The training photos' data module for `train.augment_on` (host or device)."""
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"augment_on must be one of {AUGMENT_ON}, got {augment_on!r}")
    kind = PackedDataModule if augment_on == "host" else DeviceAugmentedData
    return kind(prepared, classes, batch_size, num_workers, augment, seed, imbalance)
