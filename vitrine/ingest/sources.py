"""Per-image facts for collect — decode, check, sha256, pHash, thumbnail — fast and in parallel.

`ingest_image` is the pure per-image function; `ingest_stream` maps it over a stream of
(key, bytes) with Dask, in bounded batches, yielding results in input order.

Rejections use the stable codes of `vitrine.images.inspect_image` (empty, not_an_image,
truncated, too_small, too_many_pixels), in the same order of precedence, so an input gets the
same code from either, `undecodable` included: a decoder's own failure (libavif's
RuntimeError, SPIDER's EOFError), `vitrine.images.undecodable`. Any other error of one image's
work is `undecodable` here too: in a batch of a thousand images one odd file must not abort the
other 999.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from vitrine.compute import local_cluster, pack, unpack
from vitrine.config import params_block
from vitrine.images import (
    Rejected,
    first_frame,
    load_checked,
    open_capped,
    undecodable,
    upright_rgb,
)
from vitrine.ingest.hashing import HASH_SIDE, phash64, phash64_grays

K = TypeVar("K")


@params_block
class IngestConfig:
    """What an image must satisfy, the thumbnail to make, and where to run.

    scheduler: "" runs a local cluster of worker processes (one per core), "synchronous" runs
    in this process (tests, debugging), anything else is the address of a running Dask
    scheduler ("tcp://host:8786").
    """

    min_side: int = 32  # shorter side in pixels, after EXIF orientation
    max_pixels: int = 40_000_000  # decompression-bomb cap, checked from the header
    thumb_size: int = 96  # longest side of the thumbnail; smaller images are not upscaled
    thumb_quality: int = 80  # JPEG quality of the thumbnail
    scheduler: str = ""
    n_workers: int = 0  # local cluster only; 0 = one per core
    batch_size: int = 1024  # images per task: a task costs the client ~5-10 ms of CPU
    batch_bytes: int = 8_000_000  # ...or fewer: Dask warns about task messages over 10 MB
    max_in_flight: int = 0  # batches submitted but not yet yielded; 0 = 2 per worker + 2
    progress: bool = True  # tqdm bar with rate and ETA

    def __post_init__(self) -> None:
        if self.thumb_size < 1 or self.batch_size < 1 or self.batch_bytes < 1:
            raise ValueError("ingest: thumb_size, batch_size and batch_bytes must be >= 1")


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What collect records about an accepted image.

    phash is the unsigned 64-bit pHash of vitrine.ingest.hashing (compare with hashing.hamming);
    parquet has no uint64 in most readers, so store `phash_to_int64(facts.phash)` and read
    back with `phash_from_int64`.
    """

    sha256: str  # hex digest of the encoded bytes
    width: int  # of the original, after EXIF orientation
    height: int
    format: str  # PIL format name, upper case: JPEG, PNG, WEBP, ...
    phash: int
    thumbnail: bytes  # upright RGB JPEG, longest side <= thumb_size


# What the per-image work gives for one image.
Result = ImageFacts | Rejected


def phash_to_int64(phash: int) -> int:
    """The same 64 bits as a signed int64 (for parquet / pandas int64 columns)."""
    return phash - (1 << 64) if phash >= 1 << 63 else phash


def phash_from_int64(value: int) -> int:
    """Inverse of phash_to_int64: back to the unsigned hash that hashing.hamming expects."""
    return value & ((1 << 64) - 1)


# --- one image -----------------------------------------------------------------------------


