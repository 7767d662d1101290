"""reports/evaluation.html: one self-contained page (no external files) explaining the choice.

Candidates table, the winner's test scores, its confusion matrix ordered by business value, its
reliability diagram, the abstain threshold, and the costliest test mistakes with thumbnails.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from vitrine.evaluation.metrics import ValueModel

MAX_MATRIX_CLASSES = 50
THUMBNAIL_SIDE = 128
# The candidates table's columns besides the primary metric (HTML and Markdown alike).
TABLE_COLUMNS = ("accuracy", "macro_f1", "business_weighted_f1", "expected_value_per_1000")

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1d2330}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #dde}
table{border-collapse:collapse;margin:8px 0}td,th{padding:4px 8px;border:1px solid #dde}
th{background:#f3f4f8;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.win td{font-weight:600;background:#eef8ee}
.cm td{width:34px;height:26px;text-align:center;font-size:12px;border:1px solid #fff}
.cm th{font-size:12px;font-weight:500}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{width:150px;font-size:12px;border:1px solid #dde;border-radius:6px;padding:6px}
.card img{width:138px;height:138px;image-rendering:auto;display:block;margin-bottom:4px}
.bad{color:#b3261e}.muted{color:#667}
"""


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else html.escape(str(x))


def _table(header: list[str], rows: list[list[Any]], highlight: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(
            f'<td class="n">{_num(c)}</td>' if isinstance(c, int | float) else f"<td>{_num(c)}</td>"
            for c in row
        )
        body.append(f"<tr{' class=win' if i == highlight else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def candidates_section(
    candidates: dict[str, dict[str, Any]], ranking: list[str], primary: str
) -> str:
    columns = list(dict.fromkeys([primary, *TABLE_COLUMNS]))
    rows = [[r, name, *(candidates[name][c] for c in columns)] for r, name in enumerate(ranking, 1)]
    return f"<h2>Candidates (validation photos, ranked by {html.escape(primary)})</h2>" + _table(
        ["rank", "candidate", *columns], rows, highlight=0
    )


def scores_section(test: dict[str, Any]) -> str:
    scalar = [[k, v] for k, v in test.items() if isinstance(v, int | float)]
    per_class = [
        [c, s["precision"], s["recall"], s["f1"], s["support"]]
        for c, s in test["per_class"].items()
    ]
    levels = [
        [lv["level"], lv["classes"], lv["accuracy"], lv["macro_f1"]]
        for lv in test["taxonomy"]["levels"]
    ]
    return (
        "<h2>Winner on the test photos</h2>"
        + _table(["score", "value"], scalar)
        + "<h2>Per class</h2>"
        + _table(["class", "precision", "recall", "F1", "photos"], per_class)
        + "<h2>Per taxonomy level</h2>"
        + _table(["level", "classes", "accuracy", "macro F1"], levels)
        + f"<p>Depth-weighted accuracy: {test['depth_weighted_accuracy']:.4f}</p>"
    )


def confusion_section(predictions: pd.DataFrame, values: ValueModel) -> str:
    """Rows actual, columns predicted; classes by business value (highest first), top 50."""
    order = [values.classes[i] for i in np.argsort(-values.value, kind="stable")]
    order = order[:MAX_MATRIX_CLASSES]
    counts = pd.crosstab(predictions["label"], predictions["predicted"]).reindex(
        index=order, columns=order, fill_value=0
    )
    peak = max(int(counts.to_numpy().max()), 1)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in order)
    rows = []
    for actual in order:
        cells = []
        for predicted in order:
            n = int(counts.loc[actual, predicted])
            hue = 130 if actual == predicted else 5
            light = 100 - 55 * n / peak
            cells.append(f'<td style="background:hsl({hue},60%,{light:.0f}%)">{n or ""}</td>')
        rows.append(f"<tr><th>{html.escape(actual)}</th>{''.join(cells)}</tr>")
    note = (
        f" (the {MAX_MATRIX_CLASSES} most valuable of {len(values.classes)})"
        if len(values.classes) > MAX_MATRIX_CLASSES
        else ""
    )
    return (
        f"<h2>Confusion matrix, classes by business value{note}</h2>"
        f'<p class="muted">Rows: actual class. Columns: predicted class.</p>'
        f'<table class="cm"><tr><th></th>{head}</tr>{"".join(rows)}</table>'
    )


