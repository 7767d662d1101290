"""Near-duplicate search: multi-index hashing against brute force, clusters, embedding pairs,
and edited copies of generated photos found by the thresholds chosen on the Avito photos."""

from __future__ import annotations

import numpy as np
import pytest

from vitrine.neardup import (
    brute_force_hash_pairs,
    choose_layout,
    clusters,
    embedding_pairs,
    hash_clusters,
    hash_pairs,
)


def random_codes_with_planted_pairs(rng: np.random.Generator, n: int, max_flips: int) -> np.ndarray:
    """Random codes, a quarter of them overwritten by copies of others with a few bits flipped,
    plus exact repeats: distances cluster around the threshold instead of all being ~32."""
    codes = rng.integers(0, 2**64, n, dtype=np.uint64)
    for src, dst in rng.integers(0, n, (n // 4, 2)):
        flips = rng.choice(64, int(rng.integers(0, max_flips + 1)), replace=False)
        codes[dst] = codes[src] ^ np.uint64(sum(1 << int(b) for b in flips))
    codes[rng.integers(0, n, n // 20)] = codes[0]
    return codes


@pytest.mark.parametrize("seed", range(12))
def test_hash_pairs_equal_brute_force(seed: int):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(2, 1500)), int(rng.integers(0, 13))
    codes = random_codes_with_planted_pairs(rng, n, d + 3)
    assert np.array_equal(hash_pairs(codes, d), brute_force_hash_pairs(codes, d))


@pytest.mark.parametrize("substrings", [3, 4, 5, 7, 9, 16, 64])
@pytest.mark.parametrize("d", [0, 1, 2, 5, 8, 11])
def test_hash_pairs_equal_brute_force_for_every_split(substrings: int, d: int):
    """Forced splits cover radius 0, radius > 0, skipped substrings and unequal radii."""
    rng = np.random.default_rng(100 * substrings + d)
    codes = random_codes_with_planted_pairs(rng, 600, d + 2)
    expected = brute_force_hash_pairs(codes, d)
    assert np.array_equal(hash_pairs(codes, d, substrings=substrings), expected)


@pytest.mark.parametrize("n, d", [(50_000, 8), (100_000, 4), (20_000, 0), (3_000, 12)])
def test_hash_pairs_equal_brute_force_on_the_large_n_layouts(n: int, d: int):
    """Large n selects wide substrings searched within a radius > 0 (the flip-mask path);
    brute force is only run on the codes that have a planted neighbour, plus random others."""
    rng = np.random.default_rng(n + d)
    codes = rng.integers(0, 2**64, n, dtype=np.uint64)
    src = rng.choice(n, 400, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), 400, replace=False)
    for s, t in zip(src, dst, strict=True):
        flips = rng.choice(64, int(rng.integers(0, d + 3)), replace=False)
        codes[t] = codes[s] ^ np.uint64(sum(1 << int(b) for b in flips))
    assert any(radius > 0 for _, _, radius in choose_layout(n, d)) or d == 0
    found = hash_pairs(codes, d)
    # Every found pair is truly close, and every close pair among a sample is found.
    assert (np.bitwise_count(codes[found[:, 0]] ^ codes[found[:, 1]]) <= d).all()
    sample = np.unique(np.concatenate([src, dst, rng.choice(n, 1500, replace=False)]))
    expected = sample[brute_force_hash_pairs(codes[sample], d)]
    found_set = {tuple(p) for p in found.tolist()}
    assert {tuple(sorted(p)) for p in expected.tolist()} <= found_set


def test_hash_pairs_edge_cases():
    assert hash_pairs(np.array([], dtype=np.uint64), 8).shape == (0, 2)
    assert hash_pairs(np.array([5], dtype=np.uint64), 8).shape == (0, 2)
    full = np.array([0, 2**64 - 1, 0], dtype=np.uint64)
    assert hash_pairs(full, 63).tolist() == [[0, 2]]
    with pytest.raises(ValueError):
        hash_pairs(full, 64)


def test_clusters_are_transitive_and_numbered_by_first_member():
    # 0-3 and 3-5 chain 0, 3, 5 together although 0 and 5 are not a pair; 1-4 is another.
    labels = clusters(7, np.array([[3, 5], [1, 4], [0, 3]]))
    assert labels.tolist() == [0, 1, 2, 0, 1, 0, 3]
    assert clusters(3, np.empty((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]


def test_hash_clusters_collapse_identical_codes():
    far = 0xFFFF << 40
    codes = np.array([7, 7, far, 7 ^ 0b11, 7, far + 1], dtype=np.uint64)
    assert hash_clusters(codes, 2).tolist() == [0, 0, 1, 0, 0, 1]
    assert hash_clusters(codes, 0).tolist() == [0, 0, 1, 2, 0, 3]


def test_embedding_pairs_equal_brute_force_in_every_block_size():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)).astype(np.float32)
    emb[150:] = emb[:150] + rng.normal(scale=0.3, size=(150, 16))  # one noisy twin each
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = emb @ emb.T
    i, j = np.triu_indices(len(emb), 1)
    close = sims[i, j] >= 0.9
    expected = np.stack([i[close], j[close]], axis=1)
    for block in (300, 4096, 1 << 24):
        got = embedding_pairs(emb, 0.9, top_k=None, block_elements=block)
        assert np.array_equal(got, expected)
    # top_k=1 keeps, per row, only its best later row.
    best = embedding_pairs(emb, 0.9, top_k=1, block_elements=4096)
    assert len(np.unique(best[:, 0])) == len(best)
    assert {tuple(p) for p in best.tolist()} <= {tuple(p) for p in expected.tolist()}
