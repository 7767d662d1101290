"""reports/monitor.html: the drift report as one self-contained page (inline SVG plots).

Shows the verdict and every threshold, the class mix recent against test, the confidence
histograms, the answers per hour of the window, the photo embeddings' two-sample test and the
reviewed answers. It renders the monitor's JSON report (pipeline.monitor), so the page and the
file always agree; the layout is templates/monitor.html.j2, which escapes every value.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from vitrine import pages

TEMPLATE = Path(__file__).parent / "templates" / "monitor.html.j2"
MAX_CLASSES = 30  # the class mix plot shows the classes with the largest shares
WIDTH = 640
PAD = 36
RECENT, TEST = "#2f6fbd", "#e08a1e"  # the two series' colours, on every plot


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"


def _ticks(peak: float, height: float, top: float) -> list[dict[str, str]]:
    """Three horizontal grid lines (0, half, peak) with their labels."""
    return [
        {
            "y": f"{top + height - height * f:.1f}",
            "label": number(peak * f, 3) if isinstance(peak, float) else f"{round(peak * f):,}",
        }
        for f in (0.0, 0.5, 1.0)
    ]


def class_mix_plot(recent: dict[str, float], test: dict[str, float]) -> dict[str, Any]:
    """Paired horizontal bars per class (recent above, test below), largest shares first."""
    classes = sorted(set(recent) | set(test), key=lambda c: -max(recent.get(c, 0), test.get(c, 0)))
    classes = classes[:MAX_CLASSES]
    row, label_w = 26, 150
    span = WIDTH - label_w - PAD
    peak = max([*recent.values(), *test.values(), 1e-9])
    rows = []
    for i, name in enumerate(classes):
        y = 10 + i * row
        r, t = recent.get(name, 0.0), test.get(name, 0.0)
        rows.append(
            {
                "name": name,
                "y_text": f"{y + 13:.1f}",
                "recent": {"y": f"{y:.1f}", "w": f"{span * r / peak:.1f}", "share": number(r)},
                "test": {"y": f"{y + 10:.1f}", "w": f"{span * t / peak:.1f}", "share": number(t)},
            }
        )
    return {
        "width": WIDTH,
        "height": 20 + row * max(len(classes), 1),
        "x": label_w,
        "rows": rows,
        "shown": len(classes),
        "total": len(set(recent) | set(test)),
        "colors": {"recent": RECENT, "test": TEST},
    }


def histogram_plot(recent: list[float], test: list[float]) -> dict[str, Any]:
    """Share of answers per confidence bin: recent as bars, test as a step line."""
    height, bins = 180, max(len(recent), len(test), 1)
    span = WIDTH - 2 * PAD
    step = span / bins
    peak = max([*recent, *test, 1e-9])

    def y(v: float) -> float:
        return 10 + height - height * v / peak

    bars = [
        {
            "x": f"{PAD + i * step + 1:.1f}",
            "y": f"{y(v):.1f}",
            "w": f"{max(step - 2, 1):.1f}",
            "h": f"{height * v / peak:.1f}",
            "title": f"{i / bins:.2f}–{(i + 1) / bins:.2f}: {v:.3f}",
        }
        for i, v in enumerate(recent)
    ]
    line = "".join(
        f"{'L' if i else 'M'}{PAD + i * step:.1f},{y(v):.1f}H{PAD + (i + 1) * step:.1f}"
        for i, v in enumerate(test)
    )
    return {
        "width": WIDTH,
        "height": height + 40,
        "bars": bars,
        "line": line,
        "grid": _ticks(peak, height, 10),
        "x0": PAD,
        "x1": WIDTH - PAD,
        "axis_y": f"{height + 10:.1f}",
        "label_y": f"{height + 26:.1f}",
        "labels": [
            {"x": f"{PAD + span * f:.1f}", "text": f"{f:g}"} for f in (0, 0.25, 0.5, 0.75, 1)
        ],
        "colors": {"recent": RECENT, "test": TEST},
    }


def volume_plot(series: list[int], first_hour: str) -> dict[str, Any]:
    """Answers per hour of the window, oldest first; a label every few hours."""
    height, n = 150, max(len(series), 1)
    span = WIDTH - 2 * PAD
    step = span / n
    peak = max([*series, 1])
    start = datetime.fromisoformat(first_hour)
    every = max(1, n // 6)
    bars = [
        {
            "x": f"{PAD + i * step:.1f}",
            "y": f"{10 + height - height * v / peak:.1f}",
            "w": f"{max(step - 1, 0.5):.1f}",
            "h": f"{height * v / peak:.1f}",
            "title": f"{_hour_label(start, i)}: {v:,}",
        }
        for i, v in enumerate(series)
    ]
    labels = [
        {"x": f"{PAD + (i + 0.5) * step:.1f}", "text": _hour_label(start, i)}
        for i in range(0, n, every)
    ]
    return {
        "width": WIDTH,
        "height": height + 40,
        "bars": bars,
        "grid": _ticks(peak, height, 10),
        "x0": PAD,
        "x1": WIDTH - PAD,
        "axis_y": f"{height + 10:.1f}",
        "label_y": f"{height + 26:.1f}",
        "labels": labels,
        "color": RECENT,
    }


def _hour_label(start: datetime, offset: int) -> str:
    at = start.timestamp() + offset * 3600
    return datetime.fromtimestamp(at, start.tzinfo).strftime("%m-%d %H:00")


def check_rows(checks: list[dict[str, Any]]) -> list[dict[str, str]]:
    def status(c: dict[str, Any]) -> str:
        if not c["judged"]:
            return f"not judged: {c['note']}"
        return "CROSSED" if c["crossed"] else "ok"

    return [
        {
            "name": c["name"],
            "value": number(c["value"]),
            "threshold": f"{c['rule']} {number(c['threshold'])}",
            "status": status(c),
            "crossed": "crossed" if c["crossed"] else "",
        }
        for c in checks
    ]


def monitor_page(report: dict[str, Any]) -> dict[str, Any]:
    """Everything the template shows, from the monitor's JSON report."""
    window, recent, test = report["window"], report["answers"], report["test"]
    mix, confidence = report["class_mix"], report["confidence"]
    figures = [
        ["answers (test set: photos)", recent["answers"], test["photos"] if test else None],
        ["answers in the window before", recent["previous_window_answers"], None],
        ["mean confidence", confidence["recent_mean"], confidence["test_mean"]],
        ["abstain rate", report["abstain"]["recent_rate"], report["abstain"]["test_rate"]],
        ["mismatch rate (/check_category)", report["mismatch"]["rate"], None],
        ["class mix PSI", mix["psi"], None],
        ["class mix chi-square p-value", mix["chi2_p_value"], None],
        ["confidence PSI", confidence["psi"], None],
        ["accuracy on reviewed answers", report["reviewed"]["accuracy"], test and test["accuracy"]],
    ]
    reviewed = report["reviewed"]
    return {
        "window": window,
        "verdict": report["crossed"],
        "retrain": report["retrain"],
        "notes": report["notes"],
        "checks": check_rows(report["checks"]),
        "figures": [{"name": n, "recent": number(r), "test": number(t)} for n, r, t in figures],
        "class_mix": class_mix_plot(mix["recent"], mix["test"]) if mix["recent"] else None,
        "confidence": histogram_plot(confidence["recent_histogram"], confidence["test_histogram"])
        if recent["answers"]
        else None,
        "volume": volume_plot(recent["per_hour"], window["first_hour"]),
        "per_day": [{"day": d, "answers": f"{n:,}"} for d, n in recent["per_day"].items()],
        "by_model_version": [
            {"name": k, "n": f"{v:,}"} for k, v in recent["by_model_version"].items()
        ],
        "by_endpoint": [{"name": k, "n": f"{v:,}"} for k, v in recent["by_endpoint"].items()],
        "images": {k: number(v) for k, v in report["images"].items()},
        "reviewed": {
            "reviewed": reviewed["reviewed"],
            "accuracy": number(reviewed["accuracy"]),
            "pairs": [
                {"answered": a, "reviewed": r, "n": n, "agree": a == r}
                for a, r, n in reviewed["pairs"]
            ],
        },
    }


def render_page(report: dict[str, Any]) -> str:
    return pages.template(TEMPLATE).render(page=monitor_page(report))
