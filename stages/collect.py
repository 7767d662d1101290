"""collect: read every source (folders, archives, catalogs) into one manifest and packed shards.

Every input record becomes exactly one manifest row, accepted or quarantined with a stable
reason code: nothing is dropped silently, and no single record can stop the run. Each reason
is documented where it is decided: vitrine.ingest.records (every source: files, names,
labels), .archives, .catalogs, .sources (the image checks) and .download (URLs). Catalog URLs
are downloaded first into a content-addressed cache outside DVC's outputs (resumable, nothing
fetched twice); the per-image work (decode, check, sha256, pHash, thumbnail) then runs on
Dask workers, for the photos whose results collect.cache_dir does not hold yet
(vitrine.ingest.facts_cache): a run after new photos arrived decodes only those, and writes the
manifest and shards a run without the cache writes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from vitrine.config import (
    Count,
    NonNegative,
    from_mapping,
    load_params,
    load_paths,
    params_block,
    run_cli,
    stage_config,
)
from vitrine.data.shards import MANIFEST, BlobRef, ShardWriter
from vitrine.images import Rejected
from vitrine.ingest.archives import archive_records
from vitrine.ingest.catalogs import catalog_records
from vitrine.ingest.download import DownloadConfig, FetchResult, fetch_all
from vitrine.ingest.facts_cache import FactsCache
from vitrine.ingest.records import (
    InputRecord,
    LabelMap,
    LabelMapping,
    Source,
    escaped,
    folder_records,
    read_record,
    source_path,
)
from vitrine.ingest.sources import ImageFacts, IngestConfig, ingest_stream, phash_to_int64

if TYPE_CHECKING:  # pandas only for a quarantine list: its import is a tenth of a 20,000-photo run
    import pandas as pd

SHARDS = "shards"
THUMBS = "thumbs"


@params_block
class CollectConfig:
    classes: tuple[str, ...]
    sources: tuple[Source, ...]
    min_side: Count
    max_pixels: Count
    max_bytes: Count
    shard_size: Count
    thumb_size: Count  # longest side of the thumbnails kept for review pages
    download: DownloadConfig
    cache_dir: str = ""  # the per-photo results (vitrine.ingest.facts_cache); "": none kept
    cache_keep_days: NonNegative = 30.0  # a photo no run has had for this long leaves the cache
    # source label -> class, or -> {drop: <reason>} (vitrine.ingest.records.LabelMap); {}: none
    label_map: LabelMapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        for s in self.sources:
            if s.kind not in ("folder", "archive", "catalog"):
                raise ValueError(f"collect.sources: unknown kind {s.kind!r} for {s.path}")


@params_block
class ComputeConfig:
    scheduler: str  # "" = local Dask processes, "synchronous", or "tcp://host:8786"


def iter_records(
    config: CollectConfig, raw: Path, fetched: Mapping[str, FetchResult]
) -> Iterator[InputRecord]:
    for s in config.sources:
        path, name = source_path(raw, s), f"{s.kind}:{s.path}"
        if s.kind == "folder":
            yield from folder_records(path, name, config.max_bytes)
        elif s.kind == "archive":
            labels = (*config.classes, *config.label_map)  # what a class folder may be named
            yield from archive_records(path, name, labels, config.max_bytes)
        else:
            yield from catalog_records(path, name, fetched, config.max_bytes)


def download_catalogs(config: CollectConfig, raw: Path, cache: Path) -> dict[str, FetchResult]:
    """Fetch every catalog URL into the content-addressed cache (resumable: what a killed or
    earlier run fetched is answered from the cache without a request)."""
    catalogs = [s for s in config.sources if s.kind == "catalog"]
    urls = {
        r.url
        for s in catalogs
        for r in catalog_records(source_path(raw, s), s.path, {}, config.max_bytes)
        if r.url
    }
    if not urls:
        return {}
    download = dataclasses.replace(config.download, max_bytes=config.max_bytes)  # one size cap
    return dict(fetch_all(((u, u) for u in sorted(urls)), cache, download, total=len(urls)))


# --- per-record checks -------------------------------------------------------------------


def manifest_row(
    record: InputRecord, data: bytes | Rejected, result: ImageFacts | Rejected
) -> dict[str, Any]:
    """The manifest row of one record (collect fills the storage columns of accepted images)."""
    row: dict[str, Any] = {
        "id": escaped(record.id),  # read_record escapes them already: parquet holds UTF-8 only
        "label": escaped(record.label),
        "source_label": escaped(
            record.label if record.source_label is None else record.source_label
        ),
        "source": escaped(record.source),
        "url": escaped(record.url),
        "status": "quarantined",
        "reason": "",
        "detail": "",
        "sha256": "",
        "width": 0,
        "height": 0,
        "format": "",
        "bytes": 0 if isinstance(data, Rejected) else len(data),
        "phash": 0,
        "shard": "",
        "offset": 0,
        "length": 0,
        "thumb_shard": "",
        "thumb_offset": 0,
        "thumb_length": 0,
        "meta": json.dumps(record.meta, sort_keys=True, default=str) if record.meta else "",
    }
    if isinstance(result, Rejected):
        row.update(reason=result.code, detail=escaped(result.detail))
    else:
        row.update(
            status="accepted",
            sha256=result.sha256,
            width=result.width,
            height=result.height,
            format=result.format,
            phash=phash_to_int64(result.phash),
        )
    return row


def collect(
    config: CollectConfig, raw: Path, out: Path, *, cache: Path, scheduler: str = "synchronous"
) -> Path:
    """Check every record of every source; pack accepted images (once per sha256) and their
    thumbnails into shards under `out`, and write out/manifest.parquet (returned) as the rows
    come. Downloads go to the `cache` directory."""
    fetched = download_catalogs(config, raw, cache)
    ingest = IngestConfig(
        min_side=config.min_side,
        max_pixels=config.max_pixels,
        thumb_size=config.thumb_size,
        scheduler=scheduler,
    )
    stored: dict[str, tuple[BlobRef, BlobRef]] = {}
    for sub in (SHARDS, THUMBS):  # no stale shard from a larger earlier run
        shutil.rmtree(out / sub, ignore_errors=True)
    labels = LabelMap.of(config.label_map)
    records = (read_record(r, config.classes, labels) for r in iter_records(config, raw, fetched))
    items = ((k, k[1]) for k in records)
    start = time.perf_counter()
    with (
        FactsCache(Path(config.cache_dir), ingest) if config.cache_dir else nullcontext() as facts,
        ShardWriter(out, SHARDS, config.shard_size) as shards,
        ShardWriter(out, THUMBS, config.shard_size) as thumbs,
        ManifestWriter(out / MANIFEST, manifest_schema(source_label=bool(labels))) as manifest,
    ):
        results = facts.stream(items) if facts is not None else ingest_stream(items, ingest)
        for (record, data), result in results:
            row = manifest_row(record, data, result)
            if isinstance(result, ImageFacts):
                assert isinstance(data, bytes)  # ingest_stream passes a Rejected on as the result
                if result.sha256 not in stored:
                    name = f"{result.sha256}.{result.format.lower()}"
                    image = shards.add(name, data)
                    # A photo within thumb_size is its own thumbnail: stored once, not twice.
                    own = result.thumbnail == data
                    thumb = image if own else thumbs.add(f"{result.sha256}.jpg", result.thumbnail)
                    stored[result.sha256] = (image, thumb)
                image, thumb = stored[result.sha256]
                row.update(
                    shard=image.shard,
                    offset=image.offset,
                    length=image.length,
                    thumb_shard=thumb.shard,
                    thumb_offset=thumb.offset,
                    thumb_length=thumb.length,
                )
            manifest.add(row)
        # Every photo of the sources went through the cache: the ones gone long enough leave.
        pruned = facts.prune(config.cache_keep_days * 86400) if facts is not None else 0
    if facts is not None:
        print(
            f"collect: per-photo work in {time.perf_counter() - start:.1f} s: "
            f"{facts.computed} photos computed, {facts.reused} from {config.cache_dir}, "
            f"{pruned} gone for over {config.cache_keep_days:g} days deleted from it"
        )
    return out / MANIFEST


# The manifest's columns and their parquet types, written once: ManifestWriter writes this schema.
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("label", pa.string()),
        ("source", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("format", pa.string()),
        ("bytes", pa.int64()),
        # 64-bit pHash stored as int64 (vitrine.ingest.sources.phash_from_int64 reads it back)
        ("phash", pa.int64()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("thumb_shard", pa.string()),
        ("thumb_offset", pa.int64()),
        ("thumb_length", pa.int64()),
        ("meta", pa.string()),
    ]
)
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA.names)


def manifest_schema(*, source_label: bool) -> pa.Schema:
    """MANIFEST_SCHEMA, with `source_label` (the label as the source gave it) after `label` when
    collect.label_map is set; without a map the column would only repeat `label`, and is left
    out."""
    if not source_label:
        return MANIFEST_SCHEMA
    return MANIFEST_SCHEMA.insert(
        MANIFEST_COLUMNS.index("label") + 1, pa.field("source_label", pa.string())
    )


class ManifestWriter:
    """Manifest rows into a parquet file, a row group at a time, as they come.

    Holding every row (a Python dict each) and then the whole manifest as a DataFrame made the
    stage's live memory grow with the catalog; written in groups, it holds at most `group_rows`
    rows (traced with tracemalloc at 20,000 photos: what stays alive is the ~300 bytes per
    distinct photo of its shard references).
    """

    def __init__(self, path: Path, schema: pa.Schema = MANIFEST_SCHEMA, group_rows: int = 8192):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema  # a row's keys beyond it are left out
        self._writer = pq.ParquetWriter(path, schema)
        self._rows: list[dict[str, Any]] = []
        self.group_rows = group_rows

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._flush()
        self._writer.close()


REPORT_COLUMNS = ["source", "label", "status", "reason"]
QUARANTINE_COLUMNS = ["source", "id", "label", "url", "reason", "detail"]


def collect_report(manifest: Mapping[str, Iterable[Any]] | pd.DataFrame) -> dict[str, Any]:
    """Counts by source, class and reason (REPORT_COLUMNS are enough): the collect metric.
    `manifest`: those columns, as a DataFrame or as lists (pyarrow's Table.to_pydict)."""
    source, label, status, reason = (list(manifest[c]) for c in REPORT_COLUMNS)
    accepted = [s == "accepted" for s in status]
    totals = Counter(source)
    sources_accepted = Counter(s for s, ok in zip(source, accepted, strict=True) if ok)
    return {
        "records": len(status),
        "accepted": sum(accepted),
        "quarantined": len(status) - sum(accepted),
        "by_source": {
            s: {"accepted": sources_accepted[s], "total": totals[s]} for s in sorted(totals)
        },
        # in order of first appearance in the manifest
        "by_class": dict(Counter(k for k, ok in zip(label, accepted, strict=True) if ok)),
        "by_reason": dict(Counter(k for k, ok in zip(reason, accepted, strict=True) if not ok)),
    }


def quarantine_list(manifest: pd.DataFrame) -> pd.DataFrame:
    """The quarantined rows and why, sorted so that two runs' lists diff cleanly."""
    rows = manifest[manifest["status"] != "accepted"]
    return rows[QUARANTINE_COLUMNS].sort_values(["source", "id"]).reset_index(drop=True)


def read_quarantined(manifest: Path) -> pd.DataFrame:
    """The quarantined rows of a manifest file, only the columns quarantine_list needs."""
    import pandas as pd

    return pd.read_parquet(
        manifest,
        columns=[*QUARANTINE_COLUMNS, "status"],
        filters=[("status", "!=", "accepted")],
    )


def main() -> None:
    params = load_params()
    paths, config = load_paths(params), stage_config(CollectConfig, "collect", params)
    compute = from_mapping(ComputeConfig, params["compute"], "compute")
    manifest = collect(
        config, paths.raw, paths.collected, cache=paths.download_cache, scheduler=compute.scheduler
    )
    # Read back only what the report and the list need: never the whole manifest in memory.
    report = collect_report(pq.read_table(manifest, columns=REPORT_COLUMNS).to_pydict())
    paths.collect_report.parent.mkdir(parents=True, exist_ok=True)
    paths.collect_report.write_text(json.dumps(report, indent=2) + "\n")
    if report["quarantined"]:
        quarantine_list(read_quarantined(manifest)).to_csv(paths.quarantine, index=False)
    else:  # the header alone, as pandas writes an empty list
        paths.quarantine.write_text(",".join(QUARANTINE_COLUMNS) + "\n")
    print(
        f"collect: {report['records']} records, {report['accepted']} accepted, "
        f"{report['quarantined']} quarantined {report['by_reason']}"
    )


if __name__ == "__main__":
    run_cli(main)
