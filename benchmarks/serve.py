"""Serving throughput and latency: the BentoML service against avito_upload_classifier's Flask app.

    python benchmarks/serve.py [MODEL_FOLDER ...] [--requests 600] [--photos 64]
    python benchmarks/serve.py models/package models/train/cnn64 --requests 1000
    python benchmarks/serve.py --servers bento bento-norec --concurrency 32 --rounds 3

MODEL_FOLDER: packaged model folders (model.pt, model.onnx + model.json, as the package stage
writes them; default: params.yaml paths.package), or a trained candidate's folder
(<paths.model>/<candidate>), which is packaged here as the package stage would ship it, with
that candidate's serve: settings and the model.onnx evaluate scored (<paths.served>/<candidate>,
float or int8). For each, on loopback and one after the other:
  - bento: `bentoml serve service.service:Classifier` on that model (a throwaway model store),
    POST /classify: ONNX Runtime behind the micro-batcher, serve.workers processes, recording
    every answer as deployed (vitrine.production: spool, photos, and a background writer) into
    a throwaway SQLite database, or --record-url's (a PostgreSQL server);
  - bento-norec: the same with serve.record.enabled false, so that the pair measures what
    recording costs (at concurrency 32 the recording server must keep 90% of the throughput);
  - flask: what avito_upload_classifier's app does, with the same model as the framework exported it
    (model.pt, TorchScript): Flask reads the upload, decodes and resizes it
    (vitrine.images.load_square) and runs one forward pass per request, under Flask's own
    threaded development server (werkzeug, one process, a thread per request), as `app.run()`
    serves it in avito_upload_classifier;
  - flask-onnx: the same Flask app running the service's model.onnx through ONNX Runtime, to
    show how much of the difference is the runtime and how much the serving.
Both get the same real photos (the first --photos of the bundled Avito archive, cycled) at
concurrency 1, 8 and 32, --requests requests per level after a warm-up, from an aiohttp client
on the same machine (which competes with the servers for its cores, so it replays multipart
bodies encoded once). Prints throughput, p50/p95/p99 latency and the error count (any non-200
answer or transport failure) per level; then, after the recording server's shutdown, how many
rows its database holds against the answers it gave, and the recording/no-recording throughput
ratio at each concurrency (the mean of --rounds runs of each, taken in turn).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from options import at_least  # benchmarks/ is on sys.path as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitrine.config import load_params, load_paths  # noqa: E402
from vitrine.contracts import (  # noqa: E402
    MODEL_NAME_ENV,
    ONNX_MODEL_FILE,
    SCRIPTED_MODEL_FILE,
    PackagedModel,
    Provenance,
    RecordConfig,
    read_evaluation,
    read_packaged,
    write_packaged,
)
from vitrine.evaluation.settings import check_config, load_config  # noqa: E402
from vitrine.packaging.bundle import export_package, serve_settings  # noqa: E402
from vitrine.packaging.store import save_to_store  # noqa: E402
from vitrine.production.records import RECORD_URL_ENV, RecordStore  # noqa: E402
from vitrine.runtime.onnx import load_onnx  # noqa: E402

ARCHIVE = REPO / "data" / "raw" / "avito-raw.tar.gz"
MODEL_NAME = "vitrine-bench"
CONCURRENCY = (1, 8, 32)
SERVERS = ("bento", "bento-norec", "flask", "flask-onnx")
WARMUP = 32
START_TIMEOUT_S = 180


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray

    def row(self, server: str, model: str) -> str:
        p50, p95, p99 = np.percentile(self.latencies_ms, [50, 95, 99])
        rate = self.requests / self.seconds
        return (
            f"{model:<22} {server:<11} {self.concurrency:>4} {self.requests:>6} {self.errors:>6} "
            f"{rate:>8.1f} {p50:>8.1f} {p95:>8.1f} {p99:>8.1f}"
        )

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


HEADER = (
    f"{'model':<22} {'server':<11} {'conc':>4} {'reqs':>6} {'errors':>6} "
    f"{'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
)


def archive_photos(n: int) -> list[bytes]:
    with tarfile.open(ARCHIVE) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")),
            key=lambda m: m.name,
        )
        return [archive.extractfile(m).read() for m in members[:n]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recording_as(folder: Path, record: RecordConfig, out: Path) -> Path:
    """A copy of a packaged model folder whose model.json records as `record` says."""
    shutil.copytree(folder, out)
    info = read_packaged(out)
    write_packaged(replace(info, serve=replace(info.serve, record=record)), out)
    return out


def start_bento(folder: Path, home: Path, port: int, log: Path) -> subprocess.Popen:
    from bentoml._internal.models import ModelStore

    (home / "models").mkdir(parents=True, exist_ok=True)
    save_to_store(folder, MODEL_NAME, store=ModelStore(home / "models"))
    env = {**os.environ, "BENTOML_HOME": str(home), MODEL_NAME_ENV: MODEL_NAME}
    env.pop(RECORD_URL_ENV, None)  # the database is the one the copy's model.json names
    command = ["bentoml", "serve", "service.service:Classifier", "--port", str(port)]
    return launch([sys.executable, "-m", *command, "--host", "127.0.0.1"], env, log)


def start_flask(folder: Path, runtime: str, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, __file__, "--flask-baseline", str(folder), "--port", str(port)]
    command += ["--runtime", runtime]
    return launch(command, dict(os.environ), log)


def launch(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    env = {**env, "BENTOML_DO_NOT_TRACK": "true"}
    with log.open("w") as out:
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"server not ready in {START_TIMEOUT_S} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass(frozen=True)
class Upload:
    """A photo as a multipart/form-data body, encoded once: the load generator replays bodies
    (as wrk or k6 would) so that its own CPU, taken from the servers' two cores, stays small."""

    body: bytes
    content_type: str


