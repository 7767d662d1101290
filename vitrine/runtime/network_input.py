"""The one resize from prepare's uint8 arrays to a network's input, shared by the Predictor
(training, evaluation, model.pt), the service's ONNX Runtime path (vitrine/runtime/onnx.py) and the
dedupe embeddings (vitrine.model.embeddings).

It stays in torch rather than in model.onnx: ONNX export has no antialiased bilinear resize.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def network_input(images: Tensor, input_size: int) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, input_size, input_size), antialiased bilinear."""
    # Contiguous NCHW before resizing: interpolate on the permuted (channels-last) view is
    # 2x slower on the CPU, with bit-identical results.
    x = images.permute(0, 3, 1, 2).float().contiguous()
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        x = F.interpolate(
            x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True
        )
    return x
