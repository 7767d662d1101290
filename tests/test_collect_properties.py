"""Property-based tests of collect's readers and of the stage's core (hypothesis).

For every source kind and the record reader, whatever the bytes, names (UTF-8 or not), member
types, encodings and row shapes: exactly one manifest row per input record, no exception,
nothing read outside the source's root, at most max_bytes per record and a bounded memory peak,
no FIFO or device opened (so no hang). The strategies and checks are in
tests/helpers/collect_fuzz.py; benchmarks/fuzz_collect.py runs them for minutes.

CI runs the "ci" profile: derandomized and without an example database, so a run is repeatable;
HYPOTHESIS_PROFILE=dev explores new examples each run.
"""

from __future__ import annotations

import os
import tarfile

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.collect import collect
from tests.helpers import collect_fuzz as fuzz
from tests.helpers import url_fuzz
from tests.helpers.collect_runs import config
from tests.helpers.hostile import open_tar, tar_member
from vitrine.ingest.records import Source

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@settings(max_examples=40)
@given(fuzz.folder_specs())
def test_folder_source(spec):
    fuzz.check_folder(*spec)


@settings(max_examples=40)
@given(fuzz.tar_specs())
def test_tar_source_any_compression(spec):
    fuzz.check_tar(*spec)


@settings(max_examples=40)
@given(fuzz.zip_specs())
def test_zip_source(spec):
    fuzz.check_zip(*spec)


@settings(max_examples=40)
@given(fuzz.catalog_rows, st.booleans(), fuzz.max_bytes_values, st.sampled_from(fuzz.ENCODINGS))
def test_csv_catalog(rows, bom, max_bytes, encoding):
    fuzz.check_csv(rows, bom, max_bytes, encoding)


@settings(max_examples=40)
@given(fuzz.catalog_rows, st.booleans(), fuzz.max_bytes_values, st.sampled_from(fuzz.ENCODINGS))
def test_jsonl_catalog(rows, bom, max_bytes, encoding):
    fuzz.check_jsonl(rows, bom, max_bytes, encoding)


@settings(max_examples=30)
@given(st.binary(max_size=2000), st.booleans(), fuzz.max_bytes_values)
def test_a_catalog_of_arbitrary_bytes(data, jsonl, max_bytes):
    fuzz.check_raw_catalog(data, jsonl, max_bytes)


@settings(max_examples=150)
@given(fuzz.record_specs())
def test_record_reader(spec):
    fuzz.check_record(*spec)


@settings(max_examples=12)
@given(fuzz.folder_specs(), st.lists(st.tuples(fuzz.member_paths, fuzz.contents), max_size=6))
def test_the_stage_writes_one_manifest_row_per_record(folder, members):
    """Through collect itself, image checks and parquet included: the manifest is written
    (non-UTF-8 names and all) and holds one row per input."""
    entries, max_bytes = folder
    with fuzz.scratch() as area:
        _, made = fuzz.build_folder(area, entries, max_bytes)
        with open_tar(area / "a.tar") as tf:
            for n, (name, content) in enumerate(members):
                tar_member(tf, name, fuzz.content_bytes(content, max_bytes, n), tarfile.REGTYPE)
        cfg = config(Source("folder", "src"), Source("archive", "a.tar"), max_bytes=max_bytes)
        with fuzz.deadline(fuzz.HANG_S):
            manifest = collect(cfg, area, area / "out", cache=area / "cache")
        m = pd.read_parquet(manifest)
    assert len(m) == len(made) + len(members)
    assert m["status"].isin(["accepted", "quarantined"]).all()
    assert sorted(m.loc[m["source"] == "folder:src", "id"]) == sorted(made)


@settings(max_examples=40)
@given(url_fuzz.url_rows, url_fuzz.max_bytes_values, st.sampled_from(["open", "shipped", "lab"]))
def test_catalog_url_rows_against_a_hostile_server(rows, max_bytes, policy):
    """Arbitrary answers (bytes, lying framing, redirects anywhere, drips, endless bodies) and
    arbitrary URL text: one row each, a documented reason, at most max_bytes, no hang; the
    private-network policy holds on every redirect hop."""
    url_fuzz.check_url_catalog(rows, max_bytes, policy)