def _thumb_dims(width: int, height: int, longest: int) -> tuple[int, int]:
    """Fit (width, height) into longest x longest, keeping the aspect ratio; never upscale."""
    if max(width, height) <= longest:
        return width, height
    scale = longest / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _examine(data: bytes, config: IngestConfig) -> tuple[Image.Image, bytes, int, int, str, bytes]:
    """The upright RGB pixels (at reduced DCT scale when the outputs are small), sha256 digest,
    upright size and format of the original, and thumbnail; raises Rejected in inspect_image's
    order of checks."""
    img = open_capped(data, config.max_pixels)  # header only: no decoding before the bomb cap
    header_size = img.size
    thumb_size = _thumb_dims(*header_size, config.thumb_size)  # EXIF rotation keeps the scale
    # As small a decode as the thumbnail and the 32x32 hash input allow.
    first_frame(img, (max(thumb_size[0], HASH_SIDE), max(thumb_size[1], HASH_SIDE)))
    width, height = load_checked(img, header_size, config.min_side)
    if (width, height) != header_size:  # turned by its EXIF orientation
        thumb_size = thumb_size[::-1]
    fmt = (img.format or "unknown").upper()
    # A small, upright, metadata-free colour JPEG is its own thumbnail: no resize, no encode,
    # no generation loss (most Avito photos are 90 px or less on their longest side).
    as_is = (
        fmt == "JPEG"
        and img.mode == "RGB"
        and thumb_size == (width, height)
        and "exif" not in img.info
        and "xmp" not in img.info
    )
    dct_scaled = img.size != header_size  # draft() decoded it at 1/2, 1/4 or 1/8 scale
    # The rest of vitrine.images.decode_rgb's path: EXIF orientation, then the RGB rules.
    rgb = upright_rgb(img)
    thumb = data if as_is else _encode_thumbnail(rgb, thumb_size, config.thumb_quality, dct_scaled)
    return rgb, hashlib.sha256(data).digest(), width, height, fmt, thumb


def thumb_resample(
    decoded: tuple[int, int], size: tuple[int, int], dct_scaled: bool
) -> Image.Resampling:
    """The filter from the decoded pixels to the thumbnail. BOX is area averaging: antialiased
    like BILINEAR at these ratios, at 2/3 the cost (Pillow's resampling, not the decoder, is
    the largest cost of a small image). After the decoder's DCT scaling, itself an area
    average, a step under 2x is left (640x480: 160x120 -> 128x96): nearest neighbour then looks
    the same and costs 9 us, not 137."""
    small_step = decoded[0] < 2 * size[0] and decoded[1] < 2 * size[1]
    return Image.Resampling.NEAREST if dct_scaled and small_step else Image.Resampling.BOX


def _encode_thumbnail(
    rgb: Image.Image, size: tuple[int, int], quality: int, dct_scaled: bool
) -> bytes:
    if rgb.size != size:
        rgb = rgb.resize(size, thumb_resample(rgb.size, size, dct_scaled))
    # The JPEG encoder without Image.save's plugin machinery: the same bytes as
    # save(buf, "JPEG", quality=quality) (a test checks it), in half the time at this size.
    return rgb.tobytes("jpeg", "RGB", quality)


def ingest_image(data: bytes, config: IngestConfig) -> ImageFacts:
    """Facts about one encoded image, or raise Rejected (see the module docstring for codes)."""
    rgb, sha256, width, height, fmt, thumb = _examine(data, config)
    return ImageFacts(sha256.hex(), width, height, fmt, phash64(rgb), thumb)


# --- a batch (one Dask task) ----------------------------------------------------------------


@dataclass(frozen=True)
class _Packed:
    """A batch's results as a few numpy arrays, not one object per image.

    Dask serialises numpy arrays without copying them (pickle-5 out-of-band buffers) but
    bytes objects and small Python objects one by one. Measured on the local cluster, for
    the client process that shares the cores with the workers: a batch as a list of bytes
    costs ~90 us of CPU per 3.4 kB image and ~140 us per 27 kB one, as a uint8 array ~18 us
    and ~45 us; the same holds for the results coming back.
    """

    rejected: dict[int, tuple[str, str]]  # index in the batch -> Rejected's (code, detail)
    sha256: np.ndarray  # uint8, the 32-byte digests of the accepted images in batch order
    width: np.ndarray  # int64, one per accepted image
    height: np.ndarray
    phash: np.ndarray  # uint64
    formats: list[str]
    thumbs: np.ndarray  # uint8, the thumbnails end to end
    thumb_ends: np.ndarray  # int64: thumbnail i is thumbs[thumb_ends[i - 1]:thumb_ends[i]]


