"""A linear probe fitted on cached features: its frozen backbone runs once per photo and view.

A probe's backbone gets no gradient and stays in eval mode, so what it computes for a photo never
changes while the head learns. CachedFeatures runs it once, when training starts, on every
training photo and its horizontal flip and on every val photo; HeadOnly then fits the head on
those features, every epoch choosing each photo's view as HorizontalFlip's p says. Running the
backbone on every photo of every epoch instead costs effnet_probe (6 epochs, 2,278 training and
513 val photos) three times the backbone passes: measured with `python -m stages.train
effnet_probe` in a copy of the project on the 2-core AVX-512 machine, while other work loaded it
(load average about 6.5), 1,612 s and 787 CPU-seconds that way against 296 s and 256 CPU-seconds
cached, at the same val accuracy (92.98% after the last epoch either way; the best epoch's 92.79
and 92.59%, one photo apart). HorizontalFlip is the one augmentation a cache can hold (a crop or a
colour change would need a view per draw), so a probe's `augment` lists it or nothing, and a
probe takes no CutMix.

The checkpoint is the whole ImageClassifier's (the backbone's weights unchanged, the head's
trained): export, evaluate and the service load the network that takes pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vitrine.data.batches import as_batched, epoch_sampler
from vitrine.data.layout import load_split
from vitrine.data.splits import PackedDataModule, epoch_seed
from vitrine.model.networks import (
    ImageClassifier,
    Predictor,
    PretrainedClassifier,
    fold_batch_norm,
)
from vitrine.runtime.network_input import network_input

FEATURE_BATCH = 64  # photos per backbone pass when caching


def is_probe(options: dict[str, Any]) -> bool:
    """Whether a candidate's model options freeze its backbone (`mode: probe`)."""
    return options.get("mode") == "probe"


def flip_probability(augment: Sequence[dict[str, Any]], cutmix_p: float = 0.0) -> float:
    """A probe's augmentation, as cached views allow: the chance that an epoch shows a photo's
    horizontal flip (0 without HorizontalFlip). Other transforms and CutMix are refused."""
    if cutmix_p > 0:
        raise ValueError("a probe trains on cached features, which CutMix cannot mix: cutmix_p 0")
    p = 0.0
    for step in augment:
        kwargs = dict(step)
        name = kwargs.pop("name")
        if name != "HorizontalFlip" or set(kwargs) - {"p"}:
            raise ValueError(
                f"a probe caches its backbone's features of each photo and of its horizontal "
                f"flip, so its augment takes HorizontalFlip (with p) only, not {dict(step)}"
            )
        p = float(kwargs.get("p", 0.5))
    return p


def frozen_features(
    predictor: Predictor, images: np.ndarray, flip: bool, device: torch.device, what: str
) -> Tensor:
    """The backbone's features (N, D) of uint8 (N, H, W, 3) photos, mirrored when flip, computed
    as the Predictor computes them before its head (resize, normalisation, backbone)."""
    if not isinstance(predictor.net, PretrainedClassifier) or not predictor.net.frozen:
        raise TypeError(
            f"cached features need a frozen PretrainedClassifier, not {type(predictor.net)}"
        )
    net = cast(PretrainedClassifier, fold_batch_norm(predictor).net)  # batch norms folded
    chunks = []
    # no_grad, not inference_mode: the head's backward saves these features.
    with torch.no_grad():
        for start in tqdm(range(0, len(images), FEATURE_BATCH), desc=what, unit="batch"):
            batch = torch.from_numpy(np.array(images[start : start + FEATURE_BATCH]))
            photos = batch.to(device).flip(2) if flip else batch.to(device)
            x = network_input(photos, predictor.input_size)
            chunks.append(net.features((x - predictor.mean) / predictor.std).float().cpu())
    return torch.cat(chunks)


class FeatureViews(Dataset):
    """Cached features of every photo in each view (views, N, D) and the photos' labels; each
    item is the photo's features in its current view (choose_views)."""

    def __init__(self, features: Tensor, labels: np.ndarray):
        self.features = features
        self.labels = labels
        self.view = torch.zeros(len(labels), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def choose_views(self, seed: int, flip_p: float) -> None:
        """Each photo's view for an epoch: its flip (view 1) with probability flip_p."""
        if len(self.features) > 1:
            generator = torch.Generator().manual_seed(seed)
            self.view = (torch.rand(len(self.labels), generator=generator) < flip_p).long()

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        at = torch.as_tensor(indices, dtype=torch.int64)
        return self.features[self.view[at], at], torch.from_numpy(self.labels[at.numpy()])


class CachedFeatures(L.LightningDataModule):
    """Train and val loaders over the frozen backbone's features, computed in setup on the
    trainer's device. Order, class balancing and seeds are those of the photos' data module."""

    def __init__(self, photos: PackedDataModule, predictor: Predictor, flip_p: float):
        super().__init__()
        self.photos = photos
        self.predictor = predictor
        self.flip_p = flip_p
        self.seed = photos.seed

    def reseed(self, seed: int) -> None:
        """An epoch's draws: the photos' order (the photos' module) and their views."""
        self.photos.reseed(seed)
        self.seed = seed
        if hasattr(self, "train_set"):
            self.train_set.choose_views(seed, self.flip_p)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        self.predictor.to(device)
        classes, prepared = self.photos.classes, self.photos.prepared
        images, labels = load_split(prepared, "train", classes)
        flips = (True,) if self.flip_p > 0 else ()
        views = [
            frozen_features(self.predictor, images, flip, device, f"train features, flip {flip}")
            for flip in (False, *flips)
        ]
        self.train_set = FeatureViews(torch.stack(views), labels)
        self.train_set.choose_views(self.seed, self.flip_p)
        images, labels = load_split(prepared, "val", classes)
        val = frozen_features(self.predictor, images, False, device, "val features")
        self.val_set = FeatureViews(val.unsqueeze(0), labels)

    def train_class_weights(self) -> list[float]:
        return self.photos.train_class_weights()

    def _loader(self, dataset: FeatureViews, **kwargs: Any) -> DataLoader:
        # In memory, a gather per batch: no worker process would earn its start.
        return DataLoader(
            dataset, batch_size=self.photos.batch_size, collate_fn=as_batched, **kwargs
        )

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None:  # as PackedDataModule.train_dataloader
            self.reseed(epoch_seed(self.photos.seed, self.trainer.current_epoch))
        sampler = epoch_sampler(self.photos, self.train_set, self.train_set.labels)
        return self._loader(self.train_set, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


class HeadOnly(ImageClassifier):
    """An ImageClassifier whose batches are its backbone's cached features (CachedFeatures): its
    steps run the head alone. Hyperparameters and state_dict are ImageClassifier's, which loads
    its checkpoints."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        net = self.predictor.net
        if not isinstance(net, PretrainedClassifier) or not net.frozen:
            raise ValueError(f"{self.hparams['model']}: only a frozen backbone's head trains alone")

    def forward(self, features: Tensor) -> Tensor:
        return cast(PretrainedClassifier, self.predictor.net).head(features)

    def on_validation_epoch_start(self) -> None:
        pass  # its val batches are cached features: nothing to fold

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")
