"""collect: read every source (folders, archives, catalogs) into one manifest and packed shards.

Every input record becomes exactly one manifest row, accepted or quarantined with a stable
reason code: nothing is dropped silently. Catalog URLs are downloaded first into a
content-addressed cache outside DVC's outputs (resumable, nothing fetched twice); the
per-image work (decode, check, sha256, pHash, thumbnail) then runs on Dask workers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vitrine.config import from_mapping, load_params, load_paths, stage_config
from vitrine.data.shards import MANIFEST, BlobRef, ShardWriter
from vitrine.images import Rejected
from vitrine.ingest.download import DownloadConfig, FetchResult, fetch_all, url_problem
from vitrine.ingest.sources import ImageFacts, IngestConfig, ingest_stream, phash_to_int64

SHARDS = "shards"
THUMBS = "thumbs"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Source:
    kind: str  # folder | archive | catalog
    path: str  # relative to paths.raw


@dataclass(frozen=True)
class CollectConfig:
    classes: tuple[str, ...]
    sources: tuple[Source, ...]
    min_side: int
    max_pixels: int
    max_bytes: int
    shard_size: int
    thumb_size: int  # longest side of the thumbnails kept for review pages
    download: DownloadConfig

    def __post_init__(self) -> None:
        for s in self.sources:
            if s.kind not in ("folder", "archive", "catalog"):
                raise ValueError(f"collect.sources: unknown kind {s.kind!r} for {s.path}")


@dataclass(frozen=True)
class ComputeConfig:
    scheduler: str  # "" = local Dask processes, "synchronous", or "tcp://host:8786"


@dataclass
class InputRecord:
    """One input row: where it came from, and how to get its bytes (which may raise Rejected)."""

    id: str
    label: str
    source: str
    read: Callable[[], bytes]
    meta: dict[str, Any] = field(default_factory=dict)
    url: str = ""


@dataclass(frozen=True)
class _reject:
    """A reader that refuses: the record was found bad before any byte was read, a reason that
    takes precedence over the label check."""

    code: str
    detail: str

    def __call__(self) -> bytes:
        raise Rejected(self.code, self.detail)


def _eager(read: Callable[[], bytes]) -> Callable[[], bytes]:
    """Read now: archive members must be read while the archive is open, in archive order."""
    try:
        data = read()
    except Rejected as rejected:
        return _reject(rejected.code, rejected.detail)
    return lambda: data


def _read_capped(path: Path | str, max_bytes: int) -> bytes:
    """The file's bytes; Rejected past max_bytes, having read at most max_bytes + 1 of them."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            # One read sized by fstat on the open descriptor (no second path lookup): a plain
            # read(max_bytes + 1) allocates the whole 20 MB cap for every 3 kB photo, which
            # made reading files a sixth of collect's own CPU time.
            chunks = [os.read(fd, min(os.fstat(fd).st_size, max_bytes) + 1)]
            got = len(chunks[0])
            while got <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - got))):
                chunks.append(chunk)  # the file grew after fstat
                got += len(chunk)
        finally:
            os.close(fd)
    except OSError as err:
        raise Rejected("unreadable", str(err)) from None
    if got > max_bytes:
        raise Rejected("too_large", f"over {max_bytes} bytes")
    return b"".join(chunks) if len(chunks) > 1 else chunks[0]


# --- sources -----------------------------------------------------------------------------


