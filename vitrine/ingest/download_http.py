"""One GET attempt over httpx: the client every request shares (httpx's own HTTP/1.1
transports, on httpcore and h11, which answer malformed or hostile responses with errors
rather than guesses), the size cap enforced while the body streams in, and httpx's errors
mapped to the downloader's reason codes. URL checks and Retry-After parsing live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

import httpcore
import httpx

from vitrine.ingest.download_guard import BlockedAddress, GuardedBackend, parse_networks
from vitrine.ingest.download_lanes import Lanes
from vitrine.ingest.download_result import OK

_DEFAULT_PORTS = {"http": 80, "https": 443}
# An error page this short is read to its end so that its connection can be reused.
_SHORT_ERROR_PAGE = 4096


@dataclass
class Outcome:
    """One attempt's result, before it is stored."""

    code: str
    detail: str = ""
    body: bytes = b""
    size: int = 0
    sha256: str = ""  # of the body, hashed as it streamed in
    status: int | None = None  # the final HTTP status; None when no answer came
    retry_after: float | None = None  # seconds asked by a Retry-After header


def parse_url(url: str) -> tuple[httpx.URL | None, str]:
    """(parsed, "") for a fetchable http(s) URL, else (None, why it is refused)."""
    try:
        parsed = httpx.URL(url)
        host = parsed.host  # decodes IDNA: an invalid xn-- label raises a UnicodeError here
    except (httpx.InvalidURL, TypeError, ValueError) as err:
        return None, f"malformed URL ({err}): {str(url)[:120]}"
    if parsed.scheme not in _DEFAULT_PORTS:
        return None, f"only http and https are fetched: {url[:120]}"
    if not host:
        return None, f"no host in URL: {url[:120]}"
    why = host_problem(parsed.raw_host.decode("ascii", "replace"))
    if why:
        return None, f"{why}: {url[:120]}"
    return parsed, ""


def host_problem(host: str) -> str:
    """Why a URL's host (as sent, IDNA-encoded) can name no machine, or "": a label empty or
    over 63 characters, or a name over 253. Refused here rather than at the name lookup,
    which raises UnicodeError for them, not an OSError. (An IP address passes: its labels are
    digits, or it has no dot.)"""
    name = host.removesuffix(".")
    if len(name) > 253:
        return f"host name over 253 characters ({len(name)})"
    for label in name.split("."):
        if not 0 < len(label) <= 63:
            return f"host name {host[:80]!r} has an empty or over 63-character label"
    return ""


def url_problem(url: str) -> str | None:
    """Why `url` is refused without a request, or None for a fetchable http(s) URL."""
    return parse_url(url)[1] or None


def host_key(url: httpx.URL) -> str:
    """host:port, the unit of politeness (in-flight limit, request rate, throttling pauses)."""
    return f"{url.host}:{url.port or _DEFAULT_PORTS[url.scheme]}"


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