def upload(photo: bytes) -> Upload:
    boundary = "vitrine-bench-boundary"
    body = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            b'Content-Disposition: form-data; name="image"; filename="photo.jpg"\r\n',
            b"Content-Type: image/jpeg\r\n\r\n",
            photo,
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    return Upload(body, f"multipart/form-data; boundary={boundary}")


async def one_request(
    session: aiohttp.ClientSession, url: str, photo: Upload
) -> tuple[float, bool]:
    headers = {"Content-Type": photo.content_type}
    start = time.perf_counter()
    try:
        async with session.post(url, data=photo.body, headers=headers) as response:
            body = await response.read()
            ok = response.status == 200 and b'"label"' in body
    except aiohttp.ClientError:
        ok = False
    return (time.perf_counter() - start) * 1000, ok


async def run_level(url: str, photos: list[Upload], concurrency: int, requests: int) -> Level:
    queue = iter(range(requests))
    latencies: list[float] = []
    errors = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for i in queue:
            ms, ok = await one_request(session, url, photos[i % len(photos)])
            latencies.append(ms)
            errors += not ok

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return Level(concurrency, requests, errors, seconds, np.array(latencies))


def measure(base: str, photos: list[bytes], requests: int, concurrency: list[int]) -> list[Level]:
    url = f"{base}/classify"
    uploads = [upload(photo) for photo in photos]
    asyncio.run(run_level(url, uploads, 8, WARMUP))
    return [asyncio.run(run_level(url, uploads, c, requests)) for c in concurrency]


def packaged(folder: Path, scratch: Path) -> Path:
    """A packaged model folder as it is, or a trained candidate's folder packaged into scratch."""
    if (folder / ONNX_MODEL_FILE).is_file():
        return folder
    params = load_params(REPO / "params.yaml")
    out = scratch / f"{folder.name}-package"
    card = Provenance({}, {"path": "", "md5": "benchmark"}, "benchmark")
    paths = load_paths(params)
    gain = check_config(load_config(params)).decision_gain()
    served = REPO / paths.served / folder.name  # evaluate's model.onnx for the candidate
    serve = serve_settings(params, folder.name)
    report = read_evaluation(REPO / paths.evaluate_report)
    export_package(folder, served, report, out, serve, card, gain)
    return out


@dataclass(frozen=True)
class Options:
    requests: int
    servers: list[str]
    concurrency: list[int]
    record_url: str  # "" = a throwaway SQLite database per recording run
    rounds: int  # the servers one after the other, this many times (their figures averaged)


