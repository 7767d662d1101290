"""prepare: a stable, leakage-free split by cluster, and the resized images packed per split.

Training then memory-maps uint8 arrays and never decodes a JPEG. `prepare.split: column` takes
each photo's split from its source instead (a catalog column, e.g. a dataset's published
train/val/test lists), and the leakage report then measures how far that split leaks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from vitrine.config import Count, load_params, load_paths, params_block, run_cli, stage_config
from vitrine.data.layout import (
    SPLITS,
    prepared_manifest_path,
    split_images_path,
    write_preprocessing,
)
from vitrine.data.shards import MANIFEST, ShardReader
from vitrine.data.square_cache import Squares, keep, squares_version
from vitrine.images import RESIZE_MODES, SQUEEZE, load_square

SPLIT_RULES = ("hash", "column")


@params_block
class PrepareConfig:
    classes: tuple[str, ...]
    image_size: Count
    val_fraction: float
    test_fraction: float
    seed: int
    split: str = "hash"  # hash: by cluster key and seed | column: as the source gives it
    split_column: str = "split"  # the catalog column (kept in `meta`) read by split: column
    resize: str = SQUEEZE  # how a photo becomes the square (vitrine.images.RESIZE_MODES)
    cache_dir: str = ""  # the last run's squares by sha256 (vitrine.data.square_cache); "": none

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction + self.test_fraction < 1:
            raise ValueError("prepare: val_fraction + test_fraction must be in (0, 1)")
        if self.split == "hash" and min(self.val_fraction, self.test_fraction) <= 0:
            raise ValueError("prepare: val_fraction and test_fraction must each be > 0")
        if self.split not in SPLIT_RULES:
            raise ValueError(f"prepare.split must be one of {SPLIT_RULES}, got {self.split!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"prepare.resize must be one of {RESIZE_MODES}, got {self.resize!r}")


class SplitError(ValueError):
    """`prepare.split: column` found photos whose source gives no valid split."""


def assign_split(cluster_id: str, config: PrepareConfig) -> str:
    """A cluster's split depends only on its key and the seed: adding photos never moves old
    ones, and every copy of a photo lands in the same split as its cluster."""
    digest = hashlib.sha256(f"{config.seed}:{cluster_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < config.test_fraction:
        return "test"
    return "val" if u < config.test_fraction + config.val_fraction else "train"


def _meta_value(meta: str, key: str) -> str:
    return str(json.loads(meta).get(key, "")).strip() if meta else ""


def source_splits(rows: pd.DataFrame, column: str) -> pd.Series:
    """Each row's split as its source gives it (catalog column `column`, kept in `meta`).
    A photo without train, val or test there is refused, never guessed or dropped."""
    meta = rows["meta"] if "meta" in rows else pd.Series("", index=rows.index)
    given = meta.map(lambda m: _meta_value(m, column))
    bad = (~given.isin(SPLITS)).to_numpy()
    if bad.any():
        pairs = zip(rows["id"].to_numpy()[bad][:5], given.to_numpy()[bad][:5], strict=True)
        examples = ", ".join(f"{i} ({v!r})" for i, v in pairs)
        raise SplitError(
            f"prepare.split: column: {bad.sum()} of {len(rows)} photos have no {column!r} of "
            f"{list(SPLITS)} in their source's metadata, e.g. {examples}"
        )
    return given


def clustered_splits(deduped: pd.DataFrame, config: PrepareConfig) -> pd.Series:
    """The split of every accepted (clustered) photo, copies included, indexed as `deduped`:
    all are checked before anything is packed."""
    clustered = deduped[deduped["cluster_id"] != ""]
    if config.split == "column":
        return source_splits(clustered, config.split_column)
    return clustered["cluster_id"].map(lambda c: assign_split(c, config))


def split_manifest(deduped: pd.DataFrame, config: PrepareConfig) -> pd.DataFrame:
    """The kept photos with their split and their row `index` in that split's image array."""
    rows = deduped.reset_index(drop=True)
    splits = clustered_splits(rows, config)
    kept = rows[rows["status"] == "kept"].sort_values(["source", "id"]).copy()
    kept["split"] = splits[kept.index]
    kept["index"] = kept.groupby("split").cumcount()
    columns = [
        "id",
        "label",
        "source",
        "cluster_id",
        "split",
        "index",
        "sha256",
        "shard",
        "offset",
        "length",
    ]
    return kept[columns].reset_index(drop=True)


