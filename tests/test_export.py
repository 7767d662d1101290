"""vitrine/model/export.py: what evaluate scores and package ships, in float or int8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn

from tests.helpers.candidates import quantized_weights
from vitrine.evaluation.calibration import Calibration
from vitrine.model.export import (
    calibrated_onnx,
    calibration_photos,
    export_onnx,
    float_convs,
    quantizable_strides,
    quantize_int8,
    served_for,
)
from vitrine.model.networks import Predictor
from vitrine.runtime.onnx import OnnxPredictor


def test_calibration_photos_are_a_seeded_sample_in_order() -> None:
    photos = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    picked = calibration_photos(photos, 4, seed=0)
    assert picked.ravel().tolist() == sorted(set(picked.ravel().tolist()))  # no repeats, sorted
    assert len(picked) == 4
    assert np.array_equal(picked, calibration_photos(photos, 4, seed=0))
    assert not np.array_equal(picked, calibration_photos(photos, 4, seed=1))
    assert len(calibration_photos(photos, 50, seed=0)) == 10  # all of a smaller split
    with pytest.raises(ValueError, match="at least one photo"):
        calibration_photos(photos, 0, seed=0)


class Strided(nn.Module):
    """A MobileNet-like stack on 32 px: convolutions at output strides 2, 4, 4, 8, 8, 8."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, 8, 3, stride=2, padding=1),  # stem, stride 2: float
                nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # depthwise, stride 4: float
                nn.Conv2d(8, 16, 1),  # pointwise, stride 4: float (high resolution)
                nn.Conv2d(16, 16, 3, stride=2, padding=1),  # full, stride 8: int8
                nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise, stride 8: float
                nn.Conv2d(16, 4, 1),  # pointwise, stride 8: int8
            ]
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean(dim=(2, 3)))


def test_int8_keeps_high_resolution_and_depthwise_convolutions_in_float() -> None:
    torch.manual_seed(0)
    model = export_onnx(Predictor(Strided(), 32, 127.5, 127.5).eval(), 32)
    photos = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    expected = [False, False, False, True, False, True]
    assert quantized_weights(quantize_int8(model, photos, 32)) == expected
    assert len(float_convs(onnx.load_from_string(model))) == expected.count(False)
    # evaluate's fallback when int8 loses: the coarser stages, one at a time, in float too.
    assert quantizable_strides(model) == [8]
    all_float = quantized_weights(quantize_int8(model, photos, 32, float_strides=(8,)))
    assert all_float == [False] * 6


def test_a_retry_reads_the_first_calibrations_ranges_and_gets_the_same_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = export_onnx(Predictor(Strided(), 32, 127.5, 127.5).eval(), 32)
    photos = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    ranges = tmp_path / "ranges.json"
    assert quantize_int8(model, photos, 32, ranges=ranges) == quantize_int8(model, photos, 32)
    assert ranges.is_file()
    # Black photos would calibrate other ranges: the retry reads the file instead.
    black = np.zeros_like(photos)
    retried = quantize_int8(model, black, 32, float_strides=(8,), ranges=ranges)
    assert retried == quantize_int8(model, photos, 32, float_strides=(8,))
    assert retried != quantize_int8(model, black, 32, float_strides=(8,))


def test_quantizable_strides_are_listed_coarsest_first() -> None:
    deeper = Strided()
    deeper.convs.append(nn.Conv2d(4, 4, 3, stride=2, padding=1))  # stride 16
    model = export_onnx(Predictor(deeper, 32, 127.5, 127.5).eval(), 32)
    assert quantizable_strides(model) == [16, 8]


def test_a_missing_served_model_names_the_stage_to_run(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"served.json is missing: run `dvc repro evaluate`"):
        served_for(tmp_path, tmp_path / "best.ckpt")


@pytest.mark.parametrize("int8", [False, True])
def test_a_calibrated_model_divides_its_logits_and_adds_the_bias(int8: bool) -> None:
    torch.manual_seed(0)
    model = export_onnx(Predictor(Strided(), 32, 127.5, 127.5).eval(), 32)
    photos = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    if int8:
        model = quantize_int8(model, photos, 32)
    calibrated = calibrated_onnx(model, Calibration(2.0, (0.25, -0.25)))
    batch = torch.from_numpy(photos)
    with torch.inference_mode():
        raw, scaled = (OnnxPredictor(m, 32)(batch) for m in (model, calibrated))
    assert torch.allclose(scaled, raw / 2.0 + torch.tensor([0.25, -0.25]), atol=1e-6)
    # Readers find the output under its old name.
    names = [o.name for o in onnx.load_from_string(calibrated).graph.output]
    assert names == [o.name for o in onnx.load_from_string(model).graph.output]
