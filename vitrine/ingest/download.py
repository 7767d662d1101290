"""Concurrent, polite, resumable, content-addressed download of catalog image URLs.

`fetch_all(items, cache_dir, config)` streams `(key, url)` pairs through an asyncio downloader
running in a background thread and yields `(key, FetchResult)` as downloads finish (out of
order: the key says which is which). Memory stays bounded by `config.max_pending` items
(plus up to `concurrency` bodies of at most `max_bytes` each), whatever the catalog's size.

Modules: this one (configuration, politeness, retries, `fetch_all`); download_http (one GET
over httpx); download_guard (which addresses may be reached); download_lanes (which httpx
connection a request takes); download_cache (blobs, index, lock); download_pump (the
background thread); download_result (`FetchResult`, codes).

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
  bad_url              not an http(s) URL (ftp:, file:, malformed), or   no       no
                       a host no machine can have (an empty or
                       64-character label, bad punycode); nothing is
                       requested (also: a redirect there)
  http_<status>        final answer not 2xx, e.g. http_404, http_503     408, 425, 4xx / 3xx;
                       (after retries were exhausted)                   429, 5xx  others for
                                                                                  a delay
  timeout              no complete answer within `timeout_s`             yes      for a delay
  connection_error     refused, reset, DNS or TLS failure, malformed     yes      for a delay
                       response (bad status line, framing, headers)
  too_large            body (or its Content-Length) over `max_bytes`;    no       yes
                       the transfer is aborted as soon as it is known
  too_many_redirects   more than `max_redirects` hops                   no       yes
  blocked_address      the host (or a redirect's) is not a public        no       no
                       address: loopback, link-local, private, reserved
                       (see download_guard; `allow_private`)
  empty                2xx with a 0-byte body                           no       for a delay
  ==================== ================================================ ======== ==========

  "retried" is within a run (exponential backoff with jitter, `Retry-After` honoured when at
  most `max_retry_after_s`); "cached" means a later run answers from the index without a
  request (unless `refetch_failures=True`). A success is never requested again while its blob
  is in the cache. A transient failure ("for a delay") is answered from the index for
  `retry_failed_after_s` after it was recorded (its row holds the time), then asked again: a
  run soon after another (a retried flow, the day's second catalog) does not hammer a host
  that was failing, and a later one gives the URL another chance. 0 asks again at every run.

Politeness, per host:port
-------------------------
At most `per_host` requests in flight and `per_host_rps` request starts per second (retries
included; 0 means unlimited). A `Retry-After` pauses every request to the host, not just the
URL's, and so does a 429 without one: catalog owners block crawlers that keep asking after
being told to slow down. That pause is the retry backoff, doubling with each 429 in a row
(429s to requests sent before the pause began do not count again). Redirect hops within one
attempt are not spaced.

HTTP
----
httpx's own transport (httpcore's connections, h11's parser) does the HTTP: it answers
malformed or hostile responses with errors, which become `connection_error`. One client
serves every request (cookies, redirects); its connections are kept alive, each in a pool of
its own (download_lanes says why); HTTP/1.1 only; `Accept-Encoding: identity`, so no body is
ever decompressed here (images are compressed already, and a gzip bomb cannot inflate before
the size cap sees it). Each attempt has one wall-clock deadline, `timeout_s`, instead of
httpx's per-read timeouts, which a server dripping a byte at a time never trips. The event
loop is uvloop's (see download_pump). Environment proxies (HTTPS_PROXY, ...) are not used.

Cache layout (outside DVC outputs, e.g. `.cache/downloads`)
------------------------------------------------------------
    blobs/<sha256[:2]>/<sha256>   response bodies, named by content
    index.sqlite                  url -> (code, sha256, size, detail, attempts, time)
    .lock                         flock: one writer per cache

A body is hashed as it streams in, written durably (O_DSYNC, when `fsync`) to a temp file
(`.<sha>-<pid>-<n>.tmp`) in its final directory, then atomically renamed; its index row is
written after the rename. So an index row never names a missing or partial blob, and a
SIGKILL leaves at worst an orphan temp file (removed at the next start, under the lock) or a
blob with no row (downloaded again, same name).

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

Speed
-----
    .venv/bin/python benchmarks/download.py --n 20000

20,000 JPEGs of ~3.1 KB from a loopback server on the reference machine (2 vCPUs, AMD EPYC,
shared: load average 1.4 to 2.6 during the runs): 940 to 1,360 images/s into an empty cache
(about 1,250 typically), 860 to 1,210 µs of CPU per image; 44,000 to 62,000 images/s when
the cache answers for all of them. Of the CPU per image, the event loop's thread takes about
600 µs (three quarters of it in httpx, httpcore, h11 and anyio), the blob writers 300 to
600 µs (file system calls), the consumer 50 µs. What the figures rest on:

* one connection per httpx pool (download_lanes): with one pool of 8 connections, the event
  loop's thread needed 2.2 times the CPU, and the run reached 470 to 610 images/s;
* uvloop's event loop (download_pump): 10 to 15% more images/s;
* one wall-clock deadline per attempt rather than httpx's per-read timeouts: no timer per
  read and write;
* blob writer threads that make only file system calls, one durable write call per blob
  (download_cache).

h11's strict parsing costs CPU: a minimal hand-written HTTP/1.1 client ran the same benchmark
at 1,750 to 2,000 images/s on the same machine at the same time. Refusing a hostile
response is worth that difference; 1,000 images/s is the floor this code is held to.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Hashable, Iterable, Iterator, Sized
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import httpx
from tqdm import tqdm

from vitrine.ingest.download_cache import CacheBusy, DownloadCache, blob_path
from vitrine.ingest.download_guard import parse_networks
from vitrine.ingest.download_http import (
    Outcome,
    attempt,
    host_key,
    make_client,
    parse_url,
    retry_after_s,
    url_problem,
)
from vitrine.ingest.download_pump import Pump
from vitrine.ingest.download_result import OK, FetchResult, is_permanent, is_retryable

__all__ = [
    "OK",
    "CacheBusy",
    "DownloadConfig",
    "Downloader",
    "FetchResult",
    "blob_path",
    "fetch_all",
    "is_permanent",
    "is_retryable",
    "retry_after_s",
    "url_problem",
]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class DownloadConfig:
    concurrency: int = 64  # requests in flight, all hosts together
    per_host: int = 8  # requests in flight to one host:port (politeness)
    per_host_rps: float = 10.0  # request starts per second to one host:port; 0: unlimited
    timeout_s: float = 20.0  # wall-clock limit of one attempt: connect, headers and body
    max_attempts: int = 4  # per URL and run, the first try included
    backoff_base_s: float = 0.5  # retry n waits ~base * 2**(n-1), jittered; also 429 pauses
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 30.0  # a longer Retry-After ends this run's tries for the URL
    max_bytes: int = 20_000_000  # per body, enforced while streaming
    max_redirects: int = 5
    refetch_failures: bool = False  # ask again URLs whose cached answer was a permanent failure
    # A transient failure (timeout, 5xx, ...) is answered from the cache for this long after
    # it was recorded, then asked again; 0: asked again at every run.
    retry_failed_after_s: float = 0.0
    fsync: bool = True  # write each blob durably before its rename (survives a power loss)
    max_pending: int = 2048  # items admitted but not yet handed to the consumer
    io_threads: int = 4  # blob writers: a durable write blocks, so it runs off the event loop
    ca_file: str | None = None  # PEM bundle of trusted CAs; None: certifi's, as httpx's default
    allow_private: bool = False  # connect to loopback, link-local, private, reserved addresses
    allowed_networks: tuple[str, ...] = ()  # CIDRs allowed although not public (download_guard)
    user_agent: str = "vitrine-downloader/0.1"

    def __post_init__(self) -> None:
        for name in ("concurrency", "per_host", "max_attempts", "max_pending", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DownloadConfig.{name} must be >= 1")
        if self.timeout_s <= 0 or self.max_bytes < 1:
            raise ValueError("DownloadConfig.timeout_s and max_bytes must be positive")
        if self.per_host_rps < 0:
            raise ValueError("DownloadConfig.per_host_rps must be >= 0 (0: unlimited)")
        if self.retry_failed_after_s < 0:
            raise ValueError("DownloadConfig.retry_failed_after_s must be >= 0")
        parse_networks(self.allowed_networks)  # a typo fails here, not at the first URL


@dataclass
class _Host:
    """Politeness towards one host:port."""

    slots: asyncio.Semaphore  # requests in flight
    interval_s: float  # between request starts: 1 / per_host_rps, 0 when unlimited
    next_start: float = 0.0  # monotonic time before which no request starts
    resume_at: float = 0.0  # the end of a throttling pause (429, Retry-After)
    strikes: int = 0  # 429s in a row: each doubles the pause when no Retry-After says

    def wait_s(self) -> float:
        return max(self.next_start, self.resume_at) - time.monotonic()

    def try_start(self) -> bool:
        """Book a request start now, if the rate and any pause allow one."""
        now = time.monotonic()
        if now < self.next_start or now < self.resume_at:
            return False
        self.next_start = now + self.interval_s
        return True

    def pause(self, seconds: float) -> None:
        self.resume_at = max(self.resume_at, time.monotonic() + seconds)

    def paused(self) -> bool:
        return time.monotonic() < self.resume_at


class Downloader:
    """The asyncio downloader behind `fetch_all`; usable directly from async code:

    async with Downloader(".cache/downloads", DownloadConfig()) as d:
        result = await d.fetch(url)
    """

    def __init__(self, cache_dir: str | Path, config: DownloadConfig | None = None):
        self.config = cfg = config or DownloadConfig()
        self.cache = DownloadCache(
            Path(cache_dir),
            max_bytes=cfg.max_bytes,
            refetch_failures=cfg.refetch_failures,
            io_threads=cfg.io_threads,
            fsync=cfg.fsync,
            retry_failed_after_s=cfg.retry_failed_after_s,
        )
        self._hosts: dict[str, _Host] = {}
        self._inflight: dict[str, asyncio.Future[FetchResult]] = {}

    async def __aenter__(self) -> Downloader:
        cfg = self.config
        self.cache.open()
        self._slots = asyncio.Semaphore(cfg.concurrency)
        self._client = make_client(
            connections=cfg.concurrency,
            max_redirects=cfg.max_redirects,
            ca_file=cfg.ca_file,
            user_agent=cfg.user_agent,
            allow_private=cfg.allow_private,
            allowed_networks=cfg.allowed_networks,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._client.aclose()
        finally:
            await self.cache.aclose()

    def lookup(self, urls: list[str]) -> dict[str, FetchResult]:
        """Cached answers that make a request unnecessary (see DownloadCache.lookup)."""
        return self.cache.lookup(urls)

    async def fetch(self, url: str) -> FetchResult:
        """The cached answer for `url`, or a fresh download (stored and indexed)."""
        hit = self.lookup([url]).get(url)
        return hit if hit is not None else await self.fetch_uncached(url)

    async def fetch_uncached(self, url: str) -> FetchResult:
        """Download `url` without consulting the index; a URL already being downloaded in this
        run is not requested twice (the second caller shares the first one's result)."""
        parsed, problem = parse_url(url)
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
        key = host_key(url)
        host = self._hosts.get(key)
        if host is None:
            rps = self.config.per_host_rps
            slots = asyncio.Semaphore(self.config.per_host)
            host = self._hosts[key] = _Host(slots, 1.0 / rps if rps else 0.0)
        return host

    async def _download(self, url: str, parsed: httpx.URL) -> FetchResult:
        host = self._host(parsed)
        tries = 0
        while True:
            tries += 1
            outcome = await self._polite_attempt(host, url, parsed)
            self._heed_throttling(host, outcome)
            if outcome.code == OK:
                return await self.cache.store(url, outcome.body, outcome.sha256, tries)
            delay = self._retry_delay(outcome, tries)
            if delay is None:
                detail = outcome.detail + (f" ({tries} attempts)" if tries > 1 else "")
                result = FetchResult(url, outcome.code, detail, size=outcome.size, attempts=tries)
                self.cache.record_failure(result)
                return result
            await asyncio.sleep(delay)

    async def _polite_attempt(self, host: _Host, url: str, parsed: httpx.URL) -> Outcome:
        # The host's slot first, then a global one: a busy host's queue never holds global
        # slots that requests to other hosts could use. Waiting for the host's rate or pause
        # holds no global slot either; the start is booked once one is held, so that a wait
        # for it never squeezes two requests to the host closer than its interval.
        async with host.slots:
            while True:
                wait = host.wait_s()
                if wait > 0:
                    await asyncio.sleep(wait)
                async with self._slots:
                    if host.try_start():
                        cfg = self.config
                        return await attempt(
                            self._client, url, parsed, cfg.timeout_s, cfg.max_bytes
                        )

    def _heed_throttling(self, host: _Host, outcome: Outcome) -> None:
        """Pause the whole host after a Retry-After, or after a 429 without one."""
        if outcome.status is None:
            return  # no answer: the server said nothing about throttling
        if outcome.status != 429:
            host.strikes = 0
        elif not host.paused():  # sent after the current pause began, if any
            host.strikes += 1
        pause = outcome.retry_after
        if pause is None and outcome.status == 429:
            pause = self._backoff_s(max(host.strikes, 1))
        if pause is not None:
            host.pause(min(pause, self.config.max_retry_after_s))

    def _backoff_s(self, n: int) -> float:
        """The n-th backoff: exponential with "equal jitter", never zero, never in lock-step."""
        cfg = self.config
        return min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (n - 1)) * random.uniform(0.5, 1)

    def _retry_delay(self, outcome: Outcome, tries: int) -> float | None:
        """Seconds to wait before the next try, or None when this run gives up on the URL."""
        cfg = self.config
        if not is_retryable(outcome.code) or tries >= cfg.max_attempts:
            return None
        if outcome.retry_after is None:
            return self._backoff_s(tries)
        if outcome.retry_after > cfg.max_retry_after_s:
            outcome.detail += f"; Retry-After {outcome.retry_after:.0f} s is too long"
            return None
        return max(self._backoff_s(tries), outcome.retry_after)


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
    cfg = config or DownloadConfig()
    if total is None and isinstance(items, Sized):
        total = len(items)
    pump: Pump[K] = Pump(items, lambda: Downloader(cache_dir, cfg), cfg.max_pending)
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
