"""The downloader's on-disk, content-addressed cache: one writer's lock, the blob store and the
SQLite index of every URL's last outcome (layout and crash-safety in download.py's docstring).

`DownloadCache` is used from the event loop's thread. Blobs are written by a few threads of
its own, since a durable write blocks for a millisecond or more; those threads do nothing
but the file system calls (see _BlobWriter for why).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vitrine.ingest.download_result import OK, FetchResult, is_permanent

_tmp_serial = itertools.count()
_IndexRow = tuple[str, str, int, str, int, float]  # code, sha256, size, detail, attempts, time


class CacheBusy(RuntimeError):
    """Another downloader holds this cache directory."""


def blob_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / "blobs" / sha256[:2] / sha256


# --- blob store --------------------------------------------------------------------------


def _write_blob(final: str, body: bytes, flags: int) -> None:
    """Write `body` to a temp file next to `final` and rename it there (unless it is there
    already: content-addressed, a blob of the right size was renamed there complete)."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(final).st_size == len(body):
            return
    folder, name = os.path.split(final)
    tmp = f"{folder}/.{name}-{os.getpid()}-{next(_tmp_serial)}.tmp"
    fd = os.open(tmp, flags, 0o644)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, final)


def _write_blobs(blobs: list[tuple[str, bytes]], flags: int) -> list[OSError | None]:
    """Write each blob; what went wrong, per blob (None: stored)."""
    errors: list[OSError | None] = []
    for final, body in blobs:
        try:
            _write_blob(final, body, flags)
        except OSError as err:
            errors.append(err)
        else:
            errors.append(None)
    return errors


def _prepare_blobs(blobs: Path) -> int:
    """Create the 256 fan-out folders; delete the temp files a killed run left (counted)."""
    removed = 0
    for i in range(256):
        folder = blobs / f"{i:02x}"
        folder.mkdir(parents=True, exist_ok=True)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    os.unlink(entry.path)
                    removed += 1
    return removed


_Queued = tuple[str, bytes, "asyncio.Future[None]"]  # final path, body, stored


class _BlobWriter:
    """Writes blobs in a few threads, which make nothing but the file system calls.

    Each call a thread makes releases the GIL, and taking it back from a busy event loop
    costs two thread switches, so the bodies come hashed (while they streamed in) and a
    durable write is one call, not two: O_DSYNC, fsync's guarantee for a new file. Creating,
    writing and renaming stay in the threads all the same: with durable writes under way,
    ext4 makes a file's creation wait for its journal, for a millisecond or more. Blobs are
    handed over in batches, one per free thread, rather than one hand-off per blob.
    """

    def __init__(self, blobs: Path, threads: int, fsync: bool):
        self._blobs, self._threads = str(blobs), threads
        self._flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DSYNC if fsync else 0)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vitrine-blob")
        self._jobs: set[asyncio.Future[list[OSError | None]]] = set()
        self._queued: list[_Queued] = []

    async def write(self, sha256: str, body: bytes) -> str:
        """Store `body` as blobs/<sha[:2]>/<sha>, durably when `fsync`: its path."""
        final = f"{self._blobs}/{sha256[:2]}/{sha256}"
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()
        self._queued.append((final, body, stored))
        if len(self._queued) == 1:  # the batch's first: submit once this loop turn is over
            loop.call_soon(self._submit)
        await stored
        return final

    def _submit(self) -> None:
        if not self._queued or len(self._jobs) >= self._threads:
            return  # a busy writer picks the batch up when it is done
        batch, self._queued = self._queued, []
        blobs = [(final, body) for final, body, _ in batch]
        job = asyncio.get_running_loop().run_in_executor(
            self._pool, _write_blobs, blobs, self._flags
        )
        self._jobs.add(job)
        job.add_done_callback(lambda job: self._done(batch, job))

    def _done(self, batch: list[_Queued], job: asyncio.Future[list[OSError | None]]) -> None:
        self._jobs.discard(job)
        failure = job.exception()
        errors = [failure] * len(batch) if failure is not None else job.result()
        for (_, _, stored), error in zip(batch, errors, strict=True):
            if stored.done():  # its download was cancelled
                continue
            if error is None:
                stored.set_result(None)
            else:
                stored.set_exception(error)
        self._submit()

    async def aclose(self) -> None:
        """Finish every blob handed over (cancelled downloads' too), then stop the threads."""
        while self._queued or self._jobs:
            self._submit()
            await asyncio.gather(*self._jobs, return_exceptions=True)
        self._pool.shutdown(wait=True)


# --- index -------------------------------------------------------------------------------


