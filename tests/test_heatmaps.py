"""Grad-CAM heat maps (vitrine/evaluation/heatmaps.py) and their place on the evaluation page."""

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from tests.helpers.evaluation_report import page_report
from tests.helpers.html import Text
from vitrine.evaluation.heatmaps import heat_maps, last_conv, mistake_heatmaps
from vitrine.evaluation.metrics import value_model
from vitrine.evaluation.report import costliest, render_report
from vitrine.model.networks import Predictor, build_predictor

H, W = 48, 64  # not square: a transposed heat map would show


class Corner(nn.Module):
    """Zeroes the input outside one quarter: the network sees only that corner."""

    def __init__(self, top: bool, left: bool) -> None:
        super().__init__()
        self.top, self.left = top, left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        mask = torch.zeros_like(x)
        rows = slice(0, h) if self.top else slice(h, None)
        cols = slice(0, w) if self.left else slice(w, None)
        mask[..., rows, cols] = 1
        return x * mask


def corner_network(top: bool, left: bool) -> Predictor:
    """Its class 0 logit sums what one convolution finds in the corner: class 0 depends on
    that corner alone."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    head = nn.Linear(8, 2)
    with torch.no_grad():
        conv.weight.abs_()
        head.weight.copy_(torch.stack([torch.ones(8), -torch.ones(8)]))
    net = nn.Sequential(
        Corner(top, left), conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head
    )
    return Predictor(net, input_size=32, mean=0.0, std=255.0)


def photos(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, H, W, 3), dtype=np.uint8)


def test_heat_maps_have_the_photos_shape_and_lie_in_0_1() -> None:
    torch.manual_seed(0)
    predictor = build_predictor("lenet5", 2)
    maps = heat_maps(predictor, photos(), [0, 1, 0])
    assert maps.shape == (3, H, W) and maps.dtype == np.float32
    # scaled to [0, 1] per photo on the network's input; the resize back keeps it within
    assert maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0.5


@pytest.mark.parametrize(("top", "left"), [(True, True), (False, True), (True, False)])
def test_the_heat_lies_where_the_network_looks(top: bool, left: bool) -> None:
    maps = heat_maps(corner_network(top, left), photos(), [0, 0, 0])
    rows = slice(0, H // 2) if top else slice(H // 2, None)
    cols = slice(0, W // 2) if left else slice(W // 2, None)
    inside = maps[:, rows, cols].sum()
    assert inside / maps.sum() > 0.9  # the bilinear resize bleeds a little past the edge
    assert maps[:, rows, cols].mean() > 0.3


def test_the_callers_network_is_left_as_it_was() -> None:
    predictor = build_predictor("cnn64", 2).eval().requires_grad_(False)  # a frozen probe
    heat_maps(predictor, photos(1), [1])
    assert not any(p.requires_grad for p in predictor.parameters())
    assert not predictor._forward_hooks and not last_conv(predictor.net)._forward_hooks


def test_targets_must_match_the_photos() -> None:
    with pytest.raises(ValueError, match="target classes"):
        heat_maps(build_predictor("cnn64", 2), photos(2), [0])


def mistakes_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "index": [2, 0],
            "label": ["laptop", "phone"],
            "predicted": ["phone", "laptop"],
            "p_laptop": [0.2, 0.7],
            "p_phone": [0.8, 0.3],
        }
    )


def test_mistake_heatmaps_give_two_png_overlays_per_mistake() -> None:
    drawn = mistake_heatmaps(
        build_predictor("cnn64", 2), photos(), mistakes_table(), ("laptop", "phone"), 32
    )
    assert drawn["layer"] == "0" and drawn["reason"] == ""  # cnn64's one convolution
    assert set(drawn["maps"]) == {2, 0}
    for pair in drawn["maps"].values():
        assert set(pair) == {"predicted", "true"}
        for uri in pair.values():
            assert uri.startswith("data:image/png;base64,")
            image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
            assert image.format == "PNG" and max(image.size) == 32


def test_a_network_without_a_convolution_gets_a_reason() -> None:
    flat = Predictor(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), 8, 0.0, 255.0)
    drawn = mistake_heatmaps(flat, photos(), mistakes_table(), ("laptop", "phone"), 32)
    assert drawn["maps"] == {} and "no Conv2d" in drawn["reason"]


def page_inputs() -> list:
    classes = ("laptop", "phone")
    values = value_model(classes, {"laptop": 1.0, "phone": 1.5}, [], 0.5, 0.3)
    predictions = pd.DataFrame(
        {
            "id": [f"test-{i}" for i in range(4)],
            "label": ["laptop", "phone", "laptop", "phone"],
            "predicted": ["phone", "laptop", "laptop", "laptop"],
            "index": [0, 1, 2, 3],
            "confidence": [0.9, 0.8, 0.6, 0.7],
            "gain": [-0.5, -0.5, 1.0, -0.5],
            "abstained": [False, False, False, True],
            "p_laptop": [0.1, 0.8, 0.6, 0.7],
            "p_phone": [0.9, 0.2, 0.4, 0.3],
        }
    )
    scores = {
        "accuracy": 0.25,
        "macro_f1": 0.25,
        "business_weighted_accuracy": 0.2,
        "business_weighted_f1": 0.2,
        "expected_value_per_1000": -125.0,
    }
    report = page_report(classes, "cnn64", scores)
    reliability = [{"bin": 7, "confidence": 0.75, "accuracy": 0.5, "count": 4}]
    images = photos(4)
    return [report, {"cnn64": scores}, predictions, reliability, images, values]


def test_every_mistake_shown_has_its_two_heat_maps_on_the_page() -> None:
    report, candidates, predictions, reliability, images, values = page_inputs()
    shown = 2
    worst = costliest(predictions, shown)
    drawn = mistake_heatmaps(build_predictor("cnn64", 2), images, worst, values.classes, 64)
    page = render_report(report, candidates, predictions, reliability, images, values, shown, drawn)
    parsed = Text()
    parsed.feed(page)
    heat = [src for src in parsed.images if src.startswith("data:image/png")]
    assert len(heat) == 2 * shown
    assert "computed on the float network" in parsed.text
    for i in worst["index"]:
        assert drawn["maps"][int(i)]["predicted"] in heat
        assert drawn["maps"][int(i)]["true"] in heat
    assert page.count('class="heatmap predicted"') == page.count('class="heatmap true"') == shown
