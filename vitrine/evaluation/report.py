"""reports/evaluation.html: one self-contained page (no external files) explaining the choice.

Candidates table, the winner's test scores, its confusion matrix ordered by business value, its
reliability diagram, the abstain threshold, the error slices (vitrine.evaluation.slices) and the
costliest test mistakes with thumbnails, each with its heat maps for the predicted and the true
class (vitrine.evaluation.heatmaps, computed by evaluate).

The layout is the jinja2 template templates/evaluation.html.j2; this module turns the
evaluation's results into plain values for it (numbers formatted as shown, thumbnails as data
URIs, tables as header and rows). The template escapes every value, so class names, candidate
names and photo ids cannot inject markup.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from vitrine import pages
from vitrine.evaluation.metrics import ValueModel
from vitrine.evaluation.openset import KNOWN_AS_OTHER, RECALL
from vitrine.evaluation.slices import slices_page

MAX_MATRIX_CLASSES = 50
THUMBNAIL_SIDE = 128
# The candidates table's columns besides the primary metric (HTML and Markdown alike).
TABLE_COLUMNS = ("accuracy", "macro_f1", "business_weighted_f1", "expected_value_per_1000")

TEMPLATE = Path(__file__).parent / "templates" / "evaluation.html.j2"

# What a prediction is, by evaluate.decision (vitrine/runtime/decisions.py).
ANSWERS = {
    "argmax": "Each photo is answered with its most probable class.",
    "expected_value": "Each photo is answered with the class whose expected gain under the "
    "business values and mistake costs is highest (evaluate.decision: expected_value).",
}


def cell(x: Any) -> dict[str, Any]:
    """A table cell: floats to 4 decimals; numbers are right-aligned."""
    return {
        "text": f"{x:.4f}" if isinstance(x, float) else str(x),
        "numeric": isinstance(x, int | float),
    }


def table(header: list[str], rows: list[list[Any]], highlight: int | None = None) -> dict[str, Any]:
    """A table's header and rows of cells; row `highlight` is marked as the winner."""
    return {
        "header": header,
        "rows": [
            {"win": i == highlight, "cells": [cell(c) for c in row]} for i, row in enumerate(rows)
        ],
    }


def candidates_table(
    candidates: dict[str, dict[str, Any]], ranking: list[str], primary: str
) -> dict[str, Any]:
    columns = list(dict.fromkeys([primary, *TABLE_COLUMNS]))
    rows = [[r, name, *(candidates[name][c] for c in columns)] for r, name in enumerate(ranking, 1)]
    return {
        "primary_metric": primary,
        "table": table(["rank", "candidate", *columns], rows, highlight=0),
    }


def winner_scores(test: dict[str, Any]) -> dict[str, Any]:
    """The winner's scalar test scores, per class and per taxonomy level."""
    scalar = [[k, v] for k, v in test.items() if isinstance(v, int | float)]
    per_class = [
        [c, s["precision"], s["recall"], s["f1"], s["support"]]
        for c, s in test["per_class"].items()
    ]
    levels = [
        [lv["level"], lv["classes"], lv["accuracy"], lv["macro_f1"]]
        for lv in test["taxonomy"]["levels"]
    ]
    return {
        "scores": table(["score", "value"], scalar),
        "per_class": table(["class", "precision", "recall", "F1", "photos"], per_class),
        "levels": table(["level", "classes", "accuracy", "macro F1"], levels),
        "depth_weighted_accuracy": f"{test['depth_weighted_accuracy']:.4f}",
    }


def confusion_matrix(predictions: pd.DataFrame, values: ValueModel) -> dict[str, Any]:
    """Rows actual, columns predicted; classes by business value (highest first), top 50.
    Each cell's colour: green on the diagonal, red off it, darker the more photos."""
    order = [values.classes[i] for i in np.argsort(-values.value, kind="stable")]
    order = order[:MAX_MATRIX_CLASSES]
    counts = pd.crosstab(predictions["label"], predictions["predicted"]).reindex(
        index=order, columns=order, fill_value=0
    )
    peak = max(int(counts.to_numpy().max()), 1)
    rows = []
    for actual in order:
        cells = []
        for predicted in order:
            n = int(counts.loc[actual, predicted])
            cells.append(
                {
                    "hue": 130 if actual == predicted else 5,
                    "light": f"{100 - 55 * n / peak:.0f}",
                    "count": n or "",
                }
            )
        rows.append({"actual": actual, "cells": cells})
    return {"classes": order, "rows": rows, "shown": len(order), "total": len(values.classes)}


def confusion_section(predictions: pd.DataFrame, values: ValueModel) -> str:
    """The confusion matrix section alone, as HTML (the page's own block)."""
    template = pages.template(TEMPLATE)
    context = template.new_context({"page": {"confusion": confusion_matrix(predictions, values)}})
    return "".join(template.blocks["confusion"](context))


