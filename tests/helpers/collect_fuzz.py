"""Property-based checks of collect's readers: hypothesis strategies that build hostile sources
on disk, and the checks that read them as collect does (tests/test_collect_properties.py runs
them in CI, benchmarks/fuzz_collect.py for minutes).

Every source kind (folder, tar in four compressions, zip, CSV, JSONL with paths) and the record
reader are held to the same promises: one row per input record; no exception; nothing opened
or listed outside the source's root; no FIFO, socket or device opened; at most max_bytes read
per record and a bounded peak of memory while reading it (tracemalloc); every text the manifest
takes is valid UTF-8; every reason one of REASONS.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
import tempfile
import tracemalloc
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from tests.helpers.hostile import (
    deadline,
    make_special,
    open_tar,
    patch_zip,
    tar_member,
    watching,
)
from tests.helpers.photos import photo_bytes
from vitrine.images import Rejected
from vitrine.ingest.archives import archive_records
from vitrine.ingest.catalogs import catalog_records
from vitrine.ingest.records import CHUNK, InputRecord, escaped, folder_records, read_record

CLASSES = ("laptop", "phone")
PHOTOS = [photo_bytes(i) for i in range(3)]  # 1.4-1.6 kB each
# The reasons the readers may give (the image checks and downloads come later, elsewhere).
REASONS = {
    "outside_source_root",
    "unreadable",
    "not_a_regular_file",
    "too_large",
    "invalid_utf8",
    "label_not_in_classes",
    "bad_archive",
    "bad_row",
    "missing_id",
    "duplicate_id",
    "missing_location",
    "bad_url",
}
HANG_S = 20.0  # one source read for longer than this is a hang
STATS = Counter[str]()  # examples tried per check, and the largest memory peak seen


DECODER = 16 << 20  # an xz or LZMA decoder's own state (its dictionary: 8 MiB at preset 6)
ZEROS = 4 << 20  # a zip member of zeros inflates to this, past any max_bytes tried


def memory_bound(max_bytes: int, decoder: bool = False) -> int:
    """The most memory reading one record may take at its peak: its bytes twice (the chunks and
    their join), a chunk of the archive, room for the reader's bookkeeping and, for an xz or
    LZMA archive, the decoder's state."""
    return 2 * max_bytes + 2 * CHUNK + (1 << 20) + (DECODER if decoder else 0)


# --- reading a source as collect does ------------------------------------------------------


@dataclass
class Read:
    rows: list[tuple[InputRecord, bytes | Rejected]]
    peaks: list[int]


def read_all(records: Callable[[], Iterator[InputRecord]], area: Path, root: Path) -> Read:
    """Every record of a source through read_record, the memory peak of each measured; fails
    on a hang, or if anything under `area` but outside `root` was touched, or a special file
    opened."""
    rows: list[tuple[InputRecord, bytes | Rejected]] = []
    peaks: list[int] = []
    with watching() as watch, deadline(HANG_S):
        tracemalloc.start()
        try:
            stream = records()
            while True:
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                record = next(stream, None)
                if record is None:
                    break
                rows.append(read_record(record, CLASSES))
                peaks.append(tracemalloc.get_traced_memory()[1] - before)
        finally:
            tracemalloc.stop()
    assert watch.outside(area, root) == [], "read outside the source root"
    assert watch.special_opened() == [], "opened a FIFO, socket or device"
    return Read(rows, peaks)


