"""vitrine.ingest.download against a local threaded HTTP server that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import os
import shutil
import signal
import socket
import socketserver
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import REPO
from tests.helpers.photos import photo_bytes
from vitrine.images import Rejected, inspect_image
from vitrine.ingest.download import (
    CacheBusy,
    DownloadConfig,
    Downloader,
    FetchResult,
    fetch_all,
    is_permanent,
    retry_after_s,
)
from vitrine.ingest.download_guard import parse_networks, refusal
from vitrine.ingest.download_lanes import Lanes

HOME_PAGE = b"<!doctype html><html><body>Welcome to the marketplace</body></html>"
HUGE = 64 * 2**20  # what /huge would send if it were read to the end


# per_host_rps=0 (unlimited) wherever a test is not about the request rate: the polite default
# would space these local requests out and slow the suite down for nothing.
def local(**options: Any) -> DownloadConfig:
    """A config that may reach the loopback test server (the default policy refuses it)."""
    return DownloadConfig(allow_private=True, **options)


QUICK = local(timeout_s=3.0, backoff_base_s=0.01, max_attempts=4, concurrency=8, per_host_rps=0)


def tagged(i: int) -> bytes:
    """Distinct JPEG bodies without encoding one image each: a COM segment after SOI."""
    note = f"image {i}".encode()
    base = photo_bytes(0)
    return base[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + base[2:]


class Site:
    """What the test server knows: request counts, concurrency, how /huge ended."""

    def __init__(self) -> None:
        self.base = ""  # http://127.0.0.1:<port>, once serving
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.client_ports: list[int] = []
        self.arrivals: list[tuple[str, float]] = []  # (path, monotonic time) per request
        self.huge_sent = 0
        self.huge_aborted = threading.Event()

    def held(self, seconds: float) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(seconds)
        with self.lock:
            self.in_flight -= 1


def make_handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a CDN would

        def log_message(self, *args: object) -> None:
            pass

        def reply(self, status: int, body: bytes, ctype: str = "image/jpeg", **headers: str):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with site.lock:
                site.counts[self.path] += 1
                seen = site.counts[self.path]
                site.client_ports.append(self.client_address[1])
                site.arrivals.append((self.path, time.monotonic()))
            try:
                self.route(self.path, seen)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up on us: expected here

        def route(self, path: str, seen: int) -> None:
            name = path.rsplit("/", 1)[-1]
            if path.startswith("/img/"):
                self.reply(200, photo_bytes(int(name.split(".")[0])))
            elif path.startswith("/flaky/"):  # 503 twice, then fine
                self.reply(*((503, b"busy", "text/plain") if seen <= 2 else (200, tagged(7))))
            elif path == "/down":
                self.reply(503, b"down", "text/plain")
            elif path == "/throttled":  # 429 once, asking for a 1 s pause
                if seen == 1:
                    self.reply(429, b"slow down", "text/plain", Retry_After="1")
                else:
                    self.reply(200, tagged(8))
            elif path == "/throttled-bare":  # 429 once, saying nothing about how long to wait
                if seen == 1:
                    self.reply(429, b"too many requests", "text/plain")
                else:
                    self.reply(200, tagged(11))
            elif path == "/throttled-long":
                self.reply(429, b"come back tomorrow", "text/plain", Retry_After="86400")
            elif path == "/cookie-check":  # a CDN's bot check: set a cookie, come back
                self.reply(302, b"", "text/plain", Location="/cookie-jar", Set_Cookie="ok=1")
            elif path == "/cookie-jar":
                has_cookie = self.headers.get("Cookie") == "ok=1"
                self.reply(*((200, tagged(10)) if has_cookie else (403, b"no", "text/plain")))
            elif path == "/moved":
                self.reply(302, b"", "text/plain", Location="/")
            elif path == "/":
                self.reply(200, HOME_PAGE, "text/html")
            elif path == "/login.jpg":
                self.reply(200, b"<html><body>Please log in</body></html>")
            elif path == "/slow":
                time.sleep(1.0)
                self.reply(200, tagged(9))
            elif path == "/huge":
                self.huge()
            elif path == "/medium":
                self.reply(200, bytes(200_000))
            elif path == "/empty":
                self.reply(200, b"")
            elif path == "/loop":
                self.reply(302, b"", "text/plain", Location="/loop")
            elif path == "/to-ftp":
                self.reply(302, b"", "text/plain", Location="ftp://example.com/a.jpg")
            elif path == "/to-bad-punycode":  # IDNA cannot decode xn--a
                self.reply(302, b"", "text/plain", Location="http://xn--a.com/x.jpg")
            elif path == "/to-long-label":  # no DNS name has a 64-character label
                self.reply(302, b"", "text/plain", Location=f"http://{'b' * 64}.com/x.jpg")
            elif path == "/to-empty-label":
                self.reply(302, b"", "text/plain", Location="//a..b.com/x.jpg")
            elif path == "/to-metadata":  # a seller's URL aimed at the cloud's metadata service
                self.reply(302, b"", "text/plain", Location="http://169.254.169.254/latest/")
            elif path == "/to-other-loopback":
                port = self.server.server_address[1]
                self.reply(302, b"", "text/plain", Location=f"http://127.0.0.2:{port}/img/1.jpg")
            elif path.startswith("/held/"):
                site.held(0.15)
                self.reply(200, tagged(int(name)))
            elif path.startswith("/drip/"):
                time.sleep(0.05)
                self.reply(200, tagged(int(name)))
            elif path.startswith("/chunked/"):
                self.chunked(tagged(int(name)))
            elif path.startswith("/http10/"):  # an old server: no length, no keep-alive
                self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n")
                self.wfile.write(tagged(int(name)))
                self.close_connection = True
            elif path.startswith("/hangup/"):  # closes the keep-alive connection it promised
                self.reply(200, tagged(int(name)))
                self.close_connection = True
            else:
                self.reply(404, b"not found", "text/plain")

        def huge(self) -> None:
            """A body with no Content-Length, streamed until the client hangs up."""
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            chunk = bytes(2**18)
            try:
                while site.huge_sent < HUGE:
                    self.wfile.write(chunk)
                    site.huge_sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                site.huge_aborted.set()

        def chunked(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 1000):
                piece = body[i : i + 1000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

    return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # client hang-ups are the point here


def start_server(site: Site, tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    server = QuietServer(("127.0.0.1", 0), make_handler(site))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture
def site():
    site = Site()
    server = start_server(site)
    site.base = f"http://127.0.0.1:{server.server_address[1]}"
    yield site
    server.shutdown()
    server.server_close()


def fetch(
    site: Site, paths: list[str], cache: Path, config: DownloadConfig = QUICK
) -> dict[str, FetchResult]:
    """path on `site` ("/...") or any other URL -> result, downloading into `cache`."""
    items = [(p, site.base + p if p.startswith("/") else p) for p in paths]
    results = dict(fetch_all(items, cache, config, progress=False))
    assert set(results) == set(paths)
    return results


def requests(site: Site) -> int:
    return sum(site.counts.values())


def blob_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "blobs").rglob("*") if p.is_file()]


# --- one response each -------------------------------------------------------------------


def test_image_is_stored_under_its_sha256_and_404_is_not_retried(site, tmp_path):
    r = fetch(site, ["/img/1.jpg", "/missing.jpg"], tmp_path)
    ok = r["/img/1.jpg"]
    assert ok.ok and ok.attempts == 1 and not ok.from_cache
    assert ok.read() == photo_bytes(1) and ok.size == len(photo_bytes(1))
    assert ok.sha256 == hashlib.sha256(photo_bytes(1)).hexdigest()
    assert ok.path == tmp_path / "blobs" / ok.sha256[:2] / ok.sha256
    missing = r["/missing.jpg"]
    assert (missing.code, missing.attempts, site.counts["/missing.jpg"]) == ("http_404", 1, 1)
    with pytest.raises(Rejected) as err:  # what collect's record readers raise
        missing.read()
    assert err.value.code == "http_404"


def test_non_http_urls_are_refused_without_a_request(site, tmp_path):
    urls = ["ftp://127.0.0.1/a.jpg", "file:///etc/passwd", "not a url", "http://", "data:,x"]
    r = fetch(site, urls, tmp_path)
    assert {u: (x.code, x.attempts) for u, x in r.items()} == {u: ("bad_url", 0) for u in urls}
    assert requests(site) == 0


GUARDED = DownloadConfig(max_attempts=1, allowed_networks=("127.0.0.1/32",))


@pytest.mark.parametrize("policy", [QUICK, GUARDED], ids=["open", "guarded"])
def test_host_names_no_machine_can_have_are_bad_urls_not_crashes(site, tmp_path, policy):
    """Empty or over-long labels and undecodable punycode, in the URL or a redirect's Location:
    the name lookup would raise UnicodeError (not an OSError), under either network policy."""
    urls = ["http://a..b.com/x.jpg", "http://.example.com/x.jpg", f"http://{'a' * 64}.com/x"]
    urls += ["http://xn--a.com/x.jpg", "http://" + "a." * 130 + "com/x.jpg"]
    redirects = ["/to-bad-punycode", "/to-long-label", "/to-empty-label"]
    r = fetch(site, urls + redirects, tmp_path, policy)
    assert {u: x.code for u, x in r.items()} == {u: "bad_url" for u in urls + redirects}
    assert all(r[u].attempts == 0 for u in urls)  # refused without a request
    assert "invalid host name" in r["/to-bad-punycode"].detail


def test_503_twice_then_success_after_retries(site, tmp_path):
    r = fetch(site, ["/flaky/a"], tmp_path)["/flaky/a"]
    assert (r.code, r.attempts, site.counts["/flaky/a"]) == ("ok", 3, 3)


def test_5xx_gives_up_after_max_attempts(site, tmp_path):
    config = local(backoff_base_s=0.01, max_attempts=3)
    r = fetch(site, ["/down"], tmp_path, config)["/down"]
    assert (r.code, r.attempts, site.counts["/down"]) == ("http_503", 3, 3)
    assert "3 attempts" in r.detail


def test_429_waits_for_retry_after(site, tmp_path):
    start = time.monotonic()
    r = fetch(site, ["/throttled"], tmp_path)["/throttled"]
    assert (r.code, r.attempts) == ("ok", 2)
    assert time.monotonic() - start >= 0.9  # Retry-After: 1, not the 10 ms backoff


def test_a_long_retry_after_ends_the_run_for_that_url(site, tmp_path):
    start = time.monotonic()
    r = fetch(site, ["/throttled-long"], tmp_path)["/throttled-long"]
    assert (r.code, r.attempts) == ("http_429", 1) and "too long" in r.detail
    assert time.monotonic() - start < 5
    assert not fetch(site, ["/throttled-long"], tmp_path)["/throttled-long"].from_cache


def test_429_without_retry_after_pauses_the_host_for_a_backoff(site, tmp_path):
    """Asked to slow down without being told for how long: the whole host waits a backoff
    (0.5 to 1 x backoff_base_s), then the URL is asked again and succeeds."""
    config = replace(QUICK, per_host=1, backoff_base_s=0.4)
    r = fetch(site, ["/throttled-bare", "/img/1.jpg"], tmp_path, config)
    assert (r["/throttled-bare"].code, r["/throttled-bare"].attempts) == ("ok", 2)
    assert r["/img/1.jpg"].ok
    (first, t429), *later = site.arrivals
    assert first == "/throttled-bare"
    assert sorted(path for path, _ in later) == ["/img/1.jpg", "/throttled-bare"]
    # Not only the throttled URL waited (at least 0.5 x 0.4 s): the other one did too.
    assert min(t for _, t in later) - t429 >= 0.19


def test_requests_to_a_host_are_spaced_by_its_rate(site, tmp_path):
    rps = 20.0
    config = replace(QUICK, per_host=4, per_host_rps=rps)
    r = fetch(site, [f"/img/{i}.jpg" for i in range(12)], tmp_path, config)
    assert all(x.ok for x in r.values())
    times = sorted(t for _, t in site.arrivals)
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    # The client books starts 1/rps apart; the server's threads may note one arrival late and
    # the next one on time, so a single gap can look short, not the run or the typical gap.
    assert times[-1] - times[0] >= (len(times) - 1) / rps * 0.9
    assert gaps[len(gaps) // 2] >= 0.8 / rps


def test_retry_after_parsing():
    assert retry_after_s("3") == 3.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_redirect_to_home_page_downloads_html_that_collect_quarantines(site, tmp_path):
    """The contract: HTML is a successful download; decoding (collect) quarantines it."""
    r = fetch(site, ["/moved", "/login.jpg"], tmp_path)
    assert r["/moved"].ok and r["/moved"].read() == HOME_PAGE
    assert r["/login.jpg"].ok  # HTML served as image/jpeg
    for result in r.values():
        with pytest.raises(Rejected) as err:
            inspect_image(result.read(), min_side=32, max_pixels=10**7)
        assert err.value.code == "not_an_image"


def test_a_cookie_set_on_a_redirect_is_sent_back(site, tmp_path):
    assert fetch(site, ["/cookie-check"], tmp_path)["/cookie-check"].ok


# --- private-network policy -------------------------------------------------------------


def test_private_addresses_are_refused_by_default_without_a_request(site, tmp_path):
    port = site.base.rsplit(":", 1)[1]
    spellings = [
        site.base + "/img/1.jpg",
        f"http://localhost:{port}/img/1.jpg",  # a name that resolves to loopback
        f"http://2130706433:{port}/img/1.jpg",  # 127.0.0.1 as one decimal number
        f"http://[::ffff:127.0.0.1]:{port}/img/1.jpg",  # IPv4-mapped IPv6
        "http://169.254.169.254/latest/meta-data/",  # link-local: cloud metadata
        "http://10.1.2.3/a.jpg",
        "http://[fd00::1]/a.jpg",
    ]
    r = fetch(site, spellings, tmp_path, DownloadConfig(max_attempts=3))
    assert {u: x.code for u, x in r.items()} == {u: "blocked_address" for u in spellings}
    assert "loopback address 127.0.0.1" in r[spellings[1]].detail
    assert "link-local" in r[spellings[4]].detail and "private" in r[spellings[5]].detail
    assert requests(site) == 0 and blob_files(tmp_path) == []
    # Not a lasting answer: the same cache, with the policy lifted, fetches it.
    assert fetch(site, spellings[:1], tmp_path, QUICK)[spellings[0]].ok


def test_redirects_are_held_to_the_policy_and_allowed_networks_lift_it(site, tmp_path):
    config = DownloadConfig(max_attempts=1, allowed_networks=("127.0.0.1/32",))
    r = fetch(site, ["/img/1.jpg", "/to-metadata", "/to-other-loopback"], tmp_path, config)
    assert r["/img/1.jpg"].ok
    assert r["/to-metadata"].code == "blocked_address"
    assert r["/to-other-loopback"].code == "blocked_address"
    assert "127.0.0.2" in r["/to-other-loopback"].detail
    assert site.counts["/img/1.jpg"] == 1  # the redirect's target was never asked


def test_the_address_rules():
    public = ["93.184.216.34", "2606:2800:220:1::1"]
    refused = {
        "127.0.0.1": "loopback",
        "::1": "loopback",
        "169.254.0.9": "link-local",
        "fe80::1": "link-local",
        "10.0.0.1": "private",
        "192.168.1.1": "private",
        "172.16.0.1": "private",
        "fd12::1": "private",
        "0.0.0.0": "unspecified",
        "224.0.0.1": "multicast",
        "100.64.0.1": "reserved",  # carrier-grade NAT
        "::ffff:10.0.0.1": "private",
    }
    assert all(refusal(ipaddress.ip_address(a)) is None for a in public)
    for address, kind in refused.items():
        assert refusal(ipaddress.ip_address(address)).startswith(kind), address
    lab = parse_networks(["10.20.0.0/16"])
    assert refusal(ipaddress.ip_address("10.20.3.4"), lab) is None
    assert refusal(ipaddress.ip_address("10.21.3.4"), lab) is not None
    with pytest.raises(ValueError, match=r"10\.0\.0/33"):
        DownloadConfig(allowed_networks=("10.0.0/33",))


def test_redirect_loop_and_redirect_to_another_scheme(site, tmp_path):
    r = fetch(site, ["/loop", "/to-ftp"], tmp_path)
    assert r["/loop"].code == "too_many_redirects"
    assert r["/to-ftp"].code == "bad_url"


def test_slow_response_times_out_and_is_retried(site, tmp_path):
    config = local(timeout_s=0.3, backoff_base_s=0.01, max_attempts=2)
    r = fetch(site, ["/slow"], tmp_path, config)["/slow"]
    assert (r.code, r.attempts, site.counts["/slow"]) == ("timeout", 2, 2)


def test_oversized_body_is_refused_and_its_download_aborted(site, tmp_path):
    config = local(max_bytes=100_000)
    r = fetch(site, ["/huge", "/medium"], tmp_path, config)
    assert r["/huge"].code == r["/medium"].code == "too_large"
    assert r["/medium"].size == 200_000  # refused from its Content-Length
    assert site.huge_aborted.wait(10), "the server should see the client hang up"
    assert site.huge_sent < HUGE / 4
    assert blob_files(tmp_path) == []


def test_empty_body(site, tmp_path):
    assert fetch(site, ["/empty"], tmp_path)["/empty"].code == "empty"


def test_chunked_body_and_keep_alive_reuse(site, tmp_path):
    config = local(per_host=1)
    paths = [f"/chunked/{i}" for i in range(5)] + [f"/img/{i}.jpg" for i in range(5)]
    r = fetch(site, paths, tmp_path, config)
    assert all(r[f"/chunked/{i}"].read() == tagged(i) for i in range(5))
    assert len(set(site.client_ports)) == 1  # one connection for ten requests


def test_server_closing_a_keep_alive_connection_is_not_a_failure(site, tmp_path):
    config = local(per_host=1)
    r = fetch(site, [f"/hangup/{i}" for i in range(6)], tmp_path, config)
    assert all(x.ok and x.attempts == 1 for x in r.values())


# --- hostile servers: what h11 refuses to guess about --------------------------------------

JPEG = tagged(3)
HOSTILE = {
    # Two different lengths: which one frames the body is anybody's guess.
    "/two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "/bad-status": b"HTTP/1.1 2OO OK\r\nContent-Length: 1\r\n\r\nx",
    "/not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "/negative-length": b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
    "/nul-in-header": b"HTTP/1.1 200 OK\r\nX-Note: a\x00b\r\nContent-Length: 1\r\n\r\nx",
    "/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    # Fewer bytes than announced, then the connection closes.
    "/short-body": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(JPEG), JPEG[:100]),
    "/no-answer": b"",
}


class HostileHandler(socketserver.StreamRequestHandler):
    """Answers each path with canned bytes, or streams one of two endless answers."""

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            path = self.rfile.readline().split(b" ")[1].decode()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            if path == "/endless-head":  # a header that never ends
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Padding: ")
                while True:
                    self.wfile.write(b"a" * 65536)
            elif path == "/endless-chunks":  # chunked, no length anywhere, never done
                self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                while True:
                    self.wfile.write(b"10000\r\n" + bytes(65536) + b"\r\n")
            else:
                self.wfile.write(HOSTILE[path])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)


@pytest.fixture
def hostile():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), HostileHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_malformed_responses_are_connection_errors_not_guesses(hostile, tmp_path):
    config = replace(QUICK, max_attempts=1, max_bytes=1_000_000)
    urls = {f"{hostile}{p}": p for p in [*HOSTILE, "/endless-head"]}
    start = time.monotonic()
    r = dict(fetch_all([(p, u) for u, p in urls.items()], tmp_path, config, progress=False))
    assert {p: x.code for p, x in r.items()} == {p: "connection_error" for p in urls.values()}
    assert time.monotonic() - start < config.timeout_s  # refused, not waited out
    assert blob_files(tmp_path) == []


def test_an_endless_chunked_body_is_cut_at_the_size_cap(hostile, tmp_path):
    config = replace(QUICK, max_bytes=1_000_000)
    r = fetch_all([(0, f"{hostile}/endless-chunks")], tmp_path, config, progress=False)
    assert next(iter(r))[1].code == "too_large"


@pytest.fixture
def tls_site(tmp_path):
    """The same site over HTTPS, with a self-signed certificate for 127.0.0.1."""
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    site = Site()
    server = start_server(site, tls)
    site.base = f"https://127.0.0.1:{server.server_address[1]}"
    yield site, cert
    server.shutdown()
    server.server_close()


def test_https_with_a_given_ca_and_with_an_untrusted_certificate(tls_site, tmp_path):
    site, cert = tls_site
    ok = fetch(site, ["/img/2.jpg"], tmp_path / "given", local(ca_file=str(cert)))
    assert ok["/img/2.jpg"].ok and ok["/img/2.jpg"].read() == photo_bytes(2)
    untrusted = fetch(site, ["/img/2.jpg"], tmp_path / "certifi", local(max_attempts=1))
    assert untrusted["/img/2.jpg"].code == "connection_error"
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted["/img/2.jpg"].detail


# --- politeness --------------------------------------------------------------------------


def test_per_host_concurrency_is_bounded(site, tmp_path):
    config = local(per_host=3, concurrency=10, per_host_rps=0)
    r = fetch(site, [f"/held/{i}" for i in range(12)], tmp_path, config)
    assert all(x.ok for x in r.values())
    assert site.max_in_flight == 3


class StreamedBody(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"x"


class FakeLane(httpx.AsyncBaseTransport):
    """Stands for one single-connection httpx transport: answers 200 with a body to stream
    (as httpx's transport does), notes its closing."""

    def __init__(self) -> None:
        self.closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=StreamedBody())

    async def aclose(self) -> None:
        self.closed = True


