"""Memory under sustained mixed traffic: does the serving processes' RSS level off?

    python benchmarks/serve_soak.py [MODEL_FOLDER] [--requests 5000] [--concurrency 16]
    python benchmarks/serve_soak.py models/package --every 250

MODEL_FOLDER: a packaged model folder or a trained candidate's folder, as for
benchmarks/serve.py. Default: a tiny untrained cnn64 (tests/helpers/tiny_package.py, the
service tests' model) packaged with the repository's serve: settings for cnn64 (params.yaml):
the soak is about the server's memory, not the model's answers.

The server is `bentoml serve service.service:Classifier` on loopback, started as
benchmarks/serve.py starts it. After --warmup-s of the same traffic (longer than the
server's traffic timeout: see WARMUP_S), --requests requests (a fixed mix of good and
hostile ones, cycled: good photos to /classify and /check_category, /classify_batch with a bad
part, truncated JPEGs, text files, a photo part over serve.max_upload_bytes, a request whose
Content-Length is over the cap, uploads abandoned half-way, a GET on an unknown path and on
/classify) go in from --concurrency clients. Every --every requests it samples the resident
memory (RSS, and USS: the pages no other process shares) of the server's process tree with
psutil, then prints the curve, each kind's answers, the 5xx count of /metrics, and the verdict:
the memory levels off when the tree's RSS grew by less than --level-mb over the last half.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import psutil
from serve import (  # benchmarks/serve.py, which also puts the repository on sys.path
    archive_photos,
    free_port,
    packaged,
    start_bento,
    stop,
    wait_ready,
)

from tests.helpers.candidates import SERVE
from tests.helpers.tiny_package import package_tiny_model
from vitrine.contracts import read_packaged

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model
from options import at_least, non_negative_float, positive_float

BOUNDARY = "vitrine-soak-boundary"
# BentoML's TimeoutMiddleware keeps each request's timer (with a copy of its context: the
# OpenTelemetry span and more, ~1.5 kB) for the traffic timeout, 60 s in service/service.py,
# whether the answer is long gone or not: the memory grows for that long whatever the service
# does, then levels off. The warm-up lasts longer, so that the samples see what comes after.
WARMUP_S = 65
LEVEL_MB = 5.0
MB = 1024 * 1024
OK, UNPROCESSABLE, TOO_LARGE = frozenset({200}), frozenset({422}), frozenset({413})
NO_ANSWER = frozenset({0})  # abandoned: the client closes before any answer
Sender = Callable[[aiohttp.ClientSession, str], Awaitable[int]]  # (session, base URL) -> status


def multipart(parts: list[tuple[str, bytes, bool]]) -> bytes:
    """(field, value, is_file) parts -> a multipart/form-data body with BOUNDARY."""
    chunks = []
    for name, value, is_file in parts:
        filename = '; filename="upload.jpg"' if is_file else ""
        chunks += [
            f"--{BOUNDARY}\r\n".encode(),
            f'Content-Disposition: form-data; name="{name}"{filename}\r\n'.encode(),
            b"Content-Type: application/octet-stream\r\n\r\n" if is_file else b"\r\n",
            value,
            b"\r\n",
        ]
    return b"".join([*chunks, f"--{BOUNDARY}--\r\n".encode()])


@dataclass(frozen=True)
class Kind:
    """One kind of request in the mix: how it is sent, and the answers that are right for it."""

    name: str
    send: Sender  # the HTTP status it got, 0 when it waits for none
    expected: frozenset[int]


def post(endpoint: str, body: bytes) -> Sender:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    async def send(session: aiohttp.ClientSession, base: str) -> int:
        async with session.post(f"{base}/{endpoint}", data=body, headers=headers) as response:
            await response.read()
            return response.status

    return send


def get(path: str) -> Sender:
    async def send(session: aiohttp.ClientSession, base: str) -> int:
        async with session.get(f"{base}{path}") as response:
            await response.read()
            return response.status

    return send


def raw(head: bytes, body: bytes, read: bool) -> Sender:
    """A hand-written request on its own connection: `body` is all that is sent of it. With
    `read`, the answer's status is read; otherwise the connection is closed at once (abandoned)."""

    async def send(session: aiohttp.ClientSession, base: str) -> int:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(head + body)
            await writer.drain()
            if not read:
                return 0
            status_line = await asyncio.wait_for(reader.readline(), timeout=60)
            return int(status_line.split()[1])
        finally:
            writer.close()

    return send