def check_rows(read: Read, max_bytes: int, decoder: bool = False) -> None:
    """What holds for every row, whatever the source."""
    for (record, result), peak in zip(read.rows, read.peaks, strict=True):
        for text in (record.id, record.label, record.source, record.url):
            text.encode("utf-8")  # parquet takes it
        json.dumps(record.meta, sort_keys=True, default=str)
        if isinstance(result, Rejected):
            assert result.code in REASONS, result.code
            result.detail.encode("utf-8")
        else:
            assert len(result) <= max_bytes
        assert peak <= memory_bound(max_bytes, decoder), f"{peak} bytes to read {record.id!r}"
        STATS["peak"] = max(STATS["peak"], peak)


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh directory per example (hypothesis cannot use pytest's tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="fuzz-collect-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def outside_secret(area: Path) -> Path:
    """A photo outside every source root: no reader may open it."""
    secret = area / "outside" / "secret.jpg"
    secret.parent.mkdir(exist_ok=True)
    secret.write_bytes(PHOTOS[0])
    return secret


# --- strategies ----------------------------------------------------------------------------

_TEXT = st.characters(exclude_categories=["Cs"], exclude_characters="\0/")
names = st.one_of(
    st.text(_TEXT, min_size=1, max_size=12).map(os.fsencode),
    st.binary(min_size=1, max_size=12),  # mostly not UTF-8
).filter(lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
labels = st.sampled_from([b"phone", b"laptop", b" Phone", b"LAPTOP ", b"phnoe", b"tablet"]) | names
contents = st.sampled_from(["photo", "big", "empty"]) | st.binary(max_size=300)
max_bytes_values = st.sampled_from([512, 4096, 65536])


def content_bytes(content: str | bytes, max_bytes: int, n: int = 0) -> bytes:
    if content == "photo":
        return PHOTOS[n % len(PHOTOS)]
    if content == "big":
        return bytes(range(256)) * (max_bytes // 256 + 2)
    if content == "empty":
        return b""
    assert isinstance(content, bytes)
    return content


# --- folders -------------------------------------------------------------------------------

FOLDER_KINDS = ["file", "file", "file", "fifo", "socket", "device"]
FOLDER_KINDS += ["link_in", "link_out", "link_loop", "link_dangling", "link_dir"]
NEVER_READ = {"fifo", "socket", "device", "link_loop", "link_dangling", "link_dir"}


@st.composite
def folder_specs(draw: st.DrawFn) -> tuple[list[tuple[bytes, bytes, str, str | bytes]], int]:
    entry = st.tuples(labels, names, st.sampled_from(FOLDER_KINDS), contents)
    entries = draw(st.lists(entry, max_size=12, unique_by=lambda e: (e[0], e[1])))
    return entries, draw(max_bytes_values)


def _link_target(kind: str, name: bytes, secret: Path) -> bytes:
    return {
        "link_in": name + b".target",
        "link_out": os.fsencode(secret),
        "link_loop": name,
        "link_dangling": b"nowhere",
        "link_dir": b".",
    }[kind]


def build_folder(area: Path, entries: list, max_bytes: int) -> tuple[Path, dict[str, str]]:
    """The folder source under area/src, and what each input is (its escaped id -> kind)."""
    root = area / "src"
    root.mkdir()
    secret = outside_secret(area)
    made: dict[str, str] = {}
    for n, (label, name, kind, content) in enumerate(entries):
        folder = os.fsencode(root) + b"/" + label
        path = folder + b"/" + name
        rel = escaped(os.fsdecode(label + b"/" + name))
        extra = {rel + ".target": path + b".target"} if kind == "link_in" else {}
        wanted = {rel: path, **extra}
        if any(r in made or os.path.lexists(p) for r, p in wanted.items()):
            continue  # a name taken (two names can escape alike), or the target's name
        os.makedirs(folder, exist_ok=True)
        if kind in ("fifo", "socket", "device"):
            if not make_special(Path(os.fsdecode(path)), kind):
                continue
        elif kind == "file" or extra:
            with open(path + (b".target" if extra else b""), "wb") as f:
                f.write(content_bytes(content, max_bytes, n))
        if kind.startswith("link"):
            os.symlink(_link_target(kind, name, secret), path)
        made.update(dict.fromkeys(wanted, "file"))
        made[rel] = kind
    return root, made


def check_folder(entries: list, max_bytes: int) -> None:
    STATS["folder"] += 1
    with scratch() as area:
        root, made = build_folder(area, entries, max_bytes)
        read = read_all(lambda: folder_records(root, "folder:src", max_bytes), area, root)
        check_rows(read, max_bytes)
        ids = Counter(r.id for r, _ in read.rows)
        assert ids == Counter(list(made)), (ids, made)
        for record, result in read.rows:
            kind = made[record.id]
            if kind == "link_out":
                assert isinstance(result, Rejected) and result.code == "outside_source_root"
            assert kind not in NEVER_READ or isinstance(result, Rejected), (kind, record)


# --- tar and zip ---------------------------------------------------------------------------

TAR_TYPES = [tarfile.REGTYPE] * 4 + [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE]
TAR_TYPES += [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.CONTTYPE]
member_paths = st.one_of(
    st.lists(names, min_size=1, max_size=3).map(b"/".join),
    st.tuples(labels, names).map(b"/".join),
    st.sampled_from([b"../escape.jpg", b"/abs.jpg", b"phone/../../up.jpg"]),
)
damages = st.none() | st.tuples(st.floats(0, 1), st.sampled_from(["cut", "flip"]))
Damage = tuple[float, str] | None


@st.composite
def tar_specs(draw: st.DrawFn) -> tuple[list, str, int, int, Damage]:
    member = st.tuples(member_paths, st.sampled_from(TAR_TYPES), contents)
    members = draw(st.lists(member, max_size=10))
    compression = draw(st.sampled_from(["", "gz", "bz2", "xz"]))
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))
    return members, compression, fmt, draw(max_bytes_values), draw(damages)


def damaged(path: Path, how: Damage) -> None:
    """Cut the file short at a fraction of its length, or flip the bits of one byte there."""
    data = path.read_bytes()
    if how is None or not data:
        return
    at = int(how[0] * (len(data) - 1))
    flipped = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    path.write_bytes(data[:at] if how[1] == "cut" else flipped)


def check_archive_rows(read: Read, names: list[str], hurt: bool) -> None:
    """One row per member but directories (a wrapping top folder may be stripped from the
    ids); of a damaged archive, at most one bad_archive row."""
    if hurt:
        codes = [getattr(result, "code", "") for _, result in read.rows]
        assert codes.count("bad_archive") <= 1
        return
    ids = Counter(r.id for r, _ in read.rows)
    tops = {n.split("/", 1)[0] + "/" for n in names}
    prefixes = ["", *tops] if len(tops) == 1 and all("/" in n for n in names) else [""]
    expected = [Counter(repeats_named([n.removeprefix(p) for n in names])) for p in prefixes]
    assert ids in expected, (ids, expected)


def repeats_named(ids: list[str]) -> list[str]:
    """The ids as the manifest lists them: a repeat as `<id>#repeat-<k>`, k from 2 past any id
    already listed."""
    named: list[str] = []
    for rid in ids:
        k = 1
        while (f"{rid}#repeat-{k}" if k > 1 else rid) in named:
            k += 1
        named.append(f"{rid}#repeat-{k}" if k > 1 else rid)
    return named


def check_tar(members: list, compression: str, fmt: int, max_bytes: int, how: Damage) -> None:
    STATS["tar"] += 1
    with scratch() as area:
        outside_secret(area)
        path = area / ("a.tar" + (f".{compression}" if compression else ""))
        kept: list[str] = []
        with open_tar(path, f"w:{compression}", fmt) as tf:
            for n, (name, kind, content) in enumerate(members):
                try:
                    data = content_bytes(content, max_bytes, n)
                    tar_member(tf, name, data, kind, "../outside/secret.jpg")
                except ValueError:  # a name the format cannot hold (ustar: over 256 bytes)
                    continue
                if kind != tarfile.DIRTYPE:
                    kept.append(escaped(os.fsdecode(name)))
        damaged(path, how)
        read = read_all(lambda: archive_records(path, "archive:a", CLASSES, max_bytes), area, path)
        check_rows(read, max_bytes, decoder=compression == "xz")
        check_archive_rows(read, kept, how is not None)


ZIP_MODES = [None, 0o100644, 0o120777, 0o010644, 0o040755, 0o020644]
ZIP_METHODS = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
zip_names = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), min_size=1),
    st.sampled_from(["../up.jpg", "/abs.jpg", "phone/a.jpg", "Laptop/b.jpg"]),
).filter(lambda n: not n.endswith("/"))


