"""Records from archives: a tar (plain, gzip, bzip2 or xz) or a zip holding a class tree.

Members are read in archive order while the archive is open, and never extracted to disk.
Nothing an archive claims is trusted, so memory stays bounded per record: a member's content is
read up to max_bytes + 1 bytes of *inflated* output whatever its header says (a zip member
through our own decoders, CHUNK bytes at a time); no single read of a tar stream (a header, a
PAX record, a long name) may exceed CHUNK + 512 bytes; an xz or zip LZMA dictionary is capped
at XZ_MEMLIMIT. A damaged archive keeps the members read before the damage.

Quarantine reasons decided here:

- bad_archive: the archive cannot be opened, or not read on past some point (truncated,
  corrupt, a block that is not a tar header, data after the end-of-archive marker). One row,
  named `<archive file name>#<n>` after the n members read before it, stands for the rest.
- outside_source_root: a member name that is absolute or climbs out with "..".
- not_a_regular_file: a member that is a symbolic or hard link, a FIFO, a device or another
  special file (tar types; a zip member's Unix mode): never followed, never read.
- unreadable: a member whose content cannot be read (truncated, bad CRC, encrypted, an
  unsupported compression method).
- too_large: a member whose header claims, or whose inflated content reaches, over max_bytes.
- duplicate_id: a member with the name of an earlier one (`tar -rf` appends a file again): the
  first is kept, the repeat listed as `<name>#repeat-<k>`.

A leading ./ is not part of a member's name (`tar -czf x.tgz ./photos`), a zip's \\ separates
folders as / does (zips written by some Windows tools), and a __MACOSX/ folder of resource
forks (a Mac's "Compress") is not a second top folder.

Names that are not valid UTF-8 (invalid_utf8) and labels (label_not_in_classes) are checked by
`vitrine.ingest.records.read_record`, as for every source.
"""

from __future__ import annotations

import bz2
import gzip
import itertools
import lzma
import re
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from vitrine.images import Rejected
from vitrine.ingest.records import (
    CHUNK,
    InputRecord,
    eager,
    match_label,
    not_regular,
    read_stream_capped,
    reject,
    repeats_refused,
)

_MAX_READ = CHUNK + tarfile.BLOCKSIZE
_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
# xz's decoder holds the dictionary its stream asks for, up to 1.5 GiB, and all of it fills as
# the archive flows through: cap it (xz -9 streams need 65 MiB).
XZ_MEMLIMIT = 128 << 20


class _Xz:
    """An xz file's decompressed bytes with the decoder's memory capped at XZ_MEMLIMIT
    (lzma.LZMAFile has no cap), read forward: tarfile's seeks are forward, served by reading.
    Streams may follow one another; padding or garbage after the last one is its end, as
    lzma.LZMAFile has it."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self._decoder = self._new()
        self._out = b""
        self._pos = 0
        self._done = False

    @staticmethod
    def _new() -> lzma.LZMADecompressor:
        return lzma.LZMADecompressor(memlimit=XZ_MEMLIMIT)

    def read(self, n: int) -> bytes:
        while len(self._out) < n and not self._done:
            self._more(n - len(self._out))
        data, self._out = self._out[:n], self._out[n:]
        self._pos += len(data)
        return data

    def _more(self, want: int) -> None:
        if self._decoder.eof:  # another stream, padding, or the end
            rest = self._decoder.unused_data or self._file.read(1 << 16)
            self._decoder = self._new()
            try:
                self._out += self._decoder.decompress(rest, want) if rest else b""
            except lzma.LZMAError:
                rest = b""
            self._done = not rest
            return
        data = self._file.read(1 << 16) if self._decoder.needs_input else b""
        if self._decoder.needs_input and not data:
            raise EOFError("xz stream ended before its end-of-stream marker")
        self._out += self._decoder.decompress(data, want)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self._pos:
            raise OSError("an xz stream is read forward only")
        while self._pos < offset and self.read(min(CHUNK, offset - self._pos)):
            pass
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._out = b""


def _decompressed(file: BinaryIO, kind: str) -> Any:
    """A reader of `file`'s decompressed bytes; closing it leaves `file` open."""
    if kind == "gz":
        return gzip.GzipFile(fileobj=file, mode="rb")
    if kind == "bz2":
        return bz2.BZ2File(file)
    if kind == "xz":
        return _Xz(file)
    return file


