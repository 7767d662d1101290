"""Photo bytes -> the model's input, and probabilities -> an answer: the one implementation the
service (service/core.py) and batch scoring (vitrine.scoring) both run. A photo is refused past
serve.max_upload_bytes or serve.max_pixels (from its header, nothing decoded), and under
serve.min_side; its pixels are vitrine.images' (the evaluated ones); the answer is evaluate's
decision rule (vitrine.runtime.decisions.decide with the packaged gain matrix), its class's
probability the confidence, abstaining below the packaged abstain_threshold. model.onnx already
holds the calibration. tests/test_score.py checks that a real server and the scorer agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vitrine.contracts import PackagedModel
from vitrine.images import Rejected, checked_square, open_capped
from vitrine.runtime.decisions import decide


def open_upload(data: bytes, info: PackagedModel) -> Image.Image:
    """Photo bytes -> the opened image, judged from its size and header alone (a decompression
    bomb is refused before any pixel is decoded); Rejected otherwise."""
    serve = info.serve
    if len(data) > serve.max_upload_bytes:
        raise Rejected("too_large", f"image of {len(data)} bytes exceeds {serve.max_upload_bytes}")
    try:
        return open_capped(data, serve.max_pixels)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's ways of failing on a bad file
        raise Rejected("undecodable", str(err)) from None


def prepare_image(img: Image.Image, info: PackagedModel) -> np.ndarray:
    """An opened photo -> the (size, size, 3) uint8 array the model takes; Rejected otherwise."""
    try:
        return checked_square(img, info.image_size, min_side=info.serve.min_side)
    except (OSError, ValueError, SyntaxError) as err:
        raise Rejected("undecodable", str(err)) from None


def model_input(data: bytes, info: PackagedModel) -> np.ndarray:
    """open_upload then prepare_image: photo bytes -> pixels, or Rejected."""
    return prepare_image(open_upload(data, info), info)


def classify_answer(probabilities: Sequence[float], info: PackagedModel) -> dict[str, Any]:
    """The answer for one photo's class probabilities (in info.classes order): the class
    evaluate's decision rule answers, and its probability as the confidence."""
    values = [float(p) for p in probabilities]
    best = int(decide(np.array([values]), info.gain)[0])
    return {
        "label": info.classes[best],
        "confidence": values[best],
        "probabilities": dict(zip(info.classes, values, strict=True)),
        "abstain": values[best] < info.abstain_threshold,
        "model_version": info.version,
    }
