"""Concurrent, polite, resumable, content-addressed download of catalog image URLs.

`fetch_all(items, cache_dir, config)` streams `(key, url)` pairs through an asyncio downloader
running in a background thread and yields `(key, FetchResult)` as downloads finish (out of
order: the key says which is which). Memory stays bounded by `config.max_pending` items
(plus up to `concurrency` bodies of at most `max_bytes` each), whatever the catalog's size.

Contract
--------
* Success (`code == "ok"`) means a 2xx answer with a non-empty body of at most `max_bytes`.
  Bytes are not decoded here: a redirect to a home page or an HTML "log in" page served as
  `image/jpeg` is a success of the download, and collect's decoder quarantines it later as
  `not_an_image`. The body is stored in the cache; `FetchResult.path` points at it.
* Failures carry a stable reason `code`:

  ==================== ================================================ ======== ==========
  code                 meaning                                          retried  cached
  ==================== ================================================ ======== ==========
  bad_url              not an http(s) URL (ftp:, file:, malformed);      no       no
                       nothing is requested (also: a redirect there)
  http_<status>        final answer not 2xx, e.g. http_404, http_503     408, 425, 4xx / 3xx
                       (after retries were exhausted)                   429, 5xx  only
  timeout              no complete answer within `timeout_s`             yes      no
  connection_error     refused, reset, DNS or TLS failure, bad framing   yes      no
  too_large            body (or its Content-Length) over `max_bytes`;    no       yes
                       the transfer is aborted as soon as it is known
  too_many_redirects   more than `max_redirects` hops                   no       yes
  empty                2xx with a 0-byte body                           no       no
  ==================== ================================================ ======== ==========

  "retried" is within a run (exponential backoff with jitter, `Retry-After` honoured when at
  most `max_retry_after_s`); "cached" means a later run answers from the index without a
  request (unless `refetch_failures=True`). Transient failures are always asked again.

Cache layout (outside DVC outputs, e.g. `.cache/downloads`)
------------------------------------------------------------
    blobs/<sha256[:2]>/<sha256>   response bodies, named by content
    index.sqlite                  url -> (code, sha256, size, detail, attempts, time)
    .lock                         flock: one writer per cache

A body is written to a temp file (`.<sha>-<pid>-<n>.tmp`) in its final directory, fsynced,
then atomically renamed; its index row is written after the rename. So an index row never
names a missing or partial blob, and a SIGKILL leaves at worst an orphan temp file (removed
at the next start, under the lock) or a blob with no row (downloaded again, same name).

Why SQLite in WAL mode for the index rather than an append-only JSONL: a committed WAL
transaction survives SIGKILL (it is in the OS page cache), and a torn write is rolled back
by SQLite instead of by hand-written "skip a broken last line" logic; lookups are indexed
point queries, so a 1,000,000-URL cache is not replayed into a dict at every start; a URL
retried after a transient failure replaces its row instead of growing a log that needs
compaction; and the index can be queried (`SELECT code, count(*) ...`). Rows are committed
once per event-loop turn (one transaction for all the downloads that finished in it), so a
SIGKILL loses at most that turn's rows besides the requests in flight: those URLs are
fetched once more, to the same blob names. `synchronous=NORMAL` is enough for
SIGKILL; after a power loss the last transactions may roll back, which again costs only a
re-download (cache hits also check that the blob exists with the recorded size).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import fcntl
import hashlib
import itertools
import os
import queue
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import AsyncIterator, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from tqdm import tqdm

from vitrine.images import Rejected

OK = "ok"
ENGINES = ("fast", "httpx")
K = TypeVar("K", bound=Hashable)

# Statuses worth asking again within the run: overload, throttling, gateway trouble.
_RETRY_STATUSES = {408, 425, 429}
_RETRYABLE_CODES = {"timeout", "connection_error"}
# Failures that a later run trusts from the index: the server's answer will not change.
_PERMANENT_CODES = {"too_large", "too_many_redirects"}
_FEED_CHUNK = 256


@dataclass(frozen=True)
class DownloadConfig:
    concurrency: int = 64  # requests in flight, all hosts together
    per_host: int = 8  # requests in flight to one host:port (politeness)
    timeout_s: float = 20.0  # wall-clock limit of one attempt: connect, headers and body
    max_attempts: int = 4  # per URL and run, the first try included
    backoff_base_s: float = 0.5  # retry n waits ~base * 2**(n-1), jittered
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 30.0  # a longer Retry-After ends this run's tries for the URL
    max_bytes: int = 20_000_000  # per body, enforced while streaming
    max_redirects: int = 5
    refetch_failures: bool = False  # ask again URLs whose cached answer was a permanent failure
    fsync: bool = True  # fsync each blob before its rename (durable across power loss)
    max_pending: int = 2048  # items admitted but not yet handed to the consumer
    io_threads: int = 4  # blob writers: fsync blocks, so it runs off the event loop
    engine: str = "fast"  # "fast" (built-in HTTP/1.1 transport) | "httpx" (httpcore's pool)
    ca_file: str | None = None  # PEM bundle of trusted CAs; None: certifi's, as httpx's default
    user_agent: str = "vitrine-downloader/0.1"

    def __post_init__(self) -> None:
        for name in ("concurrency", "per_host", "max_attempts", "max_pending", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DownloadConfig.{name} must be >= 1")
        if self.timeout_s <= 0 or self.max_bytes < 1:
            raise ValueError("DownloadConfig.timeout_s and max_bytes must be positive")
        if self.engine not in ENGINES:
            raise ValueError(f"DownloadConfig.engine must be one of {ENGINES}")


@dataclass(frozen=True, slots=True)
class FetchResult:
    url: str
    code: str  # "ok" or a reason code (see the module docstring)
    detail: str = ""
    sha256: str = ""
    path: Path | None = None  # the cached body, when ok
    size: int = 0  # body bytes; for too_large, the bytes known to exceed the cap
    attempts: int = 0  # requests made for this URL in this run (0: answered from the cache)
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.code == OK

    def read(self) -> bytes:
        """The body, or the failure as `Rejected(code, detail)` (what collect's readers raise)."""
        if not self.ok or self.path is None:
            raise Rejected(self.code, self.detail)
        return self.path.read_bytes()


class CacheBusy(RuntimeError):
    """Another downloader holds this cache directory."""


def is_permanent(code: str) -> bool:
    """Whether a failure is the server's lasting answer, so a later run may trust the cache."""
    if code in _PERMANENT_CODES:
        return True
    if code.startswith("http_") and code[5:].isdigit():
        status = int(code[5:])
        return status < 500 and status not in _RETRY_STATUSES
    return False


def is_retryable(code: str) -> bool:
    """Whether a failure is worth another try within the same run."""
    if code in _RETRYABLE_CODES:
        return True
    if code.startswith("http_") and code[5:].isdigit():
        status = int(code[5:])
        return status >= 500 or status in _RETRY_STATUSES
    return False


def _parse_url(url: str) -> tuple[httpx.URL | None, str]:
    """(parsed, "") for a fetchable http(s) URL, else (None, why it is refused)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as err:
        return None, f"malformed URL ({err}): {str(url)[:120]}"
    if parsed.scheme not in ("http", "https"):
        return None, f"only http and https are fetched: {url[:120]}"
    if not parsed.host:
        return None, f"no host in URL: {url[:120]}"
    return parsed, ""


def url_problem(url: str) -> str | None:
    """Why `url` is refused without a request, or None for a fetchable http(s) URL."""
    return _parse_url(url)[1] or None


def retry_after_s(value: str | None) -> float | None:
    """Seconds asked by a Retry-After header (delta-seconds or HTTP-date), None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# --- blob store --------------------------------------------------------------------------

_tmp_serial = itertools.count()


def blob_path(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / "blobs" / sha256[:2] / sha256


def _write_blob(blobs: str, body: bytes, fsync: bool) -> tuple[str, str]:
    """Store `body` as blobs/<sha[:2]>/<sha> (temp file, fsync, atomic rename): (sha, path)."""
    sha = hashlib.sha256(body).hexdigest()
    final = f"{blobs}/{sha[:2]}/{sha}"
    with contextlib.suppress(FileNotFoundError):
        if os.stat(final).st_size == len(body):
            return sha, final  # content-addressed: it was renamed there complete
    tmp = f"{blobs}/{sha[:2]}/.{sha}-{os.getpid()}-{next(_tmp_serial)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, final)
    return sha, final


def _write_blobs(blobs: str, bodies: list[bytes], fsync: bool) -> list[tuple[str, str]]:
    return [_write_blob(blobs, body, fsync) for body in bodies]


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


class _BlobWriter:
    """Hashes and writes bodies in a few threads (fsync blocks for a millisecond or more).

    Bodies are handed over in batches, one per free thread, rather than one thread hand-off
    per blob: each hand-off wakes a thread that then competes with the event loop for the GIL,
    and on a busy 2-core machine that costs more CPU than the download itself.
    """

    def __init__(self, blobs: Path, threads: int, fsync: bool):
        self._blobs, self._threads, self._fsync = str(blobs), threads, fsync
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vitrine-blob")
        self._busy = 0
        self._queued: list[tuple[bytes, asyncio.Future[tuple[str, str]]]] = []

    def write(self, body: bytes) -> asyncio.Future[tuple[str, str]]:
        """A future of (sha256, path) once `body` is durably stored."""
        future = asyncio.get_running_loop().create_future()
        self._queued.append((body, future))
        if len(self._queued) == 1:  # the batch's first: submit once this loop turn is over
            asyncio.get_running_loop().call_soon(self._submit)
        return future

    def _submit(self) -> None:
        if not self._queued or self._busy >= self._threads:
            return  # a busy writer picks the batch up when it is done
        batch, self._queued = self._queued, []
        self._busy += 1
        job = asyncio.get_running_loop().run_in_executor(
            self._pool, _write_blobs, self._blobs, [body for body, _ in batch], self._fsync
        )
        job.add_done_callback(lambda job: self._done(batch, job))

    def _done(self, batch: list[tuple[bytes, asyncio.Future[tuple[str, str]]]], job: Any) -> None:
        self._busy -= 1
        error = job.exception()
        for i, (_, future) in enumerate(batch):
            if future.done():  # its download was cancelled
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(job.result()[i])
        self._submit()

    def close(self) -> None:
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
    Row = tuple[str, str, int, str, int]  # code, sha256, size, detail, attempts

    def __init__(self, path: Path):
        self._db = sqlite3.connect(path, isolation_level=None)  # we delimit transactions
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(self._SCHEMA)
        self._buffer: dict[str, tuple[str, str, int, str, int, float]] = {}

    def lookup(self, urls: list[str]) -> dict[str, _Index.Row]:
        """url -> (code, sha256, size, detail, attempts) for the urls that have a row."""
        marks = ",".join("?" * len(urls))
        rows = self._db.execute(
            f"SELECT url, code, sha256, size, detail, attempts FROM fetches WHERE url IN ({marks})",
            urls,
        )
        found = {row[0]: row[1:] for row in rows}
        for url in urls:
            if url in self._buffer:
                found[url] = self._buffer[url][:5]
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


# --- HTTP/1.1 transport ------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HEAD_LIMIT = 1 << 16  # response head bytes (StreamReader limit)
_READ_SIZE = 1 << 16
# Idle connections older than this are not reused. A server that closes sooner (uvicorn: 5 s)
# is caught by the EOF check at checkout or, in a race, by the stale-connection retry.
_KEEPALIVE_S = 15.0


_NO_DEADLINE = contextlib.nullcontext()


def _deadline(seconds: float | None) -> contextlib.AbstractAsyncContextManager[Any]:
    # asyncio.timeout(None) still costs a scheduler handle per read: skip it when unused.
    return _NO_DEADLINE if seconds is None else asyncio.timeout(seconds)


class _StaleConnection(Exception):
    """A reused keep-alive connection was closed by the server before answering."""


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < _KEEPALIVE_S
        )

    def close(self) -> None:
        self.writer.close()


def _request_head(request: httpx.Request) -> bytes:
    lines = [request.method.encode("ascii") + b" " + request.url.raw_path + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _parse_head(head: bytes) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
    """(status, version, reason, headers) of a response head ending in CRLF CRLF."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name.strip():
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        headers.append((name.strip(), value.strip()))
    return int(parts[1]), parts[0], parts[2] if len(parts) > 2 else b"", headers


def _framing(
    status: int, version: bytes, headers: list[tuple[bytes, bytes]]
) -> tuple[int | None, bool, bool]:
    """(content length or None, chunked, keep-alive) for a response to GET (RFC 9112 6.3)."""
    values: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(value.lower())
    tokens = b",".join(values.get(b"connection", []))
    keep_alive = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
    if status in (204, 304):
        return 0, False, keep_alive
    if b"transfer-encoding" in values:
        chunked = b",".join(values[b"transfer-encoding"]).rsplit(b",", 1)[-1].strip()
        if chunked == b"chunked":
            return None, True, keep_alive
        return None, False, False  # delimited by the connection's close
    lengths = {v.strip() for v in values.get(b"content-length", [])}
    if not lengths:
        return None, False, False
    if len(lengths) > 1 or not next(iter(lengths)).isdigit():
        raise httpx.RemoteProtocolError(f"bad Content-Length {sorted(lengths)}")
    return int(lengths.pop()), False, keep_alive


class _Body(httpx.AsyncByteStream):
    """A response body read off a pooled connection; the connection goes back to the pool only
    when the body was read to its end, so an aborted download (too_large) closes it."""

    def __init__(
        self,
        pool: _Http11Transport,
        key: tuple[str, str, int],
        conn: _Conn,
        framing: tuple[int | None, bool, bool],
        read_timeout: float | None,
    ):
        self._pool, self._key, self._conn = pool, key, conn
        self._length, self._chunked, self._keep_alive = framing
        self._timeout = read_timeout
        self._done = self._length == 0
        self._closed = False

    async def _read(self, n: int) -> bytes:
        async with _deadline(self._timeout):
            data = await self._conn.reader.read(n)
        if not data:
            raise httpx.RemoteProtocolError("connection closed before the end of the body")
        return data

    async def _line(self) -> bytes:
        async with _deadline(self._timeout):
            return await self._conn.reader.readuntil(b"\r\n")

    async def _chunks(self) -> AsyncIterator[bytes]:
        while True:
            size = int((await self._line()).split(b";", 1)[0].strip(), 16)
            if size < 0:
                raise ValueError("negative chunk size")
            if size == 0:
                while await self._line() != b"\r\n":  # trailer fields, ignored
                    pass
                return
            while size:
                data = await self._read(min(size, _READ_SIZE))
                size -= len(data)
                yield data
            if await self._line() != b"\r\n":
                raise ValueError("chunk not followed by CRLF")

    async def _pieces(self) -> AsyncIterator[bytes]:
        if self._chunked:
            async for data in self._chunks():
                yield data
        elif self._length is None:
            while True:
                async with _deadline(self._timeout):
                    data = await self._conn.reader.read(_READ_SIZE)
                if not data:
                    return
                yield data
        else:
            remaining = self._length
            while remaining:
                data = await self._read(min(remaining, _READ_SIZE))
                remaining -= len(data)
                yield data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._done:
            return
        try:
            async for data in self._pieces():
                yield data
        except TimeoutError:
            raise httpx.ReadTimeout("body read timed out") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            raise httpx.RemoteProtocolError(f"malformed body: {err}") from None
        except OSError as err:
            raise httpx.ReadError(f"body read failed: {err}") from None
        self._done = True

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._done and self._keep_alive:
                self._pool.checkin(self._key, self._conn)
            else:
                self._conn.close()


class _Http11Transport(httpx.AsyncBaseTransport):
    """A lean HTTP/1.1 keep-alive transport for httpx on asyncio streams.

    httpcore's pool costs 1 to 1.5 ms of CPU per request on this project's 2-core machine
    (anyio cancel scopes, an O(connections) scan per request), which caps a download at
    300 to 500 images/s; with this transport a whole download (httpx's client layer, storing
    and indexing included) costs 0.3 to 0.4 ms in the event loop's thread. It speaks just
    what an image GET needs: Content-Length, chunked and close-delimited bodies, TLS via
    `ssl`, connection reuse. httpx.AsyncClient still does URLs, headers, redirects, cookies,
    decoding and env proxies (which get httpx's own transports).
    `DownloadConfig(engine="httpx")` uses httpx's default transport instead.
    """

    def __init__(self, ssl_context: Any, max_idle_per_host: int = 64):
        self._ssl = ssl_context
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        scheme = request.url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}")
        host = request.url.raw_host.decode("ascii")  # IDNA-encoded: what DNS and SNI expect
        key = (scheme, host, request.url.port or _DEFAULT_PORTS[scheme])
        timeouts = request.extensions.get("timeout", {})
        payload = _request_head(request) + await request.aread()
        conn, head = self._checkout(key), None
        if conn is not None:
            with contextlib.suppress(_StaleConnection):
                head = await self._exchange(conn, payload, timeouts.get("read"), reused=True)
        if head is None:
            conn = await self._connect(key, timeouts.get("connect"))
            head = await self._exchange(conn, payload, timeouts.get("read"), reused=False)
        status, version, reason, headers = head
        try:
            framing = _framing(status, version, headers)
        except httpx.RemoteProtocolError:
            conn.close()
            raise
        return httpx.Response(
            status,
            headers=headers,
            stream=_Body(self, key, conn, framing, timeouts.get("read")),
            extensions={"http_version": version, "reason_phrase": reason},
        )

    async def _connect(self, key: tuple[str, str, int], timeout: float | None) -> _Conn:
        scheme, host, port = key
        try:
            async with _deadline(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._ssl if scheme == "https" else None, limit=_HEAD_LIMIT
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as err:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise httpx.ConnectError(f"{host}:{port}: {err}") from None
        return _Conn(reader, writer)

    async def _exchange(
        self, conn: _Conn, payload: bytes, timeout: float | None, reused: bool
    ) -> tuple[int, bytes, bytes, list[tuple[bytes, bytes]]]:
        """Send the request and read the final response head (skipping 1xx interim ones)."""
        try:
            conn.writer.write(payload)
            async with _deadline(timeout):
                while True:
                    head = _parse_head(await conn.reader.readuntil(b"\r\n\r\n"))
                    if head[0] >= 200:
                        return head
                    if head[0] == 101:
                        raise httpx.RemoteProtocolError("unexpected 101 Switching Protocols")
        except BaseException as err:
            conn.close()
            # A server may close an idle keep-alive connection just as we reuse it: GET is
            # idempotent, so that case is retried at once on a fresh connection.
            nothing_read = isinstance(err, ConnectionResetError | BrokenPipeError) or (
                isinstance(err, asyncio.IncompleteReadError) and not err.partial
            )
            if reused and nothing_read:
                raise _StaleConnection from None
            if isinstance(err, TimeoutError):
                raise httpx.ReadTimeout("no response head in time") from None
            if isinstance(err, asyncio.IncompleteReadError | asyncio.LimitOverrunError):
                raise httpx.RemoteProtocolError(f"bad response head: {err}") from None
            if isinstance(err, OSError):
                raise httpx.ReadError(str(err)) from None
            raise

    def _checkout(self, key: tuple[str, str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # most recently used: the least likely to have been closed
            if conn.usable():
                return conn
            conn.close()
        return None

    def checkin(self, key: tuple[str, str, int], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self._max_idle or conn.reader.at_eof() or conn.writer.is_closing():
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


# --- downloader --------------------------------------------------------------------------


@dataclass
class _Outcome:
    """One attempt's result, before it is stored."""

    code: str
    detail: str = ""
    body: bytes = b""
    size: int = 0
    retry_after: float | None = None


class _LazyCookies(httpx.Cookies):
    """httpx's cookie store, minus its urllib round trip for responses that set no cookie.

    httpx hands every response to http.cookiejar through urllib Request/Response adapters:
    about half of the client's CPU per request. Image responses rarely set cookies; those that
    do (a CDN's redirect through a cookie check) are still honoured.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        if "set-cookie" in response.headers:
            super().extract_cookies(response)


@dataclass
class _Host:
    slots: asyncio.Semaphore
    resume_at: float = 0.0  # monotonic time before which nobody asks this host (429 pause)


class Downloader:
    """The asyncio downloader behind `fetch_all`; usable directly from async code:

    async with Downloader(".cache/downloads", DownloadConfig()) as d:
        result = await d.fetch(url)
    """

    def __init__(self, cache_dir: str | Path, config: DownloadConfig | None = None):
        self.cache_dir = Path(cache_dir)
        self.config = config or DownloadConfig()
        self._blobs = self.cache_dir / "blobs"
        self._hosts: dict[str, _Host] = {}
        self._inflight: dict[str, asyncio.Future[FetchResult]] = {}
        self.orphans_removed = 0

    async def __aenter__(self) -> Downloader:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self.cache_dir / ".lock")
        try:
            self.orphans_removed = _prepare_blobs(self._blobs)
            self._index = _Index(self.cache_dir / "index.sqlite")
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._writer = _BlobWriter(self._blobs, self.config.io_threads, self.config.fsync)
        self._slots = asyncio.Semaphore(self.config.concurrency)
        self._client = self._make_client()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._client.aclose()
            self._writer.close()
            self._index.close()
        finally:
            os.close(self._lock_fd)  # releases the flock

    def _make_client(self) -> httpx.AsyncClient:
        cfg = self.config
        tls = ssl.create_default_context(cafile=cfg.ca_file) if cfg.ca_file else None
        tls = tls or httpx.create_ssl_context()
        transport = None
        if cfg.engine == "fast":
            transport = _Http11Transport(tls, max(cfg.per_host, 8))
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=64)
        client = httpx.AsyncClient(
            transport=transport,
            limits=limits,
            # Each attempt runs under its own asyncio deadline (see _attempt); the fast
            # transport then needs no per-read timers, httpcore keeps its own.
            timeout=httpx.Timeout(None if transport else cfg.timeout_s, connect=cfg.timeout_s),
            verify=tls,
            follow_redirects=True,
            max_redirects=cfg.max_redirects,
            headers={"User-Agent": cfg.user_agent},
        )
        # httpx offers no setter that keeps a Cookies subclass, hence the private attribute;
        # the store keeps its cookies and behaviour (see _LazyCookies).
        client._cookies = _LazyCookies(client.cookies)
        return client

    # -- cache lookups

    def lookup(self, urls: list[str]) -> dict[str, FetchResult]:
        """Cached answers that make a request unnecessary: successes whose blob is present and
        permanent failures (unless `refetch_failures`). Other URLs are absent from the dict."""
        hits = {}
        for url, (code, sha, size, detail, _) in self._index.lookup(urls).items():
            if code == OK:
                path = blob_path(self.cache_dir, sha)
                try:
                    if path.stat().st_size != size:
                        continue
                except FileNotFoundError:
                    continue
                hits[url] = FetchResult(url, OK, "", sha, path, size, 0, True)
            elif self._trusted_failure(code, size):
                hits[url] = FetchResult(url, code, detail, size=size, from_cache=True)
        return hits

    def _trusted_failure(self, code: str, size: int) -> bool:
        if self.config.refetch_failures or not is_permanent(code):
            return False
        # A body known to exceed an older, smaller cap may fit under today's cap.
        return code != "too_large" or size > self.config.max_bytes

    # -- fetching

    async def fetch(self, url: str) -> FetchResult:
        """The cached answer for `url`, or a fresh download (stored and indexed)."""
        hit = self.lookup([url]).get(url)
        return hit if hit is not None else await self.fetch_uncached(url)

    async def fetch_uncached(self, url: str) -> FetchResult:
        """Download `url` without consulting the index; a URL already being downloaded in this
        run is not requested twice (the second caller shares the first one's result)."""
        parsed, problem = _parse_url(url)
        if parsed is None:
            return FetchResult(url, "bad_url", problem)
        running = self._inflight.get(url)
        if running is not None:
            return replace(await asyncio.shield(running), attempts=0, from_cache=True)
        future = asyncio.get_running_loop().create_future()
        self._inflight[url] = future
        try:
            result = await self._download(url, parsed)
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._inflight[url]
        future.set_result(result)
        return result

    def _host(self, url: httpx.URL) -> _Host:
        key = f"{url.host}:{url.port or _DEFAULT_PORTS[url.scheme]}"
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host(asyncio.Semaphore(self.config.per_host))
        return host

    async def _download(self, url: str, parsed: httpx.URL) -> FetchResult:
        host = self._host(parsed)
        attempt = 0
        while True:
            attempt += 1
            outcome = await self._polite_attempt(host, url, parsed)
            if outcome.code == OK:
                return await self._store(url, outcome, attempt)
            if outcome.retry_after is not None:
                # Throttling applies to the whole host, not just this URL.
                pause = min(outcome.retry_after, self.config.max_retry_after_s)
                host.resume_at = max(host.resume_at, time.monotonic() + pause)
            delay = self._retry_delay(outcome, attempt)
            if delay is None:
                detail = outcome.detail + (f" ({attempt} attempts)" if attempt > 1 else "")
                result = FetchResult(url, outcome.code, detail, size=outcome.size, attempts=attempt)
                self._index.record(result)
                return result
            await asyncio.sleep(delay)

    def _retry_delay(self, outcome: _Outcome, attempt: int) -> float | None:
        """Seconds to wait before the next try, or None when this run gives up on the URL."""
        cfg = self.config
        if not is_retryable(outcome.code) or attempt >= cfg.max_attempts:
            return None
        # Exponential backoff with "equal jitter": never zero, never in lock-step.
        backoff = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1))
        delay = backoff * random.uniform(0.5, 1.0)
        if outcome.retry_after is not None:
            if outcome.retry_after > cfg.max_retry_after_s:
                outcome.detail += f"; Retry-After {outcome.retry_after:.0f} s is too long"
                return None
            delay = max(delay, outcome.retry_after)
        return delay

    async def _polite_attempt(self, host: _Host, url: str, parsed: httpx.URL) -> _Outcome:
        # The host's slot first, then a global one: a busy host's queue never holds global
        # slots that requests to other hosts could use. Backoff sleeps hold neither.
        async with host.slots:
            pause = host.resume_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            async with self._slots:
                return await self._attempt(url, parsed)

    async def _attempt(self, url: str, parsed: httpx.URL) -> _Outcome:
        try:
            async with (
                asyncio.timeout(self.config.timeout_s),
                self._client.stream("GET", parsed) as response,  # parsed once, not twice
            ):
                return await self._read_body(url, response)
        except (TimeoutError, httpx.TimeoutException):
            return _Outcome("timeout", f"no complete answer in {self.config.timeout_s} s: {url}")
        except httpx.TooManyRedirects:
            return _Outcome("too_many_redirects", f"over {self.config.max_redirects}: {url}")
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as err:
            return _Outcome("bad_url", f"{err}: {url}")  # e.g. redirected to ftp://
        except (httpx.HTTPError, OSError) as err:
            return _Outcome("connection_error", f"{type(err).__name__} {err}: {url}")

    async def _read_body(self, url: str, response: httpx.Response) -> _Outcome:
        cap = self.config.max_bytes
        status = response.status_code
        if not 200 <= status < 300:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) <= 4096:
                # A short error page: read it so that the connection can be reused.
                with contextlib.suppress(httpx.HTTPError):
                    await response.aread()
            retry_after = retry_after_s(response.headers.get("retry-after"))
            return _Outcome(f"http_{status}", f"HTTP {status}: {url}", retry_after=retry_after)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            return _Outcome(
                "too_large", f"Content-Length {declared} > {cap}: {url}", size=int(declared)
            )
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > cap:  # leaving the `stream` block closes the connection mid-body
                return _Outcome("too_large", f"body over {cap} bytes: {url}", size=size)
            chunks.append(chunk)
        if size == 0:
            return _Outcome("empty", f"HTTP {status} with an empty body: {url}")
        return _Outcome(OK, body=b"".join(chunks), size=size)

    async def _store(self, url: str, outcome: _Outcome, attempt: int) -> FetchResult:
        sha, path = await self._writer.write(outcome.body)
        # Recorded after the rename: an index row never names a missing blob.
        result = FetchResult(url, OK, "", sha, Path(path), outcome.size, attempt)
        self._index.record(result)
        return result


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CacheBusy(f"{path.parent} is in use by another downloader") from None
    return fd


# --- sync facade -------------------------------------------------------------------------


@dataclass
class _Failed:
    error: BaseException


_DONE = object()


@dataclass
class _Pump(Generic[K]):
    """Runs a Downloader on an event loop in a background thread and hands its results to the
    consuming thread through a queue. Items are admitted against `max_pending` slots that the
    consumer gives back, so neither the input nor the results pile up in memory. Results
    cross threads in batches (one per loop turn): a hand-off per result would make the two
    threads trade the GIL thousands of times a second."""

    items: Iterable[tuple[K, str]]
    cache_dir: Path
    config: DownloadConfig
    results: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)

    def start(self) -> None:
        self._started = threading.Event()
        self._unreleased = 0
        self._release_every = max(1, min(256, self.config.max_pending // 4))
        self._outbox: list[tuple[K, FetchResult]] = []
        self._thread = threading.Thread(target=self._run, name="vitrine-download", daemon=True)
        self._thread.start()
        self._started.wait()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # re-raised in the consumer's thread
            self.results.put(_Failed(err))
        else:
            self.results.put(_DONE)
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._slots = asyncio.Semaphore(self.config.max_pending)
        self._started.set()
        async with Downloader(self.cache_dir, self.config) as downloader:
            await self._feed(downloader)
        self._ship()

    async def _feed(self, downloader: Downloader) -> None:
        loop = asyncio.get_running_loop()
        items = iter(self.items)
        tasks: set[asyncio.Task[None]] = set()
        try:
            # The caller's iterable may block (a file, a cursor): read it off the loop.
            while chunk := await loop.run_in_executor(None, _take, items, _FEED_CHUNK):
                hits = downloader.lookup([url for _, url in chunk])
                for key, url in chunk:
                    await self._slots.acquire()
                    hit = hits.get(url)
                    if hit is not None:
                        self._emit(key, hit)
                        continue
                    task = asyncio.create_task(self._one(downloader, key, url))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, downloader: Downloader, key: K, url: str) -> None:
        try:
            result = await downloader.fetch_uncached(url)
        except Exception as err:  # a bug, not a download failure: stop the consumer with it
            self.results.put(_Failed(err))
            raise
        self._emit(key, result)

    def _emit(self, key: K, result: FetchResult) -> None:
        self._outbox.append((key, result))
        if len(self._outbox) == 1:
            self._loop.call_soon(self._ship)

    def _ship(self) -> None:
        if self._outbox:
            self.results.put(self._outbox)
            self._outbox = []

    def __iter__(self) -> Iterator[tuple[K, FetchResult]]:
        while True:
            try:
                batch = self.results.get_nowait()
            except queue.Empty:
                self._release()  # give slots back before waiting, or the feeder may starve
                batch = self.results.get()
            if batch is _DONE:
                return
            if isinstance(batch, _Failed):
                raise batch.error
            for item in batch:
                yield item
                # The slot is given back once the consumer is done with the item.
                self._unreleased += 1
                if self._unreleased >= self._release_every:
                    self._release()

    def _release(self) -> None:
        n, self._unreleased = self._unreleased, 0
        if n:
            with contextlib.suppress(RuntimeError):  # the loop has finished: nothing to admit
                self._loop.call_soon_threadsafe(_release_n, self._slots, n)

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop may just have closed
                self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join()


def _take(items: Iterator[tuple[K, str]], n: int) -> list[tuple[K, str]]:
    return list(itertools.islice(items, n))


def _release_n(slots: asyncio.Semaphore, n: int) -> None:
    for _ in range(n):
        slots.release()


def fetch_all(
    items: Iterable[tuple[K, str]],
    cache_dir: str | Path,
    config: DownloadConfig | None = None,
    *,
    progress: bool = True,
    total: int | None = None,
) -> Iterator[tuple[K, FetchResult]]:
    """Download every `(key, url)` of `items` into the content-addressed cache at `cache_dir`
    and yield `(key, FetchResult)` as each finishes, in completion order.

    URLs answered before (successes, and permanent failures unless `refetch_failures`) are
    served from the cache without a request. Stopping the iteration early (break, exception,
    Ctrl-C) cancels the downloads in flight and leaves the cache consistent.
    """
    config = config or DownloadConfig()
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    pump: _Pump[K] = _Pump(items, Path(cache_dir), config)
    counts = {"cached": 0, "failed": 0}
    bar = tqdm(total=total, desc="download", unit="img", disable=not progress, mininterval=0.5)
    pump.start()
    try:
        for n, (key, result) in enumerate(pump, 1):
            counts["cached"] += result.from_cache
            counts["failed"] += not result.ok
            bar.update()
            if n % 1024 == 0:
                bar.set_postfix(counts, refresh=False)
            yield key, result
        bar.set_postfix(counts, refresh=False)
    finally:
        pump.stop()
        bar.close()
