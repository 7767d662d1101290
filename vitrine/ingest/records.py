"""Input records of every source kind: one per file, archive member or catalog row.

A record carries where it came from, its label and a way to read its bytes; reading is lazy and
capped (a record larger than max_bytes is never read whole), and only a regular file is ever
opened, so a FIFO, socket or device is never waited on. What cannot be a record at all becomes
one with a reason, so collect accounts for every input. Folders are read here, archives in
`vitrine.ingest.archives`, catalogs in `vitrine.ingest.catalogs`; `read_record` applies the
rules every source shares.

Labels: a record's label is matched against `classes` after trimming surrounding whitespace and
case-insensitively (folder names, archive paths and catalog labels alike); a matched record
takes the class's own spelling. Before that, `collect.label_map` (LabelMap) turns a source label
into a class (many to one, or a rename) or drops it with a stated reason; its keys match source
labels the same way, and a label it does not name is matched as it is. The manifest keeps the
source's own label in `source_label` when a map is set.

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
  detail names the nearest class when one is close, or says that a file sits outside any class
  folder.
- label_dropped: a label that `collect.label_map` drops; the detail is the reason the map
  states for it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Annotated, Any, Protocol

import pydantic
from pydantic_core import PydanticCustomError

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
    source_label: str | None = None  # the label as the source gave it, once read_record changed it


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


def repeats_refused(records: Iterable[InputRecord], first: str) -> Iterator[InputRecord]:
    """A source's records, each id once: a record with the id of an earlier one is quarantined
    as duplicate_id, the first kept. The manifest is keyed by source and id, so the repeat
    is listed as `<id>#repeat-<k>` (k counting on past any id already listed); a repeat already
    refused for a reason of its own (a bad row) keeps that reason. `first` says what the first
    one is, e.g. "row", "member"."""
    listed: set[str] = set()
    for record in records:
        if record.id not in listed:
            listed.add(record.id)
            yield record
            continue
        k = 2
        while f"{record.id}#repeat-{k}" in listed:
            k += 1
        detail = f"{record.id!r} is the id of an earlier {first}, which is kept (repeat {k})"
        renamed = f"{record.id}#repeat-{k}"
        listed.add(renamed)
        read = record.read if isinstance(record.read, _reject) else reject("duplicate_id", detail)
        yield dataclasses.replace(record, id=renamed, read=read)


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
    if not key:  # a folder's or an archive's file outside any class folder, a blank label
        return "no label: a photo of a folder or an archive sits in a folder named after its class"
    if len(index.folded.get(key, ())) > 1:
        return f"{label!r} matches several classes: {list(index.folded[key])}"
    near = difflib.get_close_matches(key, list(index.folded), n=1, cutoff=_NEAREST_CUTOFF)
    if near:
        return f"{label!r} not in classes; nearest: {index.folded[near[0]][0]!r}"
    if len(classes) <= _LISTED_CLASSES:
        return f"{label!r} not in {list(classes)}"
    return f"{label!r} not in the {len(classes)} classes"


# --- label_map: source labels to classes ------------------------------------------------


@params_block
class LabelDrop:
    """A label_map entry that drops a source label: its records are quarantined as
    label_dropped, with the reason as their detail."""

    drop: str  # why these records are left out, in words (the detail of their manifest rows)

    def __post_init__(self) -> None:
        if not self.drop.strip():
            raise ValueError("a label_map drop needs its reason: {drop: <why>}")


_BAD_MAP = "label_map"  # the pydantic error type of a refused collect.label_map


def _label_target(value: Any, info: pydantic.ValidationInfo) -> Any:
    """A label_map value: a class of the block's `classes` (matched as labels are, and kept in
    the class's spelling), or {drop: <reason>}; anything else is refused, saying what was
    expected. A whole number stands for its digits, as a key does (YAML reads `1: 0` as
    numbers; the keys become text on the way to JSON)."""
    classes = info.data.get("classes")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        if classes is None:  # `classes` itself was refused: that error is the one to read
            return value
        found = match_label(value, classes)
        if found is None:
            raise PydanticCustomError(
                _BAD_MAP, "one of classes {classes}", {"classes": list(classes)}
            )
        return found
    if isinstance(value, LabelDrop):
        return value
    if isinstance(value, Mapping) and "drop" in value:
        reason = value["drop"]
        if set(value) == {"drop"} and isinstance(reason, str) and reason.strip():
            return value
        raise PydanticCustomError(_BAD_MAP, "{drop: <reason>} alone, the reason in words")
    raise PydanticCustomError(
        _BAD_MAP, "a class, or {drop} to leave it out", {"drop": "{drop: <reason>}"}
    )


def _distinct_labels(mapping: dict[str, Any]) -> dict[str, Any]:
    """label_map's keys: none blank, and no two that match the same source labels."""
    seen: dict[str, str] = {}
    for key in mapping:
        folded = key.strip().casefold()
        if not folded:
            raise PydanticCustomError(_BAD_MAP, "source labels that are not blank")
        if folded in seen:
            raise PydanticCustomError(
                _BAD_MAP,
                "each source label once, whatever its case and surrounding spaces "
                "({first} and {second} are one label)",
                {"first": repr(seen[folded]), "second": repr(key)},
            )
        seen[folded] = key
    return mapping