def _walk(directory: str, rel: str) -> Iterator[tuple[str, os.DirEntry]]:
    """(relative path, entry) of everything under `directory` but sub-directories, sorted;
    symlinks are yielded, not followed."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path, f"{rel}{entry.name}/")
        else:
            yield f"{rel}{entry.name}", entry


def folder_records(root: Path, source: str, max_bytes: int) -> Iterator[InputRecord]:
    """One record per file under root/<label>/...; a symlink leading outside root is refused."""
    real_root = root.resolve()
    for rel, entry in _walk(str(root), ""):
        label = rel.split("/", 1)[0] if "/" in rel else ""
        # Only a symlink can lead out of the tree (directories are walked without following).
        if entry.is_symlink() and not Path(entry.path).resolve().is_relative_to(real_root):
            yield InputRecord(rel, label, source, _reject("outside_source_root", rel))
        else:
            yield InputRecord(rel, label, source, lambda p=entry.path: _read_capped(p, max_bytes))


def _tree_prefix(names: Iterable[str], classes: tuple[str, ...]) -> str:
    """An archive often wraps the class tree in one top folder (raw_data/laptop/...): strip it."""
    tops: set[str] = set()
    for name in names:
        top, slash, _ = name.partition("/")
        if not slash or (tops and top not in tops):  # a file at the top, or a second top
            return ""
        tops.add(top)
    top = tops.pop() if tops else ""
    return top + "/" if top and top not in classes else ""


def _safe_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not name.startswith("/") and ".." not in parts


def archive_records(
    path: Path, source: str, classes: tuple[str, ...], max_bytes: int
) -> Iterator[InputRecord]:
    """Records from a tar (any compression) or zip holding a class tree; read fully into memory
    member by member, so a large archive is streamed rather than extracted to disk."""
    if zipfile.is_zipfile(path):
        yield from _zip_records(path, source, classes, max_bytes)
    else:
        yield from _tar_records(path, source, classes, max_bytes)


def _member_record(
    name: str, prefix: str, source: str, data: Callable[[], bytes], bad: str | None
) -> InputRecord:
    rel = name[len(prefix) :] if name.startswith(prefix) else name
    label = rel.split("/", 1)[0] if "/" in rel else ""
    if not _safe_member(name):
        return InputRecord(rel, label, source, _reject("outside_source_root", name))
    if bad:
        return InputRecord(rel, label, source, _reject("unreadable", bad))
    return InputRecord(rel, label, source, _eager(data))


def _tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members but directories, header by header. TarFile's own iteration keeps
    every member it has read (about 1 kB each); this keeps none, so memory stays flat."""
    while (member := tar.next()) is not None:
        tar.members.clear()
        if not member.isdir():
            yield member


def _tar_records(
    path: Path, source: str, classes: tuple[str, ...], max_bytes: int
) -> Iterator[InputRecord]:
    with tarfile.open(path) as tar:  # a first pass over the headers, for the prefix
        prefix = _tree_prefix((m.name for m in _tar_members(tar)), classes)
    with tarfile.open(path) as tar:
        for m in _tar_members(tar):
            bad = None
            if m.issym() or m.islnk():
                bad = f"link member ({m.linkname})"
            elif not m.isfile():
                bad = "not a regular file"

            def read(m: tarfile.TarInfo = m) -> bytes:
                if m.size > max_bytes:
                    raise Rejected("too_large", f"{m.size} bytes > {max_bytes}")
                f = tar.extractfile(m)
                return f.read() if f is not None else b""

            yield _member_record(m.name, prefix, source, read, bad)


def _zip_records(
    path: Path, source: str, classes: tuple[str, ...], max_bytes: int
) -> Iterator[InputRecord]:
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        prefix = _tree_prefix([i.filename for i in infos], classes)
        for info in infos:

            def read(info: zipfile.ZipInfo = info) -> bytes:
                if info.file_size > max_bytes:
                    raise Rejected("too_large", f"{info.file_size} bytes > {max_bytes}")
                try:
                    return zf.read(info)
                except (zipfile.BadZipFile, OSError) as err:
                    raise Rejected("unreadable", str(err)) from None

            yield _member_record(info.filename, prefix, source, read, None)


