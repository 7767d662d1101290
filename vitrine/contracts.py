"""What the service needs to know besides the weights, as the package stage writes it.

The Bento carries no params.yaml: package copies the `serve:` block (as ServeConfig) and the
abstain threshold evaluate chose into the packaged model's model.json (the `serve:` block also
into a champion it keeps), and the service reads them back from there: the deployed model runs
under the limits of the last `dvc repro package`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitrine.config import from_mapping

# The model the service loads from the BentoML store, as `<name>:latest`.
MODEL_NAME_ENV = "VITRINE_MODEL_NAME"
DEFAULT_MODEL_NAME = "vitrine-classifier"

# Files inside the packaged model folder (the DVC output and the BentoML store model alike).
SCRIPTED_MODEL_FILE = "model.pt"  # TorchScript: the framework's portable export
ONNX_MODEL_FILE = "model.onnx"  # what the service runs (vitrine/runtime/onnx.py)
MODEL_INFO_FILE = "model.json"
MODEL_CARD_FILE = "model_card.md"


@dataclass(frozen=True)
class ServeConfig:
    max_upload_bytes: int  # one photo; a larger upload is refused with a 413
    max_pixels: int  # width x height, checked from the header before anything is decoded
    min_side: int  # shorter side in pixels
    max_batch_images: int  # image parts in one /classify_batch request
    max_batch_bytes: int  # the whole /classify_batch request body
    max_batch_size: int  # adaptive batching: most images in one forward pass
    max_batch_wait_ms: float  # adaptive batching: how long a lone image waits for company
    workers: int  # serving processes, each with its own copy of the model
    torch_threads: int  # intra-op threads of each worker's forward pass (ONNX Runtime's too)
    # Forward passes running at once in a worker, a thread each. A default, unlike the others:
    # a stored model packaged before it existed still loads (and runs one pass at a time) until
    # the next `dvc repro package` writes the current serve: block into it.
    concurrent_batches: int = 1
    # With workers > 1: each worker ends one keep-alive connection in this many responses, so
    # that clients reconnect to the least busy worker (service/rebalance.py); 0: never. A
    # default for the same reason as concurrent_batches.
    rebalance_every: int = 0


@dataclass(frozen=True)
class PackageInfo:
    classes: tuple[str, ...]
    image_size: int  # side of the square vitrine.images.load_square produces
    input_size: int  # the network's input side (vitrine.model.network_input resizes to it)
    version: str
    abstain_threshold: float  # answers below this confidence abstain (0.0: never)
    serve: ServeConfig
    # vitrine.runtime.decisions.decide's gain matrix, as evaluate scored the model; None: the most
    # probable class (also for models packaged before decisions existed, as they were scored).
    decision_gain: np.ndarray | None = None


def read_package_info(folder: Path) -> PackageInfo:
    """model.json of a packaged model folder (the DVC output or the stored BentoML model)."""
    info = json.loads((folder / MODEL_INFO_FILE).read_text())
    gain = info.get("decision_gain")
    return PackageInfo(
        classes=tuple(str(c) for c in info["classes"]),
        image_size=int(info["image_size"]),
        input_size=int(info["input_size"]),
        version=str(info["model_version"]),
        abstain_threshold=float(info["abstain_threshold"]),
        serve=from_mapping(ServeConfig, info["serve"], "model.json serve"),
        decision_gain=None if gain is None else np.array(gain, dtype=np.float64),
    )