def wait_workers(log: Path, workers: int) -> None:
    """/readyz answers once one worker is up: wait for all of them, or the first level would
    share the cores with the others' start."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while log.read_text().count("Service Classifier initialized") < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"not all {workers} workers started in {START_TIMEOUT_S} s")
        time.sleep(0.25)


def bench_model(folder: Path, photos: list[bytes], options: Options, scratch: Path) -> None:
    info = read_packaged(folder)
    model, serve = info.model_version, info.serve
    settings = ("workers", "max_batch_size", "concurrent_batches", "rebalance_every")
    print(
        f"# {model} bento: " + ", ".join(f"{k} {getattr(serve, k)}" for k in settings), flush=True
    )
    rates: dict[str, dict[int, list[float]]] = {}
    for round_, server in ((r, s) for r in range(options.rounds) for s in options.servers):
        port = free_port()
        name = f"{model}-{server}-{round_}"
        log = scratch / f"{name}.log"
        records = scratch / f"{name}-records"
        database = options.record_url or f"sqlite:///{records / 'answers.sqlite'}"
        if server.startswith("bento"):
            record = RecordConfig(
                enabled=server == "bento",
                url=database,
                spool=str(records / "spool"),
                photos=str(records / "photos"),
            )
            served = recording_as(folder, record, scratch / f"{name}-package")
            process = start_bento(served, scratch / f"{name}-home", port, log)
            ready = f"http://127.0.0.1:{port}/readyz"
        else:
            runtime = "onnx" if server == "flask-onnx" else "torchscript"
            process = start_flask(folder, runtime, port, log)
            ready = f"http://127.0.0.1:{port}/ready"
        try:
            wait_ready(ready, process, log)
            if server.startswith("bento"):
                wait_workers(log, serve.workers)
            levels = measure(
                f"http://127.0.0.1:{port}", photos, options.requests, options.concurrency
            )
            for level in levels:
                print(level.row(server, model), flush=True)
                rates.setdefault(server, {}).setdefault(level.concurrency, []).append(level.rate)
        finally:
            stop(process)
        if server == "bento":
            answered = WARMUP + options.requests * len(options.concurrency)
            store = RecordStore(database)
            print(f"# {model} bento: {store.count()} rows recorded for {answered} answers")
            store.close()
    if {"bento", "bento-norec"} <= rates.keys():
        for c in options.concurrency:
            on, off = np.mean(rates["bento"][c]), np.mean(rates["bento-norec"][c])
            print(
                f"# {model} recording at concurrency {c}: {on:.1f} / {off:.1f} req/s "
                f"(mean of {options.rounds}) = {on / off:.1%} of the throughput without"
            )


def load_model(folder: Path, info: PackagedModel, runtime: str) -> Callable:
    """uint8 (N, H, W, 3) tensor -> logits: model.pt under TorchScript or model.onnx under ORT."""
    import torch

    if runtime == "onnx":
        return load_onnx(folder, info.image_size, info.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        return torch.jit.load(str(folder / SCRIPTED_MODEL_FILE), map_location="cpu").eval()


def flask_baseline(folder: Path, port: int, runtime: str) -> None:
    """avito_upload_classifier's app: decode, resize, one predict per request, Flask's server."""
    import torch
    from flask import Flask, jsonify, request

    from vitrine.images import load_square

    info = read_packaged(folder)
    module = load_model(folder, info, runtime)
    app = Flask(__name__)

    @app.get("/ready")
    def ready() -> str:
        return "ok"

    @app.post("/classify")
    def classify():
        pixels = load_square(request.files["image"].read(), info.image_size)
        with torch.inference_mode():
            logits = module(torch.from_numpy(pixels.copy()).unsqueeze(0))
        probabilities = torch.softmax(logits, dim=1)[0].tolist()
        best = int(np.argmax(probabilities))
        return jsonify(
            label=info.classes[best],
            confidence=probabilities[best],
            probabilities=dict(zip(info.classes, probabilities, strict=True)),
        )

    app.run(host="127.0.0.1", port=port, threaded=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help="packaged model folders")
    parser.add_argument("--requests", type=at_least(1), default=600, help="per concurrency level")
    parser.add_argument("--photos", type=at_least(1), default=64)
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--concurrency", nargs="+", type=at_least(1), default=list(CONCURRENCY))
    parser.add_argument(
        "--rounds", type=at_least(1), default=1, help="the servers in turn, this often"
    )
    parser.add_argument(
        "--record-url",
        default="",
        help="the recording server's answers database (default: a throwaway SQLite file); "
        "a PostgreSQL URL measures recording into it (its table must be new or emptied)",
    )
    parser.add_argument("--flask-baseline", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--runtime", choices=["torchscript", "onnx"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flask_baseline:
        flask_baseline(args.flask_baseline, args.port, args.runtime)
        return
    folders = args.folders or [load_paths(load_params(REPO / "params.yaml")).package]
    photos = archive_photos(args.photos)
    print(f"{len(photos)} photos, {args.requests} requests per level, {os.cpu_count()} CPUs")
    print(HEADER, flush=True)
    with tempfile.TemporaryDirectory(prefix="vitrine-bench-") as scratch:
        for folder in folders:
            model = packaged(folder.resolve(), Path(scratch))
            options = Options(
                args.requests, args.servers, args.concurrency, args.record_url, args.rounds
            )
            bench_model(model, photos, options, Path(scratch))


if __name__ == "__main__":
    main()
