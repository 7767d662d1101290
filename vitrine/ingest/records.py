"""Input records of every source kind: one per file, archive member or catalog row.

A record carries where it came from, its label and a way to read its bytes; reading is lazy and
capped (a record larger than max_bytes is never read whole). What cannot be a record at all
becomes one with a reason, so collect accounts for every input.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from vitrine.config import params_block
from vitrine.images import Rejected
from vitrine.ingest.download import FetchResult, url_problem

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@params_block
class Source:
    kind: str  # folder | archive | catalog
    path: str  # relative to paths.raw


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
            yield InputRecord(
                rel, label, source, functools.partial(_read_capped, entry.path, max_bytes)
            )


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
        # TarFile.members is undocumented, so typeshed leaves it out.
        tar.members.clear()  # type: ignore[attr-defined]
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


def source_path(raw: Path, source: Source) -> Path:
    path = raw / source.path
    if not path.exists():
        raise FileNotFoundError(f"collect source {source.kind}:{source.path} not found at {path}")
    return path


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
