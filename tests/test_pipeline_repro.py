"""End to end: `dvc repro` of the whole pipeline on 60 real Avito photos in a copy of the repo."""

import json
import os
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers.tiny_project import add_file, dvc, set_params, tiny_project

pytestmark = pytest.mark.slow
PER_CLASS = 30


def _broken_files(archive: tarfile.TarFile, label: str, photo: bytes) -> None:
    """A corrupt JPEG and a text file named like a photo, beside the first phone photo."""
    if label == "phone":
        add_file(archive, "raw_data/phone/corrupt.jpg", photo[: len(photo) // 2])
        add_file(archive, "raw_data/laptop/readme.jpg", b"this is not a photo\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """30 real photos per class plus the two broken files, every candidate for one epoch."""
    repo = tiny_project(
        tmp_path_factory.mktemp("repo"),
        PER_CLASS,
        params={"validate.min_images_per_class": 10},
        extra=_broken_files,
    )
    dvc(repo, "repro")
    return repo


def test_every_input_is_accounted_for(repo):
    manifest = pd.read_parquet(repo / "data/collected/manifest.parquet").set_index("id")
    assert len(manifest) == 2 * PER_CLASS + 2
    assert manifest.loc["phone/corrupt.jpg", "reason"] == "truncated"
    assert manifest.loc["laptop/readme.jpg", "reason"] == "not_an_image"
    report = json.loads((repo / "reports/collect.json").read_text())
    assert report["quarantined"] == 2 and report["accepted"] == 2 * PER_CLASS


def test_every_stage_left_its_outputs(repo):
    validation = json.loads((repo / "reports/validate.json").read_text())
    assert validation["success"] is True
    assert (repo / "reports/validate/docs/index.html").exists()
    deduped = pd.read_parquet(repo / "data/deduped/manifest.parquet")
    assert len(deduped) == 2 * PER_CLASS + 2 and "cluster_id" in deduped
    prepared = pd.read_parquet(repo / "data/prepared/manifest.parquet")
    assert set(prepared["split"]) == {"train", "val", "test"}
    candidates = yaml.safe_load((repo / "params.yaml").read_text())["candidates"]
    for name in candidates:
        assert json.loads((repo / f"reports/train/{name}.json").read_text())["epochs"] == 1
    metrics = json.loads((repo / "reports/evaluate.json").read_text())
    assert metrics["winner"] in candidates and set(metrics["ranking"]) == set(candidates)
    assert metrics["test"]["n"] == (prepared["split"] == "test").sum()
    assert 0 <= metrics["test"]["business_weighted_accuracy"] <= 1
    # The reviewed catalog ships with its header only: no reviewed photo, no figure, no error.
    assert metrics["reviewed"] == {
        "source": "catalog:reviewed/catalog.csv",
        "n": 0,
        "accuracy": None,
        "business_weighted_accuracy": None,
    }
    assert json.loads((repo / "reports/promotion.json").read_text())["promoted"] is True
    assert (repo / "models/package/model.pt").exists()
    # prepare's resize rule travels with the arrays to the packaged model the service reads.
    prepare = yaml.safe_load((repo / "params.yaml").read_text())["prepare"]
    made = json.loads((repo / "data/prepared/preprocessing.json").read_text())
    assert made == {"image_size": prepare["image_size"], "resize": prepare["resize"]}
    assert json.loads((repo / "models/package/model.json").read_text())["resize"] == made["resize"]


def test_second_repro_runs_nothing_but_the_inventory(repo):
    out = dvc(repo, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"inventory"}  # always_changed: it looks at the sources every time
    assert json.loads(dvc(repo, "status", "--json")) == {"inventory": ["always changed"]}


def test_changing_a_candidate_param_retrains_that_candidate_only(repo):
    set_params(repo, **{"candidates.cnn64.lr": 0.0005})
    # evaluate reads the candidates block (their names), so it is listed as changed too.
    changed = set(json.loads(dvc(repo, "status", "--json")))
    assert changed == {"inventory", "train@cnn64", "evaluate"}
    out = dvc(repo, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"inventory", "train@cnn64", "evaluate", "package"}


def test_collect_runs_over_a_folder_that_dvc_itself_cannot_walk(repo, make_photo):
    """DVC's walk of a folder dies on a link loop or a non-UTF-8 name and hangs on a FIFO:
    through the inventory, `dvc repro collect` completes and accounts for every entry."""
    folder = repo / "data/raw/extra"
    (folder / "phone").mkdir(parents=True)
    (folder / "phone" / "a.jpg").write_bytes(make_photo(1))
    os.symlink("loop.jpg", folder / "phone" / "loop.jpg")
    os.mkfifo(folder / "phone" / "pipe.jpg")
    (folder / "phone" / os.fsdecode(b"caf\xe9.jpg")).write_bytes(make_photo(2))
    sources = yaml.safe_load((repo / "params.yaml").read_text())["collect"]["sources"]
    set_params(repo, **{"collect.sources": [*sources, {"kind": "folder", "path": "extra"}]})
    dvc(repo, "repro", "collect")
    m = pd.read_parquet(repo / "data/collected/manifest.parquet")
    extra = m[m["source"] == "folder:extra"].set_index("id")["reason"].fillna("").to_dict()
    assert extra == {
        "phone/a.jpg": "",
        "phone/caf\\xe9.jpg": "invalid_utf8",
        "phone/loop.jpg": "unreadable",
        "phone/pipe.jpg": "not_a_regular_file",
    }
    assert len(m) == 2 * PER_CLASS + 2 + 4
