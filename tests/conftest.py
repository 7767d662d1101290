"""Shared fixtures: tiny, generated image datasets built in tmp_path."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# No network here: keep every tool's telemetry off in the tests too.
os.environ.update(
    DVC_NO_ANALYTICS="1",
    BENTOML_DO_NOT_TRACK="true",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    GX_ANALYTICS_ENABLED="false",
)

REPO = Path(__file__).resolve().parents[1]
# The temporary Prefect API server (prefect_test_harness) creates and migrates its SQLite DB on
# start; Prefect's 30 s default ran out on a slower 2-core CI machine under load.
PREFECT_START_TIMEOUT_S = 180


def photo_bytes(
    seed: int, size: tuple[int, int] = (96, 72), fmt: str = "JPEG", mode: str = "RGB"
) -> bytes:
    """A distinct, photo-like image: a smooth random gradient plus a few blocks."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-2, 2, (2, 3))
    arr = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    for _ in range(4):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, 3)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


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
