"""The spool: each answer's record in a local append-only file before the answer is returned.

The guarantee: a record is written to the spool (one os.write of its whole JSON line, on a file
opened O_APPEND) before the service returns the answer it records, and the spool's files are
deleted only after the database has committed their records. The write puts the line in the
kernel's page cache, which belongs to the operating system, not the process: a worker killed
at any instant (SIGKILL, the OOM killer, a crash) loses nothing it answered, and no fsync is
needed for that. An fsync per answer (milliseconds on most disks) would add the machine's
crash to what is survived, at a cost per request the service cannot afford; the page cache
reaches the disk within seconds (the kernel's writeback) and the database takes the records
within serve.record.flush_every_s anyway. So a power cut can lose the last seconds of records;
nothing else can.

Layout, in serve.record.spool (a local folder: flock must work on it):
  <owner>.lock            one per live process, flocked (exclusively) for its whole life;
                          <owner> is host-pid-random, unique
  <owner>.<seq>.spool     the owner's segments, JSON lines (vitrine.production.records'
                          AnswerRecord.to_line), appended to in turn

The owner appends to its active segment; its writer closes the segment (rotate) and starts the
next, writes the closed one's records to the database and deletes it. The owner keeps each
segment's records in memory as well (up to MEMORY_RECORDS), so that its writer need not parse
its own lines back; the file is what a replay reads. A process that dies
leaves its lock file and segments behind, and the kernel releases its flock: any other process
(a worker of the same server, or the server started again) takes that flock without waiting
(adopt_orphans), so exactly one of them replays the dead owner's segments, while a live owner's
segments are never touched. A lock file is created under a temporary name, flocked, then
renamed, so no one can take a live owner for a dead one in between.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vitrine.production.records import AnswerRecord

SEGMENT_BYTES = 64 * 1024 * 1024  # a segment is closed at this size even with a backlog
# Records of a segment also kept in memory for the writer; past this (a database down for a
# while), the segment's are dropped from memory and read back from its file.
MEMORY_RECORDS = 10_000
STALE_NEW_LOCK_S = 60  # a temporary lock file this old belongs to a process killed at start
log = logging.getLogger(__name__)


@dataclass
class Segment:
    """A closed segment: its records wait for the database."""

    path: Path
    records: int  # lines in it (for the backlog)
    committed: int = 0  # bytes from its start already in the database
    done: int = 0  # lines from its start already in the database (or skipped as torn)
    memory: list[AnswerRecord] | None = None  # its records, when the owner still holds them


@dataclass
class Orphan:
    """A dead owner's segments, adopted: held by its flock until they are replayed."""

    owner: str
    lock_fd: int
    lock_path: Path
    segments: list[Segment] = field(default_factory=list)


def _owner_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _lock_new(folder: Path, owner: str) -> int:
    """<owner>.lock, flocked before anyone can see it under its name."""
    temporary = folder / f"{owner}.lock.new"
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(temporary, folder / f"{owner}.lock")
    return fd


def count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def read_records(segment: Segment, batch: int) -> Iterator[tuple[list[AnswerRecord], int, int]]:
    """The segment's records from its committed offset, `batch` at a time, each batch with the
    offset just past it and the lines it took. A line that is not a record (a torn write, which
    only a crash of the machine leaves) is logged and skipped. Records held in memory are
    taken from there, from the first not yet done."""
    if segment.memory is not None:
        for start in range(segment.done, len(segment.memory), batch):
            held = segment.memory[start : start + batch]
            yield held, segment.committed, len(held)
        return
    records: list[AnswerRecord] = []
    lines = 0
    with segment.path.open("rb") as f:
        f.seek(segment.committed)
        offset = segment.committed
        for line in f:
            if not line.endswith(b"\n"):  # an unfinished last line: not a record
                break
            offset += len(line)
            lines += 1
            try:
                records.append(AnswerRecord.from_line(line))
            except (ValueError, TypeError, KeyError) as err:
                log.error("%s at byte %d: not a record (%s), skipped", segment.path, offset, err)
            if len(records) >= batch:
                yield records, offset, lines
                records, lines = [], 0
        yield records, offset, lines


