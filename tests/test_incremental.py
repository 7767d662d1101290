"""Incremental runs: collect, dedupe and prepare after new photos arrived compute only those
(their per-photo caches answer for the others), and write byte for byte what a run from
scratch writes."""

from __future__ import annotations

import dataclasses
import io
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import stages.collect
import stages.dedupe
import stages.prepare
import vitrine.ingest.sources
from tests.helpers import REPO
from tests.helpers.photos import photo_bytes
from vitrine.curation import feature_nets
from vitrine.images import Rejected
from vitrine.ingest.facts_cache import FACTS_FILE, FactsCache, decode, encode, facts_version
from vitrine.ingest.photo_cache import PhotoCache
from vitrine.ingest.sources import ImageFacts, IngestConfig, ingest_image

OUTPUTS = ("data/collected", "data/deduped", "data/prepared", "reports")


def write_project(root: Path, cache: bool) -> None:
    """params.yaml as the repository's, with one folder source, quick settings and the
    per-photo caches under root/.cache (or none); an empty decisions file."""
    params: dict[str, Any] = yaml.safe_load((REPO / "params.yaml").read_text())
    collect, dedupe = params["collect"], params["dedupe"]
    collect.update(sources=[{"kind": "folder", "path": "photos"}], shard_size=10)
    collect["cache_dir"] = ".cache/collect" if cache else ""
    # Batches of 3: the 4 photos a rerun adds make a batch of 3 and one of 1, and a photo
    # computed alone rounds differently from one in a full batch unless the batch is padded.
    dedupe.update(embedding_batch_size=3, cache_dir=".cache/dedupe" if cache else "")
    dedupe["noise"]["folds"] = 3
    params["prepare"].update(image_size=32, cache_dir=".cache/prepare" if cache else "")
    params["compute"]["scheduler"] = "synchronous"
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    decisions = root / params["paths"]["decisions"]
    decisions.parent.mkdir(parents=True)
    decisions.write_text("id,decision,new_label,note\n")


def add_photos(raw: Path, photos: dict[str, bytes]) -> None:
    for name, data in photos.items():
        (raw / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / name).write_bytes(data)


