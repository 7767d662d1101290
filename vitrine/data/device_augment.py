"""Augmentation of whole training batches on the accelerator, with kornia (`train.augment_on:
device`).

On a GPU the host cannot keep up with the network: on an NVIDIA H200, effnet_finetune trained at
265 images/s with albumentations augmenting one photo at a time on the host (batch 32, no loader
workers) and 486 at batch 256, while the network's own bf16 training step ran at 1,438 and 8,497
images/s (`benchmarks/train_gpu.py --augment-on host` measures both, and with `device` whether
the GPU is kept busy). Here the loader only reads uint8 photos; the batch is augmented where it
trains.

The candidates' `augment` lists name albumentations transforms with albumentations' arguments
(and defaults); DEVICE_TRANSFORMS maps each name onto its kornia batch transform, every photo
drawing its own parameters. A name without an equivalent is refused when training starts. The
batch leaves as it came, uint8 (N, H, W, 3), so the network resizes and normalises it as it does
host-augmented photos, evaluation's and the service's. kornia draws from torch's generator, which
training seeds at every epoch (vitrine.model.training.EpochSeed): a seed gives the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from vitrine.data.splits import named_steps

Pair = tuple[float, float]


def _horizontal_flip(p: float = 0.5) -> nn.Module:
    return K.RandomHorizontalFlip(p=p)


def _random_resized_crop(
    size: Sequence[int],
    scale: Pair = (0.08, 1.0),
    ratio: Pair = (0.75, 4 / 3),
    p: float = 1.0,
) -> nn.Module:
    height, width = size
    scales, ratios = (scale[0], scale[1]), (ratio[0], ratio[1])
    return K.RandomResizedCrop((height, width), scale=scales, ratio=ratios, p=p)


def _color_jitter(
    brightness: float | Pair = (0.8, 1.2),
    contrast: float | Pair = (0.8, 1.2),
    saturation: float | Pair = (0.8, 1.2),
    hue: float | Pair = (-0.5, 0.5),
    p: float = 0.5,
) -> nn.Module:
    # Both libraries read a float f as factors in [1 - f, 1 + f] (hue: shifts in [-f, f] of a
    # turn) and a pair as the range itself.
    def both(value: float | Pair) -> float | Pair:
        return value if isinstance(value, int | float) else (value[0], value[1])

    return K.ColorJitter(both(brightness), both(contrast), both(saturation), both(hue), p=p)


# albumentations name -> builder taking albumentations' arguments, returning kornia's transform.
DEVICE_TRANSFORMS: dict[str, Callable[..., nn.Module]] = {
    "HorizontalFlip": _horizontal_flip,
    "RandomResizedCrop": _random_resized_crop,
    "ColorJitter": _color_jitter,
}


class DeviceAugment(nn.Module):
    """uint8 (N, H, W, 3) photos -> the same, augmented, on the photos' device."""

    def __init__(self, transforms: list[nn.Module]):
        super().__init__()
        self.transforms = nn.Sequential(*transforms)

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).float().div(255)  # kornia: float NCHW in [0, 1]
        x = self.transforms(x)
        return x.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def build_device_augment(steps: Sequence[dict[str, Any]]) -> DeviceAugment | None:
    """The kornia pipeline of a candidate's `augment` list, e.g. [{name: HorizontalFlip, p: 0.5}];
    None for an empty list. An unknown name or argument is a ValueError naming it."""
    if not steps:
        return None
    transforms = []
    for name, kwargs in named_steps(steps):
        if name not in DEVICE_TRANSFORMS:
            raise ValueError(
                f"train augment {name!r} has no device (kornia) equivalent; augment_on: device "
                f"knows {sorted(DEVICE_TRANSFORMS)}. Use train.augment_on: host for it"
            )
        try:
            transforms.append(DEVICE_TRANSFORMS[name](**kwargs))
        except (TypeError, ValueError) as err:
            raise ValueError(f"train augment {name} {kwargs} on the device: {err}") from err
    return DeviceAugment(transforms)
