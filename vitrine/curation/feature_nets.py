"""dedupe's two networks as one ONNX Runtime graph, and a batch of photos through it where a
Dask worker (or the caller) runs it.

The graph computes exactly what vitrine.model.embeddings computes in torch, at the same sizes:
the near-duplicate descriptor (`dedupe_embed`: stem and first five stages at 96 px, 2x2 GeM,
448-d) and the pooled 1280-d embedding (`embed`: the whole backbone at 224 px, fed from 128 px
squares upsampled by vitrine.runtime.network_input, as training's resize). The export is
refused unless ONNX Runtime's outputs match the eager networks' (`PARITY_ATOL`).

Why ONNX Runtime at these sizes: on 2 cores (`python benchmarks/neardup.py --parts d`) the
torch networks give about 25 photos/s for both features, ONNX Runtime 5-6 times that, with the
dedupe and noise figures unchanged (`benchmarks/neardup.py`, `benchmarks/noise.py`). Smaller
embedding inputs are cheaper still but change what the noise scores flag (measured on the
Avito photos without review decisions: at 128 px cleanlab flags 73 photos, 15 of them dropped
by the review, against 34 and 11 at 224 px; at 96 px, sharing the descriptor's pass, 135 and
30), so the 224 px embedding stays.

The model is loaded once per worker process: the first batch builds its session and later
batches find it in a process-wide cache keyed by the model's sha256 (the bytes are scattered
to every worker once, so a remote cluster needs no shared disk), on one thread: one worker
process per core.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitrine.compute import unpack
from vitrine.images import load_square
from vitrine.model.embeddings import (
    DEDUPE_DIM,
    DEDUPE_SIZE,
    FEATURE_DIM,
    INPUT_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    GeMDescriptor,
    dedupe_embed,
    embed,
    load_backbone,
)
from vitrine.runtime.network_input import network_input

EMBED_SIDE = 128  # the photos are ~120 px: decoding larger only upsamples
WIDTH = DEDUPE_DIM + FEATURE_DIM  # a photo's row: descriptor, then embedding
OPSET = 17
THREADS = 1  # per session: one worker process per core; part of the rounding (see features)
PARITY_ATOL = 1e-4  # ONNX Runtime against the eager networks, on unit-norm features
_SESSIONS: dict[str, Any] = {}  # model sha256 -> its InferenceSession, in this process


class DedupeFeatures(nn.Module):
    """Both networks on one shared backbone: uint8 (N, 96, 96, 3) squares and float (N, 3,
    224, 224) upsampled pixels -> (N, 448) descriptors and (N, 1280) embeddings, unit norm."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = load_backbone(0)
        self.descriptor = GeMDescriptor(self.backbone)

    def forward(self, small: Tensor, large: Tensor) -> tuple[Tensor, Tensor]:
        x = (small.permute(0, 3, 1, 2).float() - PIXEL_MEAN) / PIXEL_STD
        descriptors = F.normalize(self.descriptor(x), dim=1)
        embeddings = F.normalize(self.backbone((large - PIXEL_MEAN) / PIXEL_STD), dim=1)
        return descriptors, embeddings


def session(model: bytes) -> Any:
    """An ONNX Runtime CPU session on THREADS threads, errors only in its log.

    Without ONNX Runtime's memory arena: the arena keeps a batch's activations allocated after
    the batch (about 650 MiB per worker process at batch 64), where every worker and the stage's
    own photo features must fit together in 4 GiB at 160,000 photos; the features are the same
    bits either way.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _upsampled(squares: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return network_input(torch.from_numpy(squares), INPUT_SIZE).numpy()


def _run(runner: Any, small: np.ndarray, large: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    descriptors, embeddings = runner.run(None, {"small": small, "large": _upsampled(large)})
    return descriptors, embeddings


@lru_cache(maxsize=1)
def onnx_model() -> bytes:
    """DedupeFeatures as ONNX (any batch size), checked against the eager networks."""
    net = DedupeFeatures().eval()
    buffer = io.BytesIO()
    small = torch.zeros(1, DEDUPE_SIZE, DEDUPE_SIZE, 3, dtype=torch.uint8)
    large = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracing exporter's deprecation notice
        torch.onnx.export(
            net,
            (small, large),
            buffer,  # type: ignore[arg-type]  # a path in the stubs; a file object works too
            input_names=["small", "large"],
            output_names=["descriptors", "embeddings"],
            dynamic_axes={
                name: {0: "batch"} for name in ("small", "large", "descriptors", "embeddings")
            },
            opset_version=OPSET,
            dynamo=False,  # traced: plain convolutions, no control flow to keep
        )
    model = buffer.getvalue()
    rng = np.random.default_rng(0)
    small_px = rng.integers(0, 256, (4, DEDUPE_SIZE, DEDUPE_SIZE, 3), dtype=np.uint8)
    large_px = rng.integers(0, 256, (4, EMBED_SIDE, EMBED_SIDE, 3), dtype=np.uint8)
    got = _run(session(model), small_px, large_px)
    want = (
        dedupe_embed(small_px, len(small_px), model=net.descriptor),
        embed(large_px, len(large_px), model=net.backbone),
    )
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    if not diff <= PARITY_ATOL:
        raise ValueError(f"dedupe features under ONNX Runtime differ from torch by {diff:.3g}")
    return model


def model_digest(model: bytes) -> str:
    return hashlib.sha256(model).hexdigest()


def loaded(digest: str, model: bytes) -> Any:
    """The model's session in this process, built on first use (one model at a time)."""
    found = _SESSIONS.get(digest)
    if found is None:
        # Set before any torch work (the resize), so a forked worker never enters the parent's
        # thread pool; one thread per worker process, more only contend for its core.
        torch.set_num_threads(THREADS)
        _SESSIONS.clear()
        found = _SESSIONS[digest] = session(model)
    return found


def padded(pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """pixels with black squares appended up to batch_size rows."""
    n = len(pixels)
    if n > batch_size:
        raise ValueError(f"{n} photos in a batch of {batch_size}")
    pad = np.zeros((batch_size - n, *pixels.shape[1:]), dtype=pixels.dtype)
    return np.concatenate([pixels, pad]) if n < batch_size else pixels


def photo_features(
    payload: np.ndarray, ends: np.ndarray, model: bytes, digest: str, batch_size: int
) -> np.ndarray:
    """(n, WIDTH) float32 rows, descriptor then embedding, of the n encoded photos packed in
    payload/ends, computed as one batch of exactly batch_size (black squares pad it; their
    rows are dropped): a photo's rows then do not depend on how many others are computed
    with it."""
    blobs = list(unpack(payload, ends))
    n = len(blobs)
    small = padded(np.stack([load_square(b, DEDUPE_SIZE) for b in blobs]), batch_size)
    large = padded(np.stack([load_square(b, EMBED_SIDE) for b in blobs]), batch_size)
    descriptors, embeddings = _run(loaded(digest, model), small, large)
    return np.concatenate([descriptors[:n], embeddings[:n]], axis=1)


def rounding_settings() -> dict[str, Any]:
    """What changes a feature's last bits on the machine that computes it, besides code and
    library versions: the threads of a session and the CPU's vector instruction set."""
    return {"threads": THREADS, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
