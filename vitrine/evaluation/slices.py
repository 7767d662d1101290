"""Error slices: the winner's test accuracy and value by kind of photo, each with a 95% interval.

Slicing dimensions (params.yaml `evaluate.slices`):
  - orientation: portrait, landscape or square (width / height within `square_tolerance` of 1),
    from the photo's original width and height (collect's manifest, carried through dedupe's);
  - size: the original photo's shorter side, bucketed at `size_edges` pixels;
  - source: collect's source of the photo (an archive, a folder, a catalog);
  - each catalog metadata column named in `columns` (a seller, a country): collect keeps a
    catalog row's other columns as the photo's `meta` (JSON), dedupe's manifest carries it on.
    A column with more than `max_values` values keeps its most frequent ones, the rest pooled
    as "(other)"; a photo without the column is "(none)".

Per slice: its photos, accuracy with its Wilson score interval (correct on small counts and
near 0 or 1, where the normal interval leaves [0, 1]), and the value earned per 1,000 photos
(what each answer earned under the value model, a review's value for an abstained one) with a
normal interval of the mean (t = 1.96 · sd / √n; the mean of a few thousand bounded gains is
close to normal). Per dimension, the gap: best minus worst accuracy among the slices with at
least `min_photos` photos, and whether their intervals are disjoint; the dimension with the
largest gap is flagged, and its worst and best slices with it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vitrine.config import params_block
from vitrine.evaluation.metrics import ValueModel

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: two-sided 95% intervals
ORIENTATION, SIZE, SOURCE = "orientation", "size", "source"
NONE, OTHER = "(none)", "(other)"


@params_block
class SliceConfig:
    """params.yaml `evaluate.slices`."""

    square_tolerance: float  # |width / height - 1| at most this: a square photo
    size_edges: tuple[int, ...]  # shorter-side pixel edges of the size buckets, ascending
    columns: tuple[str, ...]  # catalog metadata columns (collect's `meta`) to slice by
    max_values: int  # per column, the most frequent values shown; the rest pooled
    min_photos: int  # a slice needs this many test photos to count in its dimension's gap


def check_slices(config: SliceConfig) -> None:
    if config.square_tolerance < 0:
        raise ValueError("evaluate.slices.square_tolerance must be >= 0")
    edges = list(config.size_edges)
    if any(e <= 0 for e in edges) or edges != sorted(set(edges)):
        raise ValueError(f"evaluate.slices.size_edges must be positive and ascending: {edges}")
    if config.max_values < 1 or config.min_photos < 1:
        raise ValueError("evaluate.slices.max_values and min_photos must be at least 1")
    reserved = {ORIENTATION, SIZE, SOURCE} & set(config.columns)
    if reserved:
        raise ValueError(f"evaluate.slices.columns: {sorted(reserved)} name built-in slices")


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion correct / n; (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(x: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """The mean of x and its normal 95% interval (the sample sd; a single photo: no width)."""
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean, mean
    half = z * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def orientation(width: np.ndarray, height: np.ndarray, tolerance: float) -> np.ndarray:
    ratio = width / np.maximum(height, 1)
    return np.where(
        np.abs(ratio - 1) <= tolerance,
        "square",
        np.where(ratio > 1, "landscape", "portrait"),
    )


def size_bucket(width: np.ndarray, height: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    """The shorter side's bucket: "<e0", "e0-e1 px", ..., ">=eN"."""
    names = [f"<{edges[0]} px"] if edges else ["all"]
    names += [f"{a}-{b - 1} px" for a, b in itertools.pairwise(edges)]
    if edges:
        names.append(f">={edges[-1]} px")
    side = np.minimum(width, height)
    return np.array(names, dtype=object)[np.searchsorted(np.asarray(edges), side, side="right")]


def meta_column(meta: pd.Series, column: str, max_values: int) -> np.ndarray:
    """One catalog column from collect's meta JSON; its rare values pooled as (other)."""

    def value(text: str) -> str:
        if not text:
            return NONE
        found = json.loads(text).get(column)
        return NONE if found is None or found == "" else str(found)

    values = meta.fillna("").map(value)
    kept = set(values.value_counts().index[:max_values])
    return values.where(values.isin(kept), OTHER).to_numpy(dtype=object)


def slice_photos(photos: pd.DataFrame, config: SliceConfig) -> dict[str, np.ndarray]:
    """Each dimension's value per photo. photos: columns width, height, source, meta."""
    width = photos["width"].to_numpy(dtype=np.float64)
    height = photos["height"].to_numpy(dtype=np.float64)
    dims = {
        ORIENTATION: orientation(width, height, config.square_tolerance),
        SIZE: size_bucket(width, height, config.size_edges),
        SOURCE: photos["source"].astype(str).to_numpy(dtype=object),
    }
    for column in config.columns:
        dims[column] = meta_column(photos["meta"], column, config.max_values)
    return dims


def one_slice(name: str, correct: np.ndarray, earned: np.ndarray) -> dict[str, Any]:
    n, right = len(correct), int(correct.sum())
    low, high = wilson_interval(right, n)
    value, value_low, value_high = mean_interval(earned)
    return {
        "slice": name,
        "n": n,
        "accuracy": right / n,
        "accuracy_low": low,
        "accuracy_high": high,
        "value_per_1000": 1000 * value,
        "value_low": 1000 * value_low,
        "value_high": 1000 * value_high,
        "flagged": False,
    }


