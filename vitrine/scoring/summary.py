"""A scoring run's summary: rows, accepted and quarantined, class mix, abstain rate, and the
photos whose declared category the model disagrees with (the photos to re-categorise).

A disagreement is what the service's /check_category calls a confident mismatch: the answer is
not the declared category and the model does not abstain (an abstained answer suggests nothing
new). A declared category that is none of the model's classes (trimmed, case-insensitively) is
counted as unknown, never as a disagreement.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa

SHOWN = 20  # disagreements printed; the summary file lists them all


class Summary:
    """Built from the output's tables as they are merged (see vitrine.scoring.parts)."""

    def __init__(self, model_version: str, category_column: str, expect_category: bool = False):
        self.model_version = model_version
        self.category_column = category_column
        # A catalog is scored to check its categories: a column that no row fills (a typo in
        # its name, most often) is said, not passed over as "no categories".
        self.expect_category = expect_category
        self.rows = 0
        self.by_reason: Counter[str] = Counter()
        self.by_label: Counter[str] = Counter()
        self.abstained = 0
        self.by_level: Counter[int] = Counter()  # answers given, by taxonomy level (1: coarsest)
        self.with_category = 0  # accepted rows with a declared category
        self.matches = 0
        self.unknown_categories = 0  # declared, but none of the model's classes
        self.recategorise: list[dict[str, Any]] = []

    def add(self, table: pa.Table) -> None:
        columns = table.column_names
        data = table.to_pydict()
        self.rows += table.num_rows
        for i in range(table.num_rows):
            if data["status"][i] != "accepted":
                self.by_reason[data["reason"][i]] += 1
                continue
            self.by_label[data["label"][i]] += 1
            self.abstained += bool(data["abstain"][i])
            if not data["abstain"][i] and "level" in columns and data["level"][i] is not None:
                self.by_level[int(data["level"][i])] += 1
            if "category" not in columns or data["category"][i] is None:
                continue
            self.with_category += 1
            matches = data["matches"][i]
            if matches is None:
                self.unknown_categories += 1
            elif matches:
                self.matches += 1
            elif not data["abstain"][i]:
                self.recategorise.append(
                    {
                        "row": data["row"][i],
                        "id": data["id"][i],
                        "category": data["category"][i],
                        "suggested_category": data["suggested_category"][i],
                        "confidence": data["confidence"][i],
                    }
                )

    def as_dict(self, **run: Any) -> dict[str, Any]:
        accepted = sum(self.by_label.values())
        summary: dict[str, Any] = {
            **run,
            "model_version": self.model_version,
            "rows": self.rows,
            "accepted": accepted,
            "quarantined": self.rows - accepted,
            "by_reason": dict(self.by_reason.most_common()),
            "by_label": dict(self.by_label.most_common()),
            "abstained": self.abstained,
            "abstain_rate": self.abstained / accepted if accepted else None,
            "answered_by_level": {str(k): v for k, v in sorted(self.by_level.items())},
        }
        if self.with_category or (self.expect_category and accepted):
            summary["category"] = {
                "column": self.category_column,
                "declared": self.with_category,
                "matches": self.matches,
                "unknown": self.unknown_categories,
                "disagreements": len(self.recategorise),
                "recategorise": self.recategorise,
            }
        return summary


def describe(summary: dict[str, Any]) -> str:
    """The summary as the lines printed at the end of a run."""
    mix = ", ".join(f"{k} {v}" for k, v in summary["by_label"].items()) or "none"
    rate = summary["abstain_rate"]
    lines = [
        f"scored {summary['rows']} rows with {summary['model_version']}: "
        f"{summary['accepted']} accepted, {summary['quarantined']} quarantined"
        + (f" {summary['by_reason']}" if summary["by_reason"] else ""),
        f"class mix: {mix}; abstained: {summary['abstained']}"
        + (f" ({rate:.1%})" if rate is not None else ""),
    ]
    levels = summary.get("answered_by_level", {})
    if len(levels) > 1:  # some answers backed off to an ancestor in the taxonomy
        lines.append(
            "answered at taxonomy level: " + ", ".join(f"{k}: {v}" for k, v in levels.items())
        )
    if "scored_now" in summary:
        lines.append(
            f"this run scored {summary['scored_now']} photos; "
            f"{summary['resumed']} rows came from an earlier run's parts"
        )
    category = summary.get("category")
    if category and not category["declared"]:
        lines.append(
            f"no accepted photo has a value in column {category['column']!r}: no category was "
            "checked (see --category-column, score.category_column)"
        )
    elif category:
        lines.append(
            f"declared {category['column']!r}: {category['declared']} photos, "
            f"{category['matches']} match, {category['disagreements']} to re-categorise"
            + (f", {category['unknown']} unknown categories" if category["unknown"] else "")
        )
        for item in category["recategorise"][:SHOWN]:
            lines.append(
                f"  {item['id']}: {item['category']} -> {item['suggested_category']} "
                f"({item['confidence']:.2f})"
            )
        if category["disagreements"] > SHOWN:
            lines.append(f"  ... and {category['disagreements'] - SHOWN} more (summary file)")
    return "\n".join(lines)