def _gray32(rgb: Image.Image) -> bytes:
    # The reduction phash64 does, without its per-image DCT: the batch does one matrix product.
    # Raw bytes, not an array: numpy's per-call overhead is a third of the cost at this size.
    return rgb.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX).tobytes()


def _ingest_packed(payload: np.ndarray, ends: np.ndarray, config: IngestConfig) -> _Packed:
    """ingest_image over the images of a batch packed by compute.pack: one Dask task."""
    rejected: dict[int, tuple[str, str]] = {}
    digests: list[bytes] = []
    widths: list[int] = []
    heights: list[int] = []
    formats: list[str] = []
    thumbs: list[bytes] = []
    grays: list[bytes] = []
    for i, data in enumerate(unpack(payload, ends)):
        try:
            rgb, sha256, width, height, fmt, thumb = _examine(data, config)
            grays.append(_gray32(rgb))
        except Rejected as err:
            rejected[i] = (err.code, err.detail)
            continue
        except Exception as err:  # one odd file must not fail the whole batch
            refused = undecodable(err)
            rejected[i] = (refused.code, refused.detail)
            continue
        digests.append(sha256)
        widths.append(width)
        heights.append(height)
        formats.append(fmt)
        thumbs.append(thumb)
    thumbs_array, thumb_ends = pack(thumbs)
    return _Packed(
        rejected=rejected,
        sha256=np.frombuffer(b"".join(digests), np.uint8),
        width=np.array(widths, dtype=np.int64),
        height=np.array(heights, dtype=np.int64),
        phash=phash64_grays(
            np.frombuffer(b"".join(grays), np.uint8).reshape(-1, HASH_SIDE, HASH_SIDE)
        ),
        formats=formats,
        thumbs=thumbs_array,
        thumb_ends=thumb_ends,
    )


def _unpack(packed: _Packed, n: int) -> Iterator[ImageFacts | Rejected]:
    """The n results of a packed batch, in batch order."""
    accepted = zip(
        packed.width.tolist(),
        packed.height.tolist(),
        packed.phash.tolist(),
        packed.formats,
        packed.thumb_ends.tolist(),
        strict=True,
    )
    digests, thumbs = packed.sha256.tobytes(), packed.thumbs.tobytes()
    j, start = 0, 0
    for i in range(n):
        if i in packed.rejected:
            yield Rejected(*packed.rejected[i])
            continue
        width, height, phash, fmt, end = next(accepted)
        sha256 = digests[32 * j : 32 * j + 32].hex()
        yield ImageFacts(sha256, width, height, fmt, phash, thumbs[start:end])
        j, start = j + 1, end


def ingest_batch(blobs: list[bytes], config: IngestConfig) -> list[ImageFacts | Rejected]:
    """ingest_image over a batch, Rejected returned rather than raised, with the pHash DCTs of
    the whole batch done at once (the same hashes as one by one)."""
    return list(_unpack(_ingest_packed(*pack(blobs), config), len(blobs)))


# --- a stream ------------------------------------------------------------------------------


def _batches(
    items: Iterable[tuple[K, bytes | Result]], config: IngestConfig
) -> Iterator[tuple[list[K], list[bytes | Result]]]:
    """Consecutive batches of at most batch_size items and (about) batch_bytes bytes, read
    lazily from `items`."""
    keys: list[K] = []
    values: list[bytes | Result] = []
    size = 0
    for key, value in items:
        keys.append(key)
        values.append(value)
        size += len(value) if isinstance(value, bytes) else 0
        if len(keys) >= config.batch_size or size >= config.batch_bytes:
            yield keys, values
            keys, values, size = [], [], 0
    if keys:
        yield keys, values


