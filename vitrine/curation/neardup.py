"""Near-duplicate search: pHash pairs by multi-index hashing, embedding pairs by blocked cosine.

Exact sha256 matching misses re-uploads that were resized, recompressed, cropped or captioned.
Two signals catch them: a 64-bit pHash (cheap, survives resizing and recompression) and a CNN
embedding (survives crops and caption bars). Both give pairs; `clusters` joins pairs into groups.

Multi-index hashing (Norouzi, Punjani & Fleet 2012; generalised pigeonhole of Qin et al. 2018):
split the 64 bits into m substrings and give substring k a radius r_k with sum(r_k) = d - m + 1.
If two codes are within distance d, some substring k differs in at most r_k bits (otherwise the
total would be at least sum(r_k + 1) = d + 1). So it suffices to look, for every code and every
substring, at the codes whose substring is within r_k bits, and verify those candidates on all 64
bits. The number of substrings m is chosen by a cost model: for 1M random codes at d = 8 that is
m = 3 substrings of 22/21/21 bits searched within 2 bits (about 150M candidates), not m = 4 of
16 bits searched within 2 (about 4 billion candidates: a 16-bit bucket holds ~15 of 1M codes and
radius 2 visits 137 buckets per code and substring).

faiss has the same search (IndexBinaryMultiHash: equally wide substrings, each searched within
`nflip` bits) and finds identical pairs, but is 14-29 times slower here: on 1M random codes plus
10,000 planted pairs at d = 8 it took 93-185 s with both cores against 6-7 s for this module on
one, over three runs (`.venv/bin/python benchmarks/neardup.py --parts f`, a shared 2-core AMD
EPYC). It looks up a hash map once per flipped key and gathers each code's candidates in a hash
set, where this module handles one substring and flip mask for all codes at once, on sorted
arrays. faiss's exhaustive IndexBinaryFlat range search is quadratic: 3-4 s at 100,000 codes,
where this module takes 0.2-0.4 s.

The pHash search is rebuilt at every run: hash_pairs over 1,000,000 codes at distance 8 takes
5.4-5.5 s (`.venv/bin/python benchmarks/neardup.py --parts ae`, a shared 2-core AMD EPYC). The
descriptor search is the quadratic part (96 s over 100,000 descriptors): `scored_pairs` searches
only the rows flagged new against all, and vitrine.curation.pair_index keeps its pairs between
runs, so a run after new photos arrived costs new x all. Both return every pair above the
cosine, scored pair by pair; `top_k_pairs` then bounds a crowded row's partners, on the full
set, so that an index that grew photo by photo and a search from scratch agree exactly.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

HASH_BITS = 64
# Widest substring: its direct-address offsets table has 2**width entries (22 bits: 32 MiB).
MAX_SUBSTRING_BITS = 22
# Cost-model constants, in "element operations": fixed numpy overhead of one pass over the codes,
# and the cost of one candidate (expand, gather both hashes, popcount) relative to one element.
_PASS_OVERHEAD = 20_000
_CANDIDATE_COST = 3.0

Pairs = np.ndarray  # (k, 2) int64, i < j, rows sorted and unique


# ---------------------------------------------------------------------------------------------
# pHash pairs
# ---------------------------------------------------------------------------------------------


def _ball(width: int, radius: int) -> int:
    """How many keys of `width` bits lie within `radius` bits of a given key."""
    return sum(comb(width, k) for k in range(radius + 1)) if radius >= 0 else 0


def _layout(m: int, max_distance: int) -> list[tuple[int, int, int]]:
    """(shift, width, radius) of each of m substrings; radius -1 means the substring is skipped.

    The radii are spread as evenly as possible over a total of d - m + 1 (generalised pigeonhole),
    the larger ones on the wider substrings, where a bucket holds fewer codes.
    """
    widths = [HASH_BITS // m + (1 if k < HASH_BITS % m else 0) for k in range(m)]
    total = max_distance - m + 1
    base, extra = divmod(total, m)
    radii = [base + (1 if k < extra else 0) for k in range(m)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return [(s, w, r) for s, w, r in zip(shifts, widths, radii, strict=True) if r >= 0]


def _layout_cost(layout: list[tuple[int, int, int]], n: int) -> float:
    cost = 0.0
    for _, width, radius in layout:
        ball = _ball(width, radius)
        cost += 2.0**width / 8  # building the offsets table
        cost += ball * (_PASS_OVERHEAD + n / 2)  # one pass over half the codes per flip mask
        cost += _CANDIDATE_COST * n * n / 2 * ball / 2.0**width  # expected random collisions
    return cost


@lru_cache(maxsize=128)
def choose_layout(n: int, max_distance: int) -> tuple[tuple[int, int, int], ...]:
    """The cheapest substring split for n uniformly random codes (see module docstring)."""
    options = []
    # m > d + 1 is allowed: then only d + 1 substrings are used, each matched exactly.
    for m in range(1, HASH_BITS + 1):
        if -(-HASH_BITS // m) > MAX_SUBSTRING_BITS:
            continue
        layout = _layout(m, max_distance)
        options.append((_layout_cost(layout, n), m, layout))
    return tuple(min(options)[2])


def _flip_masks(top_bit: int, radius: int) -> np.ndarray:
    """Masks whose highest set bit is `top_bit`, with at most `radius` bits set."""
    low = [
        sum(1 << b for b in bits) for k in range(radius) for bits in combinations(range(top_bit), k)
    ]
    return np.asarray(low, dtype=np.int64) | (1 << top_bit)


def _expand(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [start, start + count): (range number, position) of every element."""
    owner = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts
    return owner, np.arange(owner.size) + np.repeat(starts - first, counts)