def test_one_lane_per_request_in_flight_and_few_kept_idle():
    """Each request in flight to an origin has a connection (lane) of its own; a finished one
    serves the origin's next request; beyond `max_idle` the least recently used is closed."""
    made: list[FakeLane] = []

    def new_lane() -> FakeLane:
        made.append(FakeLane())
        return made[-1]

    async def scenario() -> None:
        lanes = Lanes(new_lane, max_idle=2)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=lanes) as client:
            async with client.stream("GET", "http://a/1"), client.stream("GET", "http://a/2"):
                pass  # two requests in flight to one origin: two lanes
            await client.get("http://a/3")  # served by a's most recently used lane, the first
            assert len(made) == 2 and not any(lane.closed for lane in made)
            await client.get("http://b/1")  # a third idle lane: a's least recently used goes
            assert [lane.closed for lane in made] == [False, True, False]
        assert all(lane.closed for lane in made)

    asyncio.run(scenario())


def test_total_concurrency_is_bounded_across_hosts(site, tmp_path):
    other = start_server(site)  # a second host:port sharing the same counters
    try:
        urls = [f"{site.base}/held/{i}" for i in range(10)]
        urls += [f"http://127.0.0.1:{other.server_address[1]}/held/{i}" for i in range(10, 20)]
        r = fetch(site, urls, tmp_path, local(per_host=4, concurrency=5, per_host_rps=0))
    finally:
        other.shutdown()
        other.server_close()
    assert all(x.ok for x in r.values())
    assert 4 < site.max_in_flight <= 5