_MACOS_FORKS = "__MACOSX"  # the top folder of resource forks a Mac's "Compress" adds to a zip


def _plain(name: str) -> str:
    """A member name without the ./ that `tar -czf x.tgz ./photos` writes before each."""
    return re.sub(r"^(\./)+", "", name)


def _tree_prefix(names: Iterable[str], classes: tuple[str, ...]) -> str:
    """An archive often wraps the class tree in one top folder (raw_data/laptop/...): strip it.
    __MACOSX/ beside it does not count as a second top folder (its members are records of their
    own, which no class matches)."""
    tops: set[str] = set()
    for name in map(_plain, names):
        top, slash, _ = name.partition("/")
        if top == _MACOS_FORKS and slash:
            continue
        if not slash or (tops and top not in tops):  # a file at the top, or a second top
            return ""
        tops.add(top)
    top = tops.pop() if tops else ""
    return top + "/" if top and match_label(top, classes) is None else ""


def _safe_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not name.startswith("/") and ".." not in parts


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def archive_records(
    path: Path, source: str, classes: tuple[str, ...], max_bytes: int
) -> Iterator[InputRecord]:
    """Records from a tar (any compression) or zip holding a class tree; read member by member
    into memory, so a large archive is streamed rather than extracted to disk."""
    if not _is_tar(path) and (zipfile.is_zipfile(path) or _starts_as_zip(path)):
        members = _zip_records(path, source, classes, max_bytes)
    else:
        members = _tar_records(path, source, classes, max_bytes)
    # A name twice (`tar -rf` appends a file again): the first is kept, as a catalog's first row.
    yield from repeats_refused(members, "member")


def _starts_as_zip(path: Path) -> bool:
    """A zip's first local header, its directory gone (a cut download): read as a zip."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _broken(path: Path, source: str, n: int, why: str) -> InputRecord:
    """The row that stands for what could not be read of an archive, after n members."""
    return InputRecord(f"{path.name}#{n}", "", source, reject("bad_archive", why))


def _member_record(
    name: str, prefix: str, source: str, data: Callable[[], bytes], bad: str | None
) -> InputRecord:
    rel = _plain(name)
    rel = rel[len(prefix) :] if rel.startswith(prefix) else rel
    label = rel.split("/", 1)[0] if "/" in rel else ""
    if not _safe_member(name):
        return InputRecord(rel, label, source, reject("outside_source_root", name))
    if bad:
        return InputRecord(rel, label, source, reject("not_a_regular_file", bad))
    return InputRecord(rel, label, source, eager(data))


# --- tar -----------------------------------------------------------------------------------


class _Guarded:
    """A tar's (decompressed) stream as tarfile reads it: a read over _MAX_READ bytes (a PAX
    header or long name claiming megabytes) is refused rather than allocated, and the last
    header-sized read is kept, to tell the end-of-archive marker from a damaged header."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.last = b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > _MAX_READ:
            raise tarfile.ReadError(f"a single read of {n} bytes (over {_MAX_READ})")
        data = self._stream.read(n)
        if n <= tarfile.BLOCKSIZE:
            self.last = data
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()

    def rest_is_zeros(self) -> bool:
        """Whether the stream holds nothing but zeros from here (tar pads its end with them)."""
        while chunk := self._stream.read(1 << 16):
            if chunk.count(0) != len(chunk):
                return False
        return True


@contextmanager
def _open_tar(path: Path) -> Iterator[tuple[tarfile.TarFile, _Guarded]]:
    """The tar at `path`, plain or compressed (tried as tarfile.open's "r:*" does: plain first,
    then by magic number); its decompressor is closed on leaving."""
    with open(path, "rb") as file:
        magic = file.read(6)
        failure = "not a tar archive"
        for kind in ["tar", *(kind for prefix, kind in _MAGIC.items() if magic.startswith(prefix))]:
            file.seek(0)
            stream = _decompressed(file, kind)
            guarded = _Guarded(stream)
            try:
                # tarfile wants a file; _Guarded has the three methods it reads with.
                tar = tarfile.TarFile(fileobj=guarded, mode="r", encoding="utf-8")  # type: ignore[arg-type]
            except Exception as err:  # not this kind: try the next
                failure = _error(err)
                if stream is not file:
                    stream.close()
                continue
            try:
                yield tar, guarded
            finally:
                if stream is not file:
                    stream.close()
            return
    raise tarfile.ReadError(failure)


