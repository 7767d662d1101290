"""evaluate.json as the evaluation page reads it: a report for four test photos around given
scalar scores, for the tests of the page (render_report) and of what it shows."""

from __future__ import annotations

from typing import Any

SCORE_KEYS = (
    "accuracy",
    "macro_f1",
    "business_weighted_accuracy",
    "business_weighted_f1",
    "expected_value_per_1000",
)


def page_report(
    classes: tuple[str, ...],
    winner: str,
    scores: dict[str, Any],
    ranking: list[str] | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report of `winner` (ranked first of `ranking`, itself alone by default) scored
    `scores` (SCORE_KEYS) on 4 test photos, 2 per class; its one taxonomy level and its depth
    weighted accuracy are its accuracy and macro F1; served in fp32 with `calibration`
    (evaluate's served calibration record, {"method": "none"} by default)."""
    return {
        "winner": winner,
        "primary_metric": "business_weighted_accuracy",
        "decision": "argmax",
        "ranking": ranking or [winner],
        "test": {
            "n": 4,
            **scores,
            "depth_weighted_accuracy": scores["accuracy"],
            "per_class": {
                c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2} for c in classes
            },
            "taxonomy": {
                "levels": [
                    {
                        "level": 1,
                        "classes": 2,
                        "accuracy": scores["accuracy"],
                        "macro_f1": scores["macro_f1"],
                    }
                ]
            },
        },
        "calibration": {"val_ece": 0.05, "test_ece": 0.07, "bins": 10},
        "abstain": {"threshold": 0.65, "review_cost": 0.3, "test_accuracy_when_decided": None},
        "served": {
            winner: {
                "precision": "fp32",
                "checkpoint_sha256": "0" * 64,
                "int8": None,
                "calibration": calibration or {"method": "none"},
            }
        },
    }