# --- cache -------------------------------------------------------------------------------


def test_rerun_is_served_from_cache_without_any_request(site, tmp_path):
    paths = [f"/img/{i}.jpg" for i in range(5)] + ["/missing.jpg", "/moved"]
    first = fetch(site, paths, tmp_path)
    before = requests(site)
    again = fetch(site, paths, tmp_path)
    assert requests(site) == before  # not one request
    assert all(x.from_cache and x.attempts == 0 for x in again.values())
    assert {p: (x.code, x.sha256) for p, x in again.items()} == {
        p: (x.code, x.sha256) for p, x in first.items()
    }
    # Asking again for permanent failures is a parameter: only the 404 is requested.
    fetch(site, paths, tmp_path, local(refetch_failures=True))
    assert requests(site) == before + 1 and site.counts["/missing.jpg"] == 2


def test_transient_failures_are_asked_again_next_run(site, tmp_path):
    config = local(max_attempts=1)
    assert fetch(site, ["/down"], tmp_path, config)["/down"].code == "http_503"
    assert not fetch(site, ["/down"], tmp_path, config)["/down"].from_cache
    assert site.counts["/down"] == 2


def test_a_failed_url_is_asked_again_after_the_delay_and_a_success_never(site, tmp_path):
    config = replace(QUICK, max_attempts=1, retry_failed_after_s=3600)
    paths = ["/img/1.jpg", "/flaky/a"]  # /flaky/: 503 twice, then the photo
    first = fetch(site, paths, tmp_path, config)
    assert first["/img/1.jpg"].ok and first["/flaky/a"].code == "http_503"
    # Within the delay: the failure is answered from the index, and so is the success.
    soon = fetch(site, paths, tmp_path, config)
    assert all(r.from_cache for r in soon.values()) and soon["/flaky/a"].code == "http_503"
    assert dict(site.counts) == {"/img/1.jpg": 1, "/flaky/a": 1}
    db = sqlite3.connect(tmp_path / "index.sqlite")  # an hour and a second later
    with db:
        db.execute("UPDATE fetches SET fetched_at = fetched_at - 3601")
    db.close()
    later = fetch(site, paths, tmp_path, replace(config, max_attempts=2))
    assert later["/flaky/a"].ok and not later["/flaky/a"].from_cache
    assert (
        later["/img/1.jpg"].from_cache and later["/img/1.jpg"].sha256 == first["/img/1.jpg"].sha256
    )
    assert dict(site.counts) == {"/img/1.jpg": 1, "/flaky/a": 3}