class _LazyCookies(httpx.Cookies):
    """httpx's cookie store, minus its urllib round trip for responses that set no cookie.

    httpx hands every response to http.cookiejar through urllib Request/Response adapters,
    a sizeable share of the client's CPU per request. Image responses rarely set cookies;
    those that do (a CDN's redirect through a cookie check) are still honoured.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        if "set-cookie" in response.headers:
            super().extract_cookies(response)


def make_client(
    *,
    connections: int,
    max_redirects: int,
    ca_file: str | None,
    user_agent: str,
    allow_private: bool = False,
    allowed_networks: tuple[str, ...] = (),
) -> httpx.AsyncClient:
    """The one client all requests share (cookies, redirects, headers), on httpx transports
    of one connection each (see download_lanes), at most `connections` of them kept idle.
    Unless `allow_private`, connections go only to public addresses and `allowed_networks`
    (see download_guard)."""
    tls = ssl.create_default_context(cafile=ca_file) if ca_file else httpx.create_ssl_context()
    guard = None if allow_private else GuardedBackend(parse_networks(allowed_networks))

    def new_lane() -> httpx.AsyncHTTPTransport:
        lane = httpx.AsyncHTTPTransport(verify=tls)
        # httpx's transport takes no network backend, so its pool is built here with the
        # same settings it would get, plus the guard: every connection, redirects included.
        lane._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls,
            max_connections=1,
            max_keepalive_connections=1,
            keepalive_expiry=5.0,  # httpx's default
            http1=True,
            http2=False,  # one image per request: HTTP/2's multiplexing buys nothing here
            network_backend=guard,
        )
        return lane

    client = httpx.AsyncClient(
        transport=Lanes(new_lane, max_idle=connections),
        # Each attempt runs under one wall-clock deadline instead (see `attempt`): httpx's
        # timeouts are per read, which a server dripping a byte at a time never trips, and
        # each one costs a timer per read and write.
        timeout=httpx.Timeout(None),
        follow_redirects=True,
        max_redirects=max_redirects,
        # Images are compressed already; "identity" also means no decompression at all here
        # (a gzip bomb's first chunk would inflate before any cap could see it). A server
        # that compresses anyway yields a body that collect's decoder quarantines.
        headers={"User-Agent": user_agent, "Accept-Encoding": "identity"},
        event_hooks={"request": [_check_host]},
    )
    # httpx offers no setter that keeps a Cookies subclass, hence the private attribute;
    # the store keeps its cookies and behaviour (see _LazyCookies).
    client._cookies = _LazyCookies(client.cookies)
    return client


async def _check_host(request: httpx.Request) -> None:
    """Every request, each redirect hop's too: a host no machine can have is a bad URL, under
    either network policy, before any name lookup."""
    why = host_problem(request.url.raw_host.decode("ascii", "replace"))
    if why:
        raise httpx.InvalidURL(f"redirected to a {why}")


async def attempt(
    client: httpx.AsyncClient, url: str, parsed: httpx.URL, timeout_s: float, max_bytes: int
) -> Outcome:
    """GET `url` once (redirects followed) and read its body, never more than `max_bytes`."""
    try:
        async with (
            asyncio.timeout(timeout_s),
            client.stream("GET", parsed) as response,  # parsed once, not twice
        ):
            return await _read_body(url, response, max_bytes)
    except (TimeoutError, httpx.TimeoutException):
        return Outcome("timeout", f"no complete answer in {timeout_s} s: {url}")
    except httpx.TooManyRedirects:
        return Outcome("too_many_redirects", f"too many redirects: {url}")
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as err:
        return Outcome("bad_url", f"{err}: {url}")  # e.g. redirected to ftp://
    except UnicodeError as err:  # a redirect to a host IDNA cannot encode (xn--a, a..b)
        return Outcome("bad_url", f"redirected to an invalid host name ({err}): {url}")
    except BlockedAddress as err:  # the URL itself or a redirect hop (see download_guard)
        return Outcome("blocked_address", f"{err}: {url}")
    except (httpx.HTTPError, OSError) as err:  # refused, reset, TLS, malformed response
        return Outcome("connection_error", f"{type(err).__name__} {err}: {url}")


async def _read_body(url: str, response: httpx.Response, cap: int) -> Outcome:
    status = response.status_code
    declared = response.headers.get("content-length", "")
    if not 200 <= status < 300:
        if declared.isdigit() and int(declared) <= _SHORT_ERROR_PAGE:
            with contextlib.suppress(httpx.HTTPError):
                await response.aread()
        retry_after = retry_after_s(response.headers.get("retry-after"))
        return Outcome(
            f"http_{status}", f"HTTP {status}: {url}", status=status, retry_after=retry_after
        )
    if declared.isdigit() and int(declared) > cap:
        detail = f"Content-Length {declared} > {cap}: {url}"
        return Outcome("too_large", detail, size=int(declared), status=status)
    chunks, size, digest = [], 0, hashlib.sha256()
    # Counted as it arrives, whatever Content-Length said (it may be absent or a lie); raw
    # bytes, as they came off the wire (see make_client's Accept-Encoding).
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > cap:  # leaving the `stream` block closes the connection mid-body
            return Outcome("too_large", f"body over {cap} bytes: {url}", size=size, status=status)
        chunks.append(chunk)
        digest.update(chunk)
    if size == 0:
        return Outcome("empty", f"HTTP {status} with an empty body: {url}", status=status)
    body = b"".join(chunks)
    return Outcome(OK, body=body, size=size, sha256=digest.hexdigest(), status=status)