def reliability_plot(curve: list[dict[str, float]], size: int = 260) -> dict[str, Any]:
    """The reliability diagram's geometry in SVG pixels: accuracy against mean confidence per
    bin (dot area grows with the bin's photos); the diagonal is perfect calibration."""
    pad = 30
    span = size - 2 * pad

    def xy(conf: float, acc: float) -> tuple[float, float]:
        return pad + conf * span, size - pad - acc * span

    points = [(*xy(p["confidence"], p["accuracy"]), p) for p in curve]
    (x0, y0), (x1, y1) = xy(0, 0), xy(1, 1)
    return {
        "size": size,
        "pad": pad,
        "span": span,
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
        "middle": size / 2,
        "bottom_label_y": size - 6,
        "path": "".join(
            f"{'L' if i else 'M'}{x:.1f},{y:.1f}" for i, (x, y, _) in enumerate(points)
        ),
        "dots": [
            {
                "cx": f"{x:.1f}",
                "cy": f"{y:.1f}",
                "r": f"{2 + min(p['count'], 400) ** 0.5 / 3:.1f}",
                "count": p["count"],
                "confidence": f"{p['confidence']:.3f}",
                "accuracy": f"{p['accuracy']:.3f}",
            }
            for x, y, p in points
        ],
        "ticks": [
            {
                "label": f"{t:g}",
                "x": f"{xy(t, 0)[0]:.1f}",
                "x_label_y": f"{y0 + 12:.1f}",
                "y_label_x": f"{x0 - 4:.1f}",
                "y": f"{xy(0, t)[1] + 3:.1f}",
            }
            for t in (0, 0.5, 1)
        ],
    }


def calibrated_with(fitted: dict[str, Any]) -> dict[str, str]:
    """How the winner's probabilities were calibrated on val (served.json's record)."""
    if fitted["method"] == "none":
        return {"method": "none"}
    return {
        "method": fitted["method"],
        "temperature": f"{fitted['temperature']:.3f}",
        "val_log_loss_uncalibrated": f"{fitted['val_log_loss_uncalibrated']:.4f}",
        "val_log_loss": f"{fitted['val_log_loss']:.4f}",
    }


def abstain_verdict(abstain: dict[str, Any]) -> str:
    """What the threshold means, for its two extremes: never (0), always (above 1), or ""."""
    if abstain["threshold"] == 0:
        return "never"
    if abstain["threshold"] > 1:
        return "always"
    return ""


def calibration(report: dict[str, Any], curve: list[dict[str, float]]) -> dict[str, Any]:
    cal, ab = report["calibration"], report["abstain"]
    return {
        "fitted": calibrated_with(report["served"][report["winner"]]["calibration"]),
        "val_ece": f"{cal['val_ece']:.4f}",
        "test_ece": f"{cal['test_ece']:.4f}",
        "bins": cal["bins"],
        "plot": reliability_plot(curve),
        "verdict": abstain_verdict(ab),
        "abstain": table(["abstain", "value"], [[k, v] for k, v in ab.items() if v is not None]),
    }


def thumbnail(pixels: np.ndarray) -> str:
    """A JPEG data URI (the page stays one file), at most THUMBNAIL_SIDE pixels a side."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def costliest(predictions: pd.DataFrame, shown: int) -> pd.DataFrame:
    """The `shown` wrong predictions that cost the most (lowest gain), most confident first on
    ties: the page's gallery, and the photos evaluate draws heat maps for."""
    wrong = predictions[predictions["label"] != predictions["predicted"]]
    return wrong.sort_values(["gain", "confidence"], ascending=[True, False]).head(shown)