@st.composite
def zip_specs(draw: st.DrawFn) -> tuple[list, int | None, bool, int, Damage]:
    member = st.tuples(
        zip_names,
        st.sampled_from(ZIP_METHODS),
        st.sampled_from(ZIP_MODES),
        contents | st.just("zeros"),  # ZEROS bytes, inflating far past the cap
    )
    members = draw(st.lists(member, max_size=8, unique_by=lambda m: m[0]))
    claimed = draw(st.none() | st.integers(0, 1 << 31))  # what every header says
    encrypted = draw(st.booleans())
    return members, claimed, encrypted, draw(max_bytes_values), draw(damages)


def check_zip(
    members: list, claimed: int | None, encrypted: bool, max_bytes: int, how: Damage
) -> None:
    STATS["zip"] += 1
    with scratch() as area:
        path = area / "a.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for n, (name, method, mode, content) in enumerate(members):
                info = zipfile.ZipInfo(name)
                info.compress_type = method
                if mode is not None:
                    info.create_system, info.external_attr = 3, mode << 16
                zeros = content == "zeros"
                zf.writestr(info, bytes(ZEROS) if zeros else content_bytes(content, max_bytes, n))
        if members:
            patch_zip(path, claimed, 0x1 if encrypted else 0)
        damaged(path, how)
        read = read_all(lambda: archive_records(path, "archive:a", CLASSES, max_bytes), area, path)
        check_rows(read, max_bytes, decoder=any(m[1] == zipfile.ZIP_LZMA for m in members))
        check_archive_rows(read, [m[0] for m in members], how is not None)


