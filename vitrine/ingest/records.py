"""Input records of every source kind: one per file, archive member or catalog row.

A record carries where it came from, its label and a way to read its bytes; reading is lazy and
capped (a record larger than max_bytes is never read whole), and only a regular file is ever
opened, so a FIFO, socket or device is never waited on. What cannot be a record at all becomes
one with a reason, so collect accounts for every input. Folders are read here, archives in
`vitrine.ingest.archives`, catalogs in `vitrine.ingest.catalogs`; `read_record` applies the
rules every source shares.

Labels: a record's label is matched against `classes` after trimming surrounding whitespace and
case-insensitively (folder names, archive paths and catalog labels alike); a matched record
takes the class's own spelling.

Quarantine reasons decided here (stable codes of the manifest's `reason` column):

- outside_source_root: a symbolic link in a folder source that leads out of the folder.
- unreadable: a file that cannot be opened or read: a dangling link, a symbolic-link loop, a
  directory that cannot be listed (its row stands for everything under it), an I/O error, or
  any other error a reader raises (it costs that record only).
- not_a_regular_file: a FIFO, socket, device or directory where a file was expected; checked
  with stat before opening, and again on the open descriptor.
- too_large: more than max_bytes, found while reading (at most max_bytes + 1 bytes are read).
- invalid_utf8: a file or archive member name that is not valid UTF-8; the id keeps the name
  with its undecodable bytes written as \\xNN, so the row stays traceable.
- label_not_in_classes: a label that is none of `classes` (trimmed, case-insensitively); the
  detail names the nearest class when one is close.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Protocol

from vitrine.config import params_block
from vitrine.images import Rejected

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
CHUNK = 1 << 20  # the largest single read of a stream
_NEAREST_CUTOFF = 0.75  # difflib ratio: 'phnoe' -> 'phone' (0.8), 'tablet' -> nothing
_LISTED_CLASSES = 10  # an unmatched label's detail lists the classes when there are this few


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


def reject(code: str, detail: str) -> Callable[[], bytes]:
    """A record's reader that refuses with `code` before anything is read."""
    return _reject(code, detail)


def eager(read: Callable[[], bytes]) -> Callable[[], bytes]:
    """Read now: archive members must be read while the archive is open, in archive order."""
    try:
        data = read()
    except Rejected as rejected:
        return _reject(rejected.code, rejected.detail)
    return lambda: data


# --- text that parquet can hold ------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def is_valid_text(text: str) -> bool:
    """Whether `text` encodes as UTF-8: no undecodable bytes (as os.fsdecode and the
    surrogateescape error handler keep them) and no lone surrogates (as JSON may escape)."""
    return text.isascii() or _SURROGATE.search(text) is None


