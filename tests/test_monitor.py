"""The `monitor` flow over a throwaway project in tmp_path: an answers database, kept photos,
evaluate's test predictions and prepared test photos. A crossed threshold starts the retrain
flow (a recorder stands in for it), a window like the test set starts nothing, and an empty
database or window is a report that says so."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

import pipeline.monitor
from pipeline.monitor import REPORT_KEY, MonitorResult, monitor
from pipeline.workspace import WorkspaceBusy
from tests.helpers import PREFECT_START_TIMEOUT_S, REPO
from tests.helpers.html import Text
from tests.helpers.photos import encode, photo_bytes
from tests.helpers.records import sample_answer
from vitrine.images import load_square
from vitrine.production.photos import PhotoStore
from vitrine.production.recorder import photo_sha256
from vitrine.production.records import RecordStore

UNTIL = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
SIZE = 128  # prepare.image_size
MONITOR = {
    "window_hours": 6,
    "min_answers": 20,
    "min_reviewed": 5,
    "min_photos": 10,
    "photo_sample": 16,
    "test_sample": 16,
    "permutations": 200,
}


@pytest.fixture(scope="module", autouse=True)
def prefect_backend() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_START_TIMEOUT_S):
        yield


class RetrainRecorder:
    """Stands in for pipeline.flows.retrain: records its calls, or raises `error`."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.error = error

    def __call__(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        return {"stages": []}


@pytest.fixture
def retrain(monkeypatch: pytest.MonkeyPatch) -> RetrainRecorder:
    recorder = RetrainRecorder()
    monkeypatch.setattr(pipeline.monitor, "retrain", recorder)
    monkeypatch.delenv("VITRINE_RECORD_URL", raising=False)
    return recorder


def make_project(root: Path) -> Path:
    """params.yaml as shipped but for serve.record (a relative SQLite path, photos/) and a
    small monitor: block; 40 test photos and their predictions, half laptop, half phone."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["serve"]["record"].update(url="sqlite:///answers.sqlite", photos="photos")
    params["monitor"].update(MONITOR)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    prepared = root / params["paths"]["prepared"]
    prepared.mkdir(parents=True)
    np.save(prepared / "test.npy", np.stack([load_square(photo_bytes(s), SIZE) for s in range(40)]))
    answers = [sample_answer(i) for i in range(40)]
    predictions = pd.DataFrame(
        {
            "label": [a.label for a in answers],
            "predicted": [a.label for a in answers],
            "confidence": [a.confidence for a in answers],
            "abstained": False,
        }
    )
    path = root / params["paths"]["predictions"]
    path.parent.mkdir(parents=True)
    predictions.to_parquet(path)
    return root


def record(project: Path, indices: range, photo: Any) -> list[str]:
    """Answers i in `indices` (sample_answer's) in the hour before UNTIL, each about its own
    photo photo(i), kept as the service keeps them. Returns the photos' SHA-256."""
    photos = PhotoStore(project / "photos", keep_days=0, keep_bytes=0)
    store = RecordStore(f"sqlite:///{project / 'answers.sqlite'}")
    store.migrate()
    records, shas = [], []
    for n, i in enumerate(indices):
        data = photo(i)
        sha = photo_sha256(data)
        photos.keep(data, sha)
        at = UNTIL - timedelta(minutes=1 + n)
        records.append(dataclasses.replace(sample_answer(i, at=at), image_sha256=sha))
        shas.append(sha)
    store.insert(records)
    store.close()
    return shas


def noise_photo(i: int) -> bytes:
    """Nothing like the test photos: grey-level noise."""
    pixels = np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 1), np.uint8).repeat(3, 2)
    return encode(Image.fromarray(pixels), "PNG")


def run(project: Path) -> tuple[MonitorResult, dict[str, Any], str]:
    result = monitor(project_dir=project, until=UNTIL)
    report = json.loads((project / "reports/monitor.json").read_text())
    page = Text()
    page.feed((project / "reports/monitor.html").read_text())
    return result, report, page.text


