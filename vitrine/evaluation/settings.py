"""params.yaml `evaluate:`: the value model, the primary metric and how candidates are served,
checked as one before any model is loaded. Read by evaluate and by package (which scores the
champion and the challenger with the same value model).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from vitrine.config import ConfigError, Count, NonNegative, params_block, stage_config
from vitrine.evaluation import metrics
from vitrine.evaluation.calibration import check_method
from vitrine.evaluation.slices import SliceConfig


@params_block
class EvaluateConfig:
    classes: tuple[str, ...]
    batch_size: Count
    primary_metric: str  # one of metrics.score_names(): picks the winner on val
    business_value: dict[str, float]  # per class; ignored when business_value_csv is set
    business_value_csv: str  # "" or a CSV with columns class,value (thousands of classes)
    cost_matrix: tuple[tuple[str, str, float], ...]  # [actual, predicted, cost] exceptions
    default_mistake_cost: NonNegative  # what any other wrong prediction costs
    review_cost: NonNegative  # what one human review of an abstained photo costs
    min_val_photos_per_class: Count  # val answers a class needs for a threshold of its own
    decision: str  # argmax | expected_value: how probabilities become an answer
    calibration: str  # none | temperature | temperature_bias, fitted on val (calibration.py)
    top_k: Count
    calibration_bins: Count
    promote_margin: NonNegative  # package: how much better than the champion a challenger must be
    taxonomy: metrics.Taxonomy
    mistakes_shown: int  # gallery of the costliest test mistakes in the HTML report
    slices: SliceConfig  # error slices of the test photos (vitrine/evaluation/slices.py)
    int8: tuple[str, ...]  # candidates served, and so scored, as int8 ONNX when int8 holds up
    int8_calibration_photos: Count  # train photos that set the int8 activation ranges
    int8_max_loss: NonNegative  # how far below the float model's val primary metric int8 may score
    # package: how far a challenger's open-set recall may fall below the champion's, and its
    # share of known photos called other rise above it (vitrine.evaluation.openset)
    open_set_max_loss: NonNegative = 0.02
    other_class: str = ""  # params.yaml's other_class ("": no open-set figures)


def load_config(params: Mapping[str, Any]) -> EvaluateConfig:
    return stage_config(EvaluateConfig, "evaluate", params)


def reviewed_source(params: Mapping[str, Any]) -> str:
    """The manifest source of the moderators' reviewed photos, `catalog:<feedback.catalog>`
    (pipeline/feedback.py exports that catalog, collect.sources lists it): evaluate scores the
    test photos from it on their own. "" when params.yaml has no feedback block."""
    catalog = (params.get("feedback") or {}).get("catalog")
    return f"catalog:{catalog}" if catalog else ""


def candidate_names(params: Mapping[str, Any]) -> tuple[str, ...]:
    names = tuple(params.get("candidates") or {})
    if not names:
        raise ValueError("params.yaml `candidates` is empty: there is nothing to evaluate")
    return names


def read_business_values(path: Path) -> dict[str, float]:
    """A CSV with columns class,value: one row per class."""
    if not path.is_file():
        raise ValueError(f"evaluate.business_value_csv: {path} is not a file")
    table = pd.read_csv(path, dtype={"class": str})
    if list(table.columns) != ["class", "value"]:
        raise ValueError(f"{path}: expected the columns class,value, got {list(table.columns)}")
    repeated = sorted(set(table.loc[table["class"].duplicated(), "class"]))
    if repeated:
        raise ValueError(f"{path}: class(es) listed more than once: {repeated[:10]}")
    value = pd.to_numeric(table["value"], errors="coerce")
    if value.isna().any():
        raise ValueError(f"{path}: no numeric value for {list(table.loc[value.isna(), 'class'])}")
    return dict(zip(table["class"], value.astype(float), strict=True))


def business_values(config: EvaluateConfig) -> dict[str, float]:
    if config.business_value_csv:
        return read_business_values(Path(config.business_value_csv))
    return config.business_value


def check_config(config: EvaluateConfig) -> metrics.ValueModel:
    """Every params mistake as one clear error before any model is loaded (a ConfigError, which
    a stage's command prints as one line); the value model."""
    try:
        return _checked(config)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _costs_problem(config: EvaluateConfig) -> str | None:
    """A cost_matrix exception is what a mistake loses: finite and not negative, one per pair
    (review_cost and default_mistake_cost are ranged by their types)."""
    pairs = Counter((actual, predicted) for actual, predicted, _ in config.cost_matrix)
    for actual, predicted, cost in config.cost_matrix:
        if not math.isfinite(cost) or cost < 0:
            return f"evaluate.cost_matrix [{actual}, {predicted}]: a finite cost >= 0, got {cost}"
    repeated = sorted(pair for pair, n in pairs.items() if n > 1)
    if repeated:
        return f"evaluate.cost_matrix: each [actual, predicted] pair once, {repeated} repeat"
    return None


def _checked(config: EvaluateConfig) -> metrics.ValueModel:
    problem = _costs_problem(config)
    if problem:
        raise ValueError(problem)
    values = metrics.value_model(
        config.classes,
        business_values(config),
        config.cost_matrix,
        config.default_mistake_cost,
        config.review_cost,
        config.decision,
    )
    metrics.check_taxonomy(config.classes, config.taxonomy)
    check_method(config.calibration)
    names = metrics.score_names(len(config.classes), config.top_k)
    if config.primary_metric not in names:
        raise ValueError(
            f"evaluate.primary_metric {config.primary_metric!r} is not a score; one of {names}"
        )
    if config.other_class and config.other_class not in config.classes:
        raise ValueError(f"other_class {config.other_class!r} is not one of the classes")
    return values


def check_int8(config: EvaluateConfig, candidates: tuple[str, ...]) -> None:
    unknown = sorted(set(config.int8) - set(candidates))
    if unknown:
        raise ValueError(f"evaluate.int8 names unknown candidate(s) {unknown}")
