"""Error slices (vitrine/evaluation/slices.py): counts, intervals and the flagged gap by hand."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.evaluate import evaluate, write_outputs
from tests.helpers import REPO
from tests.helpers.candidates import (
    constant_classifier,
    evaluate_config,
    write_checkpoint,
    write_prepared,
)
from tests.helpers.html import Text
from vitrine.config import load_params, load_paths
from vitrine.contracts import read_evaluation
from vitrine.data.layout import prepared_manifest_path
from vitrine.evaluation.slices import (
    SliceConfig,
    check_slices,
    error_slices,
    mean_interval,
    photo_facts,
    size_bucket,
    slices_page,
    wilson_interval,
)


def config(**overrides) -> SliceConfig:
    base = {
        "square_tolerance": 0.05,
        "size_edges": (64, 96),
        "columns": ("seller",),
        "max_values": 20,
        "min_photos": 2,
    }
    return SliceConfig(**{**base, **overrides})


def ten_photos() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """5 landscape 200x100 photos, 4 right (sellers A, A, A right, B right, B wrong), and
    5 portrait 50x100 ones without a seller, 1 right. A right answer earns 1, a wrong -0.5."""
    seller = ["A", "A", "A", "B", "B"]
    photos = pd.DataFrame(
        {
            "width": [200] * 5 + [50] * 5,
            "height": [100] * 10,
            "source": ["s"] * 10,
            "meta": [json.dumps({"seller": s}) for s in seller] + [""] * 5,
        }
    )
    correct = np.array([1, 1, 1, 1, 0, 1, 0, 0, 0, 0], bool)
    return photos, correct, np.where(correct, 1.0, -0.5)


def test_wilson_interval_by_hand() -> None:
    # p = 0.8, n = 5, z = 1.96: centre (0.8 + z²/10) / (1 + z²/5) = 0.6697, half-width
    # z·sqrt(0.8·0.2/5 + z²/100) / (1 + z²/5) = 0.2941.
    assert wilson_interval(4, 5) == pytest.approx((0.3755, 0.9638), abs=1e-4)
    assert wilson_interval(1, 5) == pytest.approx((0.0362, 0.6245), abs=1e-4)
    low, high = wilson_interval(0, 3)
    assert (
        low == pytest.approx(0.0, abs=1e-12) and 0 < high < 1
    )  # within [0, 1] where the normal interval is not
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mean_interval_by_hand() -> None:
    # [1, 1, 1, 1, -0.5]: mean 0.7, sd sqrt(1.8 / 4) = 0.6708, half 1.96 · 0.6708 / sqrt(5) = 0.588
    assert mean_interval(np.array([1, 1, 1, 1, -0.5])) == pytest.approx(
        (0.7, 0.112, 1.288), abs=1e-3
    )


def test_slices_by_hand() -> None:
    photos, correct, earned = ten_photos()
    found = error_slices(photos, correct, earned, config())
    dims = found["dimensions"]
    orientation = {r["slice"]: r for r in dims["orientation"]["slices"]}
    assert set(orientation) == {"landscape", "portrait"}
    land, portrait = orientation["landscape"], orientation["portrait"]
    assert (land["n"], land["accuracy"], portrait["accuracy"]) == (5, 0.8, 0.2)
    assert (land["accuracy_low"], land["accuracy_high"]) == pytest.approx((0.3755, 0.9638), 1e-3)
    assert (land["value_per_1000"], land["value_low"]) == pytest.approx((700, 112), abs=1)
    assert portrait["value_per_1000"] == pytest.approx(1000 * (1 - 4 * 0.5) / 5)
    assert dims["orientation"]["gap"] == pytest.approx(0.6)
    assert dims["orientation"]["separated"] is False  # 0.6245 > 0.3755: the intervals overlap
    # size: the shorter side, 100 px (>=96) for the landscape photos, 50 px (<64) for the rest
    assert {r["slice"]: r["n"] for r in dims["size"]["slices"]} == {">=96 px": 5, "<64 px": 5}
    assert dims["source"]["gap"] is None  # one source: nothing to compare
    seller = {r["slice"]: r for r in dims["seller"]["slices"]}
    assert {k: (r["n"], r["accuracy"]) for k, r in seller.items()} == {
        "A": (3, 1.0),
        "B": (2, 0.5),
        "(none)": (5, 0.2),
    }
    # the largest gap: seller, A (1.0) against (none) (0.2), both flagged, B not
    assert found["largest_gap"] == "seller"
    assert dims["seller"]["gap"] == pytest.approx(0.8)
    assert (dims["seller"]["worst"], dims["seller"]["best"]) == ("(none)", "A")
    assert {k for k, r in seller.items() if r["flagged"]} == {"A", "(none)"}
    assert not any(r["flagged"] for r in dims["orientation"]["slices"])


def test_small_slices_stay_out_of_the_gap() -> None:
    photos, correct, earned = ten_photos()
    found = error_slices(photos, correct, earned, config(min_photos=3))
    assert found["dimensions"]["seller"]["worst"] == "(none)"  # B (2 photos) not compared
    assert found["dimensions"]["seller"]["gap"] == pytest.approx(0.8)
    assert error_slices(photos, correct, earned, config(min_photos=6))["largest_gap"] is None


def test_rare_catalog_values_are_pooled() -> None:
    photos, correct, earned = ten_photos()
    found = error_slices(photos, correct, earned, config(max_values=1))
    counts = {r["slice"]: r["n"] for r in found["dimensions"]["seller"]["slices"]}
    assert counts == {"(none)": 5, "(other)": 5}


def test_orientation_square_and_size_edges() -> None:
    photos = pd.DataFrame(
        {"width": [100, 104, 90, 63], "height": [100, 100, 100, 64], "source": "s", "meta": ""}
    )
    found = error_slices(photos, np.ones(4, bool), np.ones(4), config(columns=()))
    orientation = {r["slice"]: r["n"] for r in found["dimensions"]["orientation"]["slices"]}
    assert orientation == {"square": 3, "portrait": 1}  # 104/100 within 5% of square
    assert list(size_bucket(np.array([63, 64, 95, 96]), np.array([500] * 4), (64, 96))) == [
        "<64 px",
        "64-95 px",
        "64-95 px",
        ">=96 px",
    ]


def test_test_photos_join_dedupe_manifest_and_name_the_missing() -> None:
    predictions = pd.DataFrame({"id": ["b", "a"], "source": ["s", "t"]})
    manifest = pd.DataFrame(
        {"id": ["a", "b", "c"], "width": [1, 2, 3], "height": [4, 5, 6], "meta": ["", "", ""]}
    )
    joined = photo_facts(predictions, manifest)
    assert list(joined["id"]) == ["b", "a"] and list(joined["width"]) == [2, 1]
    with pytest.raises(ValueError, match="not in dedupe's manifest"):
        photo_facts(pd.DataFrame({"id": ["zz"], "source": ["s"]}), manifest)


@pytest.mark.parametrize(
    "bad",
    [{"size_edges": (96, 64)}, {"square_tolerance": -1.0}, {"columns": ("source",)}],
)
def test_bad_slice_params_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=r"evaluate\.slices"):
        check_slices(config(**bad))


def test_page_rows_carry_the_flag() -> None:
    photos, correct, earned = ten_photos()
    page = slices_page(error_slices(photos, correct, earned, config()))
    assert page is not None and page["largest"] == "seller"
    seller = next(d for d in page["dimensions"] if d["name"] == "seller")
    assert seller["largest"] and seller["gap"] == "0.800"
    assert [r["slice"] for r in seller["rows"] if r["flagged"]] == ["(none)", "A"]
    assert slices_page({}) is None


def test_evaluate_reports_the_slices_on_the_page_and_in_evaluate_json(tmp_path: Path) -> None:
    """always_laptop on the tiny test split: its 6 laptops (landscape here) right, its 2 phones
    (portrait) wrong; evaluate reads the photos' sizes from dedupe's manifest."""
    prepared = write_prepared(tmp_path / "prepared")
    write_checkpoint(constant_classifier(0), tmp_path / "models" / "always_laptop")
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    phone = manifest["label"] == "phone"
    deduped = manifest[["id"]].assign(
        width=np.where(phone, 60, 120), height=80, meta=json.dumps({"seller": "A"})
    )
    deduped.to_parquet(tmp_path / "deduped.parquet")
    cfg = evaluate_config(mistakes_shown=2, slices=config(min_photos=2))
    result = evaluate(
        cfg, ("always_laptop",), prepared, tmp_path / "models", deduped=tmp_path / "deduped.parquet"
    )
    found = result.report.slices
    orientation = {r["slice"]: r for r in found["dimensions"]["orientation"]["slices"]}
    assert {k: (r["n"], r["accuracy"]) for k, r in orientation.items()} == {
        "landscape": (6, 1.0),
        "portrait": (2, 0.0),
    }
    assert found["largest_gap"] == "orientation"  # size (60 vs 80 px) ties it: the first wins
    assert found["dimensions"]["seller"]["gap"] is None  # one seller
    paths = stage_paths(tmp_path / "out")
    write_outputs(result, paths, cfg.mistakes_shown)
    assert read_evaluation(paths.evaluate_report).slices == found
    parsed = Text()
    parsed.feed(paths.evaluation_html.read_text())
    assert "Error slices" in parsed.text and "Largest gap: orientation" in parsed.text
    assert "portrait flagged" in parsed.text and "landscape flagged" in parsed.text


def stage_paths(root: Path):
    params = load_params(REPO / "params.yaml")
    return load_paths({"paths": {k: str(root / v) for k, v in params["paths"].items()}})