def test_too_large_is_cached_for_a_cap_it_exceeds_only(site, tmp_path):
    fetch(site, ["/medium"], tmp_path, local(max_bytes=100_000))
    assert fetch(site, ["/medium"], tmp_path, local(max_bytes=150_000))["/medium"].from_cache
    bigger = fetch(site, ["/medium"], tmp_path, local(max_bytes=10**6))["/medium"]
    assert bigger.ok and site.counts["/medium"] == 2


def test_same_url_twice_in_a_run_is_requested_once(site, tmp_path):
    items = [("a", f"{site.base}/held/1"), ("b", f"{site.base}/held/1")]
    r = dict(fetch_all(items, tmp_path, QUICK, progress=False))
    assert r["a"].sha256 == r["b"].sha256 and site.counts["/held/1"] == 1


def test_permanence_of_codes():
    assert is_permanent("http_404") and is_permanent("http_410") and is_permanent("too_large")
    assert not any(map(is_permanent, ["http_429", "http_503", "timeout", "empty", "bad_url"]))


def test_a_cache_has_one_writer_at_a_time(tmp_path):
    async def both() -> None:
        async with Downloader(tmp_path):
            with pytest.raises(CacheBusy):
                async with Downloader(tmp_path):
                    pass

    asyncio.run(both())


