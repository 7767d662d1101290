"""Hand-built candidates whose behaviour is known, on a tiny prepared dataset of dark laptops
and bright phones, so that every score of evaluate, package and the service can be worked out by
hand: always laptop, always phone, or dark = laptop / bright = phone.
"""

from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np
import onnx
import pandas as pd
import torch

from tests.helpers import REPO
from vitrine.config import load_params
from vitrine.contracts import (
    FP32,
    INT8,
    EvaluationReport,
    Provenance,
    ServedRecord,
    TrainedModel,
    read_trained,
    write_served,
    write_trained,
)
from vitrine.data.layout import prepared_manifest_path, split_images_path
from vitrine.evaluation.calibration import Calibration
from vitrine.evaluation.metrics import Taxonomy
from vitrine.evaluation.settings import EvaluateConfig
from vitrine.evaluation.slices import SliceConfig
from vitrine.model.export import calibrated_onnx, checkpoint_digest, export_onnx, quantize_int8
from vitrine.model.networks import ImageClassifier
from vitrine.packaging.bundle import load_predictor, serve_settings

CLASSES = ("laptop", "phone")
SERVE = serve_settings(load_params(REPO / "params.yaml"), "cnn64")  # the repository's limits
SIDE = 32  # prepared image side
# (laptops, phones) per split
COUNTS = {"train": (4, 4), "val": (4, 4), "test": (6, 2)}


def write_prepared(root: Path, counts: dict = COUNTS) -> Path:
    """A prepared dataset: dark laptops (0-99) and bright phones (156-255), SIDE x SIDE."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, (laptops, phones) in counts.items():
        labels = [0] * laptops + [1] * phones
        low = [0 if y == 0 else 156 for y in labels]
        images = np.stack([rng.integers(lo, lo + 100, (SIDE, SIDE, 3)) for lo in low])
        np.save(split_images_path(root, split), images.astype(np.uint8))
        rows += [
            {
                "id": f"{split}-{i}",
                "source": "s",
                "label": CLASSES[y],
                "cluster_id": f"{split}{i}",
                "split": split,
                "index": i,
            }
            for i, y in enumerate(labels)
        ]
    pd.DataFrame(rows).to_parquet(prepared_manifest_path(root))
    return root


def constant_classifier(favoured: int, margin: float = 2.0) -> ImageClassifier:
    """cnn64 answering class `favoured` for every photo (softmax of a `margin` logit gap)."""
    module = ImageClassifier("cnn64", list(CLASSES), lr=1e-3)
    head = module.predictor.net[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[favoured] = margin
    return module


def brightness_classifier() -> ImageClassifier:
    """cnn64 answering phone for bright photos and laptop for dark ones: right on every photo.

    The convolution averages the pixels (scaled to 0..1) minus 0.5, so only bright photos
    light the ReLU; the head turns their total into the phone logit.
    """
    module = ImageClassifier("cnn64", list(CLASSES), lr=1e-3)
    conv, head = module.predictor.net[0], module.predictor.net[-1]
    with torch.no_grad():
        conv.weight.fill_(1 / conv.weight[0].numel())
        conv.bias.fill_(-0.5)
        head.weight.zero_()
        head.weight[1].fill_(10 / head.weight.shape[1])
        head.bias.copy_(torch.tensor([1.0, 0.0]))
    return module


def write_checkpoint(
    module: ImageClassifier, model_dir: Path, image_size: int = SIDE, resize: str = "squeeze"
) -> Path:
    """What train leaves in <paths.model>/<candidate>: a Lightning checkpoint and model.json."""
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        model_dir / "best.ckpt",
    )
    classes = tuple(module.hparams.classes)
    input_size = module.predictor.input_size
    trained = TrainedModel(module.hparams.model, classes, image_size, input_size, resize)
    write_trained(trained, model_dir)
    return model_dir


def evaluate_config(**overrides) -> EvaluateConfig:
    base = {
        "classes": CLASSES,
        "batch_size": 3,
        "primary_metric": "business_weighted_accuracy",
        "business_value": {"laptop": 1.0, "phone": 1.5},
        "business_value_csv": "",
        "cost_matrix": (("phone", "laptop", 1.0),),
        "default_mistake_cost": 0.5,
        "review_cost": 0.3,
        "min_val_photos_per_class": 30,
        "decision": "argmax",
        "calibration": "none",
        "top_k": 2,
        "calibration_bins": 10,
        "promote_margin": 0.005,
        "taxonomy": Taxonomy("/", (1.0,)),
        "mistakes_shown": 4,
        "slices": SliceConfig(0.05, (64, 96), (), 20, 20),
        "int8": (),
        "int8_calibration_photos": 4,
        "int8_max_loss": 0.005,
    }
    return EvaluateConfig(**{**base, **overrides})


def quantized_weights(model: bytes) -> list[bool]:
    """Per convolution, in graph order: are its weights int8 (fed by a DequantizeLinear)?"""
    graph = onnx.load_from_string(model).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [node.input[1] in dequantized for node in graph.node if node.op_type == "Conv"]


def serve_checkpoint(
    model_dir: Path,
    served: Path,
    photos: np.ndarray | None = None,
    calibration: Calibration | None = None,
) -> Path:
    """What evaluate writes for a candidate: its model.onnx in float, or in int8 calibrated on
    `photos` (uint8 NHWC), its probabilities calibrated when `calibration` is given."""
    trained = read_trained(model_dir)
    model = export_onnx(load_predictor(model_dir / "best.ckpt", trained), trained.image_size)
    precision = FP32
    if photos is not None:
        model, precision = quantize_int8(model, photos, trained.input_size), INT8
    fitted: dict[str, object] = {"method": "none"}
    if calibration is not None:
        model = calibrated_onnx(model, calibration)
        fitted = {
            "method": "temperature_bias",
            "temperature": calibration.temperature,
            "bias": dict(zip(CLASSES, calibration.bias, strict=True)),
        }
    digest = checkpoint_digest(model_dir / "best.ckpt")
    write_served(served, model, ServedRecord(precision, digest, fitted))
    return served


# What package records of the model's making; any values do in tests.
PROVENANCE = Provenance({}, {"path": "data/prepared", "md5": "m"}, "g")


def evaluation_report(test: dict | None = None, threshold: float = 0.0) -> EvaluationReport:
    """evaluate.json as package reads it: the winner's test scores and abstain threshold."""
    scores = {"accuracy": 0.5} if test is None else test
    return EvaluationReport(
        winner="x",
        primary_metric="business_weighted_accuracy",
        decision="argmax",
        ranking=("x",),
        business_values="params",
        val=scores,
        test=scores,
        calibration={},
        abstain={"threshold": threshold},
        served={},
    )