class Spool:
    """This process's segments in `folder`, and the adoption of dead processes' ones."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.owner = _owner_name()
        self._lock_fd = _lock_new(self.folder, self.owner)
        self._lock = threading.Lock()  # appends (request path) against rotation (writer)
        self._seq = 0
        self._fd, self._path = self._open_segment()
        self._records = 0  # in the active segment
        self._bytes = 0
        self._memory: list[AnswerRecord] | None = []  # the active segment's records
        self.closed: list[Segment] = []  # rotated, not yet all in the database, oldest first

    def _open_segment(self) -> tuple[int, Path]:
        self._seq += 1
        path = self.folder / f"{self.owner}.{self._seq:08d}.spool"
        return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND, 0o644), path

    def append(self, line: bytes, record: AnswerRecord | None = None) -> None:
        """One record's line, in the page cache when this returns (see the module's docstring);
        an OSError (disk full, ...) is the caller's to count. record: the line's record, kept
        in memory for the writer (without it, the writer reads the segment's file)."""
        with self._lock:
            try:
                written = os.write(self._fd, line)
                while written < len(line):  # a regular file takes it whole; a short one resumes
                    written += os.write(self._fd, line[written:])
            except OSError:
                # Half a line (the disk filled up mid-write) would spoil the next record too.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._bytes)
                raise
            self._records += 1
            self._bytes += len(line)
            if self._memory is not None:
                if record is None or len(self._memory) >= MEMORY_RECORDS:
                    self._memory = None
                else:
                    self._memory.append(record)

    @property
    def active_records(self) -> int:
        return self._records

    def rotate(self, force: bool = False) -> Segment | None:
        """Close the active segment for appends and start the next one: when it holds records
        and nothing older waits (or force), or when it reached SEGMENT_BYTES. The closed one is
        appended to self.closed and returned."""
        if not self._records or (self.closed and not force and self._bytes < SEGMENT_BYTES):
            return None
        fd, path = self._open_segment()
        with self._lock:
            fd, self._fd = self._fd, fd
            path, self._path = self._path, path
            segment = Segment(path, self._records, memory=self._memory)
            self._records = self._bytes = 0
            self._memory = []
        os.close(fd)
        self.closed.append(segment)
        return segment

    def close(self) -> None:
        """Stop appending: delete the active segment if empty and, when nothing of ours is left
        for the database, the lock file too; the flock goes with the process either way."""
        with self._lock:
            os.close(self._fd)
            if not self._records:
                self._path.unlink(missing_ok=True)
            if not self._records and not self.closed:
                (self.folder / f"{self.owner}.lock").unlink(missing_ok=True)
            self._fd = -1
        os.close(self._lock_fd)

    def adopt_orphans(self) -> list[Orphan]:
        """Dead owners' segments, each owner's flock now held by this process (exactly one
        process adopts each). Stale temporary lock files are deleted."""
        orphans = []
        for lock_path in sorted(self.folder.glob("*.lock")):
            owner = lock_path.name.removesuffix(".lock")
            if owner == self.owner:
                continue
            orphan = self._take(owner, lock_path)
            if orphan is not None:
                orphans.append(orphan)
        now = time.time()
        for temporary in self.folder.glob("*.lock.new"):
            with contextlib.suppress(FileNotFoundError):
                if now - temporary.stat().st_mtime > STALE_NEW_LOCK_S:
                    temporary.unlink()
        return orphans

    def _take(self, owner: str, lock_path: Path) -> Orphan | None:
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:  # replayed and deleted meanwhile
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # alive, or being replayed by another process
            os.close(fd)
            return None
        if os.fstat(fd).st_nlink == 0:  # replayed by another process, which deleted it
            os.close(fd)
            return None
        segments = [
            Segment(path, count_lines(path))
            for path in sorted(self.folder.glob(f"{owner}.*.spool"))
        ]
        return Orphan(owner, fd, lock_path, segments)

    @staticmethod
    def release(orphan: Orphan) -> None:
        """An orphan fully replayed: its lock file deleted, then its flock released."""
        orphan.lock_path.unlink(missing_ok=True)
        os.close(orphan.lock_fd)

    @staticmethod
    def release_unfinished(orphan: Orphan) -> None:
        """An orphan not fully replayed (at shutdown): its flock released, its files left for
        the next process to adopt."""
        os.close(orphan.lock_fd)
