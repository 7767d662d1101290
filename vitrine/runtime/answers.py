"""Photo bytes -> the model's input, and probabilities -> an answer: the one implementation the
service (service/core.py) and batch scoring (vitrine.scoring) both run. A photo is refused past
serve.max_upload_bytes or serve.max_pixels (from its header, nothing decoded), and under
serve.min_side; its pixels are vitrine.images' (the evaluated ones); the answer is evaluate's
decision rule (vitrine.runtime.decisions.answer with the packaged model's rule: its gain matrix,
class thresholds and taxonomy back-off), the answered class's or ancestor's probability the
confidence. model.onnx already holds the calibration. tests/test_score.py checks that a real
server, the scorer and evaluate agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vitrine.contracts import PackagedModel
from vitrine.images import Rejected, checked_square, open_capped, undecodable
from vitrine.runtime.decisions import answer


def open_upload(data: bytes, info: PackagedModel) -> Image.Image:
    """Photo bytes -> the opened image, judged from its size and header alone (a decompression
    bomb is refused before any pixel is decoded); Rejected otherwise."""
    serve = info.serve
    if len(data) > serve.max_upload_bytes:
        raise Rejected("too_large", f"image of {len(data)} bytes exceeds {serve.max_upload_bytes}")
    try:
        return open_capped(data, serve.max_pixels)
    except Rejected:
        raise
    except Exception as err:  # PIL's many ways of failing on a bad file
        raise undecodable(err) from None


def prepare_image(img: Image.Image, info: PackagedModel) -> np.ndarray:
    """An opened photo -> the (size, size, 3) uint8 array the model takes; Rejected otherwise."""
    try:
        return checked_square(
            img, info.image_size, min_side=info.serve.min_side, resize=info.resize
        )
    except Rejected:
        raise
    except Exception as err:  # a decoder's or a resize's failure costs this photo only
        raise undecodable(err) from None


def model_input(data: bytes, info: PackagedModel) -> np.ndarray:
    """open_upload then prepare_image: photo bytes -> pixels, or Rejected."""
    return prepare_image(open_upload(data, info), info)


def classify_answer(probabilities: Sequence[float], info: PackagedModel) -> dict[str, Any]:
    """The answer for one photo's class probabilities (in info.classes order): the class, or
    the taxonomy ancestor, that evaluate's decision rule answers, its taxonomy level (the
    deepest, the number of levels, for a class), its probability as the confidence, and whether
    the photo goes to review instead (the label is then the class the rule would have given)."""
    values = [float(p) for p in probabilities]
    given = answer(np.array([values]), info.rule)
    return {
        "label": given.labels[0],
        "level": int(given.level[0]),
        "confidence": float(given.confidence[0]),
        "probabilities": dict(zip(info.classes, values, strict=True)),
        "abstain": bool(given.abstain[0]),
        "model_version": info.version,
    }


def category_check(declared: str, given: dict[str, Any], info: PackagedModel) -> tuple[bool, str]:
    """(matches, suggested category) of a classify_answer for a seller's declared class, as
    /check_category and batch scoring judge it. A class answer matches its own class; an
    ancestor answer (taxonomy back-off) every class under it. A confident mismatch suggests the
    answered class, or for an ancestor its most probable class; a match or an abstained answer
    suggests the declared class (nothing new)."""
    rule = info.rule
    level = given.get("level", rule.leaf_level)
    if level == rule.leaf_level:
        matches = given["label"] == declared
        suggestion = given["label"]
    else:
        tier = next(lv for lv in rule.backoff if lv.level == level)
        node = tier.nodes.index(given["label"])
        under = np.flatnonzero(tier.node_of == node)
        matches = bool(tier.node_of[info.classes.index(declared)] == node)
        p = np.array([given["probabilities"][info.classes[i]] for i in under])
        suggestion = info.classes[int(under[p.argmax()])]
    keep = matches or given["abstain"]
    return matches, declared if keep else suggestion
