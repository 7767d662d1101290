"""collect.label_map: source labels mapped to classes, or dropped with a reason, at collect."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from stages.collect import MANIFEST, MANIFEST_COLUMNS, collect_report, quarantine_list
from tests.helpers.collect_runs import config, run
from tests.helpers.photos import photo_bytes
from vitrine.config import ConfigError, load_params, stage_config
from vitrine.images import Rejected
from vitrine.ingest.records import InputRecord, LabelDrop, LabelMap, Source, read_record, reject

REPO = Path(__file__).resolve().parents[1]
DOCS_PAGE = REPO / "docs/how-to/own-catalog.md"


def docs_example(part: str) -> str:
    """The block of the docs page's label_map example that follows its `part` marker."""
    text = DOCS_PAGE.read_text()
    marker = f"<!-- label-map-example: {part} -->\n"
    assert text.count(marker) == 1, f"{DOCS_PAGE.name} has no single {marker.strip()}"
    block = text.split(marker, 1)[1]
    fenced = re.match(r"```\w*\n(.*?)\n```", block, re.S)
    if fenced:
        return fenced.group(1)
    return block.split("\n\n", 1)[0]  # a table: up to the first blank line


def markdown_rows(table: str) -> pd.DataFrame:
    lines = [line.strip().strip("|") for line in table.splitlines()]
    header, rows = lines[0], lines[2:]  # lines[1] is the |---| rule
    cells = [[c.strip() for c in line.split("|")] for line in rows]
    return pd.DataFrame(cells, columns=[c.strip() for c in header.split("|")])


def collect_params(params: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's collect block and classes, as the stage loads them."""
    return {"classes": tuple(params["classes"]), **params["collect"]}


def test_the_docs_label_map_example_gives_the_manifest_the_docs_show(tmp_path):
    params = yaml.safe_load(docs_example("params"))
    catalog = docs_example("catalog")
    raw = tmp_path / "raw"
    (raw / "photos").mkdir(parents=True)
    (raw / "ratings.csv").write_text(catalog + "\n")
    paths = pd.read_csv(io.StringIO(catalog))["path"]
    for seed, path in enumerate(paths):
        (raw / path).write_bytes(photo_bytes(seed))
    cfg = config(Source("catalog", "ratings.csv"), **collect_params(params))
    m = run(cfg, raw, tmp_path).reset_index()

    expected = markdown_rows(docs_example("manifest"))
    assert len(m) == len(paths) == len(expected)  # every record accounted for
    got = m[expected.columns].astype(str).sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected.sort_values("id").reset_index(drop=True))
    # magicpin's {1, 2} -> 0, {4, 5} -> 1, 3 dropped: the counts collect reports
    report = collect_report(m)
    assert report["by_class"] == {"0": 2, "1": 2}
    assert report["by_reason"] == {"label_dropped": 1, "label_not_in_classes": 1}
    dropped = quarantine_list(m).set_index("id").loc["p3"]
    assert dropped["reason"] == "label_dropped"
    assert dropped["detail"] == params["collect"]["label_map"]["3"]["drop"]


def test_the_docs_example_loads_as_params_yaml_does():
    params = load_params(REPO / "params.yaml")
    example = yaml.safe_load(docs_example("params"))
    params["classes"] = example["classes"]
    params["collect"]["label_map"] = example["collect"]["label_map"]
    loaded = stage_config(type(config()), "collect", params)
    assert loaded.label_map == {
        "1": "0",
        "2": "0",
        "4": "1",
        "5": "1",
        "3": LabelDrop("neutral rating: neither a poor nor a good photo"),
    }


