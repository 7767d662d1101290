"""Near-duplicate search benchmark: speed at 1M hashes, recall on edited copies, real archive.

    .venv/bin/python benchmarks/neardup.py             # parts a-d, about 7 minutes on 2 cores
    .venv/bin/python benchmarks/neardup.py --parts ae  # a and e (e: about 2 minutes)
    .venv/bin/python benchmarks/neardup.py --parts f   # f (2-4 minutes)

(a) 1,000,000 random 64-bit hashes (--hashes) plus planted near pairs, clustered at distance <= 8.
(b) 300 Avito photos and 5 edited copies of each (resize 60%, JPEG q25, 4% crop per side,
    brightness +15%, caption bar): % of copies clustered with their original and % of originals
    wrongly merged with another, by pHash alone, by descriptor alone, combined, and by the rule
    stages/dedupe.py uses today. Run twice: originals that are clearly distinct (one per loose
    component), then originals that are merely different files (re-uploads, look-alikes).
(c) The 4,277 Avito photos as they are: clusters and near-duplicate (non-identical) groups.
(d) Feature throughput on CPU: pHash; dedupe's features (96 px descriptor and 224 px embedding,
    decode included) by the torch networks on 2 threads and as dedupe computes them, ONNX Runtime
    on --workers Dask worker processes (a local cluster started beforehand).
(e) embedding_pairs on 100,000 random 448-d vectors (not run by default).
(f) The hashes of (a) searched by faiss's IndexBinaryMultiHash instead of hash_pairs: time and
    whether the pairs are identical (not run by default).
Timings are noisy on a shared machine: each is given as best and median of --repeats runs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from machine import cpu_model  # benchmarks/ is on sys.path when run as a script
from options import at_least
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from vitrine.compute import local_cluster
from vitrine.curation import feature_nets
from vitrine.curation.feature_nets import EMBED_SIDE
from vitrine.curation.features import FeatureRunner, feature_batches
from vitrine.curation.neardup import (
    DEFAULT_TIERS,
    clusters,
    embedding_pairs,
    hash_clusters,
    hash_pairs,
    near_duplicate_clusters,
    near_duplicate_pairs,
    star_clusters,
)
from vitrine.images import decode_rgb, load_square
from vitrine.ingest.hashing import phash64
from vitrine.model.embeddings import (
    DEDUPE_DIM,
    DEDUPE_SIZE,
    dedupe_embed,
    embed,
    load_backbone,
    load_descriptor,
)

AVITO = Path(__file__).resolve().parents[1] / "data" / "raw" / "avito-raw.tar.gz"
# What stages/dedupe.py does at the time of writing: pHash <= 8 OR pooled 1280-d cosine >= 0.92,
# the embedding computed from 128 px squares (params.yaml dedupe.*).
STAGE_DISTANCE, STAGE_COSINE, STAGE_SIDE = 8, 0.92, 128
HASH_ONLY_DISTANCE = 8  # pHash alone: every resized or recompressed copy is within 8
EMBEDDING_ONLY_COSINE = DEFAULT_TIERS[1][1]  # 0.965
# Looser than every tier: photos linked this way are treated as possibly the same photo when
# choosing "distinct" originals for (b).
LOOSE_DISTANCE, LOOSE_COSINE = 12, 0.95
FEATURE_BATCH = 64  # params.yaml dedupe.embedding_batch_size
T = TypeVar("T")


def timed(fn: Callable[[], T], repeats: int) -> tuple[T, float, float]:
    """(result, best seconds, median seconds) of `repeats` calls (at least one)."""
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times), statistics.median(times)


# ---------------------------------------------------------------------------------------------
# (a) 1M hashes
# ---------------------------------------------------------------------------------------------


def planted_codes(n: int, planted: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n random codes, `planted` of them copies of others with 1..d bits flipped: (codes, src,
    dst), code dst[k] being the flipped copy of code src[k]."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2**64, n, dtype=np.uint64)
    src = rng.choice(n, planted, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), planted, replace=False)
    for s, t in zip(src, dst, strict=True):
        flips = rng.choice(64, int(rng.integers(1, d + 1)), replace=False)
        codes[t] = codes[s] ^ np.uint64(sum(1 << int(b) for b in flips))
    return codes, src, dst


def part_a(repeats: int, n: int, d: int = 8) -> None:
    planted = n // 100
    codes, src, dst = planted_codes(n, planted, d)
    pairs, best, median = timed(lambda: hash_pairs(codes, d), repeats)
    labels, c_best, c_median = timed(lambda: clusters(n, pairs), repeats)
    found = {(int(a), int(b)) for a, b in pairs}
    recovered = sum((min(s, t), max(s, t)) in found for s, t in zip(src, dst, strict=True))
    print(f"(a) {n:,} random 64-bit hashes + {planted:,} planted pairs at distance 1..{d}")
    print(f"    hash_pairs(d<={d}): best {best:.1f} s, median {median:.1f} s ({repeats} runs)")
    print(f"    clusters():        best {c_best:.2f} s, median {c_median:.2f} s")
    print(
        f"    pairs found {len(pairs):,} (planted recovered {recovered:,}/{planted:,}, "
        f"{len(pairs) - recovered:,} others); clusters {labels.max() + 1:,}; "
        f"total best {best + c_best:.1f} s (target 60 s)"
    )


def faiss_hash_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, float]:
    """hash_pairs by faiss's IndexBinaryMultiHash, split as hash_pairs splits 1M codes at d = 8:
    3 substrings, each searched within d // 3 bits (the pigeonhole needs 3 * (d // 3 + 1) > d);
    faiss's substrings are equally wide, 21 bits (1 bit unused). Returns the pairs and the
    seconds spent building the index. faiss's OpenMP uses every core; hash_pairs runs on one."""
    import faiss  # only this comparison needs it

    start = time.perf_counter()
    nhash = 3
    codes = np.ascontiguousarray(hashes, dtype="<u8").view(np.uint8).reshape(-1, 8)
    index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
    index.nflip = max_distance // nhash
    index.add(codes)
    build = time.perf_counter() - start
    # range_search keeps distances < radius, and returns each pair both ways and every code
    # with itself.
    lims, _, found = index.range_search(codes, max_distance + 1)
    query = np.repeat(np.arange(len(hashes)), np.diff(lims).astype(np.int64))
    keep = query < found
    pairs = np.stack([query[keep], found[keep]], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))], build


