"""A persistent index of near-duplicate candidates: new photos are searched against all, not all
against all.

The descriptor search is quadratic: with every photo new it multiplies all descriptors by all
(about 1.5e-8 s a pair on 2 cores: 11.8 s at 40,000 random descriptors, some 3 minutes at
160,000), where the photos that arrived since the last run need only new x all (0.42 s for
400 new against 40,000). The index keeps, for the distinct photos
(sha256) of the last run, every pair whose descriptor cosine reaches `min_cosine`, and on the
next run:
- drops the photos that are gone and their pairs (one that comes back is new again),
- searches the new photos against every current photo (neardup.scored_pairs with `new`),
- saves the result for the run after.

The pairs it returns are exactly those a search over all photos returns (tests/test_pair_index.py):
a pair's membership depends on its two photos only, and cosines are recomputed pair by pair, so
the rounding of a matrix block cannot tell the two apart. `top_k` is applied afterwards, on
the full pair set, for the same reason. The index is only valid for the descriptors it was
built from: it is stored under their version (vitrine.curation.features) and the cosine, and
a different one starts it afresh.

Kept as one compressed NumPy file beside the feature cache (digests, pairs as positions, their
cosines), written to a temporary name and renamed, so a killed run leaves the previous index.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vitrine.curation.neardup import Pairs, scored_pairs

PAIRS_FILE = "descriptor-pairs.npz"


def _load(path: Path, key: str) -> tuple[np.ndarray, Pairs, np.ndarray] | None:
    """The stored digests, pairs and cosines, or None when absent, unreadable or built for
    other descriptors or another cosine."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            return stored["digests"], stored["pairs"], stored["cosines"]
    except (OSError, ValueError, KeyError):
        return None


def _save(path: Path, key: str, digests: np.ndarray, pairs: Pairs, cosines: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(partial, key=key, digests=digests, pairs=pairs, cosines=cosines)
    os.replace(partial, path)


def _carried_over(
    digests: np.ndarray, stored: tuple[np.ndarray, Pairs, np.ndarray]
) -> tuple[np.ndarray, Pairs, np.ndarray]:
    """Which current photos the index knows, and its pairs between two current photos, in
    current positions."""
    old_digests, old_pairs, old_cos = stored
    pos = np.searchsorted(digests, old_digests)
    present = pos < len(digests)
    present[present] = digests[pos[present]] == old_digests[present]
    known = np.zeros(len(digests), dtype=bool)
    known[pos[present]] = True
    where = np.where(present, pos, -1)
    moved = where[old_pairs] if len(old_pairs) else np.empty((0, 2), dtype=np.int64)
    both = (moved >= 0).all(axis=1)
    return known, moved[both], old_cos[both]


def indexed_pairs(
    digests: np.ndarray,
    descriptors: np.ndarray,
    min_cosine: float,
    path: Path | None,
    version: str,
) -> tuple[Pairs, np.ndarray]:
    """Every pair (i, j), i < j, of rows of `descriptors` (one per sha256 of the sorted `digests`)
    with cosine >= min_cosine, and the cosines; with `path`, only the rows the index at `path`
    does not hold yet are searched, and the index is updated. None: an in-memory search."""
    digests = np.asarray(digests).astype("S64")
    if len(digests) > 1 and not (digests[1:] > digests[:-1]).all():
        raise ValueError("indexed_pairs: digests must be sorted and distinct")
    key = f"{version}:{min_cosine!r}"
    stored = _load(path, key) if path is not None else None
    if stored is None:
        known, pairs, cos = np.zeros(len(digests), dtype=bool), np.empty((0, 2), np.int64), None
    else:
        known, pairs, cos = _carried_over(digests, stored)
    fresh, fresh_cos = scored_pairs(descriptors, min_cosine, ~known)
    pairs = np.concatenate([pairs, fresh]).astype(np.int64)
    cos = np.concatenate([cos if cos is not None else np.empty(0, np.float32), fresh_cos])
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs, cos = pairs[order], cos[order].astype(np.float32)
    if path is not None:
        _save(path, key, digests, pairs, cos)
    return pairs, cos
