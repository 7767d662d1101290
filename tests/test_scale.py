"""benchmarks/scale.py: the synthetic catalogs hold distinct photos and near copies of them as
intended, and the benchmark prints its per-stage table, the copies dedupe found and the ratios
(on a catalog of a few hundred photos)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from benchmarks.scale import CLASSES, COPY_EVERY, STAGES, original_of, photo
from tests.helpers import REPO


def test_every_tenth_photo_is_a_near_copy_of_an_earlier_one_and_the_rest_are_distinct() -> None:
    photos = [photo(i, seed=3) for i in range(40)]
    assert photo(7, seed=3) == photos[7]  # a pure function of index and seed
    assert len({data for _, data in photos}) == 40
    for i, (name, data) in enumerate(photos):
        label, file = name.split("/")
        assert label in CLASSES
        side = max(Image.open(io.BytesIO(data)).size)
        assert 60 <= side <= 120 and 500 < len(data) < 20_000  # small marketplace JPEGs
        original = original_of(i)
        if i % COPY_EVERY == COPY_EVERY - 1:
            assert original is not None and file == f"{i:07d}-copy-of-{original:07d}.jpg"
            assert photos[original][0].split("/")[0] == label  # filed with its original
        else:
            assert original is None and file == f"{i:07d}.jpg"


@pytest.mark.slow
def test_the_benchmark_prints_each_stage_the_copies_found_and_the_ratios() -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}
    args = ["--sizes", "240", "--new-share", "0.05", "--workers", "1"]  # the code at HEAD
    out = subprocess.run(
        [sys.executable, "benchmarks/scale.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    for title in ("240 photos, local Dask", "+12 new photos, re-run", "a LocalCluster of 1"):
        block = text[text.index(title) :].splitlines()
        header = ["stage", "wall", "s", "photos/s", "peak", "PSS", "MiB", "RSS", "sum", "MiB"]
        assert block[1].split() == header
        rows = [line.split() for line in block[2:7]]
        assert [r[0] for r in rows] == [*STAGES, "total"]
        # Every stage is timed and its memory sampled, the shared pages counted once in PSS.
        assert all(float(r[1]) > 0 and float(r[2]) > 0 and 0 < int(r[3]) <= int(r[4]) for r in rows)
    # 24 copies were injected: dedupe put (nearly) each in its original's cluster, and no two
    # distinct photos together (about 1 crop in 100 is missed: benchmarks/neardup.py)
    found = re.findall(r"original's cluster: (\d+) of (\d+); distinct .* another: (\d+)", text)
    assert len(found) == 2
    assert all(int(n) >= 22 and total == "24" and merged == "0" for n, total, merged in found)
    assert re.search(r"time per photo at 240 / at 240: 1\.00x", text)
    assert re.search(r"peak memory at 240: [\d.]+ GiB PSS of the process tree", text)
    assert re.search(r"re-run after 5% new photos: [\d.]+% of the time from scratch", text)