def near_copy(data: bytes) -> bytes:
    """The photo resized to 90% and recompressed: a re-upload, not the same bytes."""
    img = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    img.resize((img.width * 9 // 10, img.height * 9 // 10)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


class Counted:
    """Photos that reached the per-image work and the networks (the caches' misses)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.decoded = self.embedded = self.squared = 0
        ingest, batch = vitrine.ingest.sources._ingest_packed, feature_nets.photo_features
        square = stages.prepare.load_square

        def counted_ingest(payload: np.ndarray, ends: np.ndarray, config: IngestConfig) -> Any:
            self.decoded += len(ends)
            return ingest(payload, ends, config)

        def counted_batch(payload: np.ndarray, ends: np.ndarray, *args: Any) -> np.ndarray:
            self.embedded += len(ends)
            return batch(payload, ends, *args)

        def counted_square(*args: Any) -> np.ndarray:
            self.squared += 1
            return square(*args)

        monkeypatch.setattr(vitrine.ingest.sources, "_ingest_packed", counted_ingest)
        monkeypatch.setattr(feature_nets, "photo_features", counted_batch)
        monkeypatch.setattr(stages.prepare, "load_square", counted_square)

    def take(self) -> tuple[int, int, int]:
        counts = (self.decoded, self.embedded, self.squared)
        self.decoded = self.embedded = self.squared = 0
        return counts


def run_stages(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """collect, dedupe and prepare, as `python -m stages.<name>` runs them in `project`: their
    output. prepare's previous outputs stay in place (DVC would delete them): it must not write
    into them, as they are its cache's hard links."""
    monkeypatch.chdir(project)
    stages.collect.main()
    stages.dedupe.main()
    stages.prepare.main()
    return capsys.readouterr().out


def summary(out: str, stage: str) -> tuple[int, int]:
    """(computed, from the cache) as the stage printed them."""
    found = re.search(rf"{stage}: per-photo work .*: (\d+) photos computed, (\d+) from", out)
    assert found, out
    return int(found[1]), int(found[2])


def files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for folder in OUTPUTS
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def test_a_rerun_computes_only_new_photos_and_writes_what_a_clean_run_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    counted = Counted(monkeypatch)
    first = {
        f"{c}/{i:03d}.jpg": photo_bytes(100 * k + i)
        for k, c in enumerate(("laptop", "phone"))
        for i in range(12)
    }
    first["phone/again.jpg"] = first["phone/004.jpg"]  # the same bytes under another name
    later = {f"laptop/new-{i}.jpg": photo_bytes(900 + i) for i in range(3)}
    later["phone/004-copy.jpg"] = near_copy(first["phone/004.jpg"])

    incremental = tmp_path / "incremental"
    write_project(incremental, cache=True)
    add_photos(incremental / "data/raw/photos", first)
    out = run_stages(incremental, monkeypatch, capsys)
    assert summary(out, "collect") == (25, 0) and summary(out, "dedupe") == (24, 0)
    # 24 distinct photos; collect met both copies at once; prepare squares the 24 kept
    assert counted.take() == (25, 24, 24)
    assert "prepare: 24 of 24 squares decoded, 0 reused" in out

    add_photos(incremental / "data/raw/photos", later)
    out = run_stages(incremental, monkeypatch, capsys)
    assert summary(out, "collect") == (4, 25) and summary(out, "dedupe") == (4, 24)
    # only the new photos were decoded and embedded; the near copy is not kept, so not squared
    assert counted.take() == (4, 4, 3)
    assert "prepare: 3 of 27 squares decoded, 24 reused" in out

    clean = tmp_path / "clean"
    write_project(clean, cache=False)
    add_photos(clean / "data/raw/photos", first | later)
    run_stages(clean, monkeypatch, capsys)
    assert counted.take() == (29, 28, 27)
    assert not (clean / ".cache").exists()

    incremental_files, clean_files = files(incremental), files(clean)
    assert {"data/collected/shards/shard-00002.tar", "data/deduped/embeddings.npy"} <= set(
        clean_files
    )
    assert sorted(incremental_files) == sorted(clean_files)
    assert [f for f in clean_files if incremental_files[f] != clean_files[f]] == []
    deduped = pd.read_parquet(clean / "data/deduped/manifest.parquet").set_index("id")
    assert deduped.loc["phone/004-copy.jpg", "reason"] == "near_duplicate"
    assert deduped.loc["phone/again.jpg", "reason"] == "exact_duplicate"


def test_a_changed_setting_is_another_version_and_old_versions_are_dropped(tmp_path: Path) -> None:
    config = IngestConfig(thumb_size=48, scheduler="synchronous", progress=False)
    smaller = dataclasses.replace(config, thumb_size=32)
    assert facts_version(config) != facts_version(smaller)
    assert facts_version(config) == facts_version(dataclasses.replace(config, batch_size=7))
    data = photo_bytes(1)
    with FactsCache(tmp_path, config) as cache:
        assert [r for _, r in cache.stream([("a", data)])] == [ingest_image(data, config)]
        assert (cache.computed, cache.reused) == (1, 0)
    with FactsCache(tmp_path, config) as cache:
        assert [r for _, r in cache.stream([("a", data)])] == [ingest_image(data, config)]
        assert (cache.computed, cache.reused) == (0, 1)
    with FactsCache(tmp_path, smaller) as cache:  # a changed check recomputes
        (result,) = [r for _, r in cache.stream([("a", data)])]
        assert (cache.computed, cache.reused) == (1, 0)
    assert isinstance(result, ImageFacts) and result == ingest_image(data, smaller)
    for n in range(4):  # only the 4 most recently used versions are kept
        PhotoCache(tmp_path / FACTS_FILE, f"v{n}").close()
    db = sqlite3.connect(tmp_path / FACTS_FILE)
    versions = {v for (v,) in db.execute("SELECT version FROM versions")}
    rows = db.execute("SELECT count(*) FROM results").fetchone()[0]
    db.close()
    assert versions == {"v0", "v1", "v2", "v3"} and rows == 0


def test_a_cached_result_reads_back_as_computed() -> None:
    config = IngestConfig(thumb_size=48)
    large, small = photo_bytes(3), photo_bytes(4, (44, 36))  # small: its own thumbnail
    for data in (large, small):
        facts = ingest_image(data, config)
        assert decode(encode(facts, data), facts.sha256, data) == facts
    assert len(encode(ingest_image(small, config), small)) < 100  # the photo is not stored twice
    with pytest.raises(Rejected) as raised:
        ingest_image(b"not an image", config)
    back = decode(encode(raised.value, b"not an image"), "0" * 64, b"not an image")
    assert isinstance(back, Rejected)
    assert (back.code, back.detail) == (raised.value.code, raised.value.detail)


def test_a_stream_the_cache_answers_starts_no_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = IngestConfig(thumb_size=48, scheduler="synchronous", progress=False)
    photos = [(i, photo_bytes(i)) for i in range(3)]
    with FactsCache(tmp_path, config) as cache:
        first = list(cache.stream(photos))

    def no_cluster(n_workers: int = 0) -> None:
        raise AssertionError("a Dask cluster was started")

    monkeypatch.setattr(vitrine.ingest.sources, "local_cluster", no_cluster)
    on_a_cluster = dataclasses.replace(config, scheduler="")  # the same version
    with FactsCache(tmp_path, on_a_cluster) as cache:
        assert list(cache.stream(photos)) == first and (cache.computed, cache.reused) == (0, 3)
    with FactsCache(tmp_path, on_a_cluster) as cache, pytest.raises(AssertionError, match="Dask"):
        list(cache.stream([(3, photo_bytes(3))]))  # a new photo needs one


def test_prune_deletes_only_photos_no_run_has_had_for_the_age_given(tmp_path: Path) -> None:
    config = IngestConfig(thumb_size=48, scheduler="synchronous", progress=False)
    kept, gone = photo_bytes(1), photo_bytes(2)
    day = 86400.0
    with FactsCache(tmp_path, config) as cache:  # the first run has both photos
        list(cache.stream([("kept", kept), ("gone", gone)]))
        assert cache.store.prune(30 * day, now=0.0) == 0
    for now, deleted in ((10 * day, 0), (29 * day, 0), (31 * day, 1)):
        with FactsCache(tmp_path, config) as cache:  # later runs have only `kept`
            list(cache.stream([("kept", kept)]))
            assert cache.store.prune(30 * day, now=now) == deleted
    with FactsCache(tmp_path, config) as cache:
        list(cache.stream([("kept", kept), ("gone", gone)]))
        assert (cache.computed, cache.reused) == (1, 1)  # `gone` was deleted, `kept` was not


def test_a_cache_from_before_the_seen_table_keeps_its_photos_for_the_full_age(
    tmp_path: Path,
) -> None:
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute(
        "CREATE TABLE results (version TEXT, sha256 TEXT, value BLOB, "
        "PRIMARY KEY (version, sha256)) WITHOUT ROWID"
    )
    db.execute("CREATE TABLE versions (version TEXT PRIMARY KEY, used_at REAL NOT NULL)")
    db.execute("INSERT INTO results VALUES ('v', ?, x'00')", ("ab" * 32,))
    db.commit()
    db.close()
    with PhotoCache(tmp_path / "old.sqlite", "v") as cache:  # adopts the row as seen now
        assert cache.prune(3600.0) == 0 and cache.count() == 1
    with PhotoCache(tmp_path / "old.sqlite", "v") as cache:
        assert cache.prune(3600.0, now=time.time() + 7200) == 1 and cache.count() == 0


def test_missing_names_what_a_version_does_not_hold_without_reading_values(tmp_path: Path) -> None:
    cache = PhotoCache(tmp_path / "c.sqlite", "v1")
    cache.put("a" * 64, b"1")
    cache.flush()
    cache.put("c" * 64, b"3")  # buffered, not yet committed: held all the same
    assert cache.missing(["b" * 64, "a" * 64, "c" * 64, "b" * 64]) == ["b" * 64]
    assert (cache.hits, cache.misses) == (0, 0)  # lookups of values only are counted
    cache.close()
    assert PhotoCache(tmp_path / "c.sqlite", "v2").missing(["a" * 64]) == ["a" * 64]