def dimension(
    groups: np.ndarray, correct: np.ndarray, earned: np.ndarray, min_photos: int
) -> dict[str, Any]:
    """A dimension's slices (largest first) and its accuracy gap among the slices of at least
    min_photos photos (None with fewer than two of them)."""
    frame = pd.DataFrame({"g": groups, "c": correct, "e": earned})
    rows = [
        one_slice(str(g), part["c"].to_numpy(), part["e"].to_numpy())
        for g, part in frame.groupby("g", sort=True)
    ]
    rows.sort(key=lambda r: (-r["n"], r["slice"]))
    counted = [r for r in rows if r["n"] >= min_photos]
    if len(counted) < 2:
        return {"slices": rows, "gap": None, "worst": None, "best": None, "separated": False}
    worst = min(counted, key=lambda r: (r["accuracy"], r["slice"]))
    best = max(counted, key=lambda r: (r["accuracy"], r["slice"]))
    return {
        "slices": rows,
        "gap": best["accuracy"] - worst["accuracy"],
        "worst": worst["slice"],
        "best": best["slice"],
        "separated": worst["accuracy_high"] < best["accuracy_low"],
    }


def photo_facts(predictions: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The test photos (predictions' rows, in order) with their original width, height and
    catalog meta from dedupe's manifest (columns id, width, height, meta)."""
    info = manifest.set_index("id")[["width", "height", "meta"]]
    missing = sorted(set(predictions["id"]) - set(info.index))
    if missing:
        raise ValueError(
            f"{len(missing)} test photo(s) are not in dedupe's manifest (e.g. {missing[:3]}): "
            "prepare and dedupe are out of step, run `dvc repro prepare`"
        )
    return predictions[["id", "source"]].join(info, on="id").reset_index(drop=True)


def error_slices(
    photos: pd.DataFrame, correct: np.ndarray, earned: np.ndarray, config: SliceConfig
) -> dict[str, Any]:
    """evaluate.json `slices`: per dimension its slices and gap; `largest_gap` names the
    dimension whose gap is largest (its worst and best slices `flagged`), null when no
    dimension has two slices of min_photos photos."""
    dims = {
        name: dimension(
            groups, np.asarray(correct, bool), np.asarray(earned, float), config.min_photos
        )
        for name, groups in slice_photos(photos, config).items()
    }
    gaps = {name: d["gap"] for name, d in dims.items() if d["gap"] is not None}
    largest = max(gaps, key=lambda name: gaps[name]) if gaps else None  # ties: the first
    if largest is not None:
        flagged = {dims[largest]["worst"], dims[largest]["best"]}
        for row in dims[largest]["slices"]:
            row["flagged"] = row["slice"] in flagged
    return {"min_photos": config.min_photos, "largest_gap": largest, "dimensions": dims}


CHART_WIDTH = 120  # px of a slice's accuracy bar on the evaluation page


def slices_page(slices: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation page's slices section (None when evaluate computed none): per dimension,
    its rows as shown, each with its accuracy bar and interval in SVG pixels."""
    if not slices:
        return None
    largest = slices["largest_gap"]

    def px(x: float) -> str:
        return f"{x * CHART_WIDTH:.1f}"

    dimensions = []
    for name, found in slices["dimensions"].items():
        rows = [
            {
                "slice": r["slice"],
                "n": r["n"],
                "accuracy": f"{r['accuracy']:.3f}",
                "accuracy_interval": f"{r['accuracy_low']:.3f}-{r['accuracy_high']:.3f}",
                "value": f"{r['value_per_1000']:.0f}",
                "value_interval": f"{r['value_low']:.0f} to {r['value_high']:.0f}",
                "flagged": r["flagged"],
                "counted": r["n"] >= slices["min_photos"],
                "bar": px(r["accuracy"]),
                "low": px(r["accuracy_low"]),
                "high": px(r["accuracy_high"]),
            }
            for r in found["slices"]
        ]
        gap = found["gap"]
        dimensions.append(
            {
                "name": name,
                "rows": rows,
                "gap": "n/a" if gap is None else f"{gap:.3f}",
                "worst": found["worst"],
                "best": found["best"],
                "separated": found["separated"],
                "largest": name == largest,
            }
        )
    return {
        "dimensions": dimensions,
        "largest": largest,
        "min_photos": slices["min_photos"],
        "width": CHART_WIDTH,
    }


def earned(predictions: pd.DataFrame, values: ValueModel) -> np.ndarray:
    """What each test answer earned: the predictions' `earned` column where evaluate wrote
    one, else its gain, or a review's value where it abstained."""
    if "earned" in predictions:
        return predictions["earned"].to_numpy(np.float64)
    actual = predictions["label"].map({c: i for i, c in enumerate(values.classes)}).to_numpy()
    reviewed = values.review_gain()[actual]
    return np.where(predictions["abstained"].to_numpy(bool), reviewed, predictions["gain"])


def report_slices(
    predictions: pd.DataFrame, values: ValueModel, manifest: Path | None, config: SliceConfig
) -> dict[str, Any]:
    """evaluate.json `slices` of the winner's test predictions, the photos' sizes and catalog
    columns read from dedupe's manifest (`manifest`); {} without one."""
    if manifest is None:
        return {}
    if not manifest.is_file():
        raise ValueError(f"{manifest} is missing: run `dvc repro dedupe`")
    info = pd.read_parquet(manifest, columns=["id", "width", "height", "meta"])
    correct = (predictions["label"] == predictions["predicted"]).to_numpy()
    return error_slices(
        photo_facts(predictions, info), correct, earned(predictions, values), config
    )
