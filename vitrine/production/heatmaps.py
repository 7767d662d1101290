"""Heat maps of the review queue's photos: which classes, and where their files lie.

`python -m pipeline.heatmaps` draws them (Grad-CAM, vitrine.evaluation.heatmaps) on the float
network of the packaged model (model.pt); the service, which runs model.onnx and no torch, only
finds and serves them (service/review.py). This module is what both agree on, without torch:

  <photos>-heatmaps/<weights version>/<sha256>.<class index>.png

<photos> is the photo store (serve.record.photos); the maps lie beside it, not inside it: its
retention sweep reads every sub-folder as photos (vitrine.production.photos). The weights'
version (PackagedModel.weights) names the float network the maps come from, which the float
and the int8 model.onnx of the same weights share; a map is the class's heat map over the photo
as the network sees it (the square of vitrine.images.load_square), as an overlaid PNG.

The true class is what a review is for, so a queued answer gets two maps (`targets`):
  - "answered": the class the model answered (its most probable class when the answer is a
    taxonomy ancestor);
  - "alternative": the seller's declared category when it is another class the model knows
    (a /check_category mismatch: the two classes the moderator decides between), else the
    runner-up, the class the model found most likely after the answered one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitrine.production.photos import STALE_TEMPORARY_S, TEMPORARY_SUFFIX
from vitrine.production.records import AnswerRecord

ANSWERED, ALTERNATIVE = "answered", "alternative"
WHICH = (ANSWERED, ALTERNATIVE)  # the maps of one answer, in the order the page shows them
SUFFIX = "-heatmaps"  # the maps' folder: the photo store's name with this after it
NETWORK = "float network"  # what the maps are computed on, as the page says
DECLARED, RUNNER_UP = "declared", "runner-up"  # roles of an "alternative" map


@dataclass(frozen=True)
class Target:
    """One heat map of an answer: which one, of which class, and why that class."""

    which: str  # ANSWERED or ALTERNATIVE
    class_index: int  # in the model's classes
    role: str  # ANSWERED, DECLARED or RUNNER_UP


def heatmap_root(photos: Path | str) -> Path:
    """The folder beside the photo store: data/production/photos -> .../photos-heatmaps."""
    store = Path(photos)
    return store.with_name(store.name + SUFFIX)


def heatmap_path(root: Path, version: str, sha256: str, class_index: int) -> Path:
    return root / version / f"{sha256}.{class_index}.png"


def targets(answer: AnswerRecord, classes: Sequence[str]) -> list[Target]:
    """The answer's heat maps (see the module's docstring): the answered class, then the
    alternative (none for a model of one class)."""
    by_probability = sorted(
        range(len(classes)), key=lambda i: -float(answer.probabilities.get(classes[i], 0.0))
    )
    if not by_probability:
        return []
    answered = classes.index(answer.label) if answer.label in classes else by_probability[0]
    found = [Target(ANSWERED, answered, ANSWERED)]
    declared = answer.declared_category
    if declared in classes and classes.index(declared) != answered:
        found.append(Target(ALTERNATIVE, classes.index(declared), DECLARED))
    else:
        runner_up = [i for i in by_probability if i != answered]
        if runner_up:
            found.append(Target(ALTERNATIVE, runner_up[0], RUNNER_UP))
    return found


def target(answer: AnswerRecord, classes: Sequence[str], which: str) -> Target | None:
    return next((t for t in targets(answer, classes) if t.which == which), None)


def queue_maps(
    answer: AnswerRecord, classes: Sequence[str], root: Path, version: str
) -> list[dict[str, Any]]:
    """The review queue's `heatmaps` of one answer: per map its class, role and URL (None:
    not drawn yet)."""
    return [
        {
            "which": t.which,
            "class": classes[t.class_index],
            "role": t.role,
            "url": (
                f"/review/heatmap/{answer.request_id}/{t.which}"
                if heatmap_path(root, version, answer.image_sha256, t.class_index).is_file()
                else None
            ),
        }
        for t in targets(answer, classes)
    ]


def prune(root: Path, photos: Path) -> int:
    """Delete every map whose photo the photo store no longer holds (its retention sweep
    deleted it), in every version's folder, and the folders left empty; how many maps."""
    removed = 0
    if not root.is_dir():
        return 0
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.endswith(TEMPORARY_SUFFIX):  # a killed run's, once it is stale
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - entry.stat().st_mtime > STALE_TEMPORARY_S:
                        entry.unlink()
                continue
            sha256 = entry.name.split(".", 1)[0]
            if not (photos / sha256[:2] / sha256).is_file():  # PhotoStore.path
                entry.unlink(missing_ok=True)
                removed += 1
        with contextlib.suppress(OSError):  # not empty
            folder.rmdir()
    return removed


def write_map(path: Path, png: bytes) -> None:
    """The PNG written under a temporary name, then renamed: the service never reads half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        temporary.write_bytes(png)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
