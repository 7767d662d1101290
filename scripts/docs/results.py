"""The results page: the current figures, read from the metrics files dvc.yaml declares.

Each metrics file is read as `dvc metrics show` reads it (the JSON a stage wrote into the
workspace), checked against the hash dvc.lock records for it, and every figure names the
command that reproduces it. The metrics live only where the pipeline ran (reports/ is not in
git), so a checkout without them gets a page that says so rather than a failed build.

    python -m scripts.docs results     # the page's generated part, as the site shows it
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scripts.docs import markdown as md
from scripts.docs.outputs import FOREACH_ITEM, resolve, stages
from scripts.docs.source import docstring_markdown, load


@dataclass(frozen=True)
class Metric:
    stage: str  # as `dvc repro` names it: train@cnn64
    path: str
    data: Any  # the parsed file; None when absent or unreadable
    in_lock: bool | None  # its md5 is dvc.lock's (None: absent, or dvc.lock records none)


def metrics(root: Path) -> list[Metric]:
    """Every metrics file of dvc.yaml, a foreach stage's once per item (candidate)."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    lock_path = root / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text()) if lock_path.is_file() else {}
    found = []
    for stage, definition in stages(root):
        items = list(params.get("candidates") or {}) if FOREACH_ITEM in stage else [""]
        for entry in definition.get("metrics") or []:
            template = next(iter(entry)) if isinstance(entry, dict) else str(entry)
            for item in items:
                name = stage.replace(FOREACH_ITEM, item)
                path = resolve(template, params).replace(FOREACH_ITEM, item)
                found.append(_read(root, name, path, lock))
    return found


def _read(root: Path, stage: str, path: str, lock: dict[str, Any]) -> Metric:
    file = root / path
    if not file.is_file():
        return Metric(stage, path, None, None)
    raw = file.read_bytes()
    try:
        data = json.loads(raw) if path.endswith(".json") else yaml.safe_load(raw)
    except ValueError:
        data = None
    recorded = {
        out.get("path"): out.get("md5")
        for out in (lock.get("stages", {}).get(stage, {}).get("outs") or [])
    }
    md5 = recorded.get(path)
    return Metric(stage, path, data, None if md5 is None else md5 == hashlib.md5(raw).hexdigest())


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def n(x: float) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"


# --- the figures of each metrics file: (figure, value) pairs, each short ---------------------

Figures = list[tuple[str, str]]


def _collect(d: dict[str, Any]) -> Figures:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(d.get("by_reason", {}).items()))
    return [
        ("input records", n(d["records"])),
        ("accepted", n(d["accepted"])),
        ("quarantined", n(d["quarantined"]) + (f" ({reasons})" if reasons else "")),
    ]


def _validate(d: dict[str, Any]) -> Figures:
    verdict = "passed" if d["success"] else "failed"
    return [
        ("expectations", f"{d['evaluated']}: {verdict}"),
        ("failures: blocking, warnings", f"{d['failed_blocking']}, {d['failed_warning']}"),
    ]


def _dedupe(d: dict[str, Any]) -> Figures:
    return [
        ("clusters", f"{n(d['clusters'])} ({n(d['clusters_with_copies'])} with copies)"),
        (
            "duplicates removed",
            f"{n(d['duplicates'])} ({n(d['exact_duplicates'])} exact, "
            f"{n(d['near_duplicates'])} near)",
        ),
        ("in a label conflict", n(d["label_conflicts"])),
        (
            "review decisions applied",
            f"{n(d['dropped_by_review'])} dropped, {n(d['relabelled_by_review'])} relabelled",
        ),
        ("photos kept", n(d["kept"])),
        ("noise candidates to review", n(d["noise_candidates"])),
    ]