def request_head(endpoint: str, length: int) -> bytes:
    return (
        f"POST /{endpoint} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def traffic(photos: list[bytes], max_upload_bytes: int) -> list[Kind]:
    """The mix, in the order it is cycled: 16 requests, 7 of them good."""
    text = b"just some text, not a photo\n" * 40
    truncated = photos[0][: len(photos[0]) // 2]
    oversized = b"\xff" * (max_upload_bytes + 1)  # within the body's cap, over one photo's
    whole = multipart([("image", photos[0], True)])
    cap = max_upload_bytes + 64 * 1024  # service.uploads.MULTIPART_OVERHEAD
    declared = ("declared_category", b"phone", False)
    batch = [("image", p, True) for p in photos[:4]] + [("image", text, True)]

    def one(endpoint: str, image: bytes, *fields: tuple[str, bytes, bool]) -> Sender:
        return post(endpoint, multipart([*fields, ("image", image, True)]))

    good = [Kind(f"good-{i}", one("classify", p), OK) for i, p in enumerate(photos[:5])]
    return [
        *good,
        Kind("check", one("check_category", photos[5], declared), OK),
        Kind("batch", post("classify_batch", multipart(batch)), OK),
        Kind("truncated", one("classify", truncated), UNPROCESSABLE),
        Kind("truncated-check", one("check_category", truncated, declared), UNPROCESSABLE),
        Kind("text", one("classify", text), UNPROCESSABLE),
        Kind("oversized", one("classify", oversized), TOO_LARGE),
        Kind("over-cap", raw(request_head("classify", cap + 1), b"", read=True), TOO_LARGE),
        Kind(
            "abandoned",
            raw(request_head("classify", len(whole)), whole[: len(whole) // 2], read=False),
            NO_ANSWER,
        ),
        Kind(
            "abandoned-batch",
            raw(request_head("classify_batch", len(whole)), whole[:100], read=False),
            NO_ANSWER,
        ),
        Kind("not-found", get("/no/such/page"), frozenset({404})),
        Kind("get-classify", get("/classify"), frozenset({405})),
    ]


@dataclass(frozen=True)
class Sample:
    requests: int
    rss_mb: float  # the server's whole process tree
    uss_mb: float
    children_rss_mb: tuple[float, ...]  # the serve command's child processes (its workers)


def sample(pid: int, requests: int) -> Sample:
    root = psutil.Process(pid)
    rss = uss = 0.0
    children = []
    for process in [root, *root.children(recursive=True)]:
        try:
            memory = process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss += memory.rss / MB
        uss += memory.uss / MB
        if process != root:
            children.append(memory.rss / MB)
    return Sample(requests, rss, uss, tuple(sorted(children, reverse=True)))


async def run_round(
    base: str, kinds: list[Kind], first: int, n: int, concurrency: int, outcomes: Counter
) -> None:
    """Requests first..first+n-1 of the cycled mix, from `concurrency` clients at once."""
    numbers = iter(range(first, first + n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            for i in numbers:
                kind = kinds[i % len(kinds)]
                try:
                    status = await kind.send(session, base)
                except (aiohttp.ClientError, OSError, TimeoutError):
                    status = -1  # no answer: a transport failure
                outcomes[kind.name, status] += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))


def soak(
    base: str, pid: int, kinds: list[Kind], args: argparse.Namespace
) -> tuple[list[Sample], Counter, float]:
    """Rounds of --every requests; after each (nothing in flight), a memory sample."""
    warmup: Counter = Counter()
    start = time.perf_counter()
    while time.perf_counter() - start < args.warmup_s:
        asyncio.run(run_round(base, kinds, 0, args.every, args.concurrency, warmup))
    print(f"warm-up: {sum(warmup.values())} requests in {time.perf_counter() - start:.0f} s")
    samples, outcomes = [sample(pid, 0)], Counter()
    print(f"{'requests':>8} {'tree RSS MB':>12} {'tree USS MB':>12}  children's RSS MB", flush=True)
    print(row(samples[0]), flush=True)
    start = time.perf_counter()
    for first in range(0, args.requests, args.every):
        n = min(args.every, args.requests - first)
        asyncio.run(run_round(base, kinds, first, n, args.concurrency, outcomes))
        samples.append(sample(pid, first + n))
        print(row(samples[-1]), flush=True)
    return samples, outcomes, time.perf_counter() - start


def row(s: Sample) -> str:
    workers = " ".join(f"{w:.1f}" for w in s.children_rss_mb)
    return f"{s.requests:>8} {s.rss_mb:>12.1f} {s.uss_mb:>12.1f}  {workers}"


def server_5xx(base: str) -> Counter:
    """/metrics' request counts with a 5xx status, by endpoint and status."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    counts: Counter = Counter()
    for line in text.splitlines():
        if line.startswith("bentoml_service_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels["http_response_code"].startswith("5"):
                counts[labels["endpoint"], labels["http_response_code"]] += float(line.split()[-1])
    return counts


def report(
    samples: list[Sample],
    outcomes: Counter,
    kinds: list[Kind],
    seconds: float,
    args: argparse.Namespace,
) -> bool:
    total = sum(outcomes.values())
    print(f"\n{total} requests in {seconds:.0f} s ({total / seconds:.0f} req/s with the sampling)")
    wrong = 0
    for kind in kinds:
        statuses = {s: n for (k, s), n in outcomes.items() if k == kind.name}
        bad = sum(n for s, n in statuses.items() if s not in kind.expected)
        wrong += bad
        shown = ", ".join(f"{s if s else 'none'}: {n}" for s, n in sorted(statuses.items()))
        print(f"  {kind.name:<13} {shown}" + (f"   UNEXPECTED: {bad}" if bad else ""))
    half = samples[len(samples) // 2]
    first, last = samples[0], samples[-1]
    growth = last.rss_mb - half.rss_mb
    per_1000 = growth / max(last.requests - half.requests, 1) * 1000
    print(
        f"tree RSS: {first.rss_mb:.1f} MB after the warm-up, "
        f"{half.rss_mb:.1f} MB at {half.requests}, "
        f"{last.rss_mb:.1f} MB at {last.requests} (peak {max(s.rss_mb for s in samples):.1f})"
    )
    later = [s.rss_mb for s in samples[len(samples) // 2 :]]
    spread = max(later) - min(later)
    print(
        f"last half: {growth:+.1f} MB RSS ({per_1000:+.2f} MB per 1,000 requests), "
        f"{last.uss_mb - half.uss_mb:+.1f} MB USS; samples within {spread:.1f} MB"
    )
    levels_off = growth < args.level_mb
    verdict = "levels off" if levels_off else "still growing"
    print(f"verdict: {verdict} (last-half growth {growth:.1f} MB, threshold {args.level_mb} MB)")
    return levels_off and not wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="packaged model or candidate folder")
    parser.add_argument("--requests", type=at_least(1), default=5000)
    parser.add_argument("--concurrency", type=at_least(1), default=16)
    parser.add_argument("--every", type=at_least(1), default=250, help="requests between samples")
    parser.add_argument("--photos", type=at_least(1), default=6)
    parser.add_argument("--level-mb", type=positive_float, default=LEVEL_MB)
    parser.add_argument(
        "--warmup-s", type=non_negative_float, default=WARMUP_S, help="mixed traffic first"
    )
    parser.add_argument("--keep-log", type=Path, help="copy the server's log here")
    args = parser.parse_args()
    photos = archive_photos(max(args.photos, 6))
    with tempfile.TemporaryDirectory(prefix="vitrine-soak-") as tmp:
        scratch = Path(tmp)
        if args.folder is None:
            folder = package_tiny_model(scratch / "tiny", SERVE)
            model = "tiny untrained cnn64 (tests/helpers/tiny_package.py), params.yaml serve: cnn64"
        else:
            folder = packaged(args.folder.resolve(), scratch)
            model = str(args.folder)
        info = read_packaged(folder)
        print(f"model: {model} ({info.model_version}); serve: {info.serve}")
        print(f"CPU: {cpu_model()}, {psutil.cpu_count()} logical CPUs")
        print(
            f"{args.requests} requests, concurrency {args.concurrency}, a sample every {args.every}"
        )
        port = free_port()
        log = scratch / "server.log"
        process = start_bento(folder, scratch / "home", port, log)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(f"{base}/readyz", process, log)
            kinds = traffic(photos, info.serve.max_upload_bytes)
            samples, outcomes, seconds = soak(base, process.pid, kinds, args)
            ok = report(samples, outcomes, kinds, seconds, args)
            errors = server_5xx(base)
            print(f"/metrics 5xx: {dict(errors) or 'none'}")
        finally:
            stop(process)
            text = log.read_text()
            if args.keep_log:
                args.keep_log.write_text(text)
        tracebacks = text.count("Traceback (most recent call last)")
        print(f"server log: {tracebacks} tracebacks, {text.count('[ERROR]')} ERROR lines")
    sys.exit(0 if ok and not errors and not tracebacks else 1)


if __name__ == "__main__":
    main()