def _catalog_rows(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        yield {"id": f"line-{n}", "_error": f"invalid JSON: {err}"}
    else:
        with open(path, newline="") as f:
            yield from csv.DictReader(f)


def catalog_records(
    path: Path, source: str, fetched: Mapping[str, FetchResult], max_bytes: int
) -> Iterator[InputRecord]:
    """Rows of a CSV/JSONL catalog: id, label and url or path (relative to the catalog's folder).
    Other columns are kept as metadata; a repeated id is refused (the first one wins). A URL
    row reads its body from `fetched`, filled by download_catalogs before anything is read."""
    root = path.parent.resolve()
    seen: set[str] = set()
    for n, row in enumerate(_catalog_rows(path), 1):
        rid = str(row.get("id") or "").strip()
        label = str(row.get("label") or "").strip()
        meta = {k: v for k, v in row.items() if k not in ("id", "label", "url", "path", "_error")}
        url = str(row.get("url") or "").strip()
        if "_error" in row:
            yield InputRecord(rid, label, source, _reject("bad_row", row["_error"]), meta)
        elif not rid:
            yield InputRecord(f"row-{n}", label, source, _reject("missing_id", f"row {n}"), meta)
        elif rid in seen:
            yield InputRecord(rid, label, source, _reject("duplicate_id", rid), meta, url)
        elif url:
            problem = url_problem(url)
            read = _reject("bad_url", problem) if problem else (lambda u=url: fetched[u].read())
            yield InputRecord(rid, label, source, read, meta, "" if problem else url)
        elif row.get("path"):
            target = (root / str(row["path"])).resolve()
            read = (
                (lambda t=target: _read_capped(t, max_bytes))
                if target.is_relative_to(root)
                else _reject("outside_source_root", str(row["path"]))
            )
            yield InputRecord(rid, label, source, read, meta)
        else:
            yield InputRecord(
                rid, label, source, _reject("missing_location", "no url or path"), meta
            )
        seen.add(rid)


def _source_path(raw: Path, source: Source) -> Path:
    path = raw / source.path
    if not path.exists():
        raise FileNotFoundError(f"collect source {source.kind}:{source.path} not found at {path}")
    return path


def iter_records(
    config: CollectConfig, raw: Path, fetched: Mapping[str, FetchResult]
) -> Iterator[InputRecord]:
    for s in config.sources:
        path, name = _source_path(raw, s), f"{s.kind}:{s.path}"
        if s.kind == "folder":
            yield from folder_records(path, name, config.max_bytes)
        elif s.kind == "archive":
            yield from archive_records(path, name, config.classes, config.max_bytes)
        else:
            yield from catalog_records(path, name, fetched, config.max_bytes)


def download_catalogs(config: CollectConfig, raw: Path, cache: Path) -> dict[str, FetchResult]:
    """Fetch every catalog URL into the content-addressed cache (resumable: what a killed or
    earlier run fetched is answered from the cache without a request)."""
    catalogs = [s for s in config.sources if s.kind == "catalog"]
    urls = {
        r.url
        for s in catalogs
        for r in catalog_records(_source_path(raw, s), s.path, {}, config.max_bytes)
        if r.url
    }
    if not urls:
        return {}
    download = dataclasses.replace(config.download, max_bytes=config.max_bytes)  # one size cap
    return dict(fetch_all(((u, u) for u in sorted(urls)), cache, download, total=len(urls)))


# --- per-record checks -------------------------------------------------------------------


def read_record(record: InputRecord, classes: tuple[str, ...]) -> bytes | Rejected:
    """A record's bytes, or why there are none (an unknown label is not even read)."""
    if isinstance(record.read, _reject):
        return Rejected(record.read.code, record.read.detail)
    if record.label not in classes:
        return Rejected("unknown_label", f"{record.label!r} not in {list(classes)}")
    try:
        return record.read()
    except Rejected as rejected:
        return rejected


def manifest_row(
    record: InputRecord, data: bytes | Rejected, result: ImageFacts | Rejected
) -> dict[str, Any]:
    """The manifest row of one record (collect fills the storage columns of accepted images)."""
    row: dict[str, Any] = {
        "id": record.id,
        "label": record.label,
        "source": record.source,
        "url": record.url,
        "status": "quarantined",
        "reason": "",
        "detail": "",
        "sha256": "",
        "width": 0,
        "height": 0,
        "format": "",
        "bytes": 0 if isinstance(data, Rejected) else len(data),
        "phash": 0,
        "shard": "",
        "offset": 0,
        "length": 0,
        "thumb_shard": "",
        "thumb_offset": 0,
        "thumb_length": 0,
        "meta": json.dumps(record.meta, sort_keys=True, default=str) if record.meta else "",
    }
    if isinstance(result, Rejected):
        row.update(reason=result.code, detail=result.detail)
    else:
        row.update(
            status="accepted",
            sha256=result.sha256,
            width=result.width,
            height=result.height,
            format=result.format,
            phash=phash_to_int64(result.phash),
        )
    return row


def collect(
    config: CollectConfig, raw: Path, out: Path, *, cache: Path, scheduler: str = "synchronous"
) -> Path:
    """Check every record of every source; pack accepted images (once per sha256) and their
    thumbnails into shards under `out`, and write out/manifest.parquet (returned) as the rows
    come. Downloads go to the `cache` directory."""
    fetched = download_catalogs(config, raw, cache)
    ingest = IngestConfig(
        min_side=config.min_side,
        max_pixels=config.max_pixels,
        thumb_size=config.thumb_size,
        scheduler=scheduler,
    )
    stored: dict[str, tuple[BlobRef, BlobRef]] = {}
    for sub in (SHARDS, THUMBS):  # no stale shard from a larger earlier run
        shutil.rmtree(out / sub, ignore_errors=True)
    records = ((r, read_record(r, config.classes)) for r in iter_records(config, raw, fetched))
    with (
        ShardWriter(out, SHARDS, config.shard_size) as shards,
        ShardWriter(out, THUMBS, config.shard_size) as thumbs,
        ManifestWriter(out / MANIFEST) as manifest,
    ):
        for (record, data), result in ingest_stream(((k, k[1]) for k in records), ingest):
            row = manifest_row(record, data, result)
            if isinstance(result, ImageFacts):
                if result.sha256 not in stored:
                    name = f"{result.sha256}.{result.format.lower()}"
                    image = shards.add(name, data)
                    # A photo within thumb_size is its own thumbnail: stored once, not twice.
                    own = result.thumbnail == data
                    thumb = image if own else thumbs.add(f"{result.sha256}.jpg", result.thumbnail)
                    stored[result.sha256] = (image, thumb)
                image, thumb = stored[result.sha256]
                row.update(
                    shard=image.shard,
                    offset=image.offset,
                    length=image.length,
                    thumb_shard=thumb.shard,
                    thumb_offset=thumb.offset,
                    thumb_length=thumb.length,
                )
            manifest.add(row)
    return out / MANIFEST


# The manifest's columns and their parquet types, written once: ManifestWriter writes this schema.
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("format", pa.string()),
        ("bytes", pa.int64()),
        # 64-bit pHash stored as int64 (vitrine.ingest.sources.phash_from_int64 reads it back)
        ("phash", pa.int64()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("thumb_shard", pa.string()),
        ("thumb_offset", pa.int64()),
        ("thumb_length", pa.int64()),
        ("meta", pa.string()),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


class ManifestWriter:
    """Manifest rows into a parquet file, a row group at a time, as they come.

    Holding every row (a Python dict each) and then the whole manifest as a DataFrame made the
    stage's live memory grow with the catalog; written in groups, it holds at most `group_rows`
    rows (traced with tracemalloc at 20,000 photos: what stays alive is the ~300 bytes per
    distinct photo of its shard references).
    """

    def __init__(self, path: Path, group_rows: int = 8192):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(path, MANIFEST_SCHEMA)
        self._rows: list[dict[str, Any]] = []
        self.group_rows = group_rows

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=MANIFEST_SCHEMA))
            self._rows = []

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._flush()
        self._writer.close()