def pack_split(
    rows: pd.DataFrame,
    shards: ShardReader,
    size: int,
    out: Path,
    resize: str = SQUEEZE,
    squares: Squares | None = None,
) -> int:
    """Decode and resize one split into an (N, size, size, 3) uint8 .npy, in `index` order,
    taking the squares `squares` already holds from there: how many photos were decoded.

    Written photo by photo through a plain file, not a memory map: a map's written pages count
    in the process's resident memory until the kernel writes them back (7.3 GiB for 160,000
    photos at 128 px), a file's do not. A fresh file renamed into place: `out` may be a hard
    link of the squares cache, which must not change under it.
    """
    rows = rows.sort_values("index")
    if not np.array_equal(rows["index"].to_numpy(), np.arange(len(rows))):
        raise ValueError(f"{out.name}: the split's indices are not 0..{len(rows) - 1}")
    header = {"descr": "|u1", "fortran_order": False, "shape": (len(rows), size, size, 3)}
    partial = out.with_name(out.name + ".partial")
    decoded = 0
    with partial.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for row in tqdm(rows.itertuples(), total=len(rows), desc=f"prepare {out.stem}", unit="img"):
            square = squares.get(row.sha256) if squares is not None else None
            if square is None:
                data = shards.read(row.shard, row.offset, row.length)
                square = load_square(data, size, resize).tobytes()
                decoded += 1
            f.write(square)
    partial.replace(out)
    return decoded


def leaked(split: pd.Series, cluster_id: pd.Series) -> int:
    """How many val/test photos have a near-duplicate (a cluster-mate) in train."""
    train_clusters = set(cluster_id[split == "train"])
    return int((split.isin(["val", "test"]) & cluster_id.isin(train_clusters)).sum())


def naive_split(n: int, config: PrepareConfig) -> np.ndarray:
    """What a photo-by-photo random split (avito_upload_classifier's) would have done."""
    u = np.random.default_rng(config.seed).random(n)
    test, val = config.test_fraction, config.test_fraction + config.val_fraction
    return np.where(u < test, "test", np.where(u < val, "val", "train"))


def leakage_report(deduped: pd.DataFrame, prepared: pd.DataFrame, config: PrepareConfig) -> dict:
    """Near-duplicate leakage into val/test: our split against a naive random split of every
    accepted photo, copies included. With `split: column`, also the source's own split over
    every accepted photo (what training on it as published would leak) and what dedupe took
    out of each of its splits."""
    accepted = deduped[deduped["cluster_id"] != ""]
    naive = pd.Series(naive_split(len(accepted), config), index=accepted.index)
    report: dict[str, Any] = {
        "leaked_val_test_photos": leaked(prepared["split"], prepared["cluster_id"]),
        "naive_split_leaked_val_test_photos": leaked(naive, accepted["cluster_id"]),
        "naive_split_val_test_photos": int(naive.isin(["val", "test"]).sum()),
    }
    if config.split == "column":
        given = source_splits(accepted, config.split_column)
        splits_per_cluster = given.groupby(accepted["cluster_id"]).nunique()
        removed = given[accepted["status"] != "kept"].value_counts()
        report["source_split"] = {
            "leaked_val_test_photos": leaked(given, accepted["cluster_id"]),
            "val_test_photos": int(given.isin(["val", "test"]).sum()),
            "clusters_across_splits": int((splits_per_cluster > 1).sum()),
            "not_kept_by_dedupe": {s: int(removed.get(s, 0)) for s in SPLITS},
        }
    return report


def prepare_report(prepared: pd.DataFrame) -> dict[str, Any]:
    counts = prepared.groupby(["split", "label"]).size()
    report: dict[str, Any] = {}
    for split in SPLITS:
        if split in counts.index.get_level_values(0):
            by_label = counts.xs(split)
            report[split] = {
                "total": int(by_label.sum()),
                **{k: int(v) for k, v in by_label.items()},
            }
    return report


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), stage_config(PrepareConfig, "prepare", params)
    deduped = pd.read_parquet(paths.deduped / MANIFEST)
    try:
        prepared = split_manifest(deduped, config)
    except SplitError as err:
        raise SystemExit(f"prepare: {err}") from None
    paths.prepared.mkdir(parents=True, exist_ok=True)
    cache = Path(config.cache_dir) if config.cache_dir else None
    version = squares_version(config.image_size, config.resize)
    squares = Squares(cache, version, config.image_size)
    arrays = {split: split_images_path(paths.prepared, split) for split in SPLITS}
    decoded = 0
    with ShardReader(paths.collected) as shards:
        for split, out in arrays.items():
            rows = prepared[prepared["split"] == split]
            decoded += pack_split(rows, shards, config.image_size, out, config.resize, squares)
    reused = f", {len(prepared) - decoded} reused from {cache}" if cache is not None else ""
    print(f"prepare: {decoded} of {len(prepared)} squares decoded{reused}")
    squares.close()
    if cache is not None and not keep(cache, version, arrays, prepared):
        print(f"prepare: {cache} cannot hold hard links of {paths.prepared}: no squares kept")
    prepared.drop(columns=["shard", "offset", "length"]).to_parquet(
        prepared_manifest_path(paths.prepared), index=False
    )
    write_preprocessing(paths.prepared, config.image_size, config.resize)
    report = {**prepare_report(prepared), "leakage": leakage_report(deduped, prepared, config)}
    paths.prepare_report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"prepare: {report}")


if __name__ == "__main__":
    run_cli(main)
