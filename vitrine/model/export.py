"""How a trained Predictor becomes the model.onnx the service runs: evaluate scores exactly it.

export_onnx: the Predictor after its resize (normalisation and network) as ONNX, refused unless
ONNX Runtime, behind the shared resize, computes what the eager Predictor does.
quantize_int8: that model with static int8 weights and activations (ONNX Runtime, QDQ, per
channel), calibrated on training photos. On this machine's CPU (AVX-512 VNNI) the 192 px
EfficientNet-Lite0 then runs 1.6x faster (4.4 against 7.1 ms per image on one thread), and the
service's throughput rests on the network. Two kinds of convolution stay in float, measured on
the fine-tuned network's val photos:
- the high-resolution ones, output stride 4 or finer (the stem and EfficientNet's first two
  stages: 20% of its multiply-adds, the depthwise ones 9%). A network without dropout (529 val
  photos, fp32 95.5%) lost 18 answers (93.6%) with the first one quantized; one trained with
  dropout and stochastic depth (526 photos, business-weighted fp32 95.85%): 93.2% (22
  changed) with only the first in float, 95.4% (11 changed) with all of them (3.9 and 4.4 ms
  per image);
- the depthwise ones: quantized, val 94.9% (2.9 ms per image); in float, 96.2% (6 changed).
evaluate decides whether a quantized model is good enough to serve (evaluate.int8_max_loss).
calibrated_onnx: a model whose logits leave through evaluate's fitted probability calibration
(vitrine/evaluation/calibration.py), so every reader of model.onnx gets calibrated probabilities.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import Tensor

from vitrine.contracts import ONNX_MODEL_FILE, ServedRecord, read_served
from vitrine.evaluation.calibration import Calibration
from vitrine.model.networks import AfterResize, Predictor, parity_batch
from vitrine.runtime.network_input import network_input
from vitrine.runtime.onnx import OnnxPredictor

INPUT_NAME = "pixels"  # the float (N, 3, S, S) input after the shared resize
# ONNX Runtime fuses and reorders float operations: its logits drift from eager ones by a few
# 1e-6 (probabilities by less), still well inside the service's 1e-5 promise on probabilities.
ONNX_PARITY_ATOL = 5e-5
ONNX_OPSET = 17
CALIBRATION_BATCH = 1  # equal shapes: ORT's percentile calibrator stacks every batch's outputs
HIGH_RES_STRIDE = 4  # convolutions with outputs at this stride or finer stay float (docstring)


def max_output_diff(a: torch.nn.Module, b: torch.nn.Module, batch: Tensor) -> float:
    with torch.inference_mode():
        return (a(batch) - b(batch)).abs().max().item()


def export_onnx(predictor: Predictor, image_size: int, atol: float = ONNX_PARITY_ATOL) -> bytes:
    """The Predictor after its resize as ONNX (any batch size); refused unless ONNX Runtime,
    behind the shared resize, computes what the eager Predictor does."""
    size = predictor.input_size
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracing exporter's deprecation notice
        torch.onnx.export(
            AfterResize(predictor).eval(),
            (torch.zeros(1, 3, size, size),),
            # Typed as a path only, but the TorchScript exporter (dynamo=False) writes to a
            # file-like object as well.
            buffer,  # type: ignore[arg-type]
            input_names=[INPUT_NAME],
            output_names=["logits"],
            dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,  # traced: plain convolutions, no control flow to keep
        )
    model = buffer.getvalue()
    diff = max_output_diff(OnnxPredictor(model, size), predictor.eval(), parity_batch(image_size))
    if not diff <= atol:
        raise ValueError(f"ONNX model differs from eager by {diff:.3g} (> {atol:g})")
    return model


def calibration_photos(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n uint8 photos drawn without replacement (seeded, so the same each run), in order."""
    if n < 1:
        raise ValueError(f"int8 calibration needs at least one photo, got {n}")
    picked = np.random.default_rng(seed).permutation(len(images))[:n]
    return np.asarray(images[np.sort(picked)])


