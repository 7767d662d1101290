"""Throughput of batch scoring (pipeline/score.py) against ONNX Runtime alone, on the same cores.

    python benchmarks/score.py [--n 2000] [--model models/package] [--repeat 2] [--workers N]

The photos are N distinct Avito-like JPEGs (benchmarks/ingest.py's `variants`: random crops of
the bundled Avito photos, resized to 120x90, re-encoded at quality 75-95) in one folder.
Printed:

- the scorer, end to end: vitrine.scoring.run.score from the call to the merged Parquet file
  (reading, decoding, the resize, the network, the answers and the writes), in images/s:
  starting its own local cluster (one worker process per core, as compute.scheduler "" does:
  the cluster's start and each worker's model load included), and on a standing local cluster
  given by its address, whose workers loaded the model in an earlier run (a daily run on a
  running cluster);
- ONNX Runtime alone, the same model over photos already preprocessed (decoded, resized, as
  float network input: SAMPLE of them, cycled through until N have run), a plain loop of
  session.run batch by batch (score.batch_size), in images/s: on one session with one thread
  per core, and on one single-threaded session per core, each in its own process;
- the scorer's ratio to each (the target is 0.8 or more), the CPU, and the load average, which
  tells how much other processes took of the machine meanwhile.

Best of --repeat runs each, interleaved. The standing cluster starts first: its workers fork
from this process before ONNX Runtime or torch start any thread here.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model
from options import at_least

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ingest import generate

from vitrine.config import load_params
from vitrine.contracts import ONNX_MODEL_FILE, read_packaged
from vitrine.ingest.sources import local_cluster
from vitrine.runtime.answers import model_input
from vitrine.scoring.run import ScoreJob, score
from vitrine.scoring.sources import ScoreSource

REPO = Path(__file__).resolve().parents[1]
SIZE = (120, 90)  # the Avito photos' size
SAMPLE = 512  # photos preprocessed for ONNX Runtime alone, cycled through until N are run


def scorer_rate(
    folder: Path, work: Path, model: Path, batch: int, chunk: int, workers: int, scheduler: str
) -> float:
    output = work / f"scores-{time.monotonic_ns()}.parquet"
    job = ScoreJob(
        source=ScoreSource(folder, "folder"),
        output=output,
        model=model,
        cache=work / "cache",
        scheduler=scheduler,
        chunk_photos=chunk,
        batch_size=batch,
        n_workers=workers,
        progress=False,
    )
    start = time.perf_counter()
    summary = score(job)
    seconds = time.perf_counter() - start
    assert summary["accepted"] == summary["rows"], summary["by_reason"]
    output.unlink()
    return summary["rows"] / seconds


def network_inputs(pixels: np.ndarray, input_size: int, batch: int) -> list[np.ndarray]:
    """uint8 photos as model.onnx takes them: float (batch, 3, S, S) batches."""
    import torch

    from vitrine.runtime.network_input import network_input

    return [
        network_input(torch.from_numpy(pixels[i : i + batch]), input_size).numpy()
        for i in range(0, len(pixels), batch)
    ]


def _session_loop(model: Path, batches: list[np.ndarray], threads: int, images: int) -> float:
    """Seconds of session.run over `batches`, cycled until `images` photos were run."""
    from vitrine.runtime.onnx import session

    ort = session(model / ONNX_MODEL_FILE, threads)
    name = ort.get_inputs()[0].name
    ort.run(None, {name: batches[0]})  # warm-up
    done, start = 0, time.perf_counter()
    for x in itertools.cycle(batches):
        if done >= images:
            break
        ort.run(None, {name: x})
        done += len(x)
    return time.perf_counter() - start


def onnx_rate(pixels: np.ndarray, model: Path, batch: int, images: int) -> float:
    """One session, one thread per core."""
    batches = network_inputs(pixels, read_packaged(model).input_size, batch)
    return images / _session_loop(model, batches, os.cpu_count() or 1, images)


def _one_core(model: Path, pixels: np.ndarray, batch: int, images: int, ready: Any) -> float:
    batches = network_inputs(pixels, read_packaged(model).input_size, batch)
    ready.wait()  # every process prepared: they start together
    return _session_loop(model, batches, 1, images)


def onnx_rate_per_core(pixels: np.ndarray, model: Path, batch: int, images: int) -> float:
    """One single-threaded session per core, each in its own process (spawned: no thread
    pool of this process is copied), each running images / cores photos."""
    cores = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(cores, mp_context=context) as pool:
        ready = manager.Barrier(cores)
        share = -(-images // cores)
        jobs = [pool.submit(_one_core, model, pixels, batch, share, ready) for _ in range(cores)]
        seconds = [job.result() for job in jobs]
    return share * cores / max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=at_least(1), default=2000, help="photos")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "package")
    parser.add_argument("--repeat", type=at_least(1), default=2)
    parser.add_argument("--workers", type=at_least(0), default=0, help="0: one per core")
    args = parser.parse_args()
    config = load_params(REPO / "params.yaml")["score"]
    batch, chunk = int(config["batch_size"]), int(config["chunk_photos"])
    work = Path(tempfile.mkdtemp(prefix="score-bench-"))
    # The standing cluster, before anything here starts a thread (its workers fork from here).
    standing = local_cluster(args.workers)
    try:
        blobs = generate(args.n, SIZE, seed=11, processes=os.cpu_count() or 1)
        folder, few = work / "photos", work / "few"
        for where, photos in ((folder, blobs), (few, blobs[:8])):
            where.mkdir()
            for i, data in enumerate(photos):
                (where / f"{i:06d}.jpg").write_bytes(data)
        load0 = os.getloadavg()[0]
        info = read_packaged(args.model)
        sample = np.stack([model_input(b, info) for b in blobs[:SAMPLE]])
        address = standing.scheduler_address
        scorer = functools.partial(
            scorer_rate, work=work, model=args.model, batch=batch, chunk=chunk, workers=args.workers
        )
        scorer(few, scheduler=address)  # each standing worker loads the model
        cold: list[float] = []
        warm: list[float] = []
        plain: list[float] = []
        per_core: list[float] = []
        for _ in range(args.repeat):
            cold.append(scorer(folder, scheduler=""))
            warm.append(scorer(folder, scheduler=address))
            plain.append(onnx_rate(sample, args.model, batch, args.n))
            per_core.append(onnx_rate_per_core(sample, args.model, batch, args.n))
        load1 = os.getloadavg()[0]
    finally:
        standing.close()
        shutil.rmtree(work, ignore_errors=True)
    best_plain, best_per_core = max(plain), max(per_core)
    print(f"model: {info.version} ({info.model}, {info.precision}, input {info.input_size} px)")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; load average {load0:.1f} -> {load1:.1f}"
    )
    print(f"photos: {args.n} distinct {SIZE[0]}x{SIZE[1]} JPEGs; batch {batch}, chunk {chunk}")
    print(f"scorer, starting its cluster:     {max(cold):6.1f} images/s  ({_rates(cold)})")
    print(f"scorer, on a standing cluster:    {max(warm):6.1f} images/s  ({_rates(warm)})")
    print(f"ONNX Runtime, one session:        {best_plain:6.1f} images/s  ({_rates(plain)})")
    print(f"ONNX Runtime, a session per core: {best_per_core:6.1f} images/s  ({_rates(per_core)})")
    for name, rates in (("starting its cluster", cold), ("on a standing cluster", warm)):
        print(
            f"ratio, {name}: {max(rates) / best_plain:.2f} to one session, "
            f"{max(rates) / best_per_core:.2f} to a session per core (target >= 0.8)"
        )


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{r:.1f}" for r in rates)


if __name__ == "__main__":
    main()