# --- catalogs ------------------------------------------------------------------------------

ROW_KINDS = ["good", "good", "extra", "short", "latin1", "dup", "no_id", "outside", "loop"]
ROW_KINDS += ["fifo", "dir", "nul", "random", "url", "deep"]
_FIELD = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
catalog_rows = st.lists(st.tuples(st.sampled_from(ROW_KINDS), _FIELD, labels), max_size=12)
# What a row of each kind must end as; "" for a good row: accepted if max_bytes allows. A kind
# not named (random text, no id, a url, ...) may end as anything, so long as it is one row.
EXPECTED = {
    "good": "",
    "dup": "",
    "extra": "bad_row",  # CSV: two fields more than the header; JSONL: a JSON list
    "deep": "bad_row",  # JSONL only: nested past MAX_DEPTH
    "latin1": "invalid_utf8",
    "outside": "outside_source_root",
    "loop": "unreadable",
    "fifo": "not_a_regular_file",
    "dir": "not_a_regular_file",
}
PARSE_PROBLEMS = {"extra", "deep", "latin1"}  # decided before the id is looked at


def catalog_area(area: Path) -> Path:
    """The catalog's folder: photos, and the files its paths may lead to."""
    root = area / "cat"
    (root / "photos").mkdir(parents=True)
    for i, photo in enumerate(PHOTOS):
        (root / "photos" / f"{i}.jpg").write_bytes(photo)
    os.symlink("loop.jpg", root / "loop.jpg")
    os.mkfifo(root / "fifo.jpg")
    outside_secret(area)
    return root


