"""Hostile inputs for collect's readers, made on the spot, and the checks that go with them.

`lying_zip` writes a zip whose headers understate a member's size; `tar_member` adds a member
of any type (links, FIFOs, devices) with any name, UTF-8 or not. `Watch` records every file
opened and directory listed (Python's audit hooks) so a test can check that nothing outside a
source root is touched and no FIFO or device is opened; `deadline` turns a hang into an error.
"""

from __future__ import annotations

import io
import lzma
import os
import signal
import stat
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

# --- zips that lie -------------------------------------------------------------------------

_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_END = b"PK\x05\x06"


def patch_zip(path: Path, claimed: int | None = None, flags: int = 0) -> None:
    """Make every member's uncompressed size, in its local header and in the central
    directory, say `claimed` (the data and its CRC stay as they are), and set `flags` in its
    general-purpose bits (0x1: encrypted)."""
    data = bytearray(path.read_bytes())
    end = data.rfind(_END)
    entries, _, start = struct.unpack_from("<HII", data, end + 10)
    at = start
    for _ in range(entries):
        assert data[at : at + 4] == _CENTRAL
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        (local,) = struct.unpack_from("<I", data, at + 42)
        assert data[local : local + 4] == _LOCAL
        if claimed is not None:
            struct.pack_into("<I", data, at + 24, claimed)
            struct.pack_into("<I", data, local + 22, claimed)
        for flag_at in (at + 8, local + 6):
            (bits,) = struct.unpack_from("<H", data, flag_at)
            struct.pack_into("<H", data, flag_at, bits | flags)
        at += 46 + name_len + extra_len + comment_len
    path.write_bytes(bytes(data))


def lying_zip(path: Path, name: str, inflated: int, claimed: int, fill: bytes = b"\0") -> None:
    """A zip of one deflated member of `inflated` bytes (`fill` repeated) whose headers claim
    `claimed` bytes; written a megabyte at a time, so building it holds little memory."""
    chunk = fill * ((1 << 20) // len(fill))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w") as f:
        left = inflated
        while left > 0:
            f.write(chunk[:left])
            left -= len(chunk)
    patch_zip(path, claimed)


def xz_with_a_huge_dictionary(data: bytes) -> bytes:
    """`data` xz-compressed with a 1 MiB dictionary, its block header then claiming one of
    4 GiB (LZMA2 property 40), block header CRC fixed: a decoder without a memory limit
    allocates what the header asks."""
    xz = bytearray(lzma.compress(data, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}]))
    size = (xz[12] + 1) * 4  # the block header follows the 12-byte stream header
    assert xz[14:17] == b"\x21\x01\x10"  # LZMA2, one byte of properties: 1 MiB
    xz[16] = 40
    xz[12 + size - 4 : 12 + size] = struct.pack("<I", zlib.crc32(xz[12 : 12 + size - 4]))
    return bytes(xz)


# --- tar members of every kind ---------------------------------------------------------------


def tar_member(
    tf: tarfile.TarFile,
    name: str | bytes,
    data: bytes = b"",
    kind: bytes = tarfile.REGTYPE,
    linkname: str = "",
) -> None:
    """Add a member: any tar type, any name (bytes are kept as they are, UTF-8 or not)."""
    info = tarfile.TarInfo(os.fsdecode(name) if isinstance(name, bytes) else name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.CONTTYPE) else 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 5  # /dev/zero: endless, were it ever read
    tf.addfile(info, io.BytesIO(data) if info.size else None)


def open_tar(path: Path, mode: str = "w", fmt: int = tarfile.GNU_FORMAT) -> tarfile.TarFile:
    """A tar for writing whose names round-trip byte for byte (surrogateescape)."""
    # mode is any "w:<compression>"; typeshed's overloads want it literal.
    return tarfile.open(  # type: ignore[call-overload]
        path, mode, format=fmt, encoding="utf-8", errors="surrogateescape"
    )


# --- special files ---------------------------------------------------------------------------


def make_special(path: Path, kind: str) -> bool:
    """Create a FIFO, a Unix socket or a character device (/dev/zero's numbers) at path;
    False if this machine does not let us (devices need root)."""
    try:
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            os.mknod(path, stat.S_IFSOCK | 0o600)
        else:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except (PermissionError, OSError):
        return False
    return True


# --- what a reader touches ------------------------------------------------------------------

_watches: list[Watch] = []
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if _watches and event in ("open", "os.scandir", "os.listdir"):
        path = args[0] if args else None
        if isinstance(path, str | bytes | os.PathLike):
            _watches[-1].touched.append((event, os.fsdecode(path)))


@dataclass
class Watch:
    """Every path opened or listed while active (see `watching`)."""

    touched: list[tuple[str, str]] = field(default_factory=list)

    def outside(self, area: Path, root: Path) -> list[str]:
        """Paths touched under `area` but outside `root`, symbolic links resolved."""
        real_area, real_root = os.path.realpath(area), os.path.realpath(root)
        found = []
        for _, path in self.touched:
            real = os.path.realpath(path)
            if Path(real).is_relative_to(real_area) and not Path(real).is_relative_to(real_root):
                found.append(path)
        return found

    def special_opened(self) -> list[str]:
        """Paths opened that are FIFOs, sockets or devices."""
        found = []
        for event, path in self.touched:
            try:
                mode = os.stat(path).st_mode
            except (OSError, ValueError):
                continue
            if event == "open" and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                found.append(path)
        return found


@contextmanager
def watching() -> Iterator[Watch]:
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)  # for the life of the process; idle while no watch is active
        _hooked = True
    watch = Watch()
    _watches.append(watch)
    try:
        yield watch
    finally:
        _watches.remove(watch)


class Hang(BaseException):
    """A reader still running at its deadline. A BaseException, so that no reader's
    `except Exception` can swallow it."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise Hang in this (main) thread if the block runs longer than `seconds`."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
