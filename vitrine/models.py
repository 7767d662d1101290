"""Candidate networks and the Predictor that wraps them.

A Predictor takes the uint8 (N, H, W, 3) arrays that prepare writes and returns logits: the
resize to the network's input size and the normalisation live inside it, so training,
evaluation and the exported service model run exactly the same computation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[int], nn.Module]
    input_size: int
    mean: float  # pixel = (uint8 - mean) / std
    std: float


def cnn64(num_classes: int) -> nn.Module:
    """The seed article's Keras CNN: Conv2D(32, 3x3) + ReLU, MaxPool 2x2, Flatten, Dense."""
    return nn.Sequential(
        nn.Conv2d(3, 32, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 31 * 31, num_classes),
    )


# Adding a candidate: one builder function plus one entry here.
MODELS: dict[str, ModelSpec] = {
    "cnn64": ModelSpec(cnn64, input_size=64, mean=0.0, std=255.0),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


class Predictor(nn.Module):
    """uint8 NHWC images -> logits; scriptable so the service can load it without this code."""

    def __init__(self, net: nn.Module, input_size: int, mean: float, std: float):
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.mean = mean
        self.std = std

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return self.net((x - self.mean) / self.std)


def build_predictor(name: str, num_classes: int) -> Predictor:
    spec = model_spec(name)
    return Predictor(spec.build(num_classes), spec.input_size, spec.mean, spec.std)


class ImageClassifier(L.LightningModule):
    """Cross-entropy training of a Predictor; logs loss and accuracy per epoch."""

    def __init__(self, model: str, classes: list[str], lr: float, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.predictor = build_predictor(model, len(classes))

    def forward(self, images: Tensor) -> Tensor:
        return self.predictor(images)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        # sync_dist so every DDP rank sees (and early-stops on) the same value.
        self.log(f"{stage}_loss", loss, on_epoch=True, on_step=False, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", acc, on_epoch=True, on_step=False, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