def test_a_shifted_window_starts_the_retrain_flow(tmp_path: Path, retrain: RetrainRecorder) -> None:
    project = make_project(tmp_path / "p")
    # Only laptops (p(phone) < 0.5) and noise photos: class mix and images both drift.
    record(project, range(0, 200, 10), noise_photo)
    record(project, range(1, 200, 10), noise_photo)

    result, report, page = run(project)

    assert {"psi", "chi2_p_value", "mmd_p_value"} <= set(result["crossed"])
    assert result["crossed"] == report["crossed"]
    assert result["retrain_started"] and report["retrain"]["started"]
    assert retrain.calls == [{"project_dir": project}]
    assert report["class_mix"]["recent"] == {"laptop": 1.0}
    assert report["images"]["embedded"] == MONITOR["photo_sample"]
    assert report["images"]["p_value"] < 0.01
    assert "Drift: psi, chi2_p_value" in page
    assert "The retrain flow was started." in page
    with get_client(sync_client=True) as client:
        path = {"id": result["artifact_id"]}
        artifact = client.request("GET", "/artifacts/{id}", path_params=path).json()
    assert artifact["key"] == REPORT_KEY
    assert "**Crossed: psi, chi2_p_value, mmd_p_value" in artifact["data"]


def test_a_window_like_the_test_set_starts_nothing(
    tmp_path: Path, retrain: RetrainRecorder
) -> None:
    project = make_project(tmp_path / "p")
    shas = record(project, range(100, 140), photo_bytes)
    for sha in sorted(shas)[:3]:  # the lowest hashes are sampled first
        (project / "photos" / sha[:2] / sha).unlink()

    result, report, page = run(project)

    assert result["crossed"] == [] and not result["retrain_started"]
    assert retrain.calls == []
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["psi"]["judged"] and checks["psi"]["value"] < 0.01
    assert checks["mmd_p_value"]["judged"] and checks["mmd_p_value"]["value"] > 0.01
    assert not checks["mismatch_rate"]["judged"]  # no /check_category answers
    assert report["images"]["missing"] == 3
    assert report["images"]["embedded"] == MONITOR["photo_sample"]
    assert report["answers"]["answers"] == 40 and report["answers"]["per_hour"][-1] == 40
    assert "3 sampled photos were deleted by retention." in page
    assert "No threshold crossed." in page


def test_an_empty_database_or_window_is_reported(tmp_path: Path, retrain: RetrainRecorder) -> None:
    project = make_project(tmp_path / "p")

    _, report, page = run(project)

    assert not (project / "answers.sqlite").exists()  # the monitor never creates it
    assert "No answers database at sqlite:///" in page
    assert report["answers"]["answers"] == 0 and report["crossed"] == []
    assert not any(c["judged"] for c in report["checks"])

    record(project, range(3), photo_bytes)  # in the hour before UNTIL...
    result = monitor(project_dir=project, until=UNTIL - timedelta(days=2))  # ... not this window
    report = json.loads((project / "reports/monitor.json").read_text())
    assert report["notes"][0] == "No answers in the window."
    assert report["answers"]["previous_window_answers"] == 0
    assert result["crossed"] == [] and retrain.calls == []


def test_a_running_retrain_is_left_to_finish(tmp_path: Path, retrain: RetrainRecorder) -> None:
    retrain.error = WorkspaceBusy("flow run 'other' holds the workspace")
    project = make_project(tmp_path / "p")
    record(project, range(0, 300, 10), photo_bytes)  # all laptops

    result, report, page = run(project)

    assert "psi" in result["crossed"] and len(retrain.calls) == 1
    assert not result["retrain_started"] and not report["retrain"]["started"]
    assert "holds the workspace" in report["retrain"]["reason"]
    assert "holds the workspace" in page


def test_report_only_crosses_without_retraining(tmp_path: Path, retrain: RetrainRecorder) -> None:
    """`python -m pipeline.monitor --report-only`: a look at the day that cannot start a retrain,
    whatever monitor.retrain says."""
    project = make_project(tmp_path / "p")
    record(project, range(0, 300, 10), photo_bytes)  # all laptops

    result = monitor(project_dir=project, until=UNTIL, report_only=True)
    report = json.loads((project / "reports/monitor.json").read_text())

    assert "psi" in result["crossed"] and retrain.calls == []
    assert not result["retrain_started"] and not report["retrain"]["started"]
    assert report["retrain"]["reason"] == "Retraining is off (--report-only)."
