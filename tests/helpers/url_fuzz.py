"""Property-based checks of catalog URL rows against a hostile local web server.

`HostileWeb` is a raw-socket HTTP server on loopback whose every answer is chosen by the test:
arbitrary bytes, a status with lying or missing framing, a redirect (to another answer, to
itself, to another scheme, to a private address), a body dripped slower than the timeout, or
one that never ends. `check_url_catalog` writes a CSV catalog of such URLs (and of arbitrary
URL text), downloads it as collect does and reads every row through the catalog reader, then
holds it to collect's promises: one row per catalog row, no exception, no hang, at most
max_bytes accepted per record, every reason a documented one; under the shipped
private-network policy no request reaches the server and a redirect to a private address
ends as `blocked_address`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import re
import socket
import socketserver
import threading
import time
from pathlib import Path

from hypothesis import strategies as st

from tests.helpers.collect_fuzz import CLASSES, HANG_S, STATS, read_all, scratch
from tests.helpers.photos import photo_bytes
from vitrine.images import Rejected
from vitrine.ingest.catalogs import catalog_records
from vitrine.ingest.download import DownloadConfig, fetch_all

JPEG = photo_bytes(1)
DOWNLOAD_CODES = {
    "bad_url",
    "blocked_address",
    "timeout",
    "connection_error",
    "too_large",
    "too_many_redirects",
    "empty",
}
READER_CODES = {"bad_row", "missing_id", "duplicate_id", "missing_location", "bad_url"}
TIMEOUT_S = 0.5  # per attempt: long enough for loopback, short enough for many examples
ATTEMPTS = 2


def allowed_code(code: str) -> bool:
    return code in DOWNLOAD_CODES | READER_CODES or re.fullmatch(r"http_\d{3}", code) is not None


# --- the server ----------------------------------------------------------------------------


class _Handler(socketserver.StreamRequestHandler):
    server: HostileWeb

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            line = self.rfile.readline(8192)
            for _ in range(100):  # the request's headers, unread
                if self.rfile.readline(8192) in (b"\r\n", b"\n", b""):
                    break
            parts = line.split(b" ")
            token = parts[1].decode(errors="replace").rsplit("/", 1)[-1] if len(parts) > 1 else ""
            self.server.asked(token)
            self.server.answer(token, self)


class HostileWeb(socketserver.ThreadingTCPServer):
    """Answers GET /a/<token> with what `serve(answer)` registered under the token."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.base = f"http://127.0.0.1:{self.server_address[1]}"
        self._answers: dict[str, tuple] = {}
        self._tokens = itertools.count()
        self.requests: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-answer is the point

    def serve(self, answer: tuple) -> str:
        """The URL that is answered with `answer` (see `answer`)."""
        token = f"t{next(self._tokens)}"
        with self._lock:
            self._answers[token] = answer
        return f"{self.base}/a/{token}"

    def asked(self, token: str) -> None:
        with self._lock:
            self.requests.append(token)

    def answer(self, token: str, handler: _Handler) -> None:
        with self._lock:
            answer = self._answers.get(token, ("raw", b"HTTP/1.1 404 Not Found\r\n\r\n"))
        out, kind = handler.wfile, answer[0]
        if kind == "raw":
            out.write(answer[1])
        elif kind == "http":
            _, status, body, framing = answer
            body = BODIES.get(body, body) if isinstance(body, str) else body
            out.write(b"HTTP/1.1 %d X\r\nContent-Type: image/jpeg\r\n" % status)
            if framing == "chunked":
                out.write(
                    b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                )
            else:
                declared = {
                    "exact": len(body),
                    "short": max(len(body) - 7, 0),
                    "long": len(body) + 7,
                }.get(framing)
                length = b"" if declared is None else b"Content-Length: %d\r\n" % declared
                out.write(length + b"Connection: close\r\n\r\n" + body)
        elif kind == "redirect":
            out.write(
                b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n"
                % (answer[1].encode(errors="replace"))
            )
        elif kind == "drip":  # the photo a few bytes at a time, slower than the timeout
            out.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(JPEG))
            for at in range(0, len(JPEG), 64):
                out.write(JPEG[at : at + 64])
                out.flush()
                time.sleep(TIMEOUT_S / 4)
        elif kind == "endless":
            out.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while True:
                out.write(b"10000\r\n" + bytes(65536) + b"\r\n")
        out.flush()
        handler.connection.shutdown(socket.SHUT_WR)


_WEB: HostileWeb | None = None


def hostile_web() -> HostileWeb:
    """One server for the whole process (hypothesis runs many examples per test)."""
    global _WEB
    if _WEB is None:
        _WEB = HostileWeb()
    return _WEB


# --- strategies ------------------------------------------------------------------------------

