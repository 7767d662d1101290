"""collect: read every source (folders, archives, catalogs) into one manifest and packed shards.

Every input record becomes exactly one manifest row, accepted or quarantined with a stable
reason code: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pandas as pd
from tqdm import tqdm

from vitrine.config import load_params, load_paths, stage_config
from vitrine.images import Rejected, inspect_image
from vitrine.shards import BlobRef, ShardWriter

MANIFEST = "manifest.parquet"
SHARDS = "shards"
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
    timeout_s: float

    def __post_init__(self) -> None:
        for s in self.sources:
            if s.kind not in ("folder", "archive", "catalog"):
                raise ValueError(f"collect.sources: unknown kind {s.kind!r} for {s.path}")


@dataclass
class InputRecord:
    """One input row: where it came from, and how to get its bytes (which may raise Rejected)."""

    id: str
    label: str
    source: str
    read: Callable[[], bytes]
    meta: dict[str, Any] = field(default_factory=dict)
    rejected: Rejected | None = None  # known bad before reading (bad path, duplicate id, ...)


def _reject(code: str, detail: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise Rejected(code, detail)

    return read


def _eager(read: Callable[[], bytes]) -> Callable[[], bytes]:
    """Read now: archive members must be read while the archive is open, in archive order."""
    try:
        data = read()
    except Rejected as rejected:
        return _reject(rejected.code, rejected.detail)
    return lambda: data


def _read_capped(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise Rejected("too_large", f"{size} bytes > {max_bytes}")
        return path.read_bytes()
    except OSError as err:
        raise Rejected("unreadable", str(err)) from None


# --- sources -----------------------------------------------------------------------------


def folder_records(root: Path, source: str, max_bytes: int) -> Iterator[InputRecord]:
    """One record per file under root/<label>/...; a symlink leading outside root is refused."""
    real_root = root.resolve()
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(root).as_posix()
        label = rel.split("/", 1)[0] if "/" in rel else ""
        if not path.resolve().is_relative_to(real_root):
            yield InputRecord(rel, label, source, _reject("outside_source_root", rel))
        else:
            yield InputRecord(rel, label, source, lambda p=path: _read_capped(p, max_bytes))


def _tree_prefix(names: list[str], classes: tuple[str, ...]) -> str:
    """An archive often wraps the class tree in one top folder (raw_data/laptop/...): strip it."""
    tops = {n.split("/", 1)[0] for n in names if "/" in n}
    if len(tops) == 1 and not any("/" not in n for n in names):
        top = tops.pop()
        if top not in classes:
            return top + "/"
    return ""


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


def _tar_records(
    path: Path, source: str, classes: tuple[str, ...], max_bytes: int
) -> Iterator[InputRecord]:
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if not m.isdir()]
        prefix = _tree_prefix([m.name for m in members], classes)
        for m in members:
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


def download(url: str, client: httpx.Client, max_bytes: int) -> bytes:
    """GET `url`, refusing non-HTTP schemes, error statuses and bodies over `max_bytes`."""
    if not url.lower().startswith(("http://", "https://")):
        raise Rejected("bad_url", f"only http and https are fetched: {url[:80]}")
    try:
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise Rejected(f"http_{response.status_code}", url)
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise Rejected("too_large", f"body over {max_bytes} bytes: {url}")
            return bytes(body)
    except httpx.TimeoutException:
        raise Rejected("timeout", url) from None
    except httpx.HTTPError as err:
        raise Rejected("connection_error", f"{url}: {err}") from None


def catalog_records(
    path: Path, source: str, client: httpx.Client, max_bytes: int
) -> Iterator[InputRecord]:
    """Rows of a CSV/JSONL catalog: id, label and url or path (relative to the catalog's folder).
    Other columns are kept as metadata; a repeated id is refused (the first one wins)."""
    root = path.parent.resolve()
    seen: set[str] = set()
    for n, row in enumerate(_catalog_rows(path), 1):
        rid = str(row.get("id") or "").strip()
        label = str(row.get("label") or "").strip()
        meta = {k: v for k, v in row.items() if k not in ("id", "label", "url", "path", "_error")}
        if "_error" in row:
            yield InputRecord(rid, label, source, _reject("bad_row", row["_error"]), meta)
        elif not rid:
            yield InputRecord(f"row-{n}", label, source, _reject("missing_id", f"row {n}"), meta)
        elif rid in seen:
            yield InputRecord(rid, label, source, _reject("duplicate_id", rid), meta)
        elif row.get("url"):
            url = str(row["url"])
            yield InputRecord(
                rid, label, source, lambda u=url: download(u, client, max_bytes), meta
            )
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


def iter_records(config: CollectConfig, raw: Path, client: httpx.Client) -> Iterator[InputRecord]:
    for s in config.sources:
        path = raw / s.path
        name = f"{s.kind}:{s.path}"
        if not path.exists():
            raise FileNotFoundError(f"collect source {name} not found at {path}")
        if s.kind == "folder":
            yield from folder_records(path, name, config.max_bytes)
        elif s.kind == "archive":
            yield from archive_records(path, name, config.classes, config.max_bytes)
        else:
            yield from catalog_records(path, name, client, config.max_bytes)


# --- per-record checks -------------------------------------------------------------------


def _prefetched(
    records: Iterator[InputRecord], workers: int = 16
) -> Iterator[tuple[InputRecord, bytes | Rejected]]:
    """Read records' bytes with a few threads (downloads overlap), preserving input order."""

    def fetch(record: InputRecord) -> bytes | Rejected:
        try:
            return record.read()
        except Rejected as rejected:
            return rejected

    with ThreadPoolExecutor(workers) as pool:
        batch: list[InputRecord] = []
        for record in records:
            batch.append(record)
            if len(batch) == 256:
                yield from zip(batch, pool.map(fetch, batch), strict=True)
                batch = []
        yield from zip(batch, pool.map(fetch, batch), strict=True)


def check_record(
    record: InputRecord, data: bytes | Rejected, config: CollectConfig
) -> dict[str, Any]:
    """The manifest row for one record; `data` is its bytes or why they could not be read."""
    row: dict[str, Any] = {
        "id": record.id,
        "label": record.label,
        "source": record.source,
        "status": "quarantined",
        "reason": "",
        "detail": "",
        "sha256": "",
        "width": 0,
        "height": 0,
        "format": "",
        "bytes": 0,
        "meta": json.dumps(record.meta, sort_keys=True, default=str) if record.meta else "",
    }
    try:
        if isinstance(data, Rejected):
            raise data
        row["bytes"] = len(data)
        row["sha256"] = hashlib.sha256(data).hexdigest()
        if record.label not in config.classes:
            raise Rejected("unknown_label", f"{record.label!r} not in {list(config.classes)}")
        info = inspect_image(data, min_side=config.min_side, max_pixels=config.max_pixels)
    except Rejected as rejected:
        row.update(reason=rejected.code, detail=rejected.detail)
        return row
    row.update(status="accepted", width=info.width, height=info.height, format=info.format)
    return row


def collect(config: CollectConfig, raw: Path, out: Path) -> pd.DataFrame:
    """Check every record of every source; pack accepted images (once per sha256) into shards."""
    stored: dict[str, BlobRef] = {}
    rows = []
    shutil.rmtree(out / SHARDS, ignore_errors=True)  # no stale shard from a larger earlier run
    with (
        httpx.Client(timeout=config.timeout_s, follow_redirects=True) as client,
        ShardWriter(out / SHARDS, config.shard_size) as shards,
    ):
        records = iter_records(config, raw, client)
        for record, data in tqdm(_prefetched(records), desc="collect", unit="img"):
            row = check_record(record, data, config)
            if row["status"] == "accepted":
                sha = row["sha256"]
                if sha not in stored:
                    stored[sha] = shards.add(f"{sha}.{row['format'].lower()}", data)
                ref = stored[sha]
                row.update(shard=ref.shard, offset=ref.offset, length=ref.length)
            rows.append(row)
    manifest = pd.DataFrame(rows, columns=[*MANIFEST_COLUMNS])
    manifest[["shard"]] = manifest[["shard"]].fillna("")
    manifest[["offset", "length"]] = manifest[["offset", "length"]].fillna(0).astype("int64")
    return manifest


MANIFEST_COLUMNS = (
    "id",
    "label",
    "source",
    "status",
    "reason",
    "detail",
    "sha256",
    "width",
    "height",
    "format",
    "bytes",
    "shard",
    "offset",
    "length",
    "meta",
)


def collect_report(manifest: pd.DataFrame) -> dict[str, Any]:
    """Counts by source, class and reason: the collect metric."""
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


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), stage_config(CollectConfig, "collect", params)
    manifest = collect(config, paths.raw, paths.collected)
    manifest.to_parquet(paths.collected / MANIFEST, index=False)
    report = collect_report(manifest)
    paths.collect_report.parent.mkdir(parents=True, exist_ok=True)
    paths.collect_report.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"collect: {report['records']} records, {report['accepted']} accepted, "
        f"{report['quarantined']} quarantined {report['by_reason']}"
    )


if __name__ == "__main__":
    main()