def _prepare(d: dict[str, Any]) -> Figures:
    leak = d["leakage"]
    naive, total = leak["naive_split_leaked_val_test_photos"], leak["naive_split_val_test_photos"]
    share = f" ({pct(naive / total)})" if total else ""
    splits = [s for s in ("train", "val", "test") if s in d]
    return [
        ("split by cluster: " + " / ".join(splits), " / ".join(n(d[s]["total"]) for s in splits)),
        ("val/test photos leaked into train", f"{n(leak['leaked_val_test_photos'])}"),
        ("the same, naive random split", f"{n(naive)} of {n(total)}{share}"),
    ]


def _evaluate(d: dict[str, Any]) -> Figures:
    t = d["test"]
    served = d["served"].get(d["winner"], {})
    calibration = served.get("calibration", {}).get("method", "none")
    a = d["abstain"]
    figures = [
        ("winner", f"{d['winner']} ({served.get('precision', '?')}, calibration {calibration})"),
        (f"val {d['primary_metric']}", pct(d["val"][d["primary_metric"]])),
        ("test photos", n(t["n"])),
        ("test accuracy", pct(t["accuracy"])),
        ("test business-weighted accuracy", pct(t["business_weighted_accuracy"])),
        ("test macro F1", pct(t["macro_f1"])),
        ("test value per 1,000 photos", n(t["expected_value_per_1000"])),
        ("test calibration error (ECE)", f"{d['calibration']['test_ece']:.3f}"),
        (
            "abstain threshold (fitted on val)",
            f"{a['threshold']:.2f} at review cost {a['review_cost']}",
        ),
    ]
    if a["threshold"]:
        figures += [
            (
                "sent to review: val, test",
                f"{pct(a['val_abstain_rate'])}, {pct(a['test_abstain_rate'])}",
            ),
        ]
    return figures


def _promotion(d: dict[str, Any]) -> Figures:
    verdict = "promoted" if d["promoted"] else "not promoted"
    # The reason is a sentence: it goes below the table (promotion_reason), not in a cell.
    return [("deployed", f"{d['challenger']['model_version']} {verdict}")]


def _training(d: dict[str, Any]) -> Figures:
    resumed = d.get("resumed_at_epoch")
    again = f", resumed at epoch {resumed}" if resumed is not None else ""
    return [
        ("training time", f"{n(d['train_seconds'])} s, {n(d['train_images_per_s'])} images/s"),
        ("epochs", f"{d['epochs']} (best {d['best_epoch']}, stopped by {d['stopped_by']}{again})"),
    ]


# Which figures each stage's metrics file gives (a foreach stage by its base name).
FIGURES: dict[str, Callable[[dict[str, Any]], Figures]] = {
    "collect": _collect,
    "validate": _validate,
    "dedupe": _dedupe,
    "prepare": _prepare,
    "train": _training,
    "evaluate": _evaluate,
    "package": _promotion,
}
EVALUATE_REPORT = "evaluate.json"  # the evaluate metric that holds the winner (not candidates)


def figures(found: list[Metric]) -> list[list[str]]:
    rows = []
    for m in found:
        figure = FIGURES.get(m.stage.split("@")[0])
        if m.data is None or figure is None:
            continue
        if m.stage == "evaluate" and not m.path.endswith(EVALUATE_REPORT):
            continue  # candidates.json: its own table
        where = f"{md.code(m.path)}, {md.code(f'dvc repro {m.stage}')}"
        for name, value in _safely(figure, m):
            rows.append([md.code(m.stage), md.cell(name), md.cell(value), where])
    return rows


def _safely(figure: Callable[[dict[str, Any]], Figures], m: Metric) -> Figures:
    try:
        return figure(m.data)
    except (KeyError, TypeError, ZeroDivisionError) as err:
        return [("unreadable", f"{m.path} lacks what this page reads ({err!r})")]


def promotion_reason(found: list[Metric]) -> str:
    """Why package deployed (or kept) the model it did, as package wrote it."""
    record = next((m for m in found if m.path.endswith("promotion.json") and m.data), None)
    if record is None or not record.data.get("reason"):
        return ""
    return md.paragraph(f"Promotion ({md.code(record.path)}): {record.data['reason']}.")


