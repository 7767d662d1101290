"""Throughput of vitrine.ingest.sources on this machine: images per second at 120x90 and at 640x480.

    python benchmarks/ingest.py [--n 20000] [--repeat 5] [--workers N] [--profile]

The test images are the bundled Avito photos (data/raw/avito-raw.tar.gz), randomly cropped and
resized to exactly 120x90 (N of them) and 640x480 (N/4), re-encoded at JPEG quality 75-95, so
every one is distinct. Printed, per size:

- one process, no Dask: CPU time per image of ingest_batch, the per-image work on one core;
- the stream on a local Dask cluster (vitrine.ingest.sources.local_cluster, one worker process per
  core), started and warmed up before the clock starts: wall-clock images/s (best and median
  of --repeat runs), the CPU time per image of this process and the workers together, and
  what share of the machine other processes took meanwhile. On a shared machine the wall
  figure is what the run got; cores / CPU per image is what the same work would give on
  idle cores (contention inflates CPU time too, so it is still a conservative estimate);
- once, ingest_stream as a stage uses it: local cluster started and stopped in the call.

--profile prints instead where one worker's time goes: each step of the per-image work
timed separately (best of --repeat), then cProfile's top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import hashlib
import io
import multiprocessing
import os
import pstats
import statistics
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from options import at_least  # benchmarks/ is on sys.path as a script
from PIL import Image

from vitrine.images import _open, upright_rgb
from vitrine.ingest.hashing import HASH_SIDE
from vitrine.ingest.sources import (
    ImageFacts,
    IngestConfig,
    _gray32,
    _thumb_dims,
    ingest_batch,
    ingest_stream,
    local_cluster,
    thumb_resample,
)

AVITO = Path(__file__).resolve().parents[1] / "data" / "raw" / "avito-raw.tar.gz"


@functools.cache
def avito_photos(limit: int = 1000) -> list[Image.Image]:
    with tarfile.open(AVITO) as tar:
        members = [m for m in tar.getmembers() if m.isfile()][:limit]
        return [Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB") for m in members]


def variants(n: int, size: tuple[int, int], seed: int) -> list[bytes]:
    """n distinct JPEGs of exactly `size`: a random crop of a photo, resized, re-encoded."""
    photos = avito_photos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[(seed * 7919 + i) % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.8, 1)), int(h * rng.uniform(0.8, 1))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
        out.append(buf.getvalue())
    return out


def generate(n: int, size: tuple[int, int], seed: int, processes: int) -> list[bytes]:
    """variants() in chunks of 500 on forked processes, which inherit the decoded photos."""
    avito_photos()
    chunks = [(min(500, n - i), size, seed + i) for i in range(0, n, 500)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
        return [blob for chunk in pool.map(variants, *zip(*chunks, strict=True)) for blob in chunk]


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def _machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def run_once(blobs: list[bytes], config: IngestConfig, client) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds of this process and the workers, and CPU seconds of every
    other process on the machine (the contention the run saw), for one pass."""
    procs = [psutil.Process()] + [psutil.Process(pid) for pid in client.run(os.getpid).values()]
    items: Iterator[tuple[int, bytes]] = enumerate(blobs)
    cpu0, busy0, t0 = _cpu_seconds(procs), _machine_busy_seconds(), time.perf_counter()
    accepted = sum(
        isinstance(r, ImageFacts) for _, r in ingest_stream(items, config, client=client)
    )
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(procs) - cpu0
    others = _machine_busy_seconds() - busy0 - cpu
    assert accepted == len(blobs), f"only {accepted} of {len(blobs)} accepted"
    return wall, cpu, others


def bench(name: str, blobs: list[bytes], config: IngestConfig, client, repeat: int) -> None:
    cores = os.cpu_count() or 1
    runs = [run_once(blobs, config, client) for _ in range(repeat)]
    rates = [len(blobs) / wall for wall, _, _ in runs]
    cpu_per_image = min(cpu for _, cpu, _ in runs) / len(blobs)
    others = statistics.median(o / (w * cores) for w, _, o in runs)
    kb = sum(map(len, blobs)) / len(blobs) / 1000
    print(
        f"{name:>8} ({kb:4.1f} kB avg) x{len(blobs)}: "
        f"wall img/s best {max(rates):5.0f} median {statistics.median(rates):5.0f} | "
        f"CPU {cpu_per_image * 1e6:4.0f} us/img, {cores} cores / that ="
        f" {cores / cpu_per_image:5.0f} img/s | other processes took {others:4.0%} of the machine"
    )


def in_process(name: str, blobs: list[bytes], config: IngestConfig, repeat: int) -> None:
    """ingest_batch in this process, no Dask: the per-image work on one core."""
    per_image = []
    for _ in range(repeat):
        t0 = time.process_time()
        for i in range(0, len(blobs), config.batch_size):
            ingest_batch(blobs[i : i + config.batch_size], config)
        per_image.append((time.process_time() - t0) / len(blobs))
    best, median = min(per_image), statistics.median(per_image)
    print(
        f"{name:>8} one process, no Dask: CPU best {best * 1e6:4.0f} median {median * 1e6:4.0f}"
        f" us/img = {1 / best:5.0f} img/s per core"
    )


