"""The packaged model under ONNX Runtime: what the service and package's scoring run.

model.onnx holds the Predictor after its resize (normalisation and network: float (N, 3, S, S)
-> logits), exported by the package stage and checked there against the eager Predictor. The
resize runs first, in torch, through vitrine.runtime.network_input: the code the Predictor itself
runs.
ONNX Runtime runs the network about twice as fast as TorchScript on one CPU thread (192 px
EfficientNet-Lite0: 7.5-8.4 ms per image against 16-21 ms): the service's throughput rests on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn
from tqdm import tqdm

from vitrine.contracts import ONNX_MODEL_FILE
from vitrine.runtime.network_input import network_input


def session(model: Path | bytes, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime CPU session on `threads` threads (one per serving worker's core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT's warnings are about its own choices
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OnnxPredictor(nn.Module):
    """model.onnx behind the shared resize: uint8 (N, H, W, 3) tensor -> logits, as the
    Predictor computes them."""

    def __init__(self, model: Path | bytes, input_size: int, threads: int = 1):
        super().__init__()
        self.session = session(model, threads)
        self.input = self.session.get_inputs()[0].name
        self.input_size = input_size

    def forward(self, images: Tensor) -> Tensor:
        x = network_input(images, self.input_size).numpy()
        return torch.from_numpy(self.session.run(None, {self.input: x})[0])


def load_onnx(folder: Path, image_size: int, input_size: int, threads: int = 1) -> OnnxPredictor:
    """model.onnx of a packaged model folder, warmed up so the first request is not slow."""
    predictor = OnnxPredictor(folder / ONNX_MODEL_FILE, input_size, threads)
    with torch.inference_mode():
        predictor(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8))
    return predictor


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int, desc: str) -> np.ndarray:
    """Logits for uint8 (N, H, W, 3) images, batch by batch with a progress bar.

    `model` maps uint8 NHWC to logits: an OnnxPredictor (onnx_proba: the computation the service
    runs), or a Predictor or TorchScript model.
    """
    model.eval()
    starts = range(0, len(images), batch_size)
    out = [
        model(torch.from_numpy(np.array(images[i : i + batch_size])))
        for i in tqdm(starts, desc=desc, unit="batch", leave=False)
    ]
    return torch.cat(out).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise, as the service computes it (torch, float32)."""
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def onnx_logits(
    model: Path | bytes, input_size: int, images: np.ndarray, batch_size: int, desc: str
) -> np.ndarray:
    """Logits under ONNX Runtime (model.onnx, as a file or its bytes) behind the shared resize,
    on every core: the same bits as the service's single thread."""
    predictor = OnnxPredictor(model, input_size, threads=torch.get_num_threads())
    return predict_logits(predictor, images, batch_size, desc)


def onnx_proba(
    model: Path | bytes, input_size: int, images: np.ndarray, batch_size: int, desc: str
) -> np.ndarray:
    """onnx_logits, softmaxed: the probabilities the service answers from."""
    return softmax(onnx_logits(model, input_size, images, batch_size, desc))
