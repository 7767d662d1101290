"""A synthetic prepared set for the training benchmarks (loader.py, train_gpu.py): random photos
in prepare's layout ({split}.npy and manifest.parquet), for a checkout without data/prepared or
for more photos than it holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vitrine.data.layout import prepared_manifest_path, split_images_path

CHUNK = 2000  # photos generated and written at a time, so memory stays small


def synthetic_prepared(
    root: Path, classes: list[str], sizes: dict[str, int], side: int = 128, seed: int = 0
) -> Path:
    """sizes[split] random side x side photos per split, random labels among `classes`, under
    `root` (made if missing); written chunk by chunk."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in sizes.items():
        out = np.lib.format.open_memmap(
            split_images_path(root, split), mode="w+", dtype=np.uint8, shape=(n, side, side, 3)
        )
        for start in range(0, n, CHUNK):
            stop = min(start + CHUNK, n)
            out[start:stop] = rng.integers(0, 256, (stop - start, side, side, 3), dtype=np.uint8)
        out.flush()
        del out
        labels = rng.integers(0, len(classes), n)
        rows += [
            {"id": f"{split}-{i}", "label": classes[y], "split": split, "index": i}
            for i, y in enumerate(labels)
        ]
    pd.DataFrame(rows).to_parquet(prepared_manifest_path(root))
    return root
