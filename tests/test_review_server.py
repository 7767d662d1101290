"""The moderators' review on the real server (`bentoml serve`, as `make serve` runs it, with
VITRINE_REVIEW_TOKEN and VITRINE_PROJECT_DIR set): answers it recorded reach the queue, and in
real Chromium a moderator types the token, sees the queue, decides one answer (the database
holds the review) and one training photo (the decisions file holds it, as dedupe reads it)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipeline.heatmaps import draw_from_params
from service.responses import page_policy
from service.review import PROJECT_DIR_ENV, REVIEW_TOKEN_ENV
from stages.dedupe import read_decisions
from tests.helpers import REPO
from tests.helpers.browser import ARTIFACTS, chromium_page, wait_for_image
from tests.helpers.curation_project import CLASSES, write_project
from tests.helpers.records import record_config, wait_for
from tests.helpers.server import start_server, stop
from tests.helpers.tiny_package import package_tiny_model
from vitrine.contracts import ServeConfig
from vitrine.production.records import RecordStore
from vitrine.production.reviews import latest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]

ARCHIVE = REPO / "data" / "raw" / "avito-raw.tar.gz"
MODEL_NAME = "vitrine-review-test"
TOKEN = "moderators-only-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# A phone photo earns 3, any mistake costs 1; a review costs 0.05: every answer of the
# untrained model (no probability near 0 or 1) is worth one.
GAIN = np.array([[1.0, -1.0], [-1.0, 3.0]])
REVIEW_COST = 0.05


@dataclass(frozen=True)
class Served:
    url: str
    database: str  # the answers database's URL
    project: Path
    package: Path  # the packaged model the server serves


def archive_photos(n: int) -> list[bytes]:
    with tarfile.open(ARCHIVE) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")),
            key=lambda m: m.name,
        )[:n]
        return [archive.extractfile(m).read() for m in members]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("review")
    record = record_config(root / "records")
    serve = ServeConfig(1_000_000, 4_000_000, 32, 6, 2_000_000, 8, 2.0, 1, 1, record=record)
    package = package_tiny_model(
        root, serve, GAIN, MODEL_NAME, value_gain=GAIN, review_cost=REVIEW_COST
    )
    project = write_project(root / "project")
    env = {REVIEW_TOKEN_ENV: TOKEN, PROJECT_DIR_ENV: str(project)}
    running = start_server(root / "home", MODEL_NAME, root / "server.log", env)
    try:
        yield Served(running.url, record.url, project, package)
    finally:
        stop(running)
    assert running.process.returncode == 0


@pytest.fixture(scope="module")
def answered(served: Served) -> list[str]:
    """Six answers the server recorded: three /classify, three /check_category."""
    ids = []
    with httpx.Client(base_url=served.url, timeout=30) as client:
        for i, photo in enumerate(archive_photos(6)):
            files = [("image", ("upload.jpg", photo, "application/octet-stream"))]
            if i % 2:
                declared = {"declared_category": "laptop"}
                response = client.post("/check_category", files=files, data=declared)
            else:
                response = client.post("/classify", files=files)
            assert response.status_code == 200
            ids.append(response.json()["request_id"])
    store = RecordStore(served.database)
    try:
        wait_for(lambda: len(store.find(request_ids=ids)) == len(ids))
    finally:
        store.close()
    return ids


def test_the_recorded_answers_reach_the_queue_behind_the_token(
    served: Served, answered: list[str]
) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as client:
        assert client.get("/review/queue").status_code == 401
        wrong = client.get("/review/queue", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"
        queue = client.get("/review/queue", headers=AUTH).json()
        assert queue["classes"] == list(CLASSES)
        store = RecordStore(served.database)
        try:
            reviewed = set(latest(store, answered))  # by the page's test, if it ran first
        finally:
            store.close()
        assert {a["request_id"] for a in queue["answers"]} == set(answered) - reviewed
        values = [a["review_value"] for a in queue["answers"]]
        assert values == sorted(values, reverse=True) and values[-1] > 0
        photo = client.get(queue["answers"][0]["photo"], headers=AUTH)
        assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
        page = client.get("/review")
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == page_policy(page.text)
    assert page.headers["x-content-type-options"] == "nosniff"


def test_a_moderator_decides_an_answer_and_a_training_photo_in_the_page(
    served: Served, answered: list[str]
) -> None:
    with chromium_page() as (page, blocked):
        page.goto(served.url + "/review")
        assert page.locator("#queue .card").count() == 0  # nothing before the token
        page.fill("#token", "not-the-token")
        page.click("#save")
        page.locator("#status.error", has_text="token was refused").wait_for(timeout=15_000)
        assert page.locator("#login").is_visible() and page.locator("#desk").is_hidden()
        page.fill("#token", TOKEN)
        page.fill("#reviewer", "ana")
        page.click("#save")
        cards = page.locator("#queue .card")
        cards.first.wait_for(timeout=15_000)
        assert cards.count() == len(answered)
        first = cards.first
        request_id = first.get_attribute("data-request-id")
        assert request_id in answered
        assert "Model:" in first.inner_text() and "Review worth" in first.inner_text()
        # The photo shows: fetched with the token, shown from a blob: URL.
        wait_for_image(page, "#queue .card img")
        page.screenshot(path=str(ARTIFACTS / "review_queue.png"), full_page=True)
        first.locator("button[data-label=phone]").click()
        page.locator(f'[data-request-id="{request_id}"]').wait_for(state="detached", timeout=15_000)
        assert cards.count() == len(answered) - 1
        store = RecordStore(served.database)
        try:
            review = latest(store, [request_id])[request_id]
        finally:
            store.close()
        assert (review.label, review.reviewer) == ("phone", "ana")

        page.click("#tab-curation")
        candidate = page.locator("#candidates .photo-card").first
        candidate.wait_for(timeout=15_000)
        photo_id = candidate.get_attribute("data-id")
        assert photo_id
        candidate.locator("input.note").fill("a charger")
        candidate.locator("button[data-decision=drop]").click()
        page.locator(f'#candidates .photo-card.decided[data-id="{photo_id}"]').wait_for(
            timeout=15_000
        )
        page.screenshot(path=str(ARTIFACTS / "review_training_photos.png"), full_page=True)
        assert blocked == []
    decisions = read_decisions(served.project / "data/review/decisions.csv", CLASSES)
    row = decisions.set_index("id").loc[photo_id]
    assert (row["decision"], row["new_label"], row["note"]) == ("drop", "", "a charger")


def test_a_queued_photo_shows_its_two_heat_maps_once_drawn(
    served: Served, answered: list[str]
) -> None:
    """Before `python -m pipeline.heatmaps` the cards say the maps are not drawn yet; after it,
    each shows the answered class's and the runner-up's or declared one's map, fetched with
    the token like the photo, and says they come from the float network."""
    with chromium_page() as (page, blocked):
        page.goto(served.url + "/review")
        page.fill("#token", TOKEN)
        page.click("#save")
        first = page.locator("#queue .card").first
        first.wait_for(timeout=15_000)
        assert first.locator(".heatmaps .missing").all_inner_texts() == ["not drawn yet"] * 2
        report = draw_from_params(served.project, served.package)
        assert report["left_out"] == 0 and report["drawn"] + report["drawn_before"] > 0
        page.reload()
        first.wait_for(timeout=15_000)
        wait_for_image(page, "#queue .card .heatmap[data-which=answered] img")
        wait_for_image(page, "#queue .card .heatmap[data-which=alternative] img")
        maps = first.locator(".heatmap")
        assert maps.count() == 2 and first.locator(".heatmap img").count() == 2
        captions = first.locator(".heatmap figcaption").all_inner_texts()
        assert captions[0].endswith("(answered)")
        assert captions[1].endswith(("(runner-up)", "(declared)"))
        assert "float network" in first.inner_text()
        page.screenshot(path=str(ARTIFACTS / "review_heatmaps.png"), full_page=True)
        assert blocked == []