statuses = st.sampled_from([200] * 6 + [204, 301, 404, 410, 429, 500, 503])
bodies = st.sampled_from(["photo"] * 3 + ["empty", "html", "big"]) | st.binary(max_size=600)
BODIES = {"photo": JPEG, "empty": b"", "html": b"<html>log in</html>", "big": bytes(70_000)}
framings = st.sampled_from(["exact", "exact", "short", "long", "none", "chunked"])
# An answer: what the server sends. A redirect's target is drawn too: another answer, the
# redirect itself (a loop), another scheme, a private address, or arbitrary text.
answers = st.recursive(
    st.one_of(
        st.just(("http", 200, "photo", "exact")),  # a good answer, to follow through to the end
        st.tuples(st.just("raw"), st.binary(max_size=400)),
        st.tuples(st.just("http"), statuses, bodies, framings),
        st.sampled_from([("drip",), ("endless",)]),
    ),
    lambda inner: st.tuples(
        st.just("redirect"),
        inner
        | st.sampled_from(["loop", "ftp://x/a.jpg", "http://10.9.8.7/a.jpg", "http://127.0.0.2/"])
        | st.text(max_size=30),
    ),
    max_leaves=3,
)
url_rows = st.lists(
    st.one_of(
        st.tuples(st.just("web"), answers),  # three times in five
        st.tuples(st.just("web"), answers),
        st.tuples(st.just("web"), answers),
        st.tuples(st.just("text"), st.text(max_size=40)),
        st.tuples(st.just("again"), st.integers(0, 10)),  # the URL of an earlier row
    ),
    min_size=1,
    max_size=8,
)
max_bytes_values = st.sampled_from([512, 4096, 65536])


def served_url(web: HostileWeb, answer: tuple | str) -> str:
    """The URL for an answer; a redirect's target answer is registered first."""
    if isinstance(answer, str):
        return answer
    if answer[0] != "redirect":
        return web.serve(answer)
    target = answer[1]
    if target == "loop":
        url = web.serve(("raw", b""))  # replaced below by a redirect to itself
        token = url.rsplit("/", 1)[-1]
        with web._lock:
            web._answers[token] = ("redirect", url)
        return url
    return web.serve(("redirect", served_url(web, target)))


# --- the check -----------------------------------------------------------------------------


def check_url_catalog(rows: list, max_bytes: int, policy: str) -> None:
    """Download a CSV catalog of these URL rows and read it as collect does.

    policy: "open" (allow_private: every answer is fetched), "shipped" (the default policy: the
    server on loopback is never reached), "lab" (127.0.0.1 allowed by allowed_networks, so a
    redirect to another private address is the only way to one).
    """
    STATS["url"] += 1
    web = hostile_web()
    urls: list[str] = []
    for kind, value in rows:
        if kind == "again" and urls:
            urls.append(urls[value % len(urls)])
        else:
            urls.append(served_url(web, value) if kind == "web" else str(value))
    config = DownloadConfig(
        timeout_s=TIMEOUT_S,
        max_attempts=ATTEMPTS,
        backoff_base_s=0.01,
        per_host_rps=0,
        max_bytes=max_bytes,
        fsync=False,
        allow_private=policy == "open",
        allowed_networks=("127.0.0.1/32",) if policy == "lab" else (),
    )
    with scratch() as area:
        catalog = area / "catalog.csv"
        catalog.write_text(_csv(urls), encoding="utf-8", errors="surrogateescape")
        fetched = _download(catalog, area / "cache", config, max_bytes)
        read = read_all(
            lambda: catalog_records(catalog, "catalog:c", fetched, max_bytes), area, area
        )
    assert len(read.rows) == len(urls)
    for _, result in read.rows:
        STATS[f"{policy}:{result.code if isinstance(result, Rejected) else 'accepted'}"] += 1
    for (record, result), url in zip(read.rows, urls, strict=True):
        if isinstance(result, Rejected):
            assert allowed_code(result.code), (result.code, result.detail)
            result.detail.encode("utf-8")
            if policy == "shipped" and url.startswith(web.base):
                assert result.code in {"blocked_address", "duplicate_id"}, (url, result)
        else:
            assert len(result) <= max_bytes
            assert policy != "shipped", url
        record.url.encode("utf-8", errors="surrogateescape")
    if policy == "lab":
        _check_no_private_hop(read.rows, urls, web)


def _csv(urls: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "label", "url"])
    for n, url in enumerate(urls):
        writer.writerow([f"r{n}", CLASSES[n % 2], url])
    return out.getvalue()


def _download(catalog: Path, cache: Path, config: DownloadConfig, max_bytes: int) -> dict:
    """What collect's download_catalogs does: every URL the reader finds, fetched once."""
    urls = {r.url for r in catalog_records(catalog, "catalog:c", {}, max_bytes) if r.url}
    deadline = time.monotonic() + HANG_S
    results = dict(fetch_all(((u, u) for u in sorted(urls)), cache, config, progress=False))
    assert time.monotonic() < deadline, "the downloads took longer than HANG_S"
    assert set(results) == urls
    return results


def _check_no_private_hop(rows: list, urls: list[str], web: HostileWeb) -> None:
    """With only 127.0.0.1 allowed, a chain that redirects to 10.9.8.7 or 127.0.0.2 ends there
    as blocked_address, or earlier as a timeout (a loaded machine may not finish the hops before
    it within the attempt's time; had the private hop been allowed, 127.0.0.2 would answer at
    once with a refused connection, never a timeout)."""
    for (_, result), url in zip(rows, urls, strict=True):
        chain = _redirect_chain(web, url)
        if any(hop.startswith(("http://10.9.8.7", "http://127.0.0.2")) for hop in chain):
            if isinstance(result, Rejected) and result.code == "duplicate_id":
                continue
            assert isinstance(result, Rejected), (url, chain, result)
            assert result.code in {"blocked_address", "timeout"}, (url, chain, result)


def _redirect_chain(web: HostileWeb, url: str, hops: int = 6) -> list[str]:
    chain = []
    while hops and url.startswith(web.base + "/a/"):
        with web._lock:
            answer = web._answers.get(url.rsplit("/", 1)[-1])
        if not answer or answer[0] != "redirect":
            break
        url, hops = answer[1], hops - 1
        chain.append(url)
    return chain
