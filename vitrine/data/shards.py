"""Packed image shards: a few large tar files instead of one file per image.

DVC hashes every output file, so 100,000 loose images make `dvc status` crawl; a tar shard is
one file to hash and still opens with standard tools. The manifest stores (shard, offset,
length) so a reader seeks straight to an image's bytes; shard names are relative to one root
folder, so a ref may point into any of its shard folders (a photo small enough to be its own
thumbnail is stored once, and its thumbnail ref points at the photo).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

# The table beside the shards (collect's and dedupe's): one row per input, with its BlobRef.
MANIFEST = "manifest.parquet"


@dataclass(frozen=True, slots=True)  # slots: collect keeps two per distinct photo until it ends
class BlobRef:
    shard: str
    offset: int
    length: int


BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking: archives end on a 10 KiB boundary


def _ustar_template() -> tuple[bytes, int]:
    """The fields every member header shares, and their byte sum (for the checksum)."""
    head = bytearray(BLOCK)
    head[100:108] = b"0000644\0"  # mode
    head[108:116] = b"0000000\0"  # uid
    head[116:124] = b"0000000\0"  # gid
    head[136:148] = b"00000000000\0"  # mtime: fixed, so equal inputs give equal shards
    head[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    head[156:157] = b"0"  # regular file
    head[257:265] = b"ustar\x0000"
    return bytes(head), sum(head)


_TEMPLATE, _TEMPLATE_SUM = _ustar_template()


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file (mode 0644, uid 0, mtime 0).

    Written by hand from a template: tarfile builds each header field by field in Python,
    and even summing 512 bytes per member was a tenth of collect's own CPU time at 20,000
    images; the checksum is the template's sum plus that of the two fields that vary.
    """
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"shard member name over 100 bytes: {name!r}")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_TEMPLATE_SUM + sum(raw) + sum(size_field))
    return b"".join(
        (raw, _TEMPLATE[len(raw) : 124], size_field, _TEMPLATE[136:148], checksum, _TEMPLATE[156:])
    )


class ShardWriter:
    """Appends blobs to `root/folder/shard-00000.tar`, `shard-00001.tar`, ... with `per_shard`
    blobs each; refs name the shard relative to root (`folder/shard-00000.tar`)."""

    def __init__(self, root: Path, folder: str, per_shard: int):
        self.root, self.folder = Path(root), folder
        (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.per_shard = per_shard
        self._file: io.BufferedWriter | None = None
        self._name = ""
        self._offset = 0
        self._count = 0
        self._shards = 0

    def _finish(self) -> None:
        if self._file is not None:
            end = self._offset + 2 * BLOCK  # two zero blocks close a tar archive
            self._file.write(bytes(2 * BLOCK + (-end) % RECORD))
            self._file.close()
            self._file = None

    def _roll(self) -> io.BufferedWriter:
        if self._file is None or self._count >= self.per_shard:
            self._finish()
            self._name = f"{self.folder}/shard-{self._shards:05d}.tar"
            self._file = open(self.root / self._name, "wb")  # noqa: SIM115 (see _finish)
            self._shards += 1
            self._offset = self._count = 0
        return self._file

    def add(self, member_name: str, data: bytes) -> BlobRef:
        f = self._roll()
        f.write(b"".join((ustar_header(member_name, len(data)), data, bytes(-len(data) % BLOCK))))
        ref = BlobRef(self._name, self._offset + BLOCK, len(data))
        self._offset += BLOCK + len(data) + (-len(data) % BLOCK)
        self._count += 1
        return ref

    def close(self) -> None:
        self._finish()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class ShardReader:
    """Random access to blobs by BlobRef (shard names relative to `root`); keeps shard files
    open while in use."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._files: dict[str, io.BufferedReader] = {}

    def read(self, shard: str, offset: int, length: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.root / shard, "rb")  # noqa: SIM115
        f.seek(offset)
        return f.read(length)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