def _same_key_pairs(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (p, q), p < q, of positions holding equal keys in a sorted array."""
    bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate([[0], bounds])
    lengths = np.diff(np.concatenate([starts, [len(sorted_keys)]]))
    ps, qs = [], []
    # One round per gap s: the work is proportional to the pairs produced, even for big runs.
    for s in range(1, int(lengths.max(initial=1))):
        keep = lengths > s
        starts, lengths = starts[keep], lengths[keep]
        _, p = _expand(starts, lengths - s)
        ps.append(p)
        qs.append(p + s)
    empty = np.empty(0, dtype=np.int64)
    return np.concatenate([empty, *ps]), np.concatenate([empty, *qs])


def _substring_pairs(
    hashes: np.ndarray, shift: int, width: int, radius: int, max_distance: int
) -> np.ndarray:
    """Verified pairs (as i * n + j, i < j) whose substring differs in at most `radius` bits."""
    n = len(hashes)
    # int32 keys (width <= 22): half the memory traffic of int64 in the lookups below.
    keys = ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int32)
    # Sorting by key makes every bucket a contiguous range and keeps the gathers below local.
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_hashes = keys[order], hashes[order]
    sizes = np.bincount(sorted_keys, minlength=1 << width)
    offsets = np.zeros((1 << width) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    # Most looked-up buckets are empty: a 1-byte table answers that with less memory traffic.
    occupied = sizes > 0

    found = []

    def verify(p: np.ndarray, q: np.ndarray) -> None:
        close = np.bitwise_count(sorted_hashes[p] ^ sorted_hashes[q]) <= max_distance
        i, j = order[p[close]], order[q[close]]
        found.append(np.minimum(i, j) * n + np.maximum(i, j))

    verify(*_same_key_pairs(sorted_keys))
    for top_bit in range(width):
        # A pair whose keys differ is visited once, from the code whose key has a 0 at the
        # highest differing bit: that halves the codes looked up for every mask.
        low_side = np.flatnonzero(((sorted_keys >> top_bit) & 1) == 0)
        low_keys = sorted_keys[low_side]
        for mask in _flip_masks(top_bit, radius).tolist():
            target = low_keys ^ mask
            hit = np.flatnonzero(occupied[target])
            lo, hi = offsets[target[hit]], offsets[target[hit] + 1]
            owner, q = _expand(lo, hi - lo)
            verify(low_side[hit][owner], q)
    return np.concatenate(found)


def hash_pairs(hashes: np.ndarray, max_distance: int, *, substrings: int | None = None) -> Pairs:
    """All pairs (i, j), i < j, of 64-bit codes within Hamming distance `max_distance`.

    Sub-quadratic for spread-out codes (multi-index hashing); identical codes still produce all
    their pairs, so collapse them first (as `hash_clusters` does) when only clusters are wanted.
    `substrings` forces the number of substrings (tests); by default a cost model picks it.
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64).ravel()
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS}), got {max_distance}")
    n = len(hashes)
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    if substrings is None:
        layout = choose_layout(n, max_distance)
    elif 1 <= substrings <= HASH_BITS and -(-HASH_BITS // substrings) <= MAX_SUBSTRING_BITS:
        layout = tuple(_layout(substrings, max_distance))
    else:
        raise ValueError(f"substrings must be in [3, {HASH_BITS}], got {substrings}")
    codes = [
        _substring_pairs(hashes, shift, width, radius, max_distance)
        for shift, width, radius in layout
    ]
    # A pair close in several substrings is found once per substring.
    unique = np.unique(np.concatenate(codes))
    return np.stack([unique // n, unique % n], axis=1)


def brute_force_hash_pairs(hashes: np.ndarray, max_distance: int) -> Pairs:
    """Reference for tests and small inputs: compares all n^2 / 2 pairs."""
    hashes = np.asarray(hashes, dtype=np.uint64).ravel()
    i, j = np.triu_indices(len(hashes), k=1)
    close = np.bitwise_count(hashes[i] ^ hashes[j]) <= max_distance
    return np.stack([i[close], j[close]], axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Embedding pairs
# ---------------------------------------------------------------------------------------------


# Candidates are searched a little below the asked cosine and then judged on cosines recomputed
# pair by pair: a matrix product's rounding depends on the shape of the block a pair falls in, and
# an index that adds photos must find exactly the pairs a search over all photos finds.
_SEARCH_SLACK = 1e-4


def scored_pairs(
    emb: np.ndarray,
    min_cosine: float,
    new: np.ndarray | None = None,
    *,
    block_elements: int = 1 << 24,
) -> tuple[Pairs, np.ndarray]:
    """Every pair (i, j), i < j, of L2-normalised rows with cosine >= min_cosine that involves a
    row flagged in `new` (a boolean mask; None: all rows), and its cosine.

    Rows are searched in blocks against the rows that can pair with them (with every row new,
    only the upper triangle), with at most `block_elements` similarities in memory at a time.
    Adding rows to a set costs new x all products, not all x all.
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(emb)
    is_new = np.ones(n, dtype=bool) if new is None else np.asarray(new, dtype=bool)
    new_rows = np.flatnonzero(is_new)
    everything_new = len(new_rows) == n
    rows = max(1, block_elements // max(n, 1))
    found = [np.empty((0, 2), dtype=np.int64)]
    for start in range(0, len(new_rows), rows):
        block = new_rows[start : start + rows]
        first = int(block[0]) if everything_new else 0  # columns before it cannot pair
        sims = emb[block] @ emb[first:].T  # column c is row first + c
        cols = np.arange(first, n)
        # A new column pairs with a new row only after it, so that each pair is searched once.
        sims[is_new[cols][None, :] & (cols[None, :] <= block[:, None])] = -np.inf
        r, c = np.nonzero(sims >= min_cosine - _SEARCH_SLACK)
        i, j = block[r], cols[c]
        found.append(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1))
    pairs = np.concatenate(found).astype(np.int64)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    cos = pair_cosines(emb, pairs)
    keep = cos >= min_cosine
    return pairs[keep], cos[keep]


def pair_cosines(emb: np.ndarray, pairs: Pairs) -> np.ndarray:
    """The cosine of each pair's rows, computed pair by pair (the same bits in any block)."""
    return np.einsum("ij,ij->i", emb[pairs[:, 0]], emb[pairs[:, 1]])


def top_k_pairs(pairs: Pairs, cos: np.ndarray, top_k: int | None) -> Pairs:
    """For each row i, at most its top_k most similar partners j > i (ties: the smaller j).

    Enough to connect a group of copies into one cluster while bounding the output when
    thousands of rows are alike; None keeps every pair. Rows (i, j) sorted and unique.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if top_k is not None and len(pairs):
        order = np.lexsort((pairs[:, 1], -cos, pairs[:, 0]))
        by_row = pairs[order]
        starts = np.flatnonzero(np.r_[True, by_row[1:, 0] != by_row[:-1, 0]])
        rank = np.arange(len(by_row)) - np.repeat(starts, np.diff(np.r_[starts, len(by_row)]))
        pairs = by_row[rank < top_k]
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def embedding_pairs(
    emb: np.ndarray,
    min_cosine: float,
    *,
    top_k: int | None = 32,
    block_elements: int = 1 << 24,
) -> Pairs:
    """Pairs (i, j), i < j, of L2-normalised rows with cosine similarity >= min_cosine, at most
    `top_k` per row i (see top_k_pairs)."""
    pairs, cos = scored_pairs(emb, min_cosine, block_elements=block_elements)
    return top_k_pairs(pairs, cos, top_k)


# ---------------------------------------------------------------------------------------------
# Clusters
# ---------------------------------------------------------------------------------------------


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of the graph with n nodes and `pairs` as edges (transitive closure).

    Labels are 0..k-1 numbered by each cluster's smallest member, so they do not depend on the
    order of the pairs; singletons get their own label.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = sp.coo_matrix(
        (np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n)
    )
    _, labels = connected_components(graph, directed=False)
    return _renumber(labels)


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Labels 0..k-1 in order of first occurrence: node 0's cluster is 0, the next new one 1..."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]


def hash_clusters(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Cluster labels of codes joined transitively by Hamming distance <= max_distance.

    Identical codes are collapsed first, so a hash shared by thousands of photos (blank images)
    costs one code, not millions of pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64).ravel()
    unique, inverse = np.unique(hashes, return_inverse=True)
    labels = clusters(len(unique), hash_pairs(unique, max_distance))
    return _renumber(labels[inverse.ravel()])


# ---------------------------------------------------------------------------------------------
# Both signals together
# ---------------------------------------------------------------------------------------------

Tier = tuple[int, float]  # (max pHash Hamming distance, min descriptor cosine)

# Chosen on edited copies of Avito photos (benchmarks/neardup.py) and by looking at the Avito
# pairs each tier adds. The further apart two pHashes are, the closer the descriptors must be:
# - pHash <= 6 and cosine >= 0.95: resized, recompressed and brightened copies; pHash alone at
#   6-8 also pairs different laptops shot the same way, which the descriptor rejects;
# - pHash <= 20 and cosine >= 0.965: crops and caption bars (pHash 10-20 apart);
# - cosine >= 0.975 at any pHash distance: background swaps (the same shot on white and black).
# The middle tier is the costly one: about 100 Avito pairs fall in it and most are different
# stock photos of one model line; without it, crops and captions drop below 95% recall.
DEFAULT_TIERS: tuple[Tier, ...] = ((6, 0.95), (20, 0.965), (HASH_BITS, 0.975))
# Tiers up to this distance get their candidates from the pHash index, wider ones from the
# descriptors: multi-index hashing is cheap at small distances and explodes at large ones.
HASH_SEARCH_MAX_DISTANCE = 12


def near_duplicate_pairs(
    hashes: np.ndarray,
    emb: np.ndarray,
    tiers: tuple[Tier, ...] = DEFAULT_TIERS,
    *,
    top_k: int | None = 32,
    scored: tuple[Pairs, np.ndarray] | None = None,
) -> Pairs:
    """Pairs (i, j), i < j, meeting any tier: pHash distance <= d and descriptor cosine >= c.

    Each signal proposes candidates (hash_pairs for the narrow tiers, embedding_pairs for the
    others) and every candidate is then judged on both. `scored`: the descriptor pairs at or
    above the wide tiers' lowest cosine with their cosines (scored_pairs, or a
    vitrine.curation.pair_index kept between runs); None: searched here.
    """
    hashes = np.asarray(hashes, dtype=np.uint64).ravel()
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if len(hashes) != len(emb):
        raise ValueError(f"{len(hashes)} hashes but {len(emb)} embeddings")
    by_hash = [d for d, _ in tiers if d <= HASH_SEARCH_MAX_DISTANCE]
    by_emb = [c for d, c in tiers if d > HASH_SEARCH_MAX_DISTANCE]
    candidates = [np.empty((0, 2), dtype=np.int64)]
    if by_hash:
        candidates.append(hash_pairs(hashes, max(by_hash)))
    if by_emb:
        pairs, cos = scored if scored is not None else scored_pairs(emb, min(by_emb))
        candidates.append(top_k_pairs(pairs, cos, top_k))
    pairs = np.unique(np.concatenate(candidates), axis=0)
    dist = np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]])
    cos = pair_cosines(emb, pairs)
    keep = np.zeros(len(pairs), dtype=bool)
    for max_distance, min_cosine in tiers:
        keep |= (dist <= max_distance) & (cos >= min_cosine)
    return pairs[keep]


def near_duplicate_clusters(
    hashes: np.ndarray, emb: np.ndarray, tiers: tuple[Tier, ...] = DEFAULT_TIERS
) -> np.ndarray:
    """Cluster labels (see `clusters`) of photos joined transitively by `near_duplicate_pairs`."""
    return clusters(len(emb), near_duplicate_pairs(hashes, emb, tiers))


def star_clusters(n: int, pairs: np.ndarray, priority: np.ndarray | None = None) -> np.ndarray:
    """Representative of each node: every node joins a representative it is DIRECTLY paired with.

    Nodes are visited in `priority` order (e.g. most pixels first; default 0..n-1); an unassigned
    node becomes a representative and takes its unassigned neighbours. Unlike `clusters`, chains
    A~B~C do not put A and C together unless one of them is paired with the representative, so a
    run of look-alike stock photos is not collapsed into one. Returns, per node, the index of its
    representative (representatives map to themselves).
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    order = np.arange(n) if priority is None else np.asarray(priority, dtype=np.int64)
    both = np.concatenate([pairs, pairs[:, ::-1]])
    graph = sp.csr_matrix((np.ones(len(both), dtype=np.int8), (both[:, 0], both[:, 1])), (n, n))
    rep = np.full(n, -1, dtype=np.int64)
    for node in order[np.isin(order, both[:, 0])]:  # nodes without pairs represent themselves
        if rep[node] < 0:
            rep[node] = node
            neighbours = graph.indices[graph.indptr[node] : graph.indptr[node + 1]]
            free = neighbours[rep[neighbours] < 0]
            rep[free] = node
    alone = rep < 0
    rep[alone] = np.flatnonzero(alone)
    return rep
