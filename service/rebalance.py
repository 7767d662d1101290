"""Keep-alive connections spread over the worker processes, as the load moves.

With serve.workers > 1, BentoML's workers share one listening socket, and a keep-alive
connection stays for its whole life with the worker that accepted it. Clients open their pools
in a burst, and one worker can accept all of them (BentoML issue #5426): on this 2-core machine
it served 32 connections at 1.18 cores while the other sat idle at 0.01, for about 500 req/s of
cnn64.

So each worker ends one connection in `every` responses (`Connection: close`, which HTTP
clients and pools handle by reconnecting). The reconnection goes to whichever worker's event
loop gets to accept() first, which is mostly the less busy one: connections drift from the
loaded worker to the idle one until both are equally busy (0.78-0.95 cores each, 700-990 req/s).
This is what nginx's keepalive_requests and Envoy's max_requests_per_connection are for.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CLOSE = (b"connection", b"close")


class KeepAliveRebalancer:
    """ASGI middleware: every `every`-th HTTP response of this process closes its connection."""

    def __init__(self, app: ASGIApp, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.app = app
        self.every = every
        self.responses = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.responses += 1
        if self.responses % self.every:
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        await self.app(scope, receive, send_closing)