def faiss_flat_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """hash_pairs by faiss's exhaustive IndexBinaryFlat: every code against every code."""
    import faiss

    codes = np.ascontiguousarray(hashes, dtype="<u8").view(np.uint8).reshape(-1, 8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, _, found = index.range_search(codes, max_distance + 1)
    query = np.repeat(np.arange(len(hashes)), np.diff(lims).astype(np.int64))
    keep = query < found
    pairs = np.stack([query[keep], found[keep]], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def part_f(n: int, d: int = 8) -> None:
    """The hashes of (a) through faiss: one run each, faiss takes minutes at 1M. The exhaustive
    index is run on a tenth of the codes only: it is quadratic."""
    codes, _, _ = planted_codes(n, n // 100, d)
    ours, ours_s, _ = timed(lambda: hash_pairs(codes, d), 1)
    (theirs, build), faiss_s, _ = timed(lambda: faiss_hash_pairs(codes, d), 1)
    print(f"(f) {n:,} hashes of (a), pairs at distance <= {d}, one run each")
    print(f"    hash_pairs (numpy, 1 core): {ours_s:.1f} s, {len(ours):,} pairs")
    print(
        f"    faiss IndexBinaryMultiHash (3 x 21 bits, nflip {d // 3}): {faiss_s:.1f} s "
        f"(index {build:.1f} s), {len(theirs):,} pairs; identical: {np.array_equal(ours, theirs)}"
    )
    tenth, _, _ = planted_codes(n // 10, n // 1000, d)
    ours, ours_s, _ = timed(lambda: hash_pairs(tenth, d), 1)
    flat, flat_s, _ = timed(lambda: faiss_flat_pairs(tenth, d), 1)
    print(
        f"    on {n // 10:,} codes: hash_pairs {ours_s:.1f} s, faiss IndexBinaryFlat range search "
        f"{flat_s:.1f} s; identical: {np.array_equal(ours, flat)}"
    )


def part_e(n: int = 100_000, dim: int = 448, twins: int = 1_000) -> None:
    """embedding_pairs on n random unit vectors (dedupe descriptor size) with planted twins."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb[:twins] = emb[twins : 2 * twins] + rng.normal(scale=0.1, size=(twins, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    start = time.perf_counter()
    pairs = embedding_pairs(emb, EMBEDDING_ONLY_COSINE)
    seconds = time.perf_counter() - start
    print(
        f"(e) embedding_pairs: {n:,} x {dim}-d, cosine >= {EMBEDDING_ONLY_COSINE}: {seconds:.0f} s,"
    )
    print(f"    {len(pairs):,} pairs ({twins:,} planted); one run: it is O(n^2 d) matrix products")


# ---------------------------------------------------------------------------------------------
# Avito photos and their features
# ---------------------------------------------------------------------------------------------


def load_avito() -> tuple[list[str], list[bytes]]:
    with tarfile.open(AVITO) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")),
            key=lambda m: m.name,
        )
        return [m.name for m in members], [read_member(archive, m) for m in members]


def read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    file = archive.extractfile(member)
    if file is None:  # not a regular file: load_avito keeps only those
        raise ValueError(f"{member.name} is not a file")
    return file.read()


def phashes(blobs: list[bytes]) -> np.ndarray:
    return np.array([phash64(decode_rgb(b)) for b in blobs], dtype=np.uint64)


def pooled_embeddings(blobs: list[bytes]) -> np.ndarray:
    """The 1280-d pooled embeddings as stages/dedupe.py computes them."""
    return embed(np.stack([load_square(b, STAGE_SIDE) for b in blobs]))


def loose_components(hashes: np.ndarray, emb: np.ndarray) -> np.ndarray:
    pairs = np.concatenate(
        [hash_pairs(hashes, LOOSE_DISTANCE), embedding_pairs(emb, LOOSE_COSINE, top_k=None)]
    )
    return clusters(len(hashes), pairs)


# ---------------------------------------------------------------------------------------------
# (b) edited copies
# ---------------------------------------------------------------------------------------------


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def caption(img: Image.Image) -> Image.Image:
    img = img.copy()
    bar = max(10, img.height // 6)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, img.height - bar, img.width, img.height], fill=(20, 20, 20))
    font = ImageFont.load_default(size=max(8, bar - 4))
    draw.text((3, img.height - bar + 1), "PROMO 2999 DH", fill=(255, 255, 255), font=font)
    return img


def crop(img: Image.Image, fraction: float) -> Image.Image:
    dx, dy = round(img.width * fraction), round(img.height * fraction)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


# Re-uploads are re-encoded: every edit is saved as JPEG (quality 90 unless the edit is quality).
EDITS: dict[str, Callable[[Image.Image], bytes]] = {
    "resize 60%": lambda im: jpeg(
        im.resize((round(im.width * 0.6), round(im.height * 0.6)), Image.Resampling.BILINEAR)
    ),
    "JPEG q25": lambda im: jpeg(im, 25),
    "crop 4%/side": lambda im: jpeg(crop(im, 0.04)),
    "bright +15%": lambda im: jpeg(ImageEnhance.Brightness(im).enhance(1.15)),
    "caption": lambda im: jpeg(caption(im)),
}


def score(labels: np.ndarray, family: np.ndarray, edit: np.ndarray) -> tuple[dict, float]:
    """Recall per edit, and the % of originals whose cluster holds another original's photos."""
    originals = np.flatnonzero(edit == "original")
    recall = {
        name: float((labels[rows] == labels[originals[family[rows]]]).mean())
        for name in EDITS
        for rows in [np.flatnonzero(edit == name)]
    }
    families_per_cluster: dict[int, set[int]] = {}
    for label, fam in zip(labels, family, strict=True):
        families_per_cluster.setdefault(label, set()).add(fam)
    merged = np.mean([len(families_per_cluster[labels[o]]) > 1 for o in originals])
    return recall, float(merged)


def part_b(
    blobs: list[bytes], hashes: np.ndarray, emb: np.ndarray, count: int, seed: int, strict: bool
) -> None:
    """strict: originals are one per loose component (no two of them are already near
    duplicates, nor look-alikes); otherwise one per distinct file, so two originals may be
    re-uploads or look-alikes of each other and "wrongly merged" is an upper bound."""
    if strict:
        groups = loose_components(hashes, emb)
        chosen = f"one per loose component (pHash <= {LOOSE_DISTANCE} or cos >= {LOOSE_COSINE})"
    else:
        _, groups = np.unique([hashlib.sha256(b).digest() for b in blobs], return_inverse=True)
        chosen = "one per distinct file (look-alikes and re-uploads included)"
    _, one_each = np.unique(groups, return_index=True)
    originals = np.sort(np.random.default_rng(seed).choice(one_each, count, replace=False))
    images = [decode_rgb(blobs[i]) for i in originals]
    copies = [EDITS[name](img) for name in EDITS for img in images]
    all_hashes = np.concatenate([hashes[originals], phashes(copies)])
    all_emb = np.concatenate([emb[originals], descriptors(copies)])
    family = np.concatenate([np.arange(count)] * (len(EDITS) + 1))
    edit = np.repeat(["original", *EDITS], count)
    n = len(family)
    methods = {
        f"pHash d<={d}": hash_clusters(all_hashes, d) for d in (4, 6, HASH_ONLY_DISTANCE, 10)
    }
    methods |= {
        f"descriptor cos>={c}": clusters(n, embedding_pairs(all_emb, c))
        for c in (0.955, 0.96, EMBEDDING_ONLY_COSINE, 0.97, 0.975)
    }
    methods["combined (tiers)"] = near_duplicate_clusters(all_hashes, all_emb)
    pooled = pooled_embeddings([*(blobs[i] for i in originals), *copies])
    stage_pairs = np.concatenate(
        [hash_pairs(all_hashes, STAGE_DISTANCE), embedding_pairs(pooled, STAGE_COSINE)]
    )
    methods["stage today (OR)"] = clusters(n, stage_pairs)
    print(
        f"(b) {count} Avito photos, {chosen}, x {len(EDITS)} edits = {n} photos; "
        f"tiers (max pHash distance, min cosine) {DEFAULT_TIERS}"
    )
    print(f"    {'method':22s} {'all copies':>10s} " + " ".join(f"{e:>12s}" for e in EDITS))
    print(
        f"    (stage today = pHash <= {STAGE_DISTANCE} OR pooled 1280-d cosine >= {STAGE_COSINE})"
    )
    for name, labels in methods.items():
        recall, merged = score(labels, family, edit)
        print(
            f"    {name:22s} {np.mean(list(recall.values())):10.1%} "
            + " ".join(f"{r:12.1%}" for r in recall.values())
            + f"   wrongly merged {merged:.1%}"
        )


# ---------------------------------------------------------------------------------------------
# (c) the archive as it is
# ---------------------------------------------------------------------------------------------


def describe_clusters(name: str, labels: np.ndarray, digests: np.ndarray) -> None:
    sizes = np.bincount(labels)
    distinct_bytes = [len(set(digests[labels == k])) for k in np.flatnonzero(sizes > 1)]
    near = sum(d > 1 for d in distinct_bytes)
    print(
        f"    {name:22s} clusters {len(sizes):5d}  with copies {int((sizes > 1).sum()):4d}  "
        f"near-duplicate groups (>1 distinct file) {near:4d}  "
        f"photos dropped {len(labels) - len(sizes):4d}  largest {sizes.max():3d}"
    )


def part_c(
    names: list[str], blobs: list[bytes], hashes: np.ndarray, emb: np.ndarray, stage: bool
) -> None:
    digests = np.array([hashlib.sha256(b).hexdigest() for b in blobs])
    _, exact = np.unique(digests, return_inverse=True)
    print(f"(c) the {len(blobs):,} Avito photos")
    describe_clusters("sha256 (today)", clusters(len(blobs), _same_label_pairs(exact)), digests)
    describe_clusters(
        f"pHash d<={HASH_ONLY_DISTANCE}", hash_clusters(hashes, HASH_ONLY_DISTANCE), digests
    )
    by_emb = clusters(len(blobs), embedding_pairs(emb, EMBEDDING_ONLY_COSINE))
    describe_clusters(f"descriptor cos>={EMBEDDING_ONLY_COSINE}", by_emb, digests)
    (labels, best, median) = timed(lambda: near_duplicate_clusters(hashes, emb), 3)
    describe_clusters("combined (tiers)", labels, digests)
    print(f"    combined pairs + clusters: best {best:.2f} s, median {median:.2f} s")
    # Representatives visited largest first: each duplicate is a direct pair of its kept photo.
    pixels = np.array([np.prod(decode_rgb(b).size) for b in blobs])
    star = star_clusters(len(blobs), near_duplicate_pairs(hashes, emb), np.argsort(-pixels))
    describe_clusters("combined, star_clusters", np.unique(star, return_inverse=True)[1], digests)
    if stage:
        pooled = pooled_embeddings(blobs)
        pairs = np.concatenate(
            [hash_pairs(hashes, STAGE_DISTANCE), embedding_pairs(pooled, STAGE_COSINE)]
        )
        describe_clusters("stage today (OR)", clusters(len(blobs), pairs), digests)
    labels_by_class: dict[int, set[str]] = {}
    for name, label in zip(names, labels, strict=True):
        labels_by_class.setdefault(label, set()).add(name.split("/")[-2])
    mixed = sum(len(v) > 1 for v in labels_by_class.values())
    print(f"    combined clusters mixing laptop and phone folders: {mixed}")


def _same_label_pairs(labels: np.ndarray) -> np.ndarray:
    order = np.argsort(labels, kind="stable")
    same = labels[order][1:] == labels[order][:-1]
    return np.stack([order[:-1][same], order[1:][same]], axis=1)


# ---------------------------------------------------------------------------------------------
# (d) throughput, and the features the other parts use
# ---------------------------------------------------------------------------------------------


def dedupe_features(blobs: list[bytes], scheduler: str = "synchronous") -> np.ndarray:
    """Descriptor and embedding rows as stages/dedupe.py computes them (vitrine.curation
    .features), in input order, without a cache."""
    runner = FeatureRunner(scheduler, 0, FEATURE_BATCH)
    batches = (blobs[i : i + FEATURE_BATCH] for i in range(0, len(blobs), FEATURE_BATCH))
    try:
        return np.concatenate(list(feature_batches(batches, FEATURE_BATCH, runner, progress=False)))
    finally:
        runner.close()


def descriptors(blobs: list[bytes]) -> np.ndarray:
    return dedupe_features(blobs)[:, :DEDUPE_DIM]


def torch_features(
    blobs: list[bytes], descriptor: torch.nn.Module, backbone: torch.nn.Module
) -> tuple[np.ndarray, np.ndarray]:
    """Both features by the torch networks of vitrine.model.embeddings, on 2 threads: the pass
    dedupe ran before ONNX Runtime, for comparison."""
    small = np.stack([load_square(b, DEDUPE_SIZE) for b in blobs])
    large = np.stack([load_square(b, EMBED_SIDE) for b in blobs])
    return dedupe_embed(small, FEATURE_BATCH, descriptor), embed(large, FEATURE_BATCH, backbone)


def features(blobs: list[bytes], repeats: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    print(f"(d) feature throughput on CPU ({cpu_model()}), images/s")
    hashes, best, median = timed(lambda: phashes(blobs), repeats)
    print(
        f"    pHash (decode + 32x32 DCT), {len(blobs)} photos: best {len(blobs) / best:.0f}, "
        f"median {len(blobs) / median:.0f}"
    )
    sample = blobs[:512]
    descriptor, backbone = load_descriptor(), load_backbone()
    torch_features(sample[:64], descriptor, backbone)  # warm-up
    _, best, median = timed(lambda: torch_features(sample, descriptor, backbone), repeats)
    print(
        f"    dedupe features, torch ({torch.get_num_threads()} threads; decode, 96 px descriptor "
        f"+ 224 px embedding), {len(sample)} photos: best {len(sample) / best:.1f}, "
        f"median {len(sample) / median:.1f}"
    )
    feature_nets.onnx_model()  # exported once per run, before the first batch
    with local_cluster(workers) as cluster:
        address = cluster.scheduler_address
        dedupe_features(blobs[:256], address)  # warm-up: each worker loads the model
        rows, best, median = timed(lambda: dedupe_features(blobs, address), repeats)
    print(
        f"    dedupe features, ONNX Runtime on {workers} Dask worker processes (as dedupe "
        f"runs them), {len(blobs)} photos: best {len(blobs) / best:.1f}, "
        f"median {len(blobs) / median:.1f}"
    )
    return hashes, rows[:, :DEDUPE_DIM]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'bc' or 'e'")
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument(
        "--hashes", type=at_least(1), default=1_000_000, help="codes in (a) and (f)"
    )
    parser.add_argument("--originals", type=at_least(1), default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", type=at_least(1), default=2, help="Dask worker processes in (d)"
    )
    parser.add_argument(
        "--skip-stage", action="store_true", help="skip today's stage rule in (c) (2 min)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    if "a" in args.parts:
        part_a(args.repeats, args.hashes)
    if "f" in args.parts:
        part_f(args.hashes)
    if "e" in args.parts:
        part_e()
    if set(args.parts) & set("bcd"):
        names, blobs = load_avito()
        if "d" in args.parts:
            hashes, emb = features(blobs, args.repeats, args.workers)
        else:
            hashes, emb = phashes(blobs), descriptors(blobs)
        if "b" in args.parts:
            for strict in (True, False):
                part_b(blobs, hashes, emb, args.originals, args.seed, strict)
        if "c" in args.parts:
            part_c(names, blobs, hashes, emb, not args.skip_stage)


if __name__ == "__main__":
    main()