def reliability_svg(curve: list[dict[str, float]], size: int = 260) -> str:
    """Accuracy against mean confidence per bin; the diagonal is perfect calibration."""
    pad = 30
    span = size - 2 * pad

    def xy(conf: float, acc: float) -> tuple[float, float]:
        return pad + conf * span, size - pad - acc * span

    points = [(*xy(p["confidence"], p["accuracy"]), p) for p in curve]
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{2 + min(p["count"], 400) ** 0.5 / 3:.1f}" '
        f'fill="#3867d6" fill-opacity="0.7"><title>{p["count"]} photos: confidence '
        f"{p['confidence']:.3f}, accuracy {p['accuracy']:.3f}</title></circle>"
        for x, y, p in points
    )
    line = "".join(f"{'L' if i else 'M'}{x:.1f},{y:.1f}" for i, (x, y, _) in enumerate(points))
    (x0, y0), (x1, y1) = xy(0, 0), xy(1, 1)
    ticks = "".join(
        f'<text x="{xy(t, 0)[0]:.1f}" y="{y0 + 12:.1f}" text-anchor="middle" font-size="9">{t:g}'
        f'</text><text x="{x0 - 4:.1f}" y="{xy(0, t)[1] + 3:.1f}" text-anchor="end" '
        f'font-size="9">{t:g}</text>'
        for t in (0, 0.5, 1)
    )
    return (
        f'<svg width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg">'
        f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" fill="#fafbfd" stroke="#ccd"/>'
        f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#999" stroke-dasharray="4"/>'
        f'<path d="{line}" fill="none" stroke="#3867d6"/>{dots}{ticks}'
        f'<text x="{size / 2}" y="{size - 6}" text-anchor="middle" font-size="11">confidence</text>'
        f'<text x="10" y="{size / 2}" font-size="11" transform="rotate(-90 10 {size / 2})" '
        f'text-anchor="middle">accuracy</text></svg>'
    )


def calibrated_with(fitted: dict[str, Any]) -> str:
    """How the winner's probabilities were calibrated on val (served.json's record), in words."""
    if fitted["method"] == "none":
        return "The probabilities are the network's own softmax (<code>calibration: none</code>)."
    return (
        f"The probabilities are calibrated on val (<code>{fitted['method']}</code>, temperature "
        f"{fitted['temperature']:.3f}), the map baked into model.onnx: val log loss "
        f"{fitted['val_log_loss_uncalibrated']:.4f} before, {fitted['val_log_loss']:.4f} after."
    )


def calibration_section(report: dict[str, Any], curve: list[dict[str, float]]) -> str:
    cal, ab = report["calibration"], report["abstain"]
    fitted = report["served"][report["winner"]]["calibration"]
    rows = [[k, v] for k, v in ab.items() if v is not None]
    return (
        "<h2>Calibration and abstaining</h2>"
        f"<p>{calibrated_with(fitted)} Expected calibration error: val {cal['val_ece']:.4f}, "
        f"test {cal['test_ece']:.4f} ({cal['bins']} bins).</p>{reliability_svg(curve)}"
        "<p>Below the threshold (fitted on val to maximise expected value), the service answers "
        f"<code>abstain: true</code> and the photo goes to human review. {abstain_verdict(ab)}</p>"
        + _table(["abstain", "value"], rows)
    )


