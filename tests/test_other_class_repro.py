"""End to end with the other class on: `dvc repro` of a copy of the repo on 30 real Avito photos
per class plus 40 of the off-category photos review found in the bundled data, decided `other`
in the decisions file, as params.yaml ships it when other_class is set."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import REPO
from tests.helpers.tiny_project import ARCHIVE, add_file, dvc, tiny_project

pytestmark = pytest.mark.slow
PER_CLASS = 30
OFF_CATEGORY = 40


def off_category_ids() -> list[str]:
    """The photos the bundled decisions say are neither a laptop nor a phone (`other`, or a
    drop noted so), the first OFF_CATEGORY of them."""
    with (REPO / "data/review/decisions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        r["id"]
        for r in rows
        if r["decision"] == "other"
        or (r["decision"] == "drop" and r["note"].startswith("neither a laptop nor a phone"))
    ][:OFF_CATEGORY]


def add_off_category(archive: tarfile.TarFile, label: str, photo: bytes) -> None:
    """Beside the first laptop photo: the off-category photos past the first PER_CLASS."""
    if label != "laptop":
        return
    wanted = {f"raw_data/{i}" for i in off_category_ids()}
    seen: dict[str, int] = {}
    with tarfile.open(ARCHIVE) as src:
        for m in src:
            if not m.isfile():
                continue
            folder = m.name.split("/")[-2]
            seen[folder] = seen.get(folder, 0) + 1
            if m.name in wanted and seen[folder] > PER_CLASS:
                add_file(archive, m.name, src.extractfile(m).read())  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tiny_project(
        tmp_path_factory.mktemp("repo"),
        PER_CLASS,
        candidates=("cnn64",),
        params={
            "classes": ["laptop", "phone", "other"],
            "other_class": "other",
            "validate.min_images_per_class": 10,
            "evaluate.business_value": {"laptop": 1.0, "phone": 1.5, "other": 1.0},
            "evaluate.cost_matrix": [
                ["phone", "laptop", 1.0],
                ["laptop", "phone", 0.5],
                ["other", "phone", 1.5],
                ["other", "laptop", 1.0],
            ],
        },
        extra=add_off_category,
    )
    lines = ["id,decision,new_label,note"]
    lines += [f"{i},other,,neither a laptop nor a phone" for i in off_category_ids()]
    (repo / "data/review/decisions.csv").write_text("\n".join(lines) + "\n")
    dvc(repo, "repro")
    return repo


def test_the_off_category_photos_are_other_examples_in_every_split(repo: Path) -> None:
    deduped = pd.read_parquet(repo / "data/deduped/manifest.parquet").set_index("id")
    ids = [i for i in off_category_ids() if i in deduped.index]
    assert len(ids) >= OFF_CATEGORY - 5  # a few are copies of one another
    assert set(deduped.loc[ids, "label"]) == {"other"}
    assert not (deduped["status"] == "dropped").any()
    prepared = pd.read_parquet(repo / "data/prepared/manifest.parquet")
    assert set(prepared.loc[prepared["label"] == "other", "split"]) == {"train", "val", "test"}


def test_evaluate_reports_the_open_set_and_package_ships_the_other_class(repo: Path) -> None:
    report = json.loads((repo / "reports/evaluate.json").read_text())
    open_set = report["open_set"]
    prepared = pd.read_parquet(repo / "data/prepared/manifest.parquet")
    test = prepared[prepared["split"] == "test"]
    assert open_set["other_class"] == "other"
    assert open_set["test"]["off_category_photos"] == (test["label"] == "other").sum()
    assert open_set["test"]["known_photos"] == (test["label"] != "other").sum()
    assert 0 <= open_set["test"]["open_set_recall"] <= 1
    info = json.loads((repo / "models/package/model.json").read_text())
    assert info["classes"] == ["laptop", "phone", "other"] and info["other_class"] == "other"
    promotion = json.loads((repo / "reports/promotion.json").read_text())
    assert promotion["promoted"] and "open_set_recall" in promotion["challenger"]["scores"]