def catalog_row(kind: str, n: int, text: str, label: bytes) -> dict[str, str]:
    paths = {
        "outside": "../outside/secret.jpg",
        "loop": "loop.jpg",
        "fifo": "fifo.jpg",
        "dir": "photos",
        "nul": "photos/0.jpg\0x",
    }
    row = {
        "id": {"dup": "r0", "no_id": " "}.get(kind, f"r{n}"),
        "label": os.fsdecode(label),
        "path": paths.get(kind, f"photos/{n % len(PHOTOS)}.jpg"),
        "note": text,
    }
    if kind in EXPECTED:  # a class, in some spelling
        row["label"] = CLASSES[n % 2].upper() if n % 3 == 0 else f" {CLASSES[n % 2]} "
    if kind == "url":
        row["url"], row["path"] = text or "ftp://x/y.jpg", ""
    elif kind == "random":
        row = {"id": text, "label": text, "path": text}
    return row


ENCODINGS = ["utf-8", "utf-8", "latin-1", "utf-16"]  # the whole file re-encoded (unencodable: ?)


def reencoded(data: bytes, encoding: str) -> bytes:
    if encoding == "utf-8":
        return data
    return data.decode(errors="surrogateescape").encode(encoding, errors="replace")


def check_catalog(area: Path, path: Path, kinds: list[str] | None, max_bytes: int) -> None:
    """One row per catalog row, and the reason each kind must have (kinds None: a catalog
    whose rows cannot be told apart, as in UTF-16, or arbitrary bytes: no row may fail)."""
    read = read_all(lambda: catalog_records(path, "catalog:c", {}, max_bytes), area, path.parent)
    check_rows(read, max_bytes)
    if kinds is None:
        return
    assert len(read.rows) == len(kinds)
    assert len({r.id for r, _ in read.rows}) == len(read.rows)  # the manifest's key
    seen: set[str] = set()
    photos_fit = max_bytes >= max(map(len, PHOTOS))
    for kind, (record, result) in zip(kinds, read.rows, strict=True):
        code = result.code if isinstance(result, Rejected) else "accepted"
        if kind in PARSE_PROBLEMS:
            assert code == EXPECTED[kind], (kind, record, result)
        elif kind in EXPECTED and record.id.partition("#repeat-")[0] in seen:
            assert code == "duplicate_id", (kind, record, result)
        elif kind in EXPECTED and (EXPECTED[kind] or photos_fit):
            assert code == (EXPECTED[kind] or "accepted"), (kind, record, result)
        seen.add(record.id)


def check_raw_catalog(data: bytes, jsonl: bool, max_bytes: int) -> None:
    """Arbitrary bytes as a catalog."""
    STATS["raw"] += 1
    with scratch() as area:
        path = catalog_area(area) / ("c.jsonl" if jsonl else "c.csv")
        path.write_bytes(data)
        check_catalog(area, path, None, max_bytes)


