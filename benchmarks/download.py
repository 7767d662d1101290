"""Benchmark vitrine.ingest.download: N small JPEGs from a loopback HTTP server, then the
same N again (all answered by the cache).

    .venv/bin/python benchmarks/download.py --n 20000

The server is a bare asyncio HTTP/1.1 keep-alive server in its own process (a few µs of CPU
per request), so what is measured is the downloader: its HTTP client, hashing, blob writes
(durable unless --no-fsync) and index. The per-host request rate is unlimited here unless
--per-host-rps says otherwise: the server is our own, and the polite default would measure
the rate rather than the downloader. The machine's load average is printed with the figures:
on a shared machine they move with it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import ClassVar, cast

import httpx
from options import at_least, non_negative_float  # benchmarks/ is on sys.path as a script
from PIL import Image

from vitrine.ingest.download import DownloadConfig, fetch_all


def base_photos(k: int = 16) -> list[bytes]:
    """A few ~3 KB photo-like JPEGs (the size of the Avito thumbnails)."""
    photos = []
    for seed in range(k):
        img = Image.linear_gradient("L").resize((160, 120)).convert("RGB")
        img = Image.merge(
            "RGB",
            [
                c.point(lambda v, s=seed, j=j: (v * (j + 1) + 37 * s) % 256)
                for j, c in enumerate(img.split())
            ],
        )
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=70)
        photos.append(buf.getvalue())
    return photos


def photo(bases: list[bytes], i: int) -> bytes:
    """Image i: a base JPEG with a COM segment naming i after SOI, so every body is distinct."""
    note = f"vitrine benchmark image {i}".encode()
    segment = b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note
    base = bases[i % len(bases)]
    return base[:2] + segment + base[2:]


class _HttpServer(asyncio.Protocol):
    bases: ClassVar[list[bytes]] = []
    requests: ClassVar[int] = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP connection's
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            request_line = self.buffer[: self.buffer.find(b"\r\n")]
            self.buffer = self.buffer[end + 4 :]
            self.transport.write(self._answer(request_line.split(b" ")[1]))

    def _answer(self, path: bytes) -> bytes:
        if path == b"/_stats":  # requests served, server CPU seconds
            stats = f"{_HttpServer.requests} {time.process_time()}"
            body, ctype = stats.encode(), b"text/plain"
        elif path.startswith(b"/img/") and path.endswith(b".jpg"):
            _HttpServer.requests += 1
            body, ctype = photo(self.bases, int(path[5:-4])), b"image/jpeg"
        else:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        return head % (ctype, len(body)) + body


def serve(port_pipe: multiprocessing.connection.Connection) -> None:
    _HttpServer.bases = base_photos()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            _HttpServer, "127.0.0.1", 0, backlog=1024
        )
        port_pipe.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def timed_pass(urls: list[tuple[int, str]], cache: Path, config: DownloadConfig) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    codes: dict[str, int] = {}
    from_cache = 0
    for _, result in fetch_all(urls, cache, config):
        codes[result.code] = codes.get(result.code, 0) + 1
        from_cache += result.from_cache
    wall = time.perf_counter() - start
    return {
        "wall": wall,
        "rate": len(urls) / wall,
        "cpu_us": (time.process_time() - cpu) / len(urls) * 1e6,
        "codes": codes,
        "from_cache": from_cache,
    }


def server_stats(base: str) -> tuple[int, float]:
    requests, cpu = httpx.get(f"{base}/_stats").text.split()
    return int(requests), float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=at_least(1), default=20_000, help="images to download")
    parser.add_argument("--cache", type=Path, help="cache folder, emptied first (default: temp)")
    parser.add_argument("--concurrency", type=at_least(1), default=DownloadConfig.concurrency)
    parser.add_argument("--per-host", type=at_least(1), default=DownloadConfig.per_host)
    parser.add_argument(
        "--per-host-rps",
        type=non_negative_float,
        default=0.0,
        help="request rate per host; default 0 (unlimited): the loopback server is ours, and a "
        "polite rate would measure the rate rather than the downloader",
    )
    parser.add_argument("--no-fsync", action="store_true")
    args = parser.parse_args()

    load = os.getloadavg()  # the machine is shared: say how busy it was
    here, there = multiprocessing.get_context("spawn").Pipe()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(there,), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{here.recv()}"
    urls = [(i, f"{base}/img/{i}.jpg") for i in range(args.n)]
    config = DownloadConfig(
        concurrency=args.concurrency,
        per_host=args.per_host,
        per_host_rps=args.per_host_rps,
        fsync=not args.no_fsync,
        allow_private=True,  # the server is on loopback
    )
    cache = args.cache or Path(tempfile.mkdtemp(prefix="vitrine-download-bench-"))
    if args.cache:
        shutil.rmtree(cache, ignore_errors=True)
    try:
        _, server_cpu_before = server_stats(base)
        first = timed_pass(urls, cache, config)
        requests_after_first, server_cpu = server_stats(base)
        server_cpu -= server_cpu_before
        second = timed_pass(urls, cache, config)
        requests_after_second, _ = server_stats(base)
        blobs = sum(1 for p in (cache / "blobs").glob("*/*") if not p.name.startswith("."))
    finally:
        server.terminate()
        if not args.cache:
            shutil.rmtree(cache, ignore_errors=True)

    mean_bytes = sum(map(len, base_photos())) / len(base_photos())
    print()
    print(
        f"download benchmark: {args.n} JPEGs of ~{mean_bytes / 1000:.1f} KB over loopback, "
        f"concurrency={config.concurrency}, per_host={config.per_host}, "
        f"per_host_rps={config.per_host_rps or 'unlimited'}, fsync={config.fsync}, "
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} at start"
    )
    print(
        f"  pass 1 (empty cache): {first['rate']:8.0f} images/s  ({first['wall']:.1f} s, "
        f"{first['cpu_us']:.0f} µs CPU/image, {requests_after_first} requests, "
        f"{blobs} blobs, {first['codes']}; server: "
        f"{server_cpu / args.n * 1e6:.0f} µs CPU/request)"
    )
    print(
        f"  pass 2 (all cached):  {second['rate']:8.0f} images/s  ({second['wall']:.2f} s, "
        f"{requests_after_second - requests_after_first} requests, "
        f"{second['from_cache']} from cache)"
    )


if __name__ == "__main__":
    main()
