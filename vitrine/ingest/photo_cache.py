"""A content-addressed cache of per-photo results: (version, sha256) -> bytes, in SQLite.

collect caches each photo's facts (vitrine.ingest.facts_cache) and dedupe its descriptor and
embedding (vitrine.curation.features) here, outside DVC's outputs, so that a run after new
photos arrived computes only those. A row is keyed by the photo's sha256 and a `version`: a
digest of the code and settings that produced it (`code_version`), so a changed check, decoder,
network or parameter finds nothing and recomputes; results are never reused across versions.

Why SQLite (WAL) rather than a file per photo: the values are small (a 3 KB thumbnail and a
few numbers; 7 KB of features) and there are tens of thousands of them. A file each costs an
inode, a directory entry and three system calls to read, and a crash-safe write needs a temp
file and a rename; here a batch of lookups is one indexed query (`sha256 IN (...)`) and a batch
of results one transaction, committed atomically (a SIGKILL loses at most the batch being
written, and a torn write is rolled back by SQLite, not by hand). Dropping an old version's rows
is one statement.

Concurrency: only the stage's own process opens the cache. Dask workers never touch it (and on
a remote scheduler they could not): the stage looks a photo up before shipping its bytes and
writes the results that come back. WAL lets readers run beside the one writer, and a busy
timeout makes two stage processes sharing a cache take turns rather than fail; rows are pure
functions of their key, so whichever process writes one last writes the same value.

Versions: every open records the time its version was used; rows of versions beyond the
`keep_versions` most recently used are deleted then, so the cache holds the results of the
code being run (and a few recent alternatives, e.g. an experiment's `-S` setting), not every
version ever run.

Photos gone from the sources: the cache records when each photo was last part of a run
(table `seen`: one row per sha256, every version together), and `prune`, called after a
run that went through every photo, deletes the results of photos no run has had for
`max_age_s`. A photo removed from a catalog stops costing space a few weeks later, while one
that comes back after a short absence (a source moved, an experiment on a subset) is still
answered from the cache. Marking is one upsert per photo at the end of a run, not a write per
lookup: about 0.1 s for 20,000 photos.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS results (
        version TEXT NOT NULL, sha256 TEXT NOT NULL, value BLOB NOT NULL,
        PRIMARY KEY (version, sha256)
    ) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS versions (version TEXT PRIMARY KEY, used_at REAL NOT NULL)",
)
# When each photo was last part of a run; a cache older than this table adopts its photos as
# seen when the table is made, so they get the full max_age_s before a prune may drop them.
_SEEN = "CREATE TABLE seen (sha256 TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID"
_ADOPT = "INSERT OR IGNORE INTO seen SELECT DISTINCT sha256, ? FROM results"
_LOOKUP_CHUNK = 500  # under SQLite's default limit of host parameters in one statement


def code_version(
    modules: Iterable[ModuleType],
    distributions: Iterable[str] = (),
    settings: Mapping[str, Any] | None = None,
) -> str:
    """A digest of what produced a result: the source files of `modules` (any edit, even a
    comment, is a new version), the installed versions of `distributions` (a decoder's or a
    network's library) and `settings` (the parameters that change a result)."""
    digest = hashlib.sha256()
    for module in modules:
        path = module.__file__
        if path is None:
            raise ValueError(f"{module.__name__} has no source file")
        digest.update(module.__name__.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    for name in distributions:
        digest.update(f"{name}=={importlib.metadata.version(name)}\0".encode())
    for key, value in sorted((settings or {}).items()):
        digest.update(f"{key}={value!r}\0".encode())
    return digest.hexdigest()[:32]


class PhotoCache:
    """The results of one `version`, in the SQLite file `path` (created with its folder).

    `get_many` answers what is cached; `put` buffers a result and `flush` (every
    `flush_rows` puts, and on `close`) commits the buffer in one transaction. `hits` and
    `misses` count the lookups' answers, `stored` the results put. Every digest looked up or
    put is this run's; `prune` marks them seen and deletes the photos no run has had lately.
    """

    def __init__(
        self,
        path: Path,
        version: str,
        *,
        keep_versions: int = 4,
        flush_rows: int = 1024,
        timeout_s: float = 60.0,
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.version, self.flush_rows = path, version, flush_rows
        self._db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a power loss may lose the last commits
        self._buffer: dict[str, bytes] = {}
        self._run: set[bytes] = set()  # this run's photos, as 32-byte digests (half the memory)
        self.hits = self.misses = self.stored = 0
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                self._db.execute(statement)
            tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master")}
            if "seen" not in tables:
                self._db.execute(_SEEN)
                self._db.execute(_ADOPT, (time.time(),))
            used = (version, time.time())
            self._db.execute("INSERT OR REPLACE INTO versions VALUES (?, ?)", used)
            stale = [
                v
                for (v,) in self._db.execute(
                    "SELECT version FROM versions ORDER BY used_at DESC LIMIT -1 OFFSET ?",
                    (keep_versions,),
                )
            ]
            for old in stale:
                self._db.execute("DELETE FROM results WHERE version = ?", (old,))
                self._db.execute("DELETE FROM versions WHERE version = ?", (old,))

    def get_many(self, digests: Iterable[str]) -> dict[str, bytes]:
        """sha256 -> cached value, for the digests this version holds."""
        wanted = list(dict.fromkeys(digests))
        self._run.update(bytes.fromhex(d) for d in wanted)
        found = {d: self._buffer[d] for d in wanted if d in self._buffer}
        found.update(self._select("sha256, value", [d for d in wanted if d not in found]))
        self.hits += len(found)
        self.misses += len(wanted) - len(found)
        return found

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests this version holds no value for, in order (the values are not read)."""
        wanted = list(dict.fromkeys(digests))
        held = {d for d in wanted if d in self._buffer}
        held.update(d for (d,) in self._select("sha256", [d for d in wanted if d not in held]))
        return [d for d in wanted if d not in held]

    def _select(self, columns: str, digests: list[str]) -> Iterator[tuple[Any, ...]]:
        """`columns` of this version's committed rows for `digests`, a chunk of them a query."""
        for start in range(0, len(digests), _LOOKUP_CHUNK):
            chunk = digests[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(
                f"SELECT {columns} FROM results WHERE version = ? AND sha256 IN ({marks})",
                [self.version, *chunk],
            )

    def put(self, digest: str, value: bytes) -> None:
        self._buffer[digest] = value
        self._run.add(bytes.fromhex(digest))
        self.stored += 1
        if len(self._buffer) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        rows = [(self.version, d, v) for d, v in self._buffer.items()]
        with self._db:  # BEGIN ... COMMIT
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", rows)
        self._buffer = {}

    def prune(self, max_age_s: float, now: float | None = None) -> int:
        """Mark this run's photos seen `now`, then delete the results (of every version) of
        the photos no run has had for `max_age_s`: how many were deleted. Call it after a run
        that looked up every photo of its sources, never after a partial one."""
        self.flush()
        now = time.time() if now is None else now
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR REPLACE INTO seen VALUES (?, ?)",
                ((digest.hex(), now) for digest in self._run),
            )
            gone = "SELECT sha256 FROM seen WHERE at < ?"
            cutoff = (now - max_age_s,)
            deleted = self._db.execute(
                f"DELETE FROM results WHERE sha256 IN ({gone})", cutoff
            ).rowcount
            self._db.execute("DELETE FROM seen WHERE at < ?", cutoff)
        return int(deleted)

    def count(self) -> int:
        """Results this version holds (committed ones)."""
        (n,) = self._db.execute(
            "SELECT count(*) FROM results WHERE version = ?", (self.version,)
        ).fetchone()
        return int(n)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._db.close()

    def __enter__(self) -> PhotoCache:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