def _tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members but directories, header by header. TarFile's own iteration keeps
    every member it has read (about 1 kB each); this keeps none, so memory stays flat."""
    while (member := tar.next()) is not None:
        # TarFile.members is undocumented, so typeshed leaves it out.
        tar.members.clear()  # type: ignore[attr-defined]
        if not member.isdir():
            yield member


def _tar_end(guarded: _Guarded) -> str | None:
    """Why the archive did not end cleanly where tarfile stopped, or None: tarfile ends its
    iteration silently on a damaged header after the first."""
    last = guarded.last
    if last and len(last) < tarfile.BLOCKSIZE:
        return f"truncated header ({len(last)} bytes)"
    if last.count(0) != len(last):
        return "a block that is not a tar header"
    return None if guarded.rest_is_zeros() else "data after the end-of-archive marker"


def _is_tar(path: Path) -> bool:
    """Whether the archive starts as a tar does (a tar may end with bytes that look like a zip's
    directory: a zip as its last member)."""
    try:
        with _open_tar(path):
            return True
    except Exception:
        return False


def _tar_names(path: Path) -> Iterator[str]:
    """Member names (but directories), as far as the archive can be read, one at a time."""
    try:
        with _open_tar(path) as (tar, _):
            for m in _tar_members(tar):
                yield m.name
    except Exception:  # damaged: _tar_records reports where
        return


_TAR_TYPES = {
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
}


def _tar_kind(m: tarfile.TarInfo) -> str | None:
    """What a member is when it is not a regular file (links are not followed), else None."""
    if m.issym():
        return f"a symbolic link to {m.linkname}"
    if m.islnk():
        return f"a hard link to {m.linkname}"
    if m.isfile():
        return None
    return _TAR_TYPES.get(m.type, f"a tar member of type {m.type!r}")


def _tar_records(
    path: Path, source: str, classes: tuple[str, ...], max_bytes: int
) -> Iterator[InputRecord]:
    prefix = _tree_prefix(_tar_names(path), classes)  # a first pass over the headers
    n = 0
    with ExitStack() as stack:
        try:
            tar, guarded = stack.enter_context(_open_tar(path))
        except Exception as err:
            yield _broken(path, source, 0, _error(err))
            return
        members = _tar_members(tar)
        while True:
            try:
                m = next(members, None)
                why = _tar_end(guarded) if m is None else None
            except Exception as err:  # any damage ends the archive: one row says where
                yield _broken(path, source, n, _error(err))
                return
            if m is None:
                if why:
                    yield _broken(path, source, n, why)
                return

            def read(m: tarfile.TarInfo = m) -> bytes:
                if m.size > max_bytes:
                    raise Rejected("too_large", f"{m.size} bytes > {max_bytes}")
                try:
                    f = tar.extractfile(m)
                    return read_stream_capped(f, max_bytes) if f is not None else b""
                except Rejected:
                    raise
                except Exception as err:
                    raise Rejected("unreadable", _error(err)) from None

            yield _member_record(m.name, prefix, source, read, _tar_kind(m))
            n += 1


# --- zip -----------------------------------------------------------------------------------


def _zip_kind(info: zipfile.ZipInfo) -> str | None:
    """What a zip member is when its Unix mode says it is not a regular file."""
    mode = info.external_attr >> 16
    if info.create_system != 3 or not mode & 0o170000:  # not Unix, or no file type
        return None
    return not_regular(mode)


class _Deflate:
    """zlib's raw deflate decoder with bz2's and lzma's interface: decompress(data, max_length)
    keeps what it has not used for the next call."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)

    @property
    def eof(self) -> bool:
        return self._z.eof

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self._z.decompress(self._z.unconsumed_tail + data, max_length)