class _Runner:
    """Runs _ingest_packed somewhere: in this process, on a local cluster, or on a given one.

    The cluster (or the connection to a scheduler) is made at the first batch to compute, so a
    stream whose results are all known already (collect's cache) starts none."""

    def __init__(self, config: IngestConfig, client: Any = None):
        self.config = config
        self._client = client
        self._owned: list[Any] = []  # what this runner started, and so must close
        self.in_process = client is None and config.scheduler == "synchronous"

    def _connect(self) -> Any:
        if self._client is None:
            from dask.distributed import Client

            config = self.config
            if config.scheduler:
                self._client = Client(config.scheduler, set_as_default=False)
            else:
                cluster = local_cluster(config.n_workers)
                self._owned.append(cluster)
                # Results come straight from the workers rather than via the scheduler.
                self._client = Client(cluster, set_as_default=False, direct_to_workers=True)
            self._owned.insert(0, self._client)
        return self._client

    def batches_in_flight(self) -> int:
        if self.in_process:
            return 1  # a batch is computed on submit: yield it at once rather than read ahead
        if self.config.max_in_flight:
            return self.config.max_in_flight
        # Two per worker keep every worker busy while the oldest batch is being yielded.
        workers = sum(self._connect().nthreads().values())
        return 2 * max(1, workers) + 2

    def submit(self, blobs: list[bytes]) -> Any:
        payload, ends = pack(blobs)
        if self.in_process:
            return _ingest_packed(payload, ends, self.config)
        # pure=False: no hashing of the bytes for a key, and equal batches stay two tasks.
        return self._connect().submit(_ingest_packed, payload, ends, self.config, pure=False)

    def result(self, handle: Any) -> _Packed:
        return handle if self.in_process else handle.result()

    def close(self) -> None:
        for thing in self._owned:
            thing.close()


def ingest_stream(
    items: Iterable[tuple[K, bytes | Result]],
    config: IngestConfig,
    *,
    client: Any = None,
    total: int | None = None,
) -> Iterator[tuple[K, ImageFacts | Rejected]]:
    """(key, facts or Rejected) for every (key, bytes) of `items`, in input order.

    A value may already be a result: a Rejected (its bytes could not be read) or the facts
    collect's cache holds for them (vitrine.ingest.facts_cache); it is passed through, and a
    stream of nothing but results starts no cluster.
    Keys never leave this process (only bytes are shipped), so any object will do, e.g. the
    input record and its bytes for writing shards afterwards. At most `max_in_flight` batches
    are read ahead, so memory stays flat however long the stream; `items` is consumed lazily.
    `client`, a dask.distributed.Client, overrides config.scheduler and is left open.
    `total` sizes the progress bar (default: len(items) when it has one).
    """
    if total is None and isinstance(items, Sized):
        total = len(items)
    runner = _Runner(config, client)
    # Per batch: its keys, its pass-through results (None where bytes were sent), the task.
    pending: deque[tuple[list[K], list[Result | None], Any]] = deque()
    bar = tqdm(total=total, desc="ingest", unit="img", disable=not config.progress)
    in_flight = 0  # known once a batch is sent: asking a cluster starts it
    try:
        for keys, values in _batches(items, config):
            blobs = [v for v in values if isinstance(v, bytes)]
            passed = [None if isinstance(v, bytes) else v for v in values]
            pending.append((keys, passed, runner.submit(blobs) if blobs else None))
            if blobs and not in_flight:
                in_flight = runner.batches_in_flight()
            del values, blobs  # the bytes now live in the task only
            if len(pending) >= max(in_flight, 1):
                yield from _drain_one(pending, runner, bar)
        while pending:
            yield from _drain_one(pending, runner, bar)
    finally:
        for *_, handle in pending:  # the consumer stopped early, or a batch failed
            if handle is not None and hasattr(handle, "cancel"):
                handle.cancel()
        bar.close()
        runner.close()


def _drain_one(
    pending: deque[tuple[list[K], list[Result | None], Any]], runner: _Runner, bar: tqdm
) -> Iterator[tuple[K, ImageFacts | Rejected]]:
    keys, passed, handle = pending.popleft()
    n = passed.count(None)
    results = _unpack(runner.result(handle), n) if handle is not None else iter(())
    bar.update(len(keys))
    for key, rejected in zip(keys, passed, strict=True):
        yield key, rejected if rejected is not None else next(results)


__all__ = [
    "ImageFacts",
    "IngestConfig",
    "ingest_batch",
    "ingest_image",
    "ingest_stream",
    "local_cluster",
    "phash_from_int64",
    "phash_to_int64",
]