def test_stopping_early_leaves_a_usable_cache(site, tmp_path):
    items = [(i, f"{site.base}/drip/{i}") for i in range(40)]
    for n, _ in enumerate(fetch_all(items, tmp_path, QUICK, progress=False), 1):
        if n == 3:
            break
    r = dict(fetch_all(items, tmp_path, QUICK, progress=False))
    assert all(x.ok for x in r.values()) and len(r) == 40
    assert max(site.counts.values()) <= 2


def test_a_slow_consumer_holds_back_the_downloads(site, tmp_path):
    """Streaming: at most `max_pending` results are ever downloaded ahead of the consumer."""
    items = [(i, f"{site.base}/img/{i}.jpg") for i in range(30)]
    ahead = []
    for consumed, _ in enumerate(
        fetch_all(items, tmp_path, replace(QUICK, max_pending=5), progress=False)
    ):
        ahead.append(requests(site) - consumed)
        time.sleep(0.01)
    assert max(ahead) <= 5 and requests(site) == 30


def test_every_framing_and_failure_gets_its_code(site, tmp_path):
    config = replace(QUICK, max_bytes=100_000)
    r = fetch(site, list(EXPECTED_CODES), tmp_path, config)
    assert {p: x.code for p, x in r.items()} == EXPECTED_CODES
    sha = {p: x.sha256 for p, x in r.items()}
    assert sha["/chunked/1"] == hashlib.sha256(tagged(1)).hexdigest()
    assert sha["/http10/2"] == hashlib.sha256(tagged(2)).hexdigest()  # delimited by the close