def _zip_decoder(info: zipfile.ZipInfo, raw: Iterator[bytes]) -> tuple[Any, bytes]:
    """The decoder of a member's compression method (None: stored), and the compressed bytes
    already taken from `raw` that it must be given first. zip's LZMA header gives the
    dictionary size, refused past XZ_MEMLIMIT."""
    method = info.compress_type
    if method == zipfile.ZIP_STORED:
        return None, b""
    if method == zipfile.ZIP_DEFLATED:
        return _Deflate(), b""
    if method == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor(), b""
    if method != zipfile.ZIP_LZMA:
        raise Rejected("unreadable", f"compression method {method}")
    head = b""
    while len(head) < 9 and (chunk := next(raw, b"")):
        head += chunk
    # LZMA SDK version (2 bytes), properties size (2: always 5), properties: lc/lp/pb, dict size
    if len(head) < 9 or head[2:4] != b"\x05\x00" or head[4] >= 9 * 5 * 5:
        raise Rejected("unreadable", f"not an LZMA header: {head[:9].hex()}")
    (dict_size,) = struct.unpack_from("<I", head, 5)
    if dict_size > XZ_MEMLIMIT:
        raise Rejected("unreadable", f"an LZMA dictionary of {dict_size} bytes")
    lc, lp, pb = head[4] % 9, head[4] // 9 % 5, head[4] // 45
    lzma1 = {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1]), head[9:]


def _zip_raw(file: BinaryIO, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """A member's compressed bytes, 64 KiB at a time, found from its local header."""
    file.seek(info.header_offset)
    local = file.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise Rejected("unreadable", "no local header where the directory says")
    name_len, extra_len = struct.unpack_from("<HH", local, 26)
    file.seek(info.header_offset + 30 + name_len + extra_len)
    left = info.compress_size
    while left > 0:
        chunk = file.read(min(left, 1 << 16))
        if not chunk:
            raise Rejected("unreadable", f"truncated: {left} compressed bytes missing")
        left -= len(chunk)
        yield chunk


def _inflated(raw: Iterator[bytes], decoder: Any) -> Iterator[bytes]:
    """The content from compressed chunks, at most CHUNK bytes at a time (never more: a chunk
    of a few kB can inflate to gigabytes). Compressed data ending before the decoder's end
    marker ends the content, as in zipfile: the CRC then decides."""
    if decoder is None:
        yield from raw
        return
    for data in raw:
        while not decoder.eof and (piece := decoder.decompress(data, CHUNK)):
            data = b""
            yield piece
        if decoder.eof:
            return
    while not decoder.eof and (piece := decoder.decompress(b"", CHUNK)):
        yield piece


def _zip_read(file: BinaryIO, info: zipfile.ZipInfo, max_bytes: int) -> bytes:
    """A member's content, inflated by our own decoders, up to max_bytes + 1 bytes whatever
    the header says. zipfile's reader is not capped: read whole, it inflates the whole member
    at once (4 kB claimed in front of 200 MB of zeros: 200 MB held), and asked for a chunk of
    a bzip2 or LZMA member it inflates all that 4 kB of compressed input holds."""
    if info.flag_bits & 0x1:
        raise Rejected("unreadable", "encrypted")
    if info.file_size > max_bytes:
        raise Rejected("too_large", f"header says {info.file_size} bytes > {max_bytes}")
    try:
        raw = _zip_raw(file, info)
        decoder, first = _zip_decoder(info, raw)
        pieces, got = [], 0
        for piece in _inflated(itertools.chain([first], raw), decoder):
            got += len(piece)
            if got > max_bytes:
                raise Rejected("too_large", f"over {max_bytes} bytes")
            pieces.append(piece)
    except Rejected:
        raise
    except Exception as err:  # a corrupt stream, an I/O error
        raise Rejected("unreadable", _error(err)) from None
    data = b"".join(pieces)
    if zlib.crc32(data) != info.CRC:
        raise Rejected("unreadable", "bad CRC-32")
    return data


def _zip_records(
    path: Path, source: str, classes: tuple[str, ...], max_bytes: int
) -> Iterator[InputRecord]:
    try:
        zf = zipfile.ZipFile(path)
    except Exception as err:  # a damaged directory, a name flagged UTF-8 that is not, ...
        yield _broken(path, source, 0, _error(err))
        return
    with zf, open(path, "rb") as file:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        prefix = _tree_prefix([_zip_name(i) for i in infos], classes)
        for info in infos:

            def read(info: zipfile.ZipInfo = info) -> bytes:
                return _zip_read(file, info, max_bytes)

            yield _member_record(_zip_name(info), prefix, source, read, _zip_kind(info))


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The member's path with /, as the format asks, where a Windows tool wrote \\."""
    return info.filename.replace("\\", "/")
