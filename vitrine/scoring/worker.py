"""One chunk of photos -> class probabilities, where a Dask worker (or the caller) runs it.

A chunk's photos travel as one uint8 array and their end offsets (Dask ships numpy arrays
without copying each bytes object: vitrine.compute.pack). Each photo goes through
the service's checks and pixels (vitrine.runtime.answers), the accepted ones through model.onnx
behind the shared resize (vitrine.runtime.onnx.OnnxPredictor, as the service runs it) a batch
at a time, and the probabilities are the service's softmax of the logits.

The model is loaded once per worker process: the first chunk builds its ONNX Runtime session
and later chunks find it in a process-wide cache keyed by the model file's sha256 (the bytes
are scattered to every worker once, so a remote cluster needs no shared disk). torch and ONNX
Runtime are imported only here, on the worker: the calling process stays light, and forking
local workers from it stays safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vitrine.compute import unpack
from vitrine.contracts import PackagedModel
from vitrine.images import Rejected
from vitrine.runtime.answers import model_input

_LOADED: dict[str, Any] = {}  # model sha256 -> its OnnxPredictor, in this process


@dataclass(frozen=True)
class Scored:
    """A chunk's results, in chunk order."""

    rejected: dict[int, tuple[str, str]]  # index in the chunk -> (reason, detail)
    probabilities: np.ndarray  # float32 (accepted photos, classes), the accepted in order


def predictor(digest: str, model: bytes, info: PackagedModel, threads: int) -> Any:
    """The model's OnnxPredictor in this process, loaded and warmed up on first use (one model
    at a time: another digest replaces it)."""
    found = _LOADED.get(digest)
    if found is None:
        import torch  # here, not at the top: see the module docstring

        from vitrine.runtime.onnx import OnnxPredictor

        # One thread per worker process; more only contend for its core. Set before any torch
        # work, so a forked worker never enters the parent's thread pool.
        torch.set_num_threads(threads)
        _LOADED.clear()
        found = OnnxPredictor(model, info.input_size, threads)
        with torch.inference_mode():
            found(torch.zeros(1, info.image_size, info.image_size, 3, dtype=torch.uint8))
        _LOADED[digest] = found
    return found


def forward(module: Any, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 probabilities (N, classes), batch_size at a time: the
    service's forward pass (logits as float, softmax over the classes)."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            logits = module(torch.from_numpy(pixels[i : i + batch_size]))
            out.append(torch.softmax(logits.float(), dim=1).numpy())
    return np.concatenate(out)


def score_packed(
    payload: np.ndarray,
    ends: np.ndarray,
    model: bytes,
    digest: str,
    info: PackagedModel,
    batch_size: int,
    threads: int,
) -> Scored:
    """One chunk (packed by `pack`) -> its Scored: one Dask task."""
    rejected: dict[int, tuple[str, str]] = {}
    pixels: list[np.ndarray] = []
    for i, data in enumerate(unpack(payload, ends)):
        try:
            pixels.append(model_input(data, info))
        except Rejected as err:
            rejected[i] = (err.code, err.detail)
        except Exception as err:  # one odd file must not fail the chunk
            rejected[i] = ("undecodable", f"{type(err).__name__}: {err}")
    if not pixels:
        return Scored(rejected, np.zeros((0, len(info.classes)), np.float32))
    module = predictor(digest, model, info, threads)
    return Scored(rejected, forward(module, np.stack(pixels), batch_size))
