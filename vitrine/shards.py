"""Packed image shards: a few large tar files instead of one file per image.

DVC hashes every output file, so 100,000 loose images make `dvc status` crawl; a tar shard is
one file to hash and still opens with standard tools. The manifest stores (shard, offset,
length) so a reader seeks straight to an image's bytes.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


@dataclass(frozen=True)
class BlobRef:
    shard: str
    offset: int
    length: int


class ShardWriter:
    """Appends blobs to `shard-00000.tar`, `shard-00001.tar`, ... with `per_shard` blobs each."""

    def __init__(self, directory: Path, per_shard: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.per_shard = per_shard
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0
        self._shards = 0

    def _roll(self) -> tarfile.TarFile:
        if self._tar is None or self._count >= self.per_shard:
            if self._tar is not None:
                self._tar.close()
            self._name = f"shard-{self._shards:05d}.tar"
            self._tar = tarfile.open(  # noqa: SIM115 (closed in _roll and close)
                self.directory / self._name, "w", format=tarfile.USTAR_FORMAT
            )
            self._shards += 1
            self._count = 0
        return self._tar

    def add(self, member_name: str, data: bytes) -> BlobRef:
        tar = self._roll()
        info = tarfile.TarInfo(member_name)
        info.size = len(data)
        header = info.tobuf(tar.format, tar.encoding, tar.errors)
        offset = tar.offset + len(header)
        tar.addfile(info, io.BytesIO(data))
        self._count += 1
        return BlobRef(self._name, offset, len(data))

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class ShardReader:
    """Random access to blobs by BlobRef; keeps shard files open while in use."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._files: dict[str, io.BufferedReader] = {}

    def read(self, shard: str, offset: int, length: int) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.directory / shard, "rb")  # noqa: SIM115
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