EXPECTED_CODES = {
    "/img/3.jpg": "ok",
    "/missing.jpg": "http_404",
    "/flaky/b": "ok",  # after two 503s
    "/moved": "ok",  # to the home page: collect's decoder quarantines it
    "/chunked/1": "ok",
    "/http10/2": "ok",
    "/empty": "empty",
    "/medium": "too_large",
    "/loop": "too_many_redirects",
    "/to-ftp": "bad_url",
    "ftp://127.0.0.1/x": "bad_url",
}


# --- SIGKILL and resume ------------------------------------------------------------------

DOWNLOAD_SCRIPT = """
import sys
from vitrine.ingest.download import DownloadConfig, fetch_all
base, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
items = [(i, f"{base}/drip/{i}") for i in range(n)]
config = DownloadConfig(per_host=8, concurrency=8, per_host_rps=0, allow_private=True)
for _ in fetch_all(items, cache, config, progress=False):
    pass
"""


def test_resume_after_sigkill_fetches_each_completed_url_once(site, tmp_path):
    n, cache = 300, tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", DOWNLOAD_SCRIPT, site.base, str(cache), str(n)], cwd=REPO
    )
    deadline = time.monotonic() + 30
    while requests(site) < 80 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    asked_before_kill = {p for p, c in site.counts.items() if c}
    with sqlite3.connect(cache / "index.sqlite") as db:
        recorded = {url[len(site.base) :] for (url,) in db.execute("SELECT url FROM fetches")}
    assert 0 < len(recorded) < n, "the kill should land mid-way"
    orphan = cache / "blobs" / "00" / ".00dead-1-1.tmp"  # as if killed while writing
    orphan.write_bytes(b"partial")

    items = [(i, f"{site.base}/drip/{i}") for i in range(n)]
    results = dict(fetch_all(items, cache, QUICK, progress=False))
    assert all(r.ok for r in results.values()) and len(results) == n
    assert all(site.counts[p] == 1 for p in recorded)  # finished before the kill: never again
    refetched = {p for p, c in site.counts.items() if c == 2}
    assert refetched <= asked_before_kill - recorded  # only those in flight (or unrecorded)
    assert max(site.counts.values()) == 1 + 1 * bool(refetched)
    assert not list(cache.rglob("*.tmp"))
    blobs = blob_files(cache)
    assert len(blobs) == n
    assert all(hashlib.sha256(b.read_bytes()).hexdigest() == b.name for b in blobs)
