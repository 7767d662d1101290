"""A small collect configuration and a run of the stage's core into tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from stages.collect import CollectConfig, collect
from vitrine.ingest.download import DownloadConfig
from vitrine.ingest.records import Source


def config(*sources: Source, **overrides: Any) -> CollectConfig:
    base: dict[str, Any] = dict(
        classes=("laptop", "phone"),
        sources=sources,
        min_side=32,
        max_pixels=10**7,
        max_bytes=10**6,
        shard_size=5,
        thumb_size=48,
        # allow_private: the URL tests' servers listen on loopback
        download=DownloadConfig(
            timeout_s=5.0, max_attempts=2, backoff_base_s=0.01, fsync=False, allow_private=True
        ),
    )
    return CollectConfig(**{**base, **overrides})


def run(cfg: CollectConfig, raw: Path, tmp_path: Path) -> pd.DataFrame:
    """collect into tmp_path/out; the manifest indexed by id."""
    manifest = collect(cfg, raw, tmp_path / "out", cache=tmp_path / "cache")
    return pd.read_parquet(manifest).set_index("id")