def steps(name: str, blobs: list[bytes], config: IngestConfig, repeat: int) -> None:
    """The per-image steps of vitrine.ingest.sources._examine and _gray32, timed one by one
    (the same calls, in the same order), best of `repeat` passes."""
    best: dict[str, float] = {}
    for _ in range(repeat):
        spent = dict.fromkeys(STEPS, 0)
        for data in blobs:
            t = [time.perf_counter_ns()]
            img = _open(data)
            t.append(time.perf_counter_ns())
            header_size = img.size
            size = _thumb_dims(*header_size, config.thumb_size)
            img.draft("RGB", (max(size[0], HASH_SIDE), max(size[1], HASH_SIDE)))
            img.load()
            dct_scaled = img.size != header_size
            t.append(time.perf_counter_ns())
            img.getexif()
            rgb = upright_rgb(img)
            t.append(time.perf_counter_ns())
            small = rgb.resize(size, thumb_resample(rgb.size, size, dct_scaled))
            t.append(time.perf_counter_ns())
            small.tobytes("jpeg", "RGB", config.thumb_quality)
            t.append(time.perf_counter_ns())
            _gray32(rgb)
            t.append(time.perf_counter_ns())
            hashlib.sha256(data).digest()
            t.append(time.perf_counter_ns())
            for step, before, after in zip(STEPS, t[:-1], t[1:], strict=True):
                spent[step] += after - before
        for step, ns in spent.items():
            best[step] = min(best.get(step, 1e18), ns / len(blobs) / 1000)
    total = sum(best.values())
    print(f"\n{name}: {total:.0f} us/img in these steps")
    for step, us in best.items():
        print(f"  {step:<34} {us:5.0f} us {us / total:4.0%}")


STEPS = (
    "open (parse the header, in Python)",
    "decode (JPEG at reduced DCT scale)",
    "EXIF orientation, upright RGB",
    "thumbnail resize (nearest or BOX)",
    "thumbnail JPEG encode",
    "greyscale 32x32 for the pHash",
    "sha256",
)


def profile(name: str, blobs: list[bytes], config: IngestConfig) -> None:
    """cProfile's view of ingest_batch in this process."""
    batches = [blobs[i : i + config.batch_size] for i in range(0, len(blobs), config.batch_size)]
    profiler = cProfile.Profile()
    profiler.enable()
    for batch in batches:
        results = ingest_batch(batch, config)
        assert all(isinstance(r, ImageFacts) for r in results)
    profiler.disable()
    print(f"\n--- cProfile of ingest_batch, {name} ---")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--n", type=at_least(4), default=20_000, help="120x90 images (a quarter: 640x480)"
    )
    parser.add_argument("--repeat", type=at_least(1), default=5)
    parser.add_argument("--workers", type=at_least(1), default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=at_least(1), default=IngestConfig.batch_size)
    parser.add_argument("--profile", action="store_true", help="cProfile one worker's batches")
    args = parser.parse_args()

    from dask.distributed import Client

    config = IngestConfig(batch_size=args.batch_size, progress=False)
    t0 = time.perf_counter()
    sets = {
        "120x90": generate(args.n, (120, 90), seed=1, processes=args.workers),
        "640x480": generate(args.n // 4, (640, 480), seed=2, processes=args.workers),
    }
    print(f"made the test JPEGs in {time.perf_counter() - t0:.1f} s")
    if args.profile:
        for name, blobs in sets.items():
            steps(name, blobs[:2000], config, args.repeat)
        for name, blobs in sets.items():
            profile(name, blobs[:2000], config)
        return
    for name, blobs in sets.items():
        in_process(name, blobs[:4000], config, args.repeat)
    with (
        local_cluster(args.workers) as cluster,
        Client(cluster, set_as_default=False, direct_to_workers=True) as client,
    ):
        run_once(sets["120x90"][:2000], config, client)  # warm-up: imports on the workers
        print(
            f"{args.workers} worker processes on {os.cpu_count()} cores, "
            f"batch_size {config.batch_size}, {args.repeat} runs each"
        )
        for name, blobs in sets.items():
            bench(name, blobs, config, client, args.repeat)
    # What a stage run sees: the local cluster started, used once and stopped.
    blobs = sets["120x90"]
    t0 = time.perf_counter()
    for _ in ingest_stream(enumerate(blobs), IngestConfig(progress=False)):
        pass
    wall = time.perf_counter() - t0
    print(
        f"cold ingest_stream(scheduler=''), 120x90, cluster start and stop included: "
        f"{wall:.1f} s = {len(blobs) / wall:.0f} img/s"
    )


if __name__ == "__main__":
    main()
