"""A source to score, read with collect's own readers: a folder, an archive or a catalog.

Every file, archive member or catalog row is one record, read and refused exactly as collect
reads it (vitrine.ingest.records, .archives, .catalogs), with one difference: a record needs no
label, since the model gives it one. A catalog's URLs are fetched first into the download cache
(vitrine.ingest.download.fetch_all: resumable, nothing fetched twice, private addresses blocked
unless the download settings allow them). A record's declared category is the catalog column
that the category option names (`label` means the record's own label: a folder source's
sub-folder, a catalog's label column).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitrine.images import Rejected
from vitrine.ingest.archives import archive_records
from vitrine.ingest.catalogs import catalog_records
from vitrine.ingest.download import DownloadConfig, FetchResult, fetch_all
from vitrine.ingest.records import InputRecord, escaped, folder_records, read_record

KINDS = ("folder", "archive", "catalog")
CATALOG_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def guess_kind(path: Path) -> str:
    """folder for a directory, catalog for .csv/.jsonl/.ndjson, archive for any other file."""
    if path.is_dir():
        return "folder"
    return "catalog" if path.suffix.lower() in CATALOG_SUFFIXES else "archive"


@dataclass(frozen=True)
class ScoreSource:
    path: Path
    kind: str  # folder | archive | catalog

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown source kind {self.kind!r}: one of {', '.join(KINDS)}")
        if not self.path.exists():
            raise FileNotFoundError(f"source not found: {self.path}")
        if self.path.is_dir() != (self.kind == "folder"):
            wanted = "a directory" if self.kind == "folder" else "a regular file"
            raise ValueError(f"a {self.kind} source must be {wanted}: {self.path}")

    @property
    def name(self) -> str:
        """The output's `source` column, as collect names a source: kind:path."""
        return escaped(f"{self.kind}:{self.path}")

    def identity(self) -> dict[str, Any]:
        """What tells this source from another one between runs (resuming trusts it): its
        resolved path and kind, a file's size and modification time, and for a folder a digest
        of every file's name, size and modification time (a photo replaced or added since the
        last run starts the scoring over; the walk costs far less than scoring the photos)."""
        found: dict[str, Any] = {"path": str(self.path.resolve()), "kind": self.kind}
        if self.kind != "folder":
            stat = self.path.stat()
            found["file"] = [stat.st_size, stat.st_mtime_ns]
        else:
            found["files"] = _listing_digest(self.path)
        return found


def _listing_digest(folder: Path) -> str:
    """sha256 of every file under `folder`: relative name, size and modification time, sorted."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                stat = os.lstat(path)
            except OSError:
                continue  # gone while walking: the records will say so
            rel = os.path.relpath(path, folder)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(errors="replace"))
    return digest.hexdigest()


def records(
    source: ScoreSource,
    classes: tuple[str, ...],
    max_bytes: int,
    fetched: Mapping[str, FetchResult],
) -> Iterator[InputRecord]:
    """The source's records in their order (a folder's in name order, an archive's in archive
    order, a catalog's in row order): the same every run."""
    if source.kind == "folder":
        yield from folder_records(source.path, source.name, max_bytes)
    elif source.kind == "archive":  # classes only tell a top folder from a class folder
        yield from archive_records(source.path, source.name, classes, max_bytes)
    else:
        yield from catalog_records(source.path, source.name, fetched, max_bytes)


def download(
    source: ScoreSource, cache: Path, config: DownloadConfig, *, progress: bool = True
) -> dict[str, FetchResult]:
    """Fetch every URL of a catalog into the content-addressed cache (an earlier run's are
    answered from it without a request); {} for other sources."""
    if source.kind != "catalog":
        return {}
    urls = {r.url for r in catalog_records(source.path, source.name, {}, config.max_bytes)}
    urls.discard("")
    if not urls:
        return {}
    items = ((u, u) for u in sorted(urls))
    return dict(fetch_all(items, cache, config, progress=progress, total=len(urls)))


def with_max_bytes(config: DownloadConfig, max_bytes: int) -> DownloadConfig:
    """The download settings with the one size cap every reader applies."""
    return dataclasses.replace(config, max_bytes=max_bytes)


def read_photo(record: InputRecord) -> tuple[InputRecord, bytes | Rejected]:
    """The record (names in valid UTF-8) and its bytes, or why there are none: collect's
    read_record with the record's own label as the only class, so every rule of collect's
    readers applies (a refusing reader first, then a name that is not UTF-8, then the read)
    but the label check: scoring needs no label."""
    return read_record(record, (record.label,))


def category(record: InputRecord, column: str) -> str | None:
    """The record's declared category: its `column` value (None when it has none or it is
    empty); column `label` is the record's own label."""
    value: Any = record.label if column == "label" else record.meta.get(column)
    if value is None:
        return None
    if isinstance(value, dict | list):
        value = json.dumps(value, ensure_ascii=False)
    text = escaped(str(value)).strip()
    return text or None
