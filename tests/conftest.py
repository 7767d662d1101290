"""Shared fixtures: tiny, generated image datasets built in tmp_path (helpers in tests/helpers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.photos import photo_bytes

# No network here: keep every tool's telemetry off in the tests too.
os.environ.update(
    DVC_NO_ANALYTICS="1",
    BENTOML_DO_NOT_TRACK="true",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    GX_ANALYTICS_ENABLED="false",
)


@pytest.fixture
def make_photo():
    return photo_bytes


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """A folder source: 12 photos per class under <root>/<class>/."""
    root = tmp_path / "photos"
    for c, cls in enumerate(("laptop", "phone")):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            (root / cls / f"{i:03d}.jpg").write_bytes(photo_bytes(1000 * c + i))
    return root
