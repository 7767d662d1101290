"""collect's per-photo cache: what the per-image work (decode, checks, pHash, thumbnail) found for
each photo's bytes, so a run after new photos arrived sends only those to the Dask workers.

`FactsCache(folder, config).stream(items)` is `sources.ingest_stream` with the cache in front:
the stage's process reads each photo's bytes anyway (to pack them into shards), hashes them
(sha256, about 2 µs for a 3 KB photo) and looks a chunk of digests up in one query; a photo
found is passed through as its result, and only the others are shipped to the workers, whose
results are stored as they come back. The results are those a run without the cache computes
(the same per-image function, keyed by the same bytes), so the manifest and shards are too.

Stored in `<folder>/facts.sqlite` (vitrine.ingest.photo_cache: SQLite in WAL mode, why, and
how the stage's process alone reads and writes it). The version is a digest of the per-image
code (vitrine.ingest.sources, .hashing, vitrine.images), Pillow's and numpy's versions, and the
settings that change a result (min_side, max_pixels, thumb_size, thumb_quality): changing any
of them recomputes every photo.

A row holds the facts (width, height, format, pHash) and the thumbnail, or nothing but a flag
when the photo is its own thumbnail; or a rejection's code and detail. `undecodable` (an
unexpected decoder error: it may be the machine's, e.g. out of memory) is never stored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from vitrine import images
from vitrine.images import Rejected
from vitrine.ingest import hashing, sources
from vitrine.ingest.photo_cache import PhotoCache, code_version
from vitrine.ingest.sources import ImageFacts, IngestConfig, Result, ingest_stream

K = TypeVar("K")
FACTS_FILE = "facts.sqlite"
LOOKUP_CHUNK = 256  # photos hashed and looked up together (one query)
_UNCACHED_CODES = frozenset({"undecodable"})


def facts_version(config: IngestConfig) -> str:
    """The version collect's cached facts are stored under (see the module docstring)."""
    settings = {
        "min_side": config.min_side,
        "max_pixels": config.max_pixels,
        "thumb_size": config.thumb_size,
        "thumb_quality": config.thumb_quality,
    }
    return code_version((sources, hashing, images), ("pillow", "numpy"), settings)


def encode(result: Result, data: bytes) -> bytes:
    """A result as a cache value: a JSON head, a NUL, the thumbnail (unless it is `data`)."""
    thumb = b""
    head: list[Any]
    if isinstance(result, Rejected):
        head = ["rejected", result.code, result.detail]
    else:
        own = result.thumbnail == data
        head = ["facts", result.width, result.height, result.format, result.phash, own]
        thumb = b"" if own else result.thumbnail
    return json.dumps(head).encode() + b"\0" + thumb  # ASCII JSON holds no NUL


def decode(value: bytes, sha256: str, data: bytes) -> Result:
    """The result `encode` stored for the photo `data` (whose digest is `sha256`)."""
    head, _, thumb = value.partition(b"\0")
    fields = json.loads(head)
    if fields[0] == "rejected":
        return Rejected(fields[1], fields[2])
    _, width, height, fmt, phash, own = fields
    return ImageFacts(sha256, width, height, fmt, phash, data if own else thumb)


class FactsCache:
    """The cache in `folder` for the settings of `config`; counts what a stream reused
    (`reused`) and what it had computed (`computed`)."""

    def __init__(self, folder: Path, config: IngestConfig):
        self.config = config
        self.store = PhotoCache(folder / FACTS_FILE, facts_version(config))
        self.reused = self.computed = 0

    def stream(
        self,
        items: Iterable[tuple[K, bytes | Rejected]],
        *,
        client: Any = None,
        total: int | None = None,
    ) -> Iterator[tuple[K, Result]]:
        """ingest_stream(items, config) (same arguments, same results, same order), computing
        only the photos the cache does not hold and storing what it computes."""
        looked_up = self._looked_up(items)
        for (key, digest, data), result in ingest_stream(
            looked_up, self.config, client=client, total=total
        ):
            if data is not None:
                self.computed += 1
                if not (isinstance(result, Rejected) and result.code in _UNCACHED_CODES):
                    self.store.put(digest, encode(result, data))
            yield key, result

    def _looked_up(
        self, items: Iterable[tuple[K, bytes | Rejected]]
    ) -> Iterator[tuple[tuple[K, str, bytes | None], bytes | Result]]:
        """Each item keyed by (key, sha256, the bytes to store a result for), its value the
        cached result where there is one."""
        it = iter(items)
        while chunk := list(islice(it, LOOKUP_CHUNK)):
            digests = [
                hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else "" for _, v in chunk
            ]
            found = self.store.get_many(d for d in digests if d)
            for (key, value), digest in zip(chunk, digests, strict=True):
                hit = found.get(digest)
                if not isinstance(value, bytes):
                    yield (key, digest, None), value
                elif hit is None:
                    yield (key, digest, value), value
                else:
                    self.reused += 1
                    yield (key, digest, None), decode(hit, digest, value)

    def prune(self, max_age_s: float) -> int:
        """After a stream over every photo of the sources: the photos no run has had for
        max_age_s are deleted (vitrine.ingest.photo_cache.PhotoCache.prune); how many."""
        return self.store.prune(max_age_s)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> FactsCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
