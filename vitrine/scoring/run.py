"""A scoring run: a source's records, in chunks, scored on Dask workers into resumable parts.

The calling process reads the records (collect's readers: vitrine.scoring.sources) a chunk at
a time and ships each chunk's bytes to a worker (vitrine.scoring.worker), keeping a few chunks
per worker in flight so every worker stays busy while memory stays flat; as each chunk comes
back its rows are written as a part (vitrine.scoring.parts). `scheduler` as compute.scheduler
has it: "" starts a local cluster (one single-threaded worker process per core, as collect's),
"synchronous" runs everything in this process (its ONNX Runtime session on every core), any
other value is the address of a running Dask scheduler.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vitrine.compute import connect, pack
from vitrine.contracts import ONNX_MODEL_FILE, PackagedModel, read_packaged
from vitrine.images import Rejected
from vitrine.ingest.download import DownloadConfig
from vitrine.ingest.records import InputRecord, escaped, match_label
from vitrine.runtime.answers import category_check, classify_answer
from vitrine.scoring import worker
from vitrine.scoring.parts import Parts
from vitrine.scoring.sources import (
    ScoreSource,
    category,
    download,
    read_photo,
    records,
    with_max_bytes,
)
from vitrine.scoring.summary import Summary

FORMAT = 2  # of the part files: parts of another format are stale (2: the answer's level)


@dataclass(frozen=True)
class ScoreJob:
    source: ScoreSource
    output: Path  # the Parquet file; its parts in <output>.parts/ until the end
    model: Path  # a packaged model folder (model.onnx, model.json)
    cache: Path  # the download cache (paths.download_cache)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    scheduler: str = ""  # as compute.scheduler
    chunk_photos: int = 256  # records per Dask task and per part
    batch_size: int = 16  # photos per ONNX Runtime call
    category_column: str = "category"
    n_workers: int = 0  # a local cluster's worker processes; 0: one per core
    progress: bool = True

    def __post_init__(self) -> None:
        if self.chunk_photos < 1 or self.batch_size < 1:
            raise ValueError("chunk_photos and batch_size must be >= 1")
        output, source = self.output.resolve(), self.source.path.resolve()
        if output == source:
            raise ValueError(f"the output would overwrite the source: {self.output}")
        if self.source.kind == "folder" and output.is_relative_to(source):
            # Its parts, the Parquet file and the summary would be listed as photos next run.
            raise ValueError(f"write the output outside the photos folder {self.source.path}")
        if output.is_dir():
            raise ValueError(f"the output is a folder, not a Parquet file: {self.output}")


class _Runner:
    """Runs worker.score_packed somewhere: in this process, on a local cluster or a given one."""

    def __init__(self, job: ScoreJob, model: bytes, digest: str, info: PackagedModel):
        self.in_process = job.scheduler == "synchronous"
        self.digest = digest
        self.info, self.batch_size = info, job.batch_size
        self._owned: list[Any] = []
        self._client: Any = None
        self._model: Any = model
        self.threads = (os.cpu_count() or 1) if self.in_process else 1
        if not self.in_process:
            # The cluster's start and stop are not logged (they would bury the progress bar
            # and summary); its warnings and errors still show.
            connection = connect(job.scheduler, job.n_workers)
            self._owned, self._client = connection.owned, connection.client
            # Once to every worker; each task then names it, and finds it there.
            self._model = self._client.scatter(model, broadcast=True)

    def in_flight(self) -> int:
        if self.in_process:
            return 1
        return 2 * max(1, sum(self._client.nthreads().values())) + 2

    def submit(self, blobs: list[bytes]) -> Any:
        payload, ends = pack(blobs)
        args = (payload, ends, self._model, self.digest, self.info, self.batch_size, self.threads)
        if self.in_process:
            return worker.score_packed(*args)
        return self._client.submit(worker.score_packed, *args, pure=False)

    def result(self, handle: Any) -> worker.Scored:
        return handle if self.in_process else handle.result()

    def close(self) -> None:
        for thing in self._owned:
            thing.close()


def chunks(items: Iterable[InputRecord], size: int) -> Iterator[list[InputRecord]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def answer_row(
    row: int,
    record: InputRecord,
    result: dict[str, Any] | Rejected,
    info: PackagedModel,
    declared: str | None,
) -> dict[str, Any]:
    """One output row: the record, and its answer or why it has none (see parts.SCHEMA)."""
    out: dict[str, Any] = {
        "row": row,
        "id": record.id,
        "source": record.source,
        "url": record.url,
        "status": "quarantined",
        "reason": "",
        "detail": "",
        "label": None,
        "level": None,
        "confidence": None,
        "probabilities": None,
        "abstain": None,
        "model_version": info.version,
        "category": declared,
        "matches": None,
        "suggested_category": None,
    }
    if isinstance(result, Rejected):
        return out | {"reason": result.code, "detail": escaped(result.detail)}
    out |= {k: result[k] for k in ("label", "level", "confidence", "abstain")}
    out |= {"status": "accepted", "probabilities": list(result["probabilities"].items())}
    known = match_label(declared, info.classes) if declared is not None else None
    if known is not None:  # the service's /check_category rule
        matches, suggested = category_check(known, result, info)
        out |= {"matches": matches, "suggested_category": suggested}
    return out


def chunk_rows(
    first: int,
    read: list[tuple[InputRecord, Rejected | None]],
    scored: worker.Scored | None,
    info: PackagedModel,
    column: str,
) -> list[dict[str, Any]]:
    """A chunk's rows, in input order: `read` holds each record and why it could not be read
    (None: its bytes went to the worker, whose answers `scored` holds)."""
    probabilities = iter(scored.probabilities if scored is not None else ())
    rows = []
    sent = 0  # index among the photos sent to the worker
    for i, (record, refused) in enumerate(read):
        result: dict[str, Any] | Rejected
        if refused is not None:
            result = refused
        else:
            assert scored is not None
            found = scored.rejected.get(sent)
            result = Rejected(*found) if found else classify_answer(next(probabilities), info)
            sent += 1
        rows.append(answer_row(first + i, record, result, info, category(record, column)))
    return rows


def score(job: ScoreJob) -> dict[str, Any]:
    """Score every record of job.source into job.output; the run's summary (also written to
    <output stem>.summary.json)."""
    info = read_packaged(job.model)
    model = (job.model / ONNX_MODEL_FILE).read_bytes()
    digest = hashlib.sha256(model).hexdigest()
    max_bytes = info.serve.max_upload_bytes  # the service's cap on one photo
    fetched = download(
        job.source, job.cache, with_max_bytes(job.download, max_bytes), progress=job.progress
    )
    run = {
        "format": FORMAT,
        "source": job.source.identity(),
        "model": digest,
        "chunk_photos": job.chunk_photos,
        "category_column": job.category_column,
    }
    parts = Parts(job.output, run)
    finished = parts.start()
    counts = {"scored_now": 0, "resumed": 0}
    runner = _Runner(job, model, digest, info)
    pending: deque[tuple[int, list[tuple[InputRecord, Rejected | None]], Any]] = deque()
    bar = tqdm(desc="score", unit="img", disable=not job.progress, mininterval=0.5)
    total_chunks = 0

    def finish_one() -> None:
        m, read, handle = pending.popleft()
        scored = runner.result(handle) if handle is not None else None
        parts.write(m, chunk_rows(m * job.chunk_photos, read, scored, info, job.category_column))
        bar.update(len(read))

    try:
        in_flight = runner.in_flight()
        source = records(job.source, info.classes, max_bytes, fetched)
        for n, chunk in enumerate(chunks(source, job.chunk_photos)):
            total_chunks = n + 1
            if n in finished and parts.ids(n) == [escaped(r.id) for r in chunk]:
                counts["resumed"] += len(chunk)
                bar.update(len(chunk))
                continue
            read = [read_photo(r) for r in chunk]
            blobs = [data for _, data in read if isinstance(data, bytes)]
            counts["scored_now"] += len(blobs)
            handle = runner.submit(blobs) if blobs else None
            # Only the refusals stay here: the bytes live in the task.
            refused = [(r, d if isinstance(d, Rejected) else None) for r, d in read]
            pending.append((n, refused, handle))
            del chunk, read, blobs
            if len(pending) >= in_flight:
                finish_one()
        while pending:
            finish_one()
    finally:
        for *_, handle in pending:  # stopped early, or a chunk failed
            if hasattr(handle, "cancel"):
                handle.cancel()
        bar.close()
        runner.close()
    summary = Summary(info.version, job.category_column, job.source.kind == "catalog")
    parts.merge(total_chunks, summary.add)
    result = summary.as_dict(output=str(job.output), source=job.source.name, **counts)
    summary_path(job.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary_path(output: Path) -> Path:
    return output.with_name(output.stem + ".summary.json")
