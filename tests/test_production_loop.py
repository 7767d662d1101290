"""The production loop end to end, on SQLite and on a real PostgreSQL server: a model trained by
`dvc repro` on a few real Avito photos is served by the real BentoML server, which records its
answers; moderators review them through the review API; their labels are exported and the
retrain flow trains on them.

The expensive part, the first `dvc repro` (the cheapest candidate, one epoch), runs once per
module; each database gets its own copy of the trained project, served from the copy as `make
serve` serves the repository (relative serve.record paths read from there). The photos uploaded
are real Avito photos the tiny archive leaves out, so each reviewed one is a new photo to the
pipeline rather than a duplicate of a training one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from pipeline.feedback import catalog_path
from pipeline.flows import retrain
from tests.helpers import PREFECT_START_TIMEOUT_S
from tests.helpers.records import wait_for
from tests.helpers.server import start_server, stop
from tests.helpers.tiny_project import dvc, photos_left_out, read_params, tiny_project
from vitrine.production.recorder import photo_sha256
from vitrine.production.records import RECORD_URL_ENV, RecordStore
from vitrine.production.reviews import history, latest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]

PER_CLASS = 30  # photos per class the pipeline trains on
CANDIDATES = ("cnn64",)  # the cheapest candidate alone: the loop needs a model, not a contest
UPLOADS = 5  # photos per class the tests upload, none of them among the training ones
TOKEN = "production-loop-review-token"
REVIEWED_SOURCE = "catalog:reviewed/catalog.csv"
REVIEW_TOKEN_ENV = "VITRINE_REVIEW_TOKEN"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after `dvc repro`: its model packaged into the copy's BentoML store."""
    repo = tiny_project(
        tmp_path_factory.mktemp("trained") / "repo",
        PER_CLASS,
        candidates=CANDIDATES,
        params={
            "validate.min_images_per_class": 10,
            "serve.by_candidate": {},  # one serving process: the quickest to start
            "package.build_bento": False,  # the service serves the model store's model
        },
    )
    dvc(repo, "repro")
    return repo


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_START_TIMEOUT_S):
        yield


@pytest.fixture(scope="module")
def uploads() -> dict[str, list[bytes]]:
    return photos_left_out(PER_CLASS, UPLOADS)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """VITRINE_RECORD_URL for the service, the export and the flow alike: a new PostgreSQL
    database; for SQLite none, so that params.yaml's relative serve.record.url stands."""
    if request.param == "sqlite":
        monkeypatch.delenv(RECORD_URL_ENV, raising=False)
        return None
    url = request.getfixturevalue("postgres_url")
    monkeypatch.setenv(RECORD_URL_ENV, url)
    return url


def image(data: bytes, name: str = "upload.jpg") -> tuple[str, tuple[str, bytes, str]]:
    return ("image", (name, data, "application/octet-stream"))


def upload_everything(
    client: httpx.Client, photos: dict[str, list[bytes]]
) -> tuple[dict[str, str], dict[str, bool]]:
    """Every upload of the loop: the true class of each answer the client received, by
    request_id, and each /check_category answer's `matches`."""
    laptop, phone = photos["laptop"], photos["phone"]
    truth: dict[str, str] = {}
    matches: dict[str, bool] = {}

    def answered(response: httpx.Response, label: str) -> dict[str, Any]:
        assert response.status_code == 200, response.text
        body = response.json()
        assert response.headers["x-request-id"] == body["request_id"] not in truth
        truth[body["request_id"]] = label
        return body

    answered(client.post("/classify", files=[image(laptop[0])]), "laptop")
    answered(client.post("/classify", files=[image(phone[0])]), "phone")
    checks = [
        (laptop[1], "laptop", "laptop"),  # (photo, its class, the declared category)
        (phone[1], "phone", "phone"),
        (laptop[2], "laptop", "phone"),  # declared under the wrong category
        (phone[2], "phone", "laptop"),
        (laptop[3], "laptop", "phone"),
        (phone[3], "phone", "laptop"),
    ]
    for photo, label, declared in checks:
        response = client.post(
            "/check_category", files=[image(photo)], data={"declared_category": declared}
        )
        body = answered(response, label)
        assert body["declared"] == declared
        assert body["matches"] == (body["predicted"] == declared)
        matches[body["request_id"]] = body["matches"]
    batch = client.post(
        "/classify_batch",
        files=[image(laptop[4]), image(b"<html>not a photo</html>", "bad.jpg"), image(phone[4])],
    )
    assert batch.status_code == 200, batch.text
    first, bad, last = batch.json()["results"]
    assert "request_id" not in bad and bad["error"]
    for result, label in ((first, "laptop"), (last, "phone")):
        assert result["request_id"] not in truth
        truth[result["request_id"]] = label
    refused = client.post("/classify", files=[image(b"this is not a photo\n")])
    assert refused.status_code == 422 and "x-request-id" not in refused.headers
    assert "request_id" not in refused.json()
    return truth, matches