def abstain_verdict(abstain: dict[str, Any]) -> str:
    """What the threshold means in words, for its two extremes."""
    if abstain["threshold"] == 0:
        return "Threshold 0: trusting the model pays at every confidence, so it never abstains."
    if abstain["threshold"] > 1:
        return (
            "The threshold is above any confidence: every photo goes to review, because a review "
            "earns more than the model's answer at every confidence (a better model or a higher "
            "<code>evaluate.review_cost</code> changes that)."
        )
    return ""


def thumbnail(pixels: np.ndarray) -> str:
    """A JPEG data URI (the page stays one file), at most THUMBNAIL_SIDE pixels a side."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def mistakes_section(predictions: pd.DataFrame, test_images: np.ndarray, shown: int) -> str:
    """The wrong predictions that cost the most (lowest gain), most confident first on ties;
    those below the abstain threshold are marked: the service would have sent them to review."""
    wrong = predictions[predictions["label"] != predictions["predicted"]]
    worst = wrong.sort_values(["gain", "confidence"], ascending=[True, False]).head(shown)
    cards = [
        f'<div class="card"><img src="{thumbnail(test_images[int(r["index"])])}" alt=""/>'
        f"<div>{html.escape(str(r['id']))}</div><div>true <b>{html.escape(r['label'])}</b></div>"
        f'<div class="bad">predicted <b>{html.escape(r["predicted"])}</b></div>'
        f"<div>confidence {r['confidence']:.3f}{' (sent to review)' if r['abstained'] else ''}"
        f"</div><div>cost {-r['gain']:.2f}</div></div>"
        for _, r in worst.iterrows()
    ]
    return (
        f"<h2>Costliest mistakes ({len(worst)} of {len(wrong)} wrong test predictions)</h2>"
        f'<div class="gallery">{"".join(cards)}</div>'
    )


# What a prediction is, by evaluate.decision (vitrine/runtime/decisions.py).
ANSWERS = {
    "argmax": "Each photo is answered with its most probable class.",
    "expected_value": "Each photo is answered with the class whose expected gain under the "
    "business values and mistake costs is highest (evaluate.decision: expected_value).",
}


def served_as(report: dict[str, Any]) -> str:
    """How the winner is scored and served: its model.onnx's precision, and int8's val cost."""
    served = report["served"][report["winner"]]
    text = f"Scored as the service runs it: model.onnx in {served['precision']}"
    if "val_answers_changed_by_int8" not in served:
        return text + "."
    metric = report["primary_metric"]
    return (
        f"{text} (validation {metric}: int8 {served[f'val_{metric}_int8']:.4f}, float "
        f"{served[f'val_{metric}_fp32']:.4f}; int8 changed "
        f"{served['val_answers_changed_by_int8']} answers)."
    )


def render_report(
    report: dict[str, Any],
    candidates: dict[str, dict[str, Any]],
    predictions: pd.DataFrame,
    reliability: list[dict[str, float]],
    test_images: np.ndarray,
    values: ValueModel,
    mistakes_shown: int,
) -> str:
    test = report["test"]
    summary = (
        f"<p>Winner: <b>{html.escape(report['winner'])}</b>, chosen on validation by "
        f"{html.escape(report['primary_metric'])}. On {test['n']} test photos: accuracy "
        f"{test['accuracy']:.4f}, business-weighted accuracy "
        f"{test['business_weighted_accuracy']:.4f}, expected value per 1,000 predictions "
        f"{test['expected_value_per_1000']:.1f}. {ANSWERS[report['decision']]} "
        f"{html.escape(served_as(report))}</p>"
    )
    sections = [
        candidates_section(candidates, report["ranking"], report["primary_metric"]),
        scores_section(test),
        confusion_section(predictions, values),
        calibration_section(report, reliability),
        mistakes_section(predictions, test_images, mistakes_shown),
    ]
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>vitrine evaluation</title>'
        f"<style>{STYLE}</style></head><body><h1>vitrine: evaluation</h1>{summary}"
        + "".join(sections)
        + "</body></html>\n"
    )
