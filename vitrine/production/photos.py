"""Uploaded photos kept by content, for the answers' review: <root>/<sha[:2]>/<sha256>.

A photo is written once per content (to a temporary name, then renamed: a reader never sees
half a photo); when it comes again, only its modification time is refreshed, so that time is
when it was last seen. The retention sweep (periodic, in the recorder's background thread, one
process at a time by an flock on <root>/.sweep.lock) deletes every photo unseen for longer than
serve.record.keep_photos_days, then, while the folder holds more than keep_photos_bytes, the
least recently seen first. An answer's row outlives its photo: image_sha256 still names it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"
STALE_TEMPORARY_S = 3600  # a temporary file this old was left by a killed process


@dataclass(frozen=True)
class Sweep:
    """What one retention sweep did."""

    deleted: int
    deleted_bytes: int
    kept: int
    kept_bytes: int


class PhotoStore:
    def __init__(self, root: Path | str, keep_days: float, keep_bytes: int) -> None:
        self.root = Path(root)
        self.keep_s = keep_days * 86400
        self.keep_bytes = keep_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def keep(self, data: bytes, sha256: str) -> None:
        """The photo under its SHA-256 (written if new, its time refreshed if not). Plain
        string paths: this runs for every answer, and pathlib's joins cost more than utime."""
        folder = os.path.join(self._root, sha256[:2])
        path = os.path.join(folder, sha256)
        try:
            os.utime(path)
            return
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
        temporary = os.path.join(folder, f".{sha256}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")
        fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temporary, path)  # the same content from two requests: either rename wins

    def sweep(self, now: float | None = None) -> Sweep | None:
        """Delete photos past either retention limit, oldest first; None when another process
        is sweeping."""
        lock = os.open(self.root / ".sweep.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            return self._sweep(time.time() if now is None else now)
        finally:
            os.close(lock)

    def _sweep(self, now: float) -> Sweep:
        photos: list[tuple[float, int, str]] = []  # (last seen, size, path)
        for folder in os.scandir(self.root):
            if not folder.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(folder.path):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat(follow_symlinks=False)
                    if entry.name.endswith(TEMPORARY_SUFFIX):
                        if now - stat.st_mtime > STALE_TEMPORARY_S:
                            os.unlink(entry.path)
                        continue
                    photos.append((stat.st_mtime, stat.st_size, entry.path))
        photos.sort()
        total = sum(size for _, size, _ in photos)
        deleted = deleted_bytes = 0
        for seen, size, path in photos:
            too_old = self.keep_s > 0 and now - seen > self.keep_s
            too_much = self.keep_bytes > 0 and total > self.keep_bytes
            if not (too_old or too_much):
                break  # sorted by age: every later photo is younger, and the total fits
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
            deleted += 1
            deleted_bytes += size
        return Sweep(deleted, deleted_bytes, len(photos) - deleted, total)