def escaped(text: str) -> str:
    """`text` as valid UTF-8: an undecodable byte as \\xNN (what os.fsencode(...).decode(
    "utf-8", "backslashreplace") gives for a file name), another lone surrogate as \\uNNNN."""
    if is_valid_text(text):
        return text

    def one(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _SURROGATE.sub(one, text)


# --- reading files -------------------------------------------------------------------------

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def not_regular(mode: int) -> str | None:
    """What a file of this st_mode is when it is not a regular file ("a FIFO", ...), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_fd_capped(fd: int, size: int, max_bytes: int) -> bytes:
    """An open descriptor's bytes, `size` being what fstat says; Rejected past max_bytes,
    having read at most max_bytes + 1 of them (more than `size` if the file grew)."""
    # One read sized by fstat (no second path lookup): a plain read(max_bytes + 1) allocates
    # the whole 20 MB cap for every 3 kB photo, which made reading files a sixth of collect's
    # own CPU time.
    chunks = [os.read(fd, min(size, max_bytes) + 1)]
    got = len(chunks[0])
    while got <= max_bytes and (chunk := os.read(fd, min(CHUNK, max_bytes + 1 - got))):
        chunks.append(chunk)  # the file grew after fstat
        got += len(chunk)
    if got > max_bytes:
        raise Rejected("too_large", f"over {max_bytes} bytes")
    return b"".join(chunks) if len(chunks) > 1 else chunks[0]


def read_file_capped(path: Path | str, max_bytes: int) -> bytes:
    """A regular file's bytes (see read_fd_capped). Anything else is refused before it is
    opened (stat), and again after (fstat: it may have been swapped since); the open is
    non-blocking, so even a FIFO swapped in between cannot stall it."""
    try:
        kind = not_regular(os.stat(path).st_mode)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                kind = not_regular(st.st_mode)
                if kind is None:
                    return read_fd_capped(fd, st.st_size, max_bytes)
            finally:
                os.close(fd)
    except (OSError, ValueError) as err:  # ValueError: a NUL character in the path
        raise Rejected("unreadable", str(err)) from None
    raise Rejected("not_a_regular_file", kind)


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


def read_stream_capped(stream: Readable, max_bytes: int) -> bytes:
    """A stream's bytes; Rejected past max_bytes, having taken at most max_bytes + 1 of them
    from `stream` (an archive member: its header's size is not trusted)."""
    chunks: list[bytes] = []
    got = 0
    while got <= max_bytes and (chunk := stream.read(min(CHUNK, max_bytes + 1 - got))):
        chunks.append(chunk)
        got += len(chunk)
    if got > max_bytes:
        raise Rejected("too_large", f"over {max_bytes} bytes")
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def within(path: str, root: str) -> bool:
    """Whether the resolved `path` is `root` or under it (both real paths)."""
    return PurePath(path).is_relative_to(root)


# --- folders -------------------------------------------------------------------------------


def _listing(directory: str, rel: str) -> Iterator[tuple[str, os.DirEntry[str] | OSError]]:
    """(relative path, entry) of a directory's entries, sorted by name; (rel, error) if it
    cannot be listed."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as err:
        yield rel.rstrip("/") or ".", err
        return
    for entry in entries:
        yield f"{rel}{entry.name}", entry


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _walk(root: str) -> Iterator[tuple[str, os.DirEntry[str] | OSError]]:
    """(relative path, entry) of everything under `root` but directories, depth first in name
    order; symlinks are yielded, not followed; a directory that cannot be listed is yielded
    with its error. A stack, not recursion: a tree may be deeper than Python's stack."""
    stack = [_listing(root, "")]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif not isinstance(item[1], OSError) and _is_dir(item[1]):
            stack.append(_listing(item[1].path, item[0] + "/"))
        else:
            yield item


def folder_records(root: Path, source: str, max_bytes: int) -> Iterator[InputRecord]:
    """One record per file under root/<label>/...; a symlink leading outside root is refused."""
    real_root = os.path.realpath(root)
    for rel, entry in _walk(str(root)):
        label = rel.split("/", 1)[0] if "/" in rel else ""
        if isinstance(entry, OSError):
            yield InputRecord(rel, label, source, _reject("unreadable", str(entry)))
        # Only a symlink can lead out of the tree (directories are walked without following);
        # realpath does not raise on a loop (the read does: unreadable).
        elif entry.is_symlink() and not within(os.path.realpath(entry.path), real_root):
            yield InputRecord(rel, label, source, _reject("outside_source_root", rel))
        else:
            yield InputRecord(
                rel, label, source, functools.partial(read_file_capped, entry.path, max_bytes)
            )


def source_path(raw: Path, source: Source) -> Path:
    """Where a source is: a directory for a folder, a regular file for an archive or catalog."""
    path = raw / source.path
    if not path.exists():
        raise FileNotFoundError(f"collect source {source.kind}:{source.path} not found at {path}")
    if not (path.is_dir() if source.kind == "folder" else path.is_file()):
        wanted = "a directory" if source.kind == "folder" else "a regular file"
        raise ValueError(f"collect source {source.kind}:{source.path} is not {wanted}: {path}")
    return path


# --- the rules every record follows ------------------------------------------------------


@dataclass(frozen=True)
class _Classes:
    exact: frozenset[str]
    folded: dict[str, tuple[str, ...]]  # trimmed, casefolded -> the classes that fold to it


@functools.lru_cache(maxsize=8)
def _classes(classes: tuple[str, ...]) -> _Classes:
    folded: dict[str, tuple[str, ...]] = {}
    for c in classes:
        key = c.strip().casefold()
        folded[key] = (*folded.get(key, ()), c)
    return _Classes(frozenset(classes), folded)


def match_label(label: str, classes: tuple[str, ...]) -> str | None:
    """The class `label` names (trimmed, case-insensitively), in the class's spelling; None if
    it names none, or several that differ only in case."""
    index = _classes(classes)
    if label in index.exact:
        return label
    found = index.folded.get(label.strip().casefold(), ())
    return found[0] if len(found) == 1 else None


@functools.lru_cache(maxsize=4096)
def _unmatched(label: str, classes: tuple[str, ...]) -> str:
    """The detail of label_not_in_classes: the nearest class if one is obviously meant."""
    index = _classes(classes)
    key = label.strip().casefold()
    if len(index.folded.get(key, ())) > 1:
        return f"{label!r} matches several classes: {list(index.folded[key])}"
    near = difflib.get_close_matches(key, list(index.folded), n=1, cutoff=_NEAREST_CUTOFF)
    if near:
        return f"{label!r} not in classes; nearest: {index.folded[near[0]][0]!r}"
    if len(classes) <= _LISTED_CLASSES:
        return f"{label!r} not in {list(classes)}"
    return f"{label!r} not in the {len(classes)} classes"


def read_record(
    record: InputRecord, classes: tuple[str, ...]
) -> tuple[InputRecord, bytes | Rejected]:
    """The record as the manifest shows it (label in its class's spelling, names in valid
    UTF-8), and its bytes or why there are none. Precedence: what the reader found, then an
    invalid name, then the label; only then is anything read."""
    label = match_label(record.label, classes)
    valid = is_valid_text(record.id) and is_valid_text(record.label)
    if label != record.label or not valid or not is_valid_text(record.source + record.url):
        record = dataclasses.replace(
            record,
            id=escaped(record.id),
            label=label or escaped(record.label.strip()),
            source=escaped(record.source),
            url=escaped(record.url),
        )
    if isinstance(record.read, _reject):
        return record, Rejected(record.read.code, escaped(record.read.detail))
    if not valid:
        return record, Rejected("invalid_utf8", f"name not valid UTF-8: {record.id}")
    if label is None:
        return record, Rejected("label_not_in_classes", escaped(_unmatched(record.label, classes)))
    try:
        return record, record.read()
    except Rejected as rejected:
        return record, Rejected(rejected.code, escaped(rejected.detail))
    except Exception as err:  # a reader's bug or an I/O error must cost this record only
        return record, Rejected("unreadable", escaped(f"{type(err).__name__}: {err}"))
