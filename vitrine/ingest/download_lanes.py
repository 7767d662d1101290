"""Connection lanes: which of httpx's transports a request goes through.

`Lanes` hands each request to an idle `httpx.AsyncHTTPTransport` of its origin that holds a
single connection (a "lane"), creating one when none is idle, and takes the lane back when
the response is closed. The HTTP itself (h11's parsing, keep-alive, TLS, timeouts) is all
httpx's transport; this is only the choice of pool.

Why not one shared pool: httpcore's pool walks all of its connections on every request and
on every response close, counting the idle ones again for each idle one (quadratic in the
pool's size), and asks the operating system about each idle connection (poll, and on
asyncio's loop getpeername too). With one pool for the eight connections a host gets, the
event loop's thread needed 2.2 times the CPU per download, and benchmarks/download.py ran
at 470 to 610 images/s instead of 1,000 to 1,300 on the reference 2-core machine. A pool of
one connection makes each of those walks a single step.

At most `max_idle` lanes (so as many open connections) are kept idle; beyond that the least
recently used origin's oldest lane is closed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx

_Origin = tuple[bytes, bytes, int | None]  # scheme, host, port as httpx keeps them


class _ThenGiveBack(httpx.AsyncByteStream):
    """A response body that gives its lane back once closed (read to its end or not)."""

    def __init__(self, body: httpx.AsyncByteStream, give_back: Callable[[], Awaitable[None]]):
        self._body, self._give_back = body, give_back
        self._given_back = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._body.aclose()
        finally:
            if not self._given_back:
                self._given_back = True
                await self._give_back()


class Lanes(httpx.AsyncBaseTransport):
    """A transport made of single-connection httpx transports, one per request in flight to an
    origin (see the module docstring)."""

    def __init__(self, new_lane: Callable[[], httpx.AsyncHTTPTransport], max_idle: int):
        self._new_lane, self._max_idle = new_lane, max_idle
        # origin -> idle lanes (most recently used last); origins least recently used first
        self._idle: OrderedDict[_Origin, list[httpx.AsyncHTTPTransport]] = OrderedDict()
        self._idle_count = 0
        self._busy: set[httpx.AsyncHTTPTransport] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = (request.url.raw_scheme, request.url.raw_host, request.url.port)
        lane = self._take(origin)
        try:
            response = await lane.handle_async_request(request)
        except BaseException:
            await self._give_back(origin, lane)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ThenGiveBack(response.stream, lambda: self._give_back(origin, lane))
        return response

    def _take(self, origin: _Origin) -> httpx.AsyncHTTPTransport:
        idle = self._idle.get(origin)
        if idle:
            lane = idle.pop()  # the most recently used: the least likely to have been closed
            self._idle_count -= 1
            if not idle:
                del self._idle[origin]
        else:
            lane = self._new_lane()
        self._busy.add(lane)
        return lane

    async def _give_back(self, origin: _Origin, lane: httpx.AsyncHTTPTransport) -> None:
        self._busy.discard(lane)
        self._idle.setdefault(origin, []).append(lane)
        self._idle.move_to_end(origin)
        self._idle_count += 1
        while self._idle_count > self._max_idle:
            await self._close_least_recently_used()

    async def _close_least_recently_used(self) -> None:
        origin, idle = next(iter(self._idle.items()))
        lane = idle.pop(0)
        self._idle_count -= 1
        if not idle:
            del self._idle[origin]
        await lane.aclose()

    async def aclose(self) -> None:
        lanes = [lane for idle in self._idle.values() for lane in idle] + list(self._busy)
        self._idle.clear()
        self._busy.clear()
        self._idle_count = 0
        for lane in lanes:
            await lane.aclose()
