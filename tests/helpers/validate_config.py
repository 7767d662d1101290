"""The validate stage's configuration with small limits, for the tests that run its suites on a
handful of manifest rows."""

from __future__ import annotations

from typing import Any

from stages.validate import ValidateConfig


def validate_config(**overrides: Any) -> ValidateConfig:
    """Classes laptop and phone, 3 photos a class at least; `overrides` replace any field."""
    base: dict[str, Any] = dict(
        min_images_per_class=3,
        max_quarantine_rate=0.1,
        min_side=32,
        max_side=10000,
        max_aspect_ratio=4.0,
        min_file_bytes=500,
        max_file_bytes=20_000_000,
        max_class_imbalance=3.0,
        classes=("laptop", "phone"),
    )
    return ValidateConfig(**{**base, **overrides})