REPORT_COLUMNS = ["source", "label", "status", "reason"]
QUARANTINE_COLUMNS = ["source", "id", "label", "url", "reason", "detail"]


def collect_report(manifest: pd.DataFrame) -> dict[str, Any]:
    """Counts by source, class and reason (REPORT_COLUMNS are enough): the collect metric."""
    accepted = manifest["status"] == "accepted"
    return {
        "records": len(manifest),
        "accepted": int(accepted.sum()),
        "quarantined": int((~accepted).sum()),
        "by_source": {
            s: {"accepted": int((g["status"] == "accepted").sum()), "total": len(g)}
            for s, g in manifest.groupby("source")
        },
        "by_class": {k: int(v) for k, v in Counter(manifest.loc[accepted, "label"]).items()},
        "by_reason": {k: int(v) for k, v in Counter(manifest.loc[~accepted, "reason"]).items()},
    }


def quarantine_list(manifest: pd.DataFrame) -> pd.DataFrame:
    """The quarantined rows and why, sorted so that two runs' lists diff cleanly."""
    rows = manifest[manifest["status"] != "accepted"]
    return rows[QUARANTINE_COLUMNS].sort_values(["source", "id"]).reset_index(drop=True)


def read_quarantined(manifest: Path) -> pd.DataFrame:
    """The quarantined rows of a manifest file, only the columns quarantine_list needs."""
    return pd.read_parquet(
        manifest,
        columns=[*QUARANTINE_COLUMNS, "status"],
        filters=[("status", "!=", "accepted")],
    )


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), stage_config(CollectConfig, "collect", params)
    compute = from_mapping(ComputeConfig, params["compute"], "compute")
    manifest = collect(
        config, paths.raw, paths.collected, cache=paths.download_cache, scheduler=compute.scheduler
    )
    # Read back only what the report and the list need: never the whole manifest in memory.
    report = collect_report(pd.read_parquet(manifest, columns=REPORT_COLUMNS))
    paths.collect_report.parent.mkdir(parents=True, exist_ok=True)
    paths.collect_report.write_text(json.dumps(report, indent=2) + "\n")
    quarantine_list(read_quarantined(manifest)).to_csv(paths.quarantine, index=False)
    print(
        f"collect: {report['records']} records, {report['accepted']} accepted, "
        f"{report['quarantined']} quarantined {report['by_reason']}"
    )


if __name__ == "__main__":
    main()
