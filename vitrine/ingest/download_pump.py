"""The synchronous face of the asyncio downloader: `Pump` runs it on an event loop in a
background thread and hands its results to the consuming thread, with bounded memory.

Items are admitted against `max_pending` slots that the consumer gives back, so neither the
input nor the results pile up, whatever the catalog's size. Results cross threads in batches
(one per loop turn): a hand-off per result would make the two threads trade the GIL
thousands of times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from vitrine.ingest.download_result import FetchResult

K = TypeVar("K", bound=Hashable)
_FEED_CHUNK = 256  # items read from the caller's iterable at a time (one cache lookup each)


class Fetcher(Protocol):
    """What the pump drives: the Downloader of vitrine/ingest/download.py."""

    def lookup(self, urls: list[str]) -> dict[str, FetchResult]: ...

    async def fetch_uncached(self, url: str) -> FetchResult: ...


@dataclass
class _Failed:
    error: BaseException


_DONE = object()


class Pump(Generic[K]):
    """Iterate it for `(key, FetchResult)` in completion order; `stop()` when done (it cancels
    what is still in flight)."""

    def __init__(
        self,
        items: Iterable[tuple[K, str]],
        open_fetcher: Callable[[], AbstractAsyncContextManager[Fetcher]],
        max_pending: int,
    ):
        self._items, self._open_fetcher, self._max_pending = items, open_fetcher, max_pending
        self._results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: list[tuple[K, FetchResult]] = []
        self._unreleased = 0
        self._release_every = max(1, min(256, max_pending // 4))
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vitrine-download", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    # -- the event loop's thread

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
                runner.run(self._main())
        except BaseException as err:  # re-raised in the consumer's thread
            self._results.put(_Failed(err))
        else:
            self._results.put(_DONE)
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # the runner's main task
        self._task: asyncio.Task[Any] = task
        self._slots = asyncio.Semaphore(self._max_pending)
        self._started.set()
        async with self._open_fetcher() as fetcher:
            await self._feed(fetcher)
        self._ship()

    async def _feed(self, fetcher: Fetcher) -> None:
        loop = asyncio.get_running_loop()
        items = iter(self._items)
        tasks: set[asyncio.Task[None]] = set()
        try:
            # The caller's iterable may block (a file, a cursor): read it off the loop.
            while chunk := await loop.run_in_executor(None, _take, items, _FEED_CHUNK):
                hits = fetcher.lookup([url for _, url in chunk])
                for key, url in chunk:
                    await self._slots.acquire()
                    hit = hits.get(url)
                    if hit is not None:
                        self._emit(key, hit)
                        continue
                    task = asyncio.create_task(self._one(fetcher, key, url))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, fetcher: Fetcher, key: K, url: str) -> None:
        try:
            result = await fetcher.fetch_uncached(url)
        except Exception as err:  # a bug, not a download failure: stop the consumer with it
            self._results.put(_Failed(err))
            raise
        self._emit(key, result)

    def _emit(self, key: K, result: FetchResult) -> None:
        self._outbox.append((key, result))
        if len(self._outbox) == 1:
            self._loop.call_soon(self._ship)

    def _ship(self) -> None:
        if self._outbox:
            self._results.put(self._outbox)
            self._outbox = []

    # -- the consumer's thread

    def __iter__(self) -> Iterator[tuple[K, FetchResult]]:
        while True:
            try:
                batch = self._results.get_nowait()
            except queue.Empty:
                self._release()  # give slots back before waiting, or the feeder may starve
                batch = self._results.get()
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


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where installed (a declared dependency; asyncio's elsewhere).

    anyio, under httpx, pauses and resumes reading around every read: two epoll system calls
    each time on asyncio's loop, none on libuv's; and uvloop's sockets answer the peer name
    that httpcore asks of every idle connection it checks from memory. Each system call on
    the loop's thread lets a blob writer take the GIL, and taking it back costs two thread
    switches. Measured: 10 to 15% more images/s (benchmarks/download.py).
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _take(items: Iterator[tuple[K, str]], n: int) -> list[tuple[K, str]]:
    return list(itertools.islice(items, n))


def _release_n(slots: asyncio.Semaphore, n: int) -> None:
    for _ in range(n):
        slots.release()
