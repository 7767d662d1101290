"""The persistent near-copy index: new photos searched against all give the pairs of a search over
all photos, photos that leave take their pairs with them, and other descriptors start afresh."""

from __future__ import annotations

import hashlib

import numpy as np

from vitrine.curation.neardup import scored_pairs, top_k_pairs
from vitrine.curation.pair_index import PAIRS_FILE, indexed_pairs

MIN_COSINE = 0.965


def catalog(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n photos' digests (sorted) and unit descriptors, a third of them near copies of another."""
    rng = np.random.default_rng(seed)
    desc = rng.normal(size=(n, 24)).astype(np.float32)
    for i in range(0, n, 3):
        j = int(rng.integers(n))
        desc[j] = desc[i] + rng.normal(scale=0.12, size=24).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    digests = np.array([hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)])
    order = np.argsort(digests)
    return digests[order], desc[order]


def brute_force(desc: np.ndarray, min_cosine: float) -> set[tuple[int, int]]:
    sims = desc @ desc.T
    i, j = np.nonzero(np.triu(sims >= min_cosine, k=1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def as_digest_pairs(digests: np.ndarray, pairs: np.ndarray) -> set[tuple[str, str]]:
    return {(str(digests[i]), str(digests[j])) for i, j in pairs}


def test_a_search_over_all_photos_finds_every_pair_above_the_cosine():
    digests, desc = catalog(400)
    pairs, cos = indexed_pairs(digests, desc, MIN_COSINE, None, "v1")
    expected = brute_force(desc, MIN_COSINE)
    assert len(expected) > 20  # the planted copies
    assert set(map(tuple, pairs.tolist())) == expected
    np.testing.assert_allclose(cos, np.einsum("ij,ij->i", desc[pairs[:, 0]], desc[pairs[:, 1]]))


def test_adding_and_removing_photos_gives_the_pairs_of_a_clean_search(tmp_path):
    digests, desc = catalog(600, seed=1)
    index = tmp_path / PAIRS_FILE
    rng = np.random.default_rng(2)
    first = np.sort(rng.choice(600, size=400, replace=False))
    indexed_pairs(digests[first], desc[first], MIN_COSINE, index, "v1")
    # The next run: 150 of those photos are gone and every photo not seen yet arrives.
    gone = set(rng.choice(first, size=150, replace=False).tolist())
    now = np.array([i for i in range(600) if i not in gone])
    incremental, inc_cos = indexed_pairs(digests[now], desc[now], MIN_COSINE, index, "v1")
    clean, clean_cos = indexed_pairs(digests[now], desc[now], MIN_COSINE, None, "v1")
    np.testing.assert_array_equal(incremental, clean)
    np.testing.assert_array_equal(inc_cos, clean_cos)  # the same bits, not just close
    assert as_digest_pairs(digests[now], clean) == as_digest_pairs(
        digests, np.array(sorted(brute_force(desc, MIN_COSINE) & pairs_within(now)))
    )
    # A photo that comes back is searched again, against the photos that arrived meanwhile.
    back, _ = indexed_pairs(digests, desc, MIN_COSINE, index, "v1")
    np.testing.assert_array_equal(back, np.array(sorted(brute_force(desc, MIN_COSINE))))


def pairs_within(rows: np.ndarray) -> set[tuple[int, int]]:
    inside = set(rows.tolist())
    return {(i, j) for i in inside for j in inside if i < j}


def test_an_index_built_from_other_descriptors_or_another_cosine_is_not_used(tmp_path):
    digests, desc = catalog(200, seed=3)
    index = tmp_path / PAIRS_FILE
    indexed_pairs(digests, desc, MIN_COSINE, index, "v1")
    moved = desc[::-1].copy()  # the same photos, other descriptors
    for version, cosine in (("v2", MIN_COSINE), ("v1", 0.9)):
        got, _ = indexed_pairs(digests, moved, cosine, index, version)
        assert set(map(tuple, got.tolist())) == brute_force(moved, cosine)


def test_a_damaged_index_is_rebuilt(tmp_path):
    digests, desc = catalog(100, seed=4)
    index = tmp_path / PAIRS_FILE
    index.write_bytes(b"not an index")
    got, _ = indexed_pairs(digests, desc, MIN_COSINE, index, "v1")
    assert set(map(tuple, got.tolist())) == brute_force(desc, MIN_COSINE)
    assert np.load(index)["pairs"].shape == got.shape


def test_new_rows_are_searched_against_every_row_and_each_pair_once():
    desc = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2]]  # rows 0~1 and 2~3 identical
    new = np.array([False, True, False, True, True])
    pairs, cos = scored_pairs(desc, 0.99, new, block_elements=1)  # one row per block
    assert pairs.tolist() == [[0, 1], [2, 3]] and cos.tolist() == [1.0, 1.0]
    assert scored_pairs(desc, 0.99, None)[0].tolist() == [[0, 1], [2, 3]]
    assert scored_pairs(desc, 0.99, np.zeros(5, dtype=bool))[0].tolist() == []


def test_top_k_keeps_each_rows_most_similar_later_partners_ties_to_the_smaller():
    pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3]])
    cos = np.array([0.97, 0.99, 0.97, 0.98, 0.99], dtype=np.float32)
    assert top_k_pairs(pairs, cos, 1).tolist() == [[0, 2], [1, 3]]
    assert top_k_pairs(pairs, cos, 2).tolist() == [[0, 1], [0, 2], [1, 2], [1, 3]]
    assert top_k_pairs(pairs, cos, None).tolist() == pairs.tolist()
