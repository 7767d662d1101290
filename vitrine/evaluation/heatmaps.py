"""Class-activation heat maps: where the float network looked for a class (Grad-CAM).

Grad-CAM (Selvaraju et al., 2017; the grad-cam package): the last convolution's activations,
each channel weighted by the mean gradient of the class's logit over it, summed, clipped at 0
and scaled to [0, 1] per photo. The layer is found generically, the network's last nn.Conv2d:
cnn64's only convolution, LeNet-5's second, EfficientNet's 1x1 `conv_head` (timm), the layer
with the coarsest but most semantic map.

Always the float network (the candidate's Lightning checkpoint, or a package's model.pt
rebuilt as a Predictor): the int8 ONNX model the service runs has no gradients. Its answers
differ from the served model's on a few photos at most (evaluate.json served.*.int8); the
pages say which network the heat maps come from.

A heat map is computed on the network's own input (the photo after the shared resize) and
resized back to the photo; `overlay` draws it in the jet colour map over the photo, as a PNG.
"""

from __future__ import annotations

import base64
import copy
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from tqdm import tqdm

from vitrine.model.networks import AfterResize, Predictor
from vitrine.runtime.network_input import network_input

BATCH = 16  # photos per Grad-CAM pass
IMAGE_WEIGHT = 0.55  # of the photo in the overlay; the rest is the heat map's colour
# An overlay's PNG in 128 colours: 5.3 KB a 128 px one on average against 19.8 KB in full
# colour (the first 24 Avito test photos, effnet_finetune), no banding to the eye.
COLOURS = 128
NETWORK = "float network"  # how the pages name where the heat maps come from


def last_conv_name(net: nn.Module) -> str:
    """The qualified name of the last nn.Conv2d the network registers (timm's Conv2dSame is
    one too)."""
    convs = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(net).__name__} has no Conv2d layer to draw a heat map from")
    return convs[-1]


def last_conv(net: nn.Module) -> nn.Module:
    return net.get_submodule(last_conv_name(net))


def heat_maps(
    predictor: Predictor, images: np.ndarray, targets: Sequence[int], desc: str = "heat maps"
) -> np.ndarray:
    """uint8 (N, H, W, 3) photos and one class index each -> float32 (N, H, W) in [0, 1]: the
    Grad-CAM of that class's logit, resized to the photo (all zero where nothing argues for
    the class)."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} photos but {len(targets)} target classes")
    n, h, w = images.shape[:3]
    out = np.zeros((n, h, w), np.float32)
    if n == 0:
        return out
    # A copy in eval mode with gradients on: a linear probe's frozen backbone has them off, and
    # the caller's network stays as it was.
    net = copy.deepcopy(predictor).eval().requires_grad_(True)
    with GradCAM(AfterResize(net), [last_conv(net.net)]) as cam:
        for start in tqdm(range(0, n, BATCH), desc=desc, unit="batch", leave=False):
            chunk = np.array(images[start : start + BATCH], np.uint8)  # writable, for torch
            x = network_input(torch.from_numpy(chunk), net.input_size)
            wanted = [ClassifierOutputTarget(int(t)) for t in targets[start : start + BATCH]]
            maps = cam(input_tensor=x, targets=wanted)  # (b, input_size, input_size)
            for i, m in enumerate(maps):
                out[start + i] = resized(m, h, w)
    return np.clip(out, 0.0, 1.0)


def resized(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    if mask.shape == (h, w):
        return mask.astype(np.float32)
    image = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), np.float32)


def overlay(photo: np.ndarray, mask: np.ndarray, side: int) -> bytes:
    """The heat map over the photo (uint8 (H, W, 3)) as a PNG of at most `side` pixels a side."""
    rgb = np.asarray(photo, np.float32) / 255.0
    drawn = show_cam_on_image(rgb, mask, use_rgb=True, image_weight=IMAGE_WEIGHT)
    image = Image.fromarray(drawn)
    image.thumbnail((side, side))
    image = image.quantize(COLOURS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def class_heat_maps(
    predictor: Predictor,
    images: np.ndarray,
    targets: Mapping[str, Sequence[int]],
    side: int,
) -> dict[str, list[bytes]]:
    """Per named target (e.g. "predicted", "true": one class index per photo), each photo's
    heat map for it as an overlaid PNG."""
    return {
        name: [
            overlay(photo, mask, side)
            for photo, mask in zip(
                images, heat_maps(predictor, images, classes, f"heat maps ({name})"), strict=True
            )
        ]
        for name, classes in targets.items()
    }


def answered_class(row: pd.Series, classes: Sequence[str]) -> int:
    """The class index a predictions row answered: its `predicted`, or, when that is no class
    (an ancestor in a taxonomy), its most probable class."""
    if row["predicted"] in classes:
        return classes.index(row["predicted"])
    return int(np.argmax([row[f"p_{c}"] for c in classes]))


def mistake_heatmaps(
    predictor: Predictor,
    images: np.ndarray,
    rows: pd.DataFrame,
    classes: Sequence[str],
    side: int,
) -> dict[str, Any]:
    """The evaluation page's heat maps: per predictions row (columns index, label, predicted,
    p_<class>), by its test photo's index, the predicted and the true class's overlays as PNG
    data URIs; `layer`, the convolution they come from; `reason`, why there are none ("" when
    drawn)."""
    try:
        layer = last_conv_name(predictor.net)
    except ValueError as err:
        return {"maps": {}, "layer": "", "reason": str(err), "network": NETWORK}
    index = rows["index"].to_numpy(dtype=np.int64)
    photos = np.stack([np.asarray(images[i], np.uint8) for i in index]) if len(index) else None
    maps: dict[int, dict[str, str]] = {}
    if photos is not None:
        targets = {
            "predicted": [answered_class(r, classes) for _, r in rows.iterrows()],
            "true": [classes.index(label) for label in rows["label"]],
        }
        drawn = class_heat_maps(predictor, photos, targets, side)
        maps = {
            int(i): {name: data_uri(pngs[k]) for name, pngs in drawn.items()}
            for k, i in enumerate(index)
        }
    return {"maps": maps, "layer": layer, "reason": "", "network": NETWORK}