class _Batches(CalibrationDataReader):
    """The calibration photos behind the shared resize, as the service feeds the network."""

    def __init__(self, photos: np.ndarray, input_size: int):
        starts = range(0, len(photos), CALIBRATION_BATCH)
        self.batches: Iterator[dict[str, np.ndarray]] = (
            {INPUT_NAME: pixels(photos[i : i + CALIBRATION_BATCH], input_size)} for i in starts
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def pixels(photos: np.ndarray, input_size: int) -> np.ndarray:
    return network_input(torch.from_numpy(np.ascontiguousarray(photos)), input_size).numpy()


def output_strides(model: onnx.ModelProto) -> dict[str, int]:
    """Each node's output stride (input side / its output's side), for nodes with a 4-d output
    whose size shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model).graph
    sides = {
        v.name: v.type.tensor_type.shape.dim[-1].dim_value
        for v in [*inferred.input, *inferred.value_info, *inferred.output]
        if len(v.type.tensor_type.shape.dim) == 4
    }
    side = sides[model.graph.input[0].name]
    return {n.name: side // sides[n.output[0]] for n in model.graph.node if sides.get(n.output[0])}


def float_convs(model: onnx.ModelProto, float_strides: Collection[int] = ()) -> list[str]:
    """The convolutions kept in float, each measured (module docstring) to cost val accuracy in
    int8: the high-resolution ones, whose output stride is at most HIGH_RES_STRIDE (with it the
    first, which reads the pixels), every depthwise one (groups > 1), and every one whose output
    stride is in float_strides (`quantize_int8`)."""
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    if not convs:
        raise ValueError("the model has no convolution: nothing to quantize")
    strides = output_strides(model)

    def groups(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    return [
        node.name
        for node in convs
        if strides[node.name] <= HIGH_RES_STRIDE
        or strides[node.name] in float_strides
        or groups(node) > 1
    ]


def quantizable_strides(model: bytes) -> list[int]:
    """The output strides of the convolutions int8 would quantize (all but float_convs),
    coarsest first: the stages evaluate may keep in float, one at a time, when the int8 model
    loses on val."""
    graph = onnx.load_from_string(model)
    strides, kept = output_strides(graph), set(float_convs(graph))
    quantized = [n for n in graph.graph.node if n.op_type == "Conv" and n.name not in kept]
    return sorted({strides[n.name] for n in quantized}, reverse=True)


def quantize_int8(
    model: bytes,
    photos: np.ndarray,
    input_size: int,
    float_strides: Collection[int] = (),
    ranges: Path | None = None,
) -> bytes:
    """model (export_onnx's) with int8 weights (per channel) and activations, the activation
    ranges calibrated on `photos` (uint8 NHWC) at their 99.999th percentile, so that a few
    extreme values do not coarsen every other step; float_convs stay float.

    ranges: a file for the calibrated ranges (ONNX Runtime's calibration cache): written by the
    first call, read by later ones for the same model and photos, which then skip calibration.
    The ranges cover every tensor whichever convolutions stay float, so a retry with another
    float_strides gets the int8 model a fresh calibration would give, byte for byte. On 2 cores
    EfficientNet-Lite0's calibration at 192 px takes about 25 s over 128 photos and 5 s over 32:
    ONNX Runtime keeps every intermediate tensor of every photo for its histograms."""
    with tempfile.TemporaryDirectory(prefix="vitrine-int8-") as tmp:
        prepared, out = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Shape inference and graph fusions first, as ONNX Runtime advises before quantizing.
        quant_pre_process(onnx.load_from_string(model), prepared)
        quantize_static(
            prepared,
            out,
            _Batches(photos, input_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            nodes_to_exclude=float_convs(onnx.load(prepared), float_strides),
            calibration_cache_path=ranges,
        )
        return out.read_bytes()


def calibrated_onnx(model: bytes, calibration: Calibration) -> bytes:
    """model with its logits output replaced by logits / temperature + bias (same name, so
    readers of model.onnx need not know)."""
    graph = onnx.load_from_string(model)
    [output] = graph.graph.output
    raw, scaled = f"{output.name}_uncalibrated", f"{output.name}_scaled"
    for node in graph.graph.node:
        node.output[:] = [raw if name == output.name else name for name in node.output]
    temperature = np.array(calibration.temperature, dtype=np.float32)
    bias = np.array(calibration.bias, dtype=np.float32)
    graph.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(temperature, "calibration_temperature"),
            onnx.numpy_helper.from_array(bias, "calibration_bias"),
        ]
    )
    graph.graph.node.extend(
        [
            onnx.helper.make_node("Div", [raw, "calibration_temperature"], [scaled]),
            onnx.helper.make_node("Add", [scaled, "calibration_bias"], [output.name]),
        ]
    )
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


def checkpoint_digest(checkpoint: Path) -> str:
    """sha256 of the checkpoint a served model was exported from (served.json records it)."""
    with open(checkpoint, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def served_for(folder: Path, checkpoint: Path) -> tuple[bytes, ServedRecord]:
    """model.onnx and served.json as evaluate wrote them, after checking they were exported from
    `checkpoint` (a retrained candidate needs evaluate again)."""
    model, record = read_served(folder)
    if record.checkpoint_sha256 != checkpoint_digest(checkpoint):
        raise ValueError(
            f"{folder / ONNX_MODEL_FILE} was exported from another checkpoint than {checkpoint}: "
            "run `dvc repro evaluate`"
        )
    return model, record