def mistakes(
    predictions: pd.DataFrame,
    test_images: np.ndarray,
    shown: int,
    heatmaps: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The costliest wrong predictions; those below the abstain threshold are marked: the
    service would have sent them to review. heatmaps: evaluate's (heatmaps.mistake_heatmaps),
    each card's by its test photo's index, and the note saying how they were drawn."""
    wrong = predictions[predictions["label"] != predictions["predicted"]]
    worst = costliest(predictions, shown)
    drawn = heatmaps or {"maps": {}, "layer": "", "reason": "not drawn", "network": ""}
    cards = [
        {
            "thumbnail": thumbnail(test_images[int(r["index"])]),
            "id": str(r["id"]),
            "label": str(r["label"]),
            "predicted": str(r["predicted"]),
            "confidence": f"{r['confidence']:.3f}",
            "sent_to_review": bool(r["abstained"]),
            "cost": f"{-r['gain']:.2f}",
            "heatmaps": drawn["maps"].get(int(r["index"])),
        }
        for _, r in worst.iterrows()
    ]
    return {
        "cards": cards,
        "shown": len(worst),
        "wrong": len(wrong),
        "heatmaps": {k: drawn[k] for k in ("layer", "reason", "network")},
    }


def served_as(report: dict[str, Any]) -> dict[str, Any]:
    """How the winner is scored and served: its model.onnx's precision, and int8's val cost
    (None when it was not quantized)."""
    served = report["served"][report["winner"]]
    trial = served["int8"]  # vitrine.contracts.Int8Trial
    if trial is None:
        return {"precision": served["precision"], "int8": None}
    return {
        "precision": served["precision"],
        "int8": {
            "metric": trial["metric"],
            "int8": f"{trial['val_int8']:.4f}",
            "fp32": f"{trial['val_fp32']:.4f}",
            "changed": trial["val_answers_changed"],
        },
    }


def reviewed_summary(reviewed: dict[str, Any] | None) -> dict[str, Any] | None:
    """The winner on the reviewed production photos among the test photos (evaluate.json
    `reviewed`); None when no reviewed source is configured (nothing to show)."""
    if not reviewed or not reviewed.get("source"):
        return None

    def shown(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    return {
        "source": reviewed["source"],
        "n": reviewed["n"],
        "accuracy": shown(reviewed["accuracy"]),
        "business_weighted_accuracy": shown(reviewed["business_weighted_accuracy"]),
    }


def summary(report: dict[str, Any]) -> dict[str, Any]:
    test = report["test"]
    return {
        "winner": report["winner"],
        "primary_metric": report["primary_metric"],
        "n": test["n"],
        "accuracy": f"{test['accuracy']:.4f}",
        "business_weighted_accuracy": f"{test['business_weighted_accuracy']:.4f}",
        "expected_value_per_1000": f"{test['expected_value_per_1000']:.1f}",
        "answers": ANSWERS[report["decision"]],
        "served": served_as(report),
        "reviewed": reviewed_summary(report.get("reviewed")),
    }


def decisions_section(decisions: dict[str, Any]) -> dict[str, Any] | None:
    """The decision rule (evaluate.json `decisions`): thresholds per class, back-off, each
    rule's value per 1,000 photos, the test answers per taxonomy level; None: none reported."""
    if not decisions:
        return None

    def shown(x: float | None) -> Any:
        return "n/a" if x is None else x

    names = {
        "one_threshold": "one threshold",
        "class_thresholds": "a threshold per class",
        "class_thresholds_backoff": "a threshold per class, then taxonomy back-off (served)",
    }
    rules = []
    for name, r in decisions["rules"].items():
        val, test = r["val"], r["test"]
        ev = [f"{val['expected_value_per_1000']:.1f}", f"{test['expected_value_per_1000']:.1f}"]
        rules.append([names.get(name, name), *ev, shown(test["abstain_rate"])])
    levels = [
        [lv["level"], lv["answers"], shown(lv["accuracy"])] for lv in decisions["test_levels"]
    ]
    own = decisions["class_thresholds"].values()
    return {
        "fitted": sum(c["fitted"] for c in own),
        "classes": len(own),
        "min_photos": decisions["min_val_photos_per_class"],
        "shared": f"{decisions['shared_threshold']:.3f}",
        "backoff": ", ".join(
            f"level {b['level']} ({b['nodes']} nodes, value share {b['value_share']:g})"
            for b in decisions["backoff_levels"]
        ),
        "rules": table(["rule", "val value / 1,000", "test value / 1,000", "test abstain"], rules),
        "levels": table(["level", "test answers", "right"], levels),
    }


def open_set_section(open_set: dict[str, Any]) -> dict[str, Any] | None:
    """The off-category photos (evaluate.json `open_set`): on val and test, how many the served
    rule answered the other class or sent to review, and how many known photos it called other;
    None without an other class."""
    if not open_set:
        return None
    header = [
        "split",
        "off-category photos",
        "answered other",
        "sent to review",
        "open-set recall",
        "known photos",
        "known called other",
        "share",
    ]
    keys = ("off_category_photos", "answered_other", "abstained", RECALL, "known_photos")
    rows = [
        [
            split,
            *("n/a" if open_set[split][k] is None else open_set[split][k] for k in keys),
            open_set[split]["known_called_other"],
            "n/a" if open_set[split][KNOWN_AS_OTHER] is None else open_set[split][KNOWN_AS_OTHER],
        ]
        for split in ("val", "test")
    ]
    return {"other_class": open_set["other_class"], "table": table(header, rows)}


def evaluation_page(
    report: dict[str, Any],
    candidates: dict[str, dict[str, Any]],
    predictions: pd.DataFrame,
    reliability: list[dict[str, float]],
    test_images: np.ndarray,
    values: ValueModel,
    mistakes_shown: int,
    heatmaps: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the template shows, one entry per section."""
    return {
        "summary": summary(report),
        "candidates": candidates_table(candidates, report["ranking"], report["primary_metric"]),
        "scores": winner_scores(report["test"]),
        "confusion": confusion_matrix(predictions, values),
        "calibration": calibration(report, reliability),
        "decisions": decisions_section(report.get("decisions") or {}),
        "slices": slices_page(report.get("slices") or {}),
        "open_set": open_set_section(report.get("open_set") or {}),
        "mistakes": mistakes(predictions, test_images, mistakes_shown, heatmaps),
    }


def render_report(
    report: dict[str, Any],
    candidates: dict[str, dict[str, Any]],
    predictions: pd.DataFrame,
    reliability: list[dict[str, float]],
    test_images: np.ndarray,
    values: ValueModel,
    mistakes_shown: int,
    heatmaps: dict[str, Any] | None = None,
) -> str:
    page = evaluation_page(
        report, candidates, predictions, reliability, test_images, values, mistakes_shown, heatmaps
    )
    return pages.template(TEMPLATE).render(page=page)