def review(client: httpx.Client, request_id: str, label: str, reviewer: str) -> dict[str, Any]:
    response = client.post(
        "/review", json={"request_id": request_id, "label": label, "reviewer": reviewer}
    )
    assert response.status_code == 200, response.text
    return response.json()


def queue_ids(client: httpx.Client) -> list[str]:
    response = client.get("/review/queue", params={"limit": 500})
    assert response.status_code == 200, response.text
    return [a["request_id"] for a in response.json()["answers"]]


def other(label: str, classes: list[str]) -> str:
    return next(c for c in classes if c != label)


def test_reviewed_answers_come_back_as_training_photos(
    trained: Path,
    database: str | None,
    uploads: dict[str, list[bytes]],
    prefect_api: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(trained, repo, symlinks=True)
    params = read_params(repo)
    classes = params["classes"]
    url = database or f"sqlite:///{repo / 'data/production/answers.sqlite'}"
    home = repo / ".bentoml"

    # 1. The packaged model served from the project, recording every answer.
    server = start_server(
        home,
        params["package"]["model_name"],
        tmp_path / "server.log",
        env={REVIEW_TOKEN_ENV: TOKEN},
        cwd=repo,
    )
    store = RecordStore(url)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            # 2. Uploads: single photos, category checks (some under the wrong category), a
            # batch with one bad part, and a refused upload.
            truth, matches = upload_everything(client, uploads)
            wait_for(lambda: store.count() == len(truth))

            # 3. Reviews: the queue's answers, each labelled as its photo truly is.
            client.headers["Authorization"] = f"Bearer {TOKEN}"
            queued = queue_ids(client)
            mismatched = [rid for rid, matched in matches.items() if not matched]
            assert mismatched, "no /check_category answer differed from its declared category"
            assert set(mismatched) <= set(queued) <= set(truth)
            twice = queued[0]  # first labelled wrongly, then corrected by another moderator
            first = review(client, twice, other(truth[twice], classes), "ana")
            for rid in queued:
                review(client, rid, truth[rid], "boris")
            # A /classify and a batch answer too, queued or not: a moderator may label any
            # recorded answer.
            ids = list(truth)  # in the order answered: /classify first, the batch's last
            more = [rid for rid in (ids[0], ids[-1]) if rid not in queued]
            for rid in more:
                review(client, rid, truth[rid], "boris")
            reviewed = {rid: truth[rid] for rid in [*queued, *more]}
            assert not set(queue_ids(client)) & set(reviewed)  # reviewed answers leave it
    finally:
        stop(server)
    assert server.process.returncode == 0, server.log.read_text()[-3000:]

    # The store: one row per answer a client received, nothing for the refused upload.
    try:
        rows = store.find()
        assert sorted(r.request_id for r in rows) == sorted(truth)
        kept = {p.name for p in (repo / "data/production/photos").glob("*/*")}
        assert kept == {r.image_sha256 for r in rows}
        assert photo_sha256(b"this is not a photo\n") not in kept
        # The second review superseded the first; both are kept.
        assert [(r.label, r.reviewer) for r in history(store, twice)] == [
            (first["label"], "ana"),
            (truth[twice], "boris"),
        ]
        standing = latest(store)
        assert {rid: r.label for rid, r in standing.items()} == reviewed
    finally:
        store.close()

    # 4. The export, as a moderator's cron would run it, then the retrain flow (whose first
    # task exports again: the same reviews give the same catalog, byte for byte).
    exported = subprocess.run(
        [sys.executable, "-m", "pipeline.feedback", str(repo)],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert exported.returncode == 0, exported.stderr
    assert f"{len(reviewed)} exported" in exported.stdout
    report = json.loads((repo / params["feedback"]["report"]).read_text())
    assert (report["exported"], report["left_out"]) == (len(reviewed), 0)
    catalog = catalog_path(repo)
    rows_exported = pd.read_csv(catalog, dtype=str).set_index("id")
    assert rows_exported["label"].to_dict() == reviewed
    assert (rows_exported.loc[twice, "reviewer"], rows_exported.loc[twice, "label"]) == (
        "boris",
        truth[twice],
    )
    catalog_text = catalog.read_text()

    monkeypatch.setenv("BENTOML_HOME", str(home))  # package saves the retrained model there
    summary = retrain(project_dir=repo)
    assert summary["feedback"] == {
        "exported": len(reviewed),
        "left_out": 0,
        "catalog": str(catalog.relative_to(repo)),
        "skipped": "",
    }
    assert catalog.read_text() == catalog_text
    assert {"collect", "dedupe", "prepare", "evaluate", "package"} <= set(summary["stages"])

    # 5. Every reviewed photo is a training, validation or test photo now, under the label
    # that stands.
    prepared = pd.read_parquet(repo / "data/prepared/manifest.parquet")
    from_reviews = prepared[prepared["source"] == REVIEWED_SOURCE].set_index("id")
    assert from_reviews["label"].to_dict() == reviewed
    metrics = json.loads((repo / "reports/evaluate.json").read_text())
    assert metrics["reviewed"]["n"] == (from_reviews["split"] == "test").sum()