# params.yaml's collect.label_map, checked at load against the block's `classes` (a field
# declared before it): source label -> class, or -> {drop: <reason>}.
LabelTarget = Annotated[str | LabelDrop, pydantic.BeforeValidator(_label_target)]
LabelMapping = Annotated[dict[str, LabelTarget], pydantic.AfterValidator(_distinct_labels)]


@dataclass(frozen=True)
class LabelMap:
    """collect.label_map ready for lookups: a source label's class, or its drop, or None when
    the map does not name it (its keys match as labels match classes: trimmed, ignoring case)."""

    exact: Mapping[str, str | LabelDrop] = field(default_factory=dict)
    folded: Mapping[str, str | LabelDrop] = field(default_factory=dict)

    @classmethod
    def of(cls, mapping: Mapping[str, str | LabelDrop]) -> LabelMap:
        return cls(dict(mapping), {k.strip().casefold(): v for k, v in mapping.items()})

    def __bool__(self) -> bool:
        return bool(self.exact)

    def get(self, label: str) -> str | LabelDrop | None:
        found = self.exact.get(label)
        return found if found is not None else self.folded.get(label.strip().casefold())


NO_LABEL_MAP = LabelMap()


def read_record(
    record: InputRecord, classes: tuple[str, ...], label_map: LabelMap = NO_LABEL_MAP
) -> tuple[InputRecord, bytes | Rejected]:
    """The record as the manifest shows it (label mapped by `label_map`, in its class's
    spelling; names in valid UTF-8), and its bytes or why there are none. Precedence: what the
    reader found, then an invalid name, then the label (dropped, or in no class); only then is
    anything read."""
    target = label_map.get(record.label) if label_map else None
    if target is None:
        label = match_label(record.label, classes)
    else:  # a class (in its own spelling, as the map was checked at load), or a drop
        label = match_label(target, classes) if isinstance(target, str) else None
    valid = is_valid_text(record.id) and is_valid_text(record.label)
    if label != record.label or not valid or not is_valid_text(record.source + record.url):
        record = dataclasses.replace(
            record,
            id=escaped(record.id),
            label=label or escaped(record.label.strip()),
            source=escaped(record.source),
            url=escaped(record.url),
            source_label=escaped(
                record.label if record.source_label is None else record.source_label
            ),
        )
    if isinstance(record.read, _reject):
        return record, Rejected(record.read.code, escaped(record.read.detail))
    if not valid:
        return record, Rejected("invalid_utf8", f"name not valid UTF-8: {record.id}")
    if isinstance(target, LabelDrop):
        return record, Rejected("label_dropped", escaped(target.drop))
    if label is None:
        return record, Rejected("label_not_in_classes", escaped(_unmatched(record.label, classes)))
    try:
        return record, record.read()
    except Rejected as rejected:
        return record, Rejected(rejected.code, escaped(rejected.detail))
    except Exception as err:  # a reader's bug or an I/O error must cost this record only
        return record, Rejected("unreadable", escaped(f"{type(err).__name__}: {err}"))
