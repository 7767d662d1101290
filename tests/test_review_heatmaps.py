"""The review queue's heat maps: `python -m pipeline.heatmaps` (pipeline/heatmaps.py) on a tiny
packaged model and a tiny queue, which classes they are drawn for and where they lie
(vitrine/production/heatmaps.py)."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import heatmaps as command
from tests.helpers.photos import photo_bytes
from tests.helpers.records import record_config, sample_answer
from tests.helpers.tiny_package import package_tiny_model
from vitrine.contracts import ServeConfig, read_packaged
from vitrine.production.heatmaps import (
    ALTERNATIVE,
    ANSWERED,
    heatmap_path,
    heatmap_root,
    prune,
    queue_maps,
    targets,
)
from vitrine.production.photos import PhotoStore
from vitrine.production.records import AnswerRecord, RecordStore

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

GAIN = np.array([[1.0, -0.5], [-1.0, 1.5]])
CLASSES = ("laptop", "phone")


def test_the_maps_lie_beside_the_photo_store_not_inside_it(tmp_path: Path) -> None:
    root = heatmap_root(tmp_path / "production" / "photos")
    assert root == tmp_path / "production" / "photos-heatmaps"
    assert heatmap_root(f"{tmp_path}/photos/") == tmp_path / "photos-heatmaps"
    assert heatmap_path(root, "cnn64-abc", "ff00", 1) == root / "cnn64-abc" / "ff00.1.png"


def test_an_answer_gets_the_answered_class_and_the_declared_or_runner_up_one() -> None:
    def drawn(answer: AnswerRecord) -> list[tuple[str, int, str]]:
        return [(t.which, t.class_index, t.role) for t in targets(answer, CLASSES)]

    assert drawn(sample_answer(4)) == [(ANSWERED, 0, "answered"), (ALTERNATIVE, 1, "runner-up")]
    mismatch = sample_answer(9, declared="laptop")  # answered phone, declared laptop
    assert drawn(mismatch) == [(ANSWERED, 1, "answered"), (ALTERNATIVE, 0, "declared")]
    agreed = sample_answer(9, declared="phone")
    assert drawn(agreed) == [(ANSWERED, 1, "answered"), (ALTERNATIVE, 0, "runner-up")]
    unknown = sample_answer(9, declared="tablet")  # a category the model does not know
    assert drawn(unknown)[1] == (ALTERNATIVE, 0, "runner-up")
    # A taxonomy ancestor answered: the maps are of its most probable class and the next.
    three = ("a", "b", "c")
    probabilities = {"a": 0.2, "b": 0.5, "c": 0.3}
    ancestor = replace(sample_answer(1), label="Fruit", probabilities=probabilities)
    assert [t.class_index for t in targets(ancestor, three)] == [1, 2]
    assert [t.which for t in targets(sample_answer(1), ("laptop",))] == [ANSWERED]


def test_queue_maps_link_only_what_is_drawn(tmp_path: Path) -> None:
    answer = sample_answer(9, declared="laptop")
    path = heatmap_path(tmp_path, "v1", answer.image_sha256, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"png")
    assert queue_maps(answer, CLASSES, tmp_path, "v1") == [
        {
            "which": ANSWERED,
            "class": "phone",
            "role": "answered",
            "url": f"/review/heatmap/{answer.request_id}/answered",
        },
        {"which": ALTERNATIVE, "class": "laptop", "role": "declared", "url": None},
    ]
    assert [m["url"] for m in queue_maps(answer, CLASSES, tmp_path, "v2")] == [None, None]


def test_prune_removes_the_maps_of_deleted_photos_and_stale_temporaries(tmp_path: Path) -> None:
    photos, root = tmp_path / "photos", tmp_path / "photos-heatmaps"
    PhotoStore(photos, 0, 0).keep(b"kept", "aa11")
    for version, name in [("v1", "aa11.0.png"), ("v1", "bb22.0.png"), ("v0", "bb22.1.png")]:
        (root / version).mkdir(parents=True, exist_ok=True)
        (root / version / name).write_bytes(b"png")
    fresh, stale = root / "v1" / ".cc33.0.png.1.tmp", root / "v1" / ".dd44.0.png.2.tmp"
    fresh.write_bytes(b"half")
    stale.write_bytes(b"half")
    old = stale.stat().st_mtime - 7200
    os.utime(stale, (old, old))
    assert prune(root, photos) == 2
    assert sorted(p.name for p in root.rglob("*")) == [".cc33.0.png.1.tmp", "aa11.0.png", "v1"]
    assert prune(tmp_path / "none", photos) == 0


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path, RecordStore]:
    """A tiny packaged cnn64 (untrained) recording into tmp_path: (project dir, package, store)."""
    record = record_config(tmp_path / "records")
    serve = ServeConfig(1_000_000, 4_000_000, 32, 6, 2_000_000, 8, 2.0, 1, 1, record=record)
    package = package_tiny_model(tmp_path, serve, GAIN, value_gain=GAIN, review_cost=0.8)
    store = RecordStore(record.url)
    store.migrate()
    return tmp_path, package, store


def test_the_command_draws_two_maps_per_queued_photo_and_accounts_for_every_one(
    project: tuple[Path, Path, RecordStore], capsys: pytest.CaptureFixture[str]
) -> None:
    project_dir, package, store = project
    info = read_packaged(package)
    photos = Path(info.serve.record.photos)
    confident, doubtful = sample_answer(9), sample_answer(4)  # only the doubtful one is queued
    mismatch = sample_answer(9, declared="laptop")
    gone, broken = sample_answer(3, abstain=True), sample_answer(7, abstain=True)
    store.insert([confident, doubtful, mismatch, gone, broken])
    kept = PhotoStore(photos, 0, 0)
    for i, a in enumerate([confident, doubtful, mismatch]):
        kept.keep(photo_bytes(i, size=(640, 480)), a.image_sha256)
    kept.keep(b"not a photo", broken.image_sha256)
    try:
        assert command.main([str(project_dir), "--package", str(package)]) == 0
        out = capsys.readouterr().out
        assert "4 queued answer(s) on the float network" in out
        assert "2 drawn (4 maps), 0 drawn before, 2 left out" in out
        assert f"left out: {gone.request_id}: photo_missing" in out
        assert f"left out: {broken.request_id}: not_an_image (text file)" in out
        root = heatmap_root(photos) / info.weights
        drawn = {
            doubtful.image_sha256 + ".0.png",  # answered laptop, runner-up phone
            doubtful.image_sha256 + ".1.png",
            mismatch.image_sha256 + ".1.png",  # answered phone, declared laptop
            mismatch.image_sha256 + ".0.png",
        }
        assert {p.name for p in root.iterdir()} == drawn
        for path in root.iterdir():
            with Image.open(io.BytesIO(path.read_bytes())) as image:
                assert image.format == "PNG" and image.size == (128, 128)

        # Again: nothing new to draw; then retention deletes a photo and its maps go.
        before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
        again = command.draw_from_params(project_dir, package)
        assert (again["drawn"], again["drawn_before"], again["pruned"]) == (0, 2, 0)
        assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before
        kept.path(mismatch.image_sha256).unlink()
        pruned = command.draw_from_params(project_dir, package)
        assert pruned["pruned"] == 2 and pruned["by_reason"]["photo_missing"] == 2
        left = {doubtful.image_sha256 + ".0.png", doubtful.image_sha256 + ".1.png"}
        assert {p.name for p in root.iterdir()} == left
    finally:
        store.close()


def test_a_model_pt_unlike_model_json_is_refused(
    project: tuple[Path, Path, RecordStore], capsys: pytest.CaptureFixture[str]
) -> None:
    project_dir, package, store = project
    store.close()
    info = json.loads((package / "model.json").read_text())
    info["weights_version"] = "cnn64-000000000000"
    (package / "model.json").write_text(json.dumps(info))
    assert command.main([str(project_dir), "--package", str(package)]) == 1
    assert "is not the network model.json describes" in capsys.readouterr().err
    assert command.main([str(project_dir), "--package", str(project_dir / "none")]) == 1
    assert "no packaged model at" in capsys.readouterr().err


def test_a_database_the_service_never_wrote_to_is_said_in_one_line(
    project: tuple[Path, Path, RecordStore], capsys: pytest.CaptureFixture[str]
) -> None:
    project_dir, package, store = project
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE reviews")
        connection.exec_driver_sql("DROP TABLE answers")
    store.close()
    assert command.main([str(project_dir), "--package", str(package)]) == 1
    err = capsys.readouterr().err
    assert "has no recorded answers: the service creates its tables" in err
    assert len(err.strip().splitlines()) == 1