def test_the_shipped_params_map_nothing():
    assert (
        stage_config(type(config()), "collect", load_params(REPO / "params.yaml")).label_map == {}
    )


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_every_source_kind_maps_its_labels_and_every_record_is_accounted_for(tmp_path):
    raw = tmp_path / "raw"
    files = {
        "shop/Laptops/a.jpg": 1,  # many to one: two source labels, one class
        "shop/notebook/b.jpg": 2,
        "shop/phone/c.jpg": 3,  # not in the map: a class as it is
        "shop/tablet/d.jpg": 4,  # dropped
        "shop/camera/e.jpg": 5,  # not in the map, not a class
    }
    for path, seed in files.items():
        (raw / path).parent.mkdir(parents=True, exist_ok=True)
        (raw / path).write_bytes(photo_bytes(seed))
    # An archive holding one class folder named by a source label: a class tree, not a wrapper.
    (raw / "more.tar.gz").write_bytes(tar_of({"notebook/f.jpg": photo_bytes(6)}))
    (raw / "catalog.csv").write_text("id,label,path\nc1,handset,shop/phone/c.jpg\n")
    label_map = {
        "laptops": "laptop",  # keys match as labels match classes: trimmed, ignoring case
        "Notebook": "laptop",
        "handset": "phone",
        "tablet": {"drop": "tablets are not sold in this category"},
    }
    sources = (Source("folder", "shop"), Source("archive", "more.tar.gz"))
    cfg = config(*sources, Source("catalog", "catalog.csv"), label_map=label_map)
    m = run(cfg, raw, tmp_path)

    assert len(m) == len(files) + 2  # input records == manifest rows
    assert tuple(m.reset_index().columns) == (
        *MANIFEST_COLUMNS[:2],
        "source_label",
        *MANIFEST_COLUMNS[2:],
    )
    want = {
        "Laptops/a.jpg": ("laptop", "Laptops", "accepted", ""),
        "notebook/b.jpg": ("laptop", "notebook", "accepted", ""),
        "phone/c.jpg": ("phone", "phone", "accepted", ""),
        "tablet/d.jpg": ("tablet", "tablet", "quarantined", "label_dropped"),
        "camera/e.jpg": ("camera", "camera", "quarantined", "label_not_in_classes"),
        "notebook/f.jpg": ("laptop", "notebook", "accepted", ""),
        "c1": ("phone", "handset", "accepted", ""),
    }
    got = m[["label", "source_label", "status", "reason"]].apply(tuple, axis=1).to_dict()
    assert got == want
    assert m.loc["tablet/d.jpg", "detail"] == "tablets are not sold in this category"


def test_without_a_map_the_manifest_has_its_columns_and_no_source_label(tmp_path):
    raw = tmp_path / "raw"
    (raw / "shop" / "Phone").mkdir(parents=True)
    (raw / "shop" / "Phone" / "a.jpg").write_bytes(photo_bytes(1))
    m = run(config(Source("folder", "shop")), raw, tmp_path).reset_index()
    assert tuple(m.columns) == MANIFEST_COLUMNS
    assert m["label"].tolist() == ["phone"]
    assert (tmp_path / "out" / MANIFEST).is_file()


def test_what_the_reader_found_and_a_bad_name_come_before_a_drop():
    drop = LabelMap.of({"3": LabelDrop("neutral")})
    unreadable = InputRecord("a", "3", "s", reject("unreadable", "gone"))
    bad_name = InputRecord("b\udcff", "3", "s", lambda: b"")
    dropped = InputRecord("c", " 3 ", "s", lambda: b"never read")
    results = [read_record(r, ("0", "1"), drop)[1] for r in (unreadable, bad_name, dropped)]
    assert [r.code for r in results if isinstance(r, Rejected)] == [
        "unreadable",
        "invalid_utf8",
        "label_dropped",
    ]
    record, _ = read_record(dropped, ("0", "1"), drop)
    assert (record.label, record.source_label) == ("3", " 3 ")


@pytest.mark.parametrize(
    ("label_map", "message"),
    [
        ({"3": "2"}, "collect.label_map.3: expected one of classes ['0', '1'], got '2'"),
        ({"3": 7.5}, "collect.label_map.3: expected a class, or {drop: <reason>}"),
        ({"3": None}, "collect.label_map.3: expected a class, or {drop: <reason>}"),
        ({"3": True}, "collect.label_map.3: expected a class, or {drop: <reason>}"),
        ({"3": {"drop": " "}}, "collect.label_map.3: expected {drop: <reason>} alone"),
        ({"3": {"drop": "x", "to": "1"}}, "collect.label_map.3: expected {drop: <reason>} alone"),
        ({"3": {"dorp": "x"}}, "collect.label_map.3: expected a class, or {drop: <reason>}"),
        (["3"], "collect.label_map: expected dict"),
        ({" ": "0"}, "collect.label_map: expected source labels that are not blank"),
        ({"Good": "1", "good ": "1"}, "('Good' and 'good ' are one label)"),
    ],
)
def test_a_bad_label_map_is_refused_at_load_with_the_key_named(label_map, message):
    params = load_params(REPO / "params.yaml")
    params["classes"] = ["0", "1"]
    params["collect"]["label_map"] = label_map
    with pytest.raises(ConfigError) as refused:
        stage_config(type(config()), "collect", params)
    assert message in str(refused.value)


def test_numbers_stand_for_their_digits_as_yaml_reads_them():
    params = load_params(REPO / "params.yaml")
    params["classes"] = ["0", "1"]
    params["collect"]["label_map"] = yaml.safe_load("{1: 0, 5: 1, 3: {drop: neutral}}")
    loaded = stage_config(type(config()), "collect", params)
    assert loaded.label_map == {"1": "0", "5": "1", "3": LabelDrop("neutral")}


def test_a_mapped_class_takes_the_class_s_own_spelling():
    loaded = config(label_map={"notebook": " Laptop"})
    assert loaded.label_map == {"notebook": "laptop"}
