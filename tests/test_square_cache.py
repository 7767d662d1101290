"""prepare's squares cache (vitrine/data/square_cache.py): what a run may take from the last."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vitrine.data.square_cache import INDEX, Squares, keep, squares_version


def prepared(tmp_path: Path, n: int = 3, size: int = 4) -> tuple[dict[str, Path], pd.DataFrame]:
    """A train array of n distinct squares and its manifest rows (sha256 s0, s1, ...)."""
    out = tmp_path / "prepared"
    out.mkdir()
    squares = np.arange(n * size * size * 3, dtype=np.uint8).reshape(n, size, size, 3)
    np.save(out / "train.npy", squares)
    manifest = pd.DataFrame(
        {"sha256": [f"s{i}" for i in range(n)], "split": "train", "index": range(n)}
    )
    return {"train": out / "train.npy"}, manifest


def test_the_last_runs_squares_are_found_by_sha256_through_hard_links(tmp_path: Path) -> None:
    arrays, manifest = prepared(tmp_path)
    cache = tmp_path / "cache"
    assert keep(cache, "v1", arrays, manifest)
    assert os.stat(cache / "train.npy").st_ino == os.stat(arrays["train"]).st_ino
    arrays["train"].unlink()  # DVC removing its output before a run
    squares = Squares(cache, "v1", 4)
    assert len(squares) == 3 and squares.get("nope") is None
    assert squares.get("s2") == np.load(cache / "train.npy")[2].tobytes()
    squares.close()


@pytest.mark.parametrize("damage", ["version", "size", "index", "array"])
def test_another_version_or_a_damaged_cache_offers_nothing(tmp_path: Path, damage: str) -> None:
    arrays, manifest = prepared(tmp_path)
    cache = tmp_path / "cache"
    assert keep(cache, "v1", arrays, manifest)
    version, size = "v1", 4
    if damage == "version":
        version = "v2"
    elif damage == "size":
        size = 8
    elif damage == "index":
        (cache / INDEX).write_bytes(b"not parquet")
    else:
        (cache / "train.npy").unlink()
    assert len(Squares(cache, version, size)) == 0
    assert len(Squares(None, "v1", 4)) == 0


def test_a_cache_that_cannot_hold_links_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays, manifest = prepared(tmp_path)

    def no_links(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    assert not keep(tmp_path / "cache", "v1", arrays, manifest)
    assert list((tmp_path / "cache").iterdir()) == []
    assert len(Squares(tmp_path / "cache", "v1", 4)) == 0


def test_the_version_follows_size_and_rule() -> None:
    assert squares_version(128, "squeeze") == squares_version(128, "squeeze")
    assert squares_version(128, "squeeze") != squares_version(128, "letterbox")
    assert squares_version(128, "squeeze") != squares_version(96, "squeeze")