def candidates_table(found: list[Metric]) -> str:
    """Every candidate on val as evaluate scored it, in evaluate's ranking."""
    table = next((m for m in found if m.path.endswith("candidates.json") and m.data), None)
    report = next((m for m in found if m.path.endswith(EVALUATE_REPORT) and m.data), None)
    if table is None:
        return ""
    ranking = report.data.get("ranking", []) if report else []
    primary = report.data.get("primary_metric", "accuracy") if report else "accuracy"
    served = report.data.get("served", {}) if report else {}
    names = [c for c in ranking if c in table.data] + [c for c in table.data if c not in ranking]
    columns = list(dict.fromkeys([primary, "accuracy", "macro_f1", "expected_value_per_1000"]))
    rows = []
    for name in names:
        scores = table.data[name]
        cells = [
            pct(scores[c]) if c != "expected_value_per_1000" else n(scores[c])
            for c in columns
            if c in scores
        ]
        precision = served.get(name, {}).get("precision", "?")
        rows.append([md.code(name), precision, *cells])
    header = ["candidate", "served as", *[md.code(c) for c in columns]]
    return md.section(
        "## Candidates on val",
        md.paragraph(
            f"Read from {md.code(table.path)} (`dvc repro evaluate`); best first by "
            f"`{primary}` (params.yaml `evaluate.primary_metric`), each scored as the service "
            "would run it."
        ),
        md.table(header, rows),
    )


def status_table(found: list[Metric]) -> str:
    rows = []
    for m in found:
        state = (
            "absent"
            if m.data is None
            else {
                True: "as dvc.lock records",
                False: "differs from dvc.lock",
                None: "present",
            }[m.in_lock]
        )
        rows.append([md.code(m.path), state, md.code(f"dvc repro {m.stage}")])
    return md.table(["metrics file", "in this checkout", "reproduce"], rows)


def benchmarks(root: Path) -> str:
    """Each benchmark's command and what it measures; their figures are printed, not kept."""
    entries = []
    for script in sorted((root / "benchmarks").glob("*.py")):
        module = load(root, f"benchmarks.{script.stem}")
        runnable = '__name__ == "__main__"' in script.read_text()  # not a shared helper
        if module is None or not module.docstring or not runnable:
            continue
        blocks = docstring_markdown(module.docstring)
        what = blocks[0][1] if blocks and blocks[0][0] == "text" else ""
        usages = [b for kind, b in blocks if kind == "code"]
        usage = usages[0] if usages else f"python {script.relative_to(root)}"
        command = usage.splitlines()[0].split("#")[0].strip()
        entries.append(f"{md.code(command)}\n:   {md.paragraph(what, '    ').lstrip()}")
    return "\n\n".join(entries)


def page(root: Path) -> str:
    found = metrics(root)
    present = [m for m in found if m.data is not None]
    parts = ["## Current figures"]
    if not present:
        parts.append(
            '!!! note "No metrics in this checkout"\n'
            + md.paragraph(
                "The metrics files are written by `dvc repro` (`make repro`) into reports/ and "
                "committed with dvc.lock; this checkout has none of them yet.",
                "    ",
            )
        )
    else:
        stale = [m for m in present if m.in_lock is False]
        if stale:
            parts.append(
                '!!! warning "Not the committed pipeline\'s figures"\n'
                + md.paragraph(
                    "These files differ from what dvc.lock records (a run with other params or "
                    "code, or an unfinished one): "
                    + ", ".join(md.code(m.path) for m in stale)
                    + ". `dvc status` says which stages are out of date.",
                    "    ",
                )
            )
        header = ["stage", "figure", "value", "read from, reproduced by"]
        parts.append(md.table(header, figures(found)))
        parts.append(promotion_reason(found))
    parts.append(candidates_table(found))
    parts += ["## Metrics files", status_table(found)]
    parts += [
        "## Benchmarks",
        md.paragraph(
            "Their figures are printed, not committed: each command measures this machine."
        ),
        benchmarks(root),
    ]
    return md.section(*parts)