def csv_line(fields: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(fields)
    return out.getvalue()


def check_csv(rows: list, bom: bool, max_bytes: int, encoding: str = "utf-8") -> None:
    STATS["csv"] += 1
    with scratch() as area:
        root = catalog_area(area)
        header = ["id", "label", "path", "note", "url"]
        data = [csv_line(header).encode("utf-8-sig" if bom else "utf-8")]
        for n, (kind, text, label) in enumerate(rows):
            row = catalog_row(kind, n, text, label)
            fields = [row.get(k, "") for k in header] + (["x", "y"] if kind == "extra" else [])
            line = csv_line(fields[:3] if kind == "short" else fields).encode(
                errors="surrogateescape"
            )
            if kind == "latin1":  # one latin-1 byte, in the id or in another column
                at = len(b"r%d" % n) if n % 2 else len(line) - 2  # before the id's comma or \r\n
                line = line[:at] + b"\xe9" + line[at:]
            data.append(line)
        (root / "c.csv").write_bytes(reencoded(b"".join(data), encoding))
        kinds: list[str] | None = ["good" if k == "deep" else k for k, _, _ in rows]  # no nesting
        if encoding != "utf-8":  # latin-1 keeps the rows apart, not their reasons
            kinds = ["random"] * len(rows) if encoding == "latin-1" else None
        check_catalog(area, root / "c.csv", kinds, max_bytes)


def jsonl_line(kind: str, n: int, text: str, label: bytes) -> bytes:
    if kind == "extra":
        return json.dumps([n, text]).encode()  # JSON, but not an object
    if kind == "latin1":
        return json.dumps(catalog_row("good", n, text, label)).encode()[:-1] + b', "x": "\xe9"}'
    if kind == "deep":
        depth = 65 + 40 * len(text)  # past MAX_DEPTH, and past json's recursion limit
        return b'{"id": "d", "m": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "short":  # raw text, JSON or not
        return text.encode(errors="surrogateescape").replace(b"\n", b" ").replace(b"\r", b" ")
    return json.dumps(catalog_row(kind, n, text, label)).encode()


def check_jsonl(rows: list, bom: bool, max_bytes: int, encoding: str = "utf-8") -> None:
    STATS["jsonl"] += 1
    with scratch() as area:
        root = catalog_area(area)
        lines = [jsonl_line(kind, n, text, label) for n, (kind, text, label) in enumerate(rows)]
        data = (b"\xef\xbb\xbf" if bom else b"") + b"\n\n".join(lines)
        (root / "c.jsonl").write_bytes(reencoded(data, encoding))
        # A line blank once decoded (Unicode white space too) is no row.
        text = [line.decode(errors="surrogateescape") for line in lines]
        kinds: list[str] | None = [k for (k, _, _), t in zip(rows, text, strict=True) if t.strip()]
        if encoding == "latin-1":  # the rows stay apart, not their reasons
            kept = reencoded(data, encoding).decode(errors="surrogateescape").split("\n")
            kinds = ["random" for line in kept if line.strip()]
            kinds = kinds if not bom else None  # the mark became "?": a row of its own, or not
        elif encoding != "utf-8":
            kinds = None
        check_catalog(area, root / "c.jsonl", kinds, max_bytes)


# --- the record reader -----------------------------------------------------------------------

any_text = st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.characters(), max_size=12
)
class_names = st.text(max_size=8) | st.sampled_from(CLASSES)


@st.composite
def record_specs(draw: st.DrawFn) -> tuple[InputRecord, tuple[str, ...], bytes | tuple]:
    classes = tuple(draw(st.lists(class_names, min_size=1, max_size=5, unique=True)))
    label = draw(st.sampled_from(classes).map(lambda c: f" {c.upper()} ") | any_text)
    outcome = draw(st.binary(max_size=64) | st.tuples(st.sampled_from(sorted(REASONS)), any_text))

    def read() -> bytes:
        if isinstance(outcome, bytes):
            return outcome
        raise Rejected(*outcome)

    record = InputRecord(draw(any_text), label, draw(any_text), read, url=draw(any_text))
    return record, classes, outcome


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_record(record: InputRecord, classes: tuple[str, ...], outcome: bytes | tuple) -> None:
    STATS["record"] += 1
    shown, result = read_record(record, classes)
    for text in (shown.id, shown.label, shown.source, shown.url):
        assert _utf8(text)
    assert shown.id == escaped(record.id)
    code = result.code if isinstance(result, Rejected) else None
    key = record.label.strip().casefold()
    folded = [c for c in classes if c.strip().casefold() == key]
    label = record.label if record.label in classes else folded[0] if len(folded) == 1 else None
    if not (_utf8(record.id) and _utf8(record.label)):
        assert code == "invalid_utf8"
    elif label is None:
        assert code == "label_not_in_classes" and shown.label == record.label.strip()
        assert _utf8(result.detail)  # type: ignore[union-attr]
    else:
        assert shown.label == label
        assert result == outcome if isinstance(outcome, bytes) else code == outcome[0]