class _Index:
    """url -> last outcome, in SQLite (WAL). Used from the event loop's thread only.

    Rows are buffered and committed together at the end of the loop turn that produced them:
    one transaction per batch rather than per download, without waiting for a timer.
    """

    _SCHEMA = """CREATE TABLE IF NOT EXISTS fetches (
        url TEXT PRIMARY KEY, code TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
        detail TEXT NOT NULL, attempts INTEGER NOT NULL, fetched_at REAL NOT NULL
    ) WITHOUT ROWID"""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, isolation_level=None)  # we delimit transactions
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(self._SCHEMA)
        self._buffer: dict[str, tuple[str, str, int, str, int, float]] = {}

    def lookup(self, urls: list[str]) -> dict[str, _IndexRow]:
        """url -> (code, sha256, size, detail, attempts, fetched_at) for the urls with a row."""
        marks = ",".join("?" * len(urls))
        rows = self._db.execute(
            "SELECT url, code, sha256, size, detail, attempts, fetched_at FROM fetches "
            f"WHERE url IN ({marks})",
            urls,
        )
        found: dict[str, _IndexRow] = {row[0]: row[1:] for row in rows}
        for url in urls:
            if url in self._buffer:
                found[url] = self._buffer[url]
        return found

    def record(self, r: FetchResult) -> None:
        self._buffer[r.url] = (r.code, r.sha256, r.size, r.detail, r.attempts, time.time())
        if len(self._buffer) == 1:  # the batch's first row: commit once this loop turn is over
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        if self._buffer:
            rows = [(url, *row) for url, row in self._buffer.items()]
            self._buffer = {}
            with self._db:  # BEGIN ... COMMIT
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR REPLACE INTO fetches VALUES (?, ?, ?, ?, ?, ?, ?)", rows
                )

    def close(self) -> None:
        self.flush()
        self._db.close()


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheBusy(f"{path.parent} is in use by another downloader") from None
    return fd


# --- the cache ---------------------------------------------------------------------------


class DownloadCache:
    """A cache directory held for one downloader: `open()` takes its lock (or raises
    `CacheBusy`) and removes the temp files a killed run left; `close()` commits and lets go.

    `max_bytes`, `refetch_failures` and `retry_failed_after_s` decide which cached failures
    are still trusted (see `lookup`).
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        max_bytes: int,
        refetch_failures: bool,
        io_threads: int,
        fsync: bool,
        retry_failed_after_s: float = 0.0,
    ):
        self.cache_dir = cache_dir
        self._max_bytes, self._refetch_failures = max_bytes, refetch_failures
        self._retry_failed_after_s = retry_failed_after_s
        self._io_threads, self._fsync = io_threads, fsync
        self.orphans_removed = 0

    def open(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.cache_dir / ".lock")
        try:
            self.orphans_removed = _prepare_blobs(self.cache_dir / "blobs")
            self._index = _Index(self.cache_dir / "index.sqlite")
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._writer = _BlobWriter(self.cache_dir / "blobs", self._io_threads, self._fsync)

    async def aclose(self) -> None:
        try:
            await self._writer.aclose()
            self._index.close()
        finally:
            os.close(self._lock_fd)  # releases the flock

    def lookup(self, urls: list[str]) -> dict[str, FetchResult]:
        """Cached answers that make a request unnecessary: successes whose blob is present with
        its recorded size, and trusted failures. Other URLs are absent from the dict.

        A permanent failure is trusted until `refetch_failures`; a transient one (timeout,
        connection_error, empty, a 5xx, 408, 425 or 429) for `retry_failed_after_s` after it
        was recorded, then asked again. `blocked_address` is never trusted: it is this
        client's policy (allow_private, allowed_networks), not the server's answer."""
        hits = {}
        now = time.time()
        for url, (code, sha, size, detail, _, fetched_at) in self._index.lookup(urls).items():
            if code == OK:
                path = blob_path(self.cache_dir, sha)
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_size == size:
                        hits[url] = FetchResult(url, OK, "", sha, path, size, 0, True)
            elif self._trusted_failure(code, size, now - fetched_at):
                hits[url] = FetchResult(url, code, detail, size=size, from_cache=True)
        return hits

    def _trusted_failure(self, code: str, size: int, age_s: float) -> bool:
        if self._refetch_failures or code == "blocked_address":
            return False
        if not is_permanent(code):
            return 0 <= age_s < self._retry_failed_after_s
        # A body known to exceed an older, smaller cap may fit under today's cap.
        return code != "too_large" or size > self._max_bytes

    async def store(self, url: str, body: bytes, sha256: str, attempts: int) -> FetchResult:
        """Store a downloaded body (its digest given) and index it: the success as a later run
        will see it."""
        path = await self._writer.write(sha256, body)
        # Recorded after the rename: an index row never names a missing blob.
        result = FetchResult(url, OK, "", sha256, Path(path), len(body), attempts)
        self._index.record(result)
        return result

    def record_failure(self, result: FetchResult) -> None:
        self._index.record(result)
