"""The review API (service/review.py) in-process: its routes on a FastAPI app behind the
service's ResponsePolicy, over SQLite and a real PostgreSQL server; the token, the queue, the
photos, moderators' labels, and the training photos' decisions as dedupe reads them back."""

from __future__ import annotations

import ast
import io
import types
from dataclasses import replace
from pathlib import Path

import bentoml
import pandas as pd
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.testclient import TestClient

from scripts.docs import http_api, http_review
from service.responses import DATA_POLICY, ResponsePolicy, page_policy
from service.review import CURATION_TAB, PROJECT_DIR_ENV, REVIEW_TOKEN_ENV, ReviewDesk, router
from stages.dedupe import DedupeConfig, read_decisions, review_candidates
from tests.helpers import REPO
from tests.helpers.candidates import PROVENANCE
from tests.helpers.curation_project import write_project
from tests.helpers.photos import photo_bytes
from tests.helpers.records import record_config, sample_answer
from vitrine.config import load_params, stage_config
from vitrine.contracts import PackagedModel, ServeConfig
from vitrine.production.heatmaps import heatmap_path, heatmap_root
from vitrine.production.photos import PhotoStore
from vitrine.production.records import AnswerRecord, RecordStore
from vitrine.production.reviews import history, latest

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLASSES = ("laptop", "phone")
GAIN = ((1.0, -0.5), (-1.0, 1.5))


def info_for(root: Path, url: str) -> PackagedModel:
    serve = ServeConfig(1_000_000, 4_000_000, 32, 6, 2_000_000, 8, 2.0, 1, 1)
    serve = replace(serve, record=record_config(root, url))
    return PackagedModel(
        "cnn64", CLASSES, 128, 64, "cnn64-x", 0.6, serve, PROVENANCE, decision_gain=GAIN,
        value_gain=GAIN, review_cost=0.8,
    )  # fmt: skip


def client_for(desk: ReviewDesk) -> TestClient:
    app = FastAPI()
    app.include_router(router)
    service = types.SimpleNamespace(review=desk)
    app.dependency_overrides[bentoml.get_current_service] = lambda: service
    return TestClient(ResponsePolicy(app))


@pytest.fixture
def desk(
    tmp_path: Path, store: RecordStore, answers_url: str, monkeypatch: pytest.MonkeyPatch
) -> ReviewDesk:
    monkeypatch.setenv(REVIEW_TOKEN_ENV, TOKEN)
    monkeypatch.setenv(PROJECT_DIR_ENV, str(write_project(tmp_path / "project")))
    return ReviewDesk(info_for(tmp_path / "records", answers_url), None)


def recorded(store: RecordStore, desk: ReviewDesk, answers: list[AnswerRecord]) -> None:
    """The answers in the database, and their photos in the photo store."""
    store.insert(answers)
    photos = PhotoStore(desk.photos, 0, 0)
    for i, a in enumerate(answers):
        a_photo = photo_bytes(i, size=(640, 480))
        photos.keep(a_photo, a.image_sha256)


# --- the token --------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/review/queue"),
    ("GET", "/review/photo/0123"),
    ("GET", "/review/heatmap/0123/answered"),
    ("POST", "/review"),
    ("GET", "/review/curation"),
    ("GET", "/review/curation/photo?id=x"),
    ("POST", "/review/curation/decision"),
]


@pytest.mark.parametrize("answers_url", ["sqlite"], indirect=True)
def test_without_the_token_variable_reviewing_is_absent(
    tmp_path: Path, answers_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REVIEW_TOKEN_ENV, raising=False)
    monkeypatch.setenv(PROJECT_DIR_ENV, str(write_project(tmp_path / "project")))
    with client_for(ReviewDesk(info_for(tmp_path, answers_url), None)) as client:
        for method, path in [("GET", "/review"), *ROUTES]:
            response = client.request(method, path, headers=AUTH)
            assert response.status_code == 404, path
            assert response.json() == {
                "error": "not_found",
                "detail": f"no such endpoint: {path.split('?')[0]}",
            }


@pytest.mark.parametrize("answers_url", ["sqlite"], indirect=True)
def test_no_token_is_a_401_and_a_wrong_one_a_403(desk: ReviewDesk) -> None:
    with client_for(desk) as client:
        for method, path in ROUTES:
            missing = client.request(method, path)
            assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
            assert missing.headers["www-authenticate"] == "Bearer"
            for header in (f"Bearer {TOKEN}x", "Bearer s3cret", f"bearer {TOKEN[:-1]}"):
                wrong = client.request(method, path, headers={"Authorization": header})
                assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"
            basic = client.request(method, path, headers={"Authorization": f"Basic {TOKEN}"})
            assert basic.status_code == 401
            assert missing.headers["content-security-policy"] == DATA_POLICY


@pytest.mark.parametrize("answers_url", ["sqlite"], indirect=True)
def test_the_page_is_served_without_the_token_under_its_own_policy(
    desk: ReviewDesk, tmp_path: Path, answers_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with client_for(desk) as client:
        page = client.get("/review")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == page_policy(page.text)
    assert "'sha256-" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert CURATION_TAB in page.text
    monkeypatch.delenv(PROJECT_DIR_ENV)  # a deployed Bento: no project, no training photos tab
    bare = ReviewDesk(info_for(tmp_path, answers_url), None)
    assert 'id="tab-curation"' not in bare.page_html and bare.project is None
    with client_for(bare) as client:
        assert client.get("/review/curation", headers=AUTH).status_code == 404


# --- the queue, the photos, the labels ---------------------------------------------------------


def test_the_queue_lists_what_the_model_doubts_and_reviewed_answers_leave_it(
    desk: ReviewDesk, store: RecordStore
) -> None:
    confident, doubtful = sample_answer(9), sample_answer(4)  # p(phone) 0.9 and 0.4
    abstained = sample_answer(5, abstain=True)
    mismatch = sample_answer(9, declared="laptop")
    recorded(store, desk, [confident, doubtful, abstained, mismatch])
    (desk.photo_path(doubtful.image_sha256)).unlink()  # retention removed it
    with client_for(desk) as client:
        answer = client.get("/review/queue", headers=AUTH).json()
        assert answer["classes"] == list(CLASSES)
        items = answer["answers"]
        ids = [i["request_id"] for i in items]
        assert ids == [mismatch.request_id, abstained.request_id, doubtful.request_id]
        first = items[0]
        assert set(first) == {
            "request_id", "answered_at", "endpoint", "model_version", "label", "confidence",
            "probabilities", "abstain", "declared_category", "matches", "review_value", "photo",
            "heatmaps",
        }  # fmt: skip
        assert first["declared_category"] == "laptop" and first["matches"] is False
        assert first["review_value"] > items[1]["review_value"] > items[2]["review_value"] > 0
        assert first["photo"] == f"/review/photo/{mismatch.request_id}"
        assert items[2]["photo"] is None  # shown as missing
        thumb = client.get(first["photo"], headers=AUTH)
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) == 256  # from 640 x 480
        gone = client.get(f"/review/photo/{doubtful.request_id}", headers=AUTH)
        assert gone.status_code == 404 and gone.json()["error"] == "photo_missing"
        unknown = client.get("/review/photo/ffff", headers=AUTH)
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_answer"
        assert len(client.get("/review/queue?limit=1", headers=AUTH).json()["answers"]) == 1
        for limit in ("0", "501", "x", "-1", "%C2%B2"):  # ² is a digit to str.isdigit
            bad = client.get(f"/review/queue?limit={limit}", headers=AUTH)
            assert bad.status_code == 400 and bad.json()["error"] == "bad_parameter"

        body = {"request_id": mismatch.request_id, "label": "phone", "reviewer": "ana"}
        done = client.post("/review", json=body, headers=AUTH)
        assert done.status_code == 200
        assert done.json() | {"reviewed_at": "", "review_id": 0} == body | {
            "reviewed_at": "",
            "review_id": 0,
        }
        client.post("/review", json=body | {"label": "laptop", "reviewer": "boris"}, headers=AUTH)
        client.post("/review", json={"request_id": doubtful.request_id, "label": "laptop"},
                    headers=AUTH)  # fmt: skip
        left = client.get("/review/queue", headers=AUTH).json()["answers"]
    assert [i["request_id"] for i in left] == [abstained.request_id]
    assert [(r.label, r.reviewer) for r in history(store, mismatch.request_id)] == [
        ("phone", "ana"),
        ("laptop", "boris"),
    ]
    assert latest(store)[doubtful.request_id].reviewer == "anonymous"


@pytest.mark.parametrize("answers_url", ["sqlite"], indirect=True)
def test_heat_maps_are_served_once_drawn_and_nothing_else_is(
    desk: ReviewDesk, store: RecordStore
) -> None:
    mismatch = sample_answer(9, declared="laptop")  # answered phone (1), declared laptop (0)
    recorded(store, desk, [mismatch])
    drawn = heatmap_path(heatmap_root(desk.photos), "cnn64-x", mismatch.image_sha256, 1)
    drawn.parent.mkdir(parents=True)
    png = io.BytesIO()
    Image.new("RGB", (128, 128), "red").save(png, "PNG")
    drawn.write_bytes(png.getvalue())
    url = f"/review/heatmap/{mismatch.request_id}"
    with client_for(desk) as client:
        maps = client.get("/review/queue", headers=AUTH).json()["answers"][0]["heatmaps"]
        assert maps == [
            {"which": "answered", "class": "phone", "role": "answered", "url": f"{url}/answered"},
            {"which": "alternative", "class": "laptop", "role": "declared", "url": None},
        ]
        answered = client.get(f"{url}/answered", headers=AUTH)
        assert answered.status_code == 200 and answered.headers["content-type"] == "image/png"
        assert answered.content == png.getvalue()
        assert client.get(f"{url}/answered").status_code == 401
        missing = client.get(f"{url}/alternative", headers=AUTH)
        assert missing.status_code == 404 and missing.json()["error"] == "heatmap_missing"
        # Nothing but a recorded answer's two maps: `which` is one of two words, the answer is
        # looked up by its id, and a path with more segments is no route.
        for path, code in [
            (f"{url}/predicted", "bad_parameter"),
            (f"{url}/%2E%2E", "bad_parameter"),
            (f"{url}/answered.png", "bad_parameter"),
            (f"{url}/..%2F..%2Fanswers.sqlite", "not_found"),
            ("/review/heatmap/..%2F..%2Fphotos/answered", "not_found"),
            ("/review/heatmap/%2E%2E/answered", "unknown_answer"),
            (f"/review/heatmap/{mismatch.image_sha256}/answered", "unknown_answer"),
        ]:
            refused = client.get(path, headers=AUTH)
            assert refused.json()["error"] == code, path
            assert refused.status_code == (400 if code == "bad_parameter" else 404)


@pytest.mark.parametrize("answers_url", ["sqlite"], indirect=True)
def test_a_bad_review_is_refused_with_its_reason(desk: ReviewDesk, store: RecordStore) -> None:
    answer = sample_answer(5, abstain=True)
    recorded(store, desk, [answer])
    good = {"request_id": answer.request_id, "label": "phone"}
    cases = [
        (b'{"request_id": ', 400, "bad_json"),
        (b"[1, 2]", 400, "bad_json"),
        (b'{"label": "phone"}', 400, "missing_field"),
        (b'{"request_id": 5, "label": "phone"}', 400, "bad_json"),
        (b'{"request_id": "ffff", "label": "phone"}', 404, "unknown_answer"),
        (b" " * 20_000, 413, "too_large"),
        (b"[" * 2_000, 400, "bad_json"),  # deeper than json's recursion limit
        (b'{"request_id": "\\ud800", "label": "phone"}', 400, "bad_json"),  # a lone surrogate
        (
            b'{"request_id": "' + answer.request_id.encode() + b'", "label": "phone", '
            b'"reviewer": "\\udfff"}',
            400,
            "bad_json",
        ),
        (  # PostgreSQL stores no NUL in text: refused here, on either database
            b'{"request_id": "' + answer.request_id.encode() + b'", "label": "phone", '
            b'"reviewer": "ann\\u0000"}',
            400,
            "bad_json",
        ),
    ]
    with client_for(desk) as client:
        for body, status, code in cases:
            response = client.post("/review", content=body, headers=AUTH)
            assert (response.status_code, response.json()["error"]) == (status, code), body
        tablet = client.post("/review", json=good | {"label": "tablet"}, headers=AUTH)
        assert tablet.status_code == 422 and tablet.json()["error"] == "unknown_label"
        assert "['laptop', 'phone']" in tablet.json()["detail"]  # names the classes
    assert latest(store) == {}


def test_a_database_without_the_answers_table_is_a_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(REVIEW_TOKEN_ENV, TOKEN)
    desk = ReviewDesk(info_for(tmp_path, f"sqlite:///{tmp_path / 'empty.sqlite'}"), None)
    with client_for(desk) as client:
        response = client.get("/review/queue", headers=AUTH)
    assert response.status_code == 503 and response.json()["error"] == "database_unavailable"


# --- the training photos ----------------------------------------------------------------------


@pytest.mark.parametrize("answers_url", ["sqlite"], indirect=True)
def test_the_training_photos_are_dedupes_candidates_and_clusters(desk: ReviewDesk) -> None:
    project = desk.project
    assert project is not None
    params = load_params(project.root / "params.yaml")
    frame = pd.read_parquet(project.root / params["paths"]["deduped"] / "manifest.parquet")
    expected = review_candidates(frame, stage_config(DedupeConfig, "dedupe", params))
    with client_for(desk) as client:
        answer = client.get("/review/curation", headers=AUTH).json()
        assert [c["id"] for c in answer["candidates"]] == list(expected["id"])
        assert answer["decisions_path"] == params["paths"]["decisions"]
        assert answer["classes"] == list(CLASSES)
        clusters = answer["clusters"]
        assert [c["cluster_id"] for c in clusters] == ["c01", "c07"]  # the conflict first
        assert clusters[0]["conflict"] and not clusters[1]["conflict"]
        assert {p["id"] for p in clusters[1]["photos"]} == {"phone/007.jpg", "laptop/008.jpg"}
        decided = {c["id"]: c["decision"] for c in answer["candidates"]}
        assert decided["phone/003.jpg"] == {
            "id": "phone/003.jpg", "decision": "relabel", "new_label": "laptop",
            "note": "a laptop, listed as a phone",
        }  # fmt: skip
        assert decided["laptop/002.jpg"] is None
        photo = client.get(answer["candidates"][0]["photo"], headers=AUTH)
        assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
        unknown = client.get("/review/curation/photo?id=nope.jpg", headers=AUTH)
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_photo"
        assert len(client.get("/review/curation?clusters=1", headers=AUTH).json()["clusters"]) == 1


@pytest.mark.parametrize("answers_url", ["sqlite"], indirect=True)
def test_training_decisions_are_written_as_dedupe_reads_them(desk: ReviewDesk) -> None:
    project = desk.project
    assert project is not None
    path = project.decisions
    with client_for(desk) as client:

        def decide(**body: str) -> dict:
            response = client.post("/review/curation/decision", json=body, headers=AUTH)
            return {"status": response.status_code, **response.json()}

        assert decide(id="phone/005.jpg", decision="relabel", new_label="laptop")["status"] == 200
        assert decide(id="laptop/002.jpg", decision="drop", note="a\ncharger,  boxed")[
            "decisions_path"
        ] == str(project.paths.decisions)
        assert decide(id="phone/003.jpg", decision="keep")["status"] == 200  # replaces its row
        for body, status, code in [
            ({"id": "laptop/000.jpg", "decision": "relabel", "new_label": "tablet"}, 422, "bad"),
            ({"id": "laptop/000.jpg", "decision": "burn"}, 422, "bad"),
            ({"id": "laptop/000.jpg", "decision": "drop", "new_label": "phone"}, 422, "bad"),
            ({"id": "nope.jpg", "decision": "drop"}, 404, "unknown_photo"),
            ({"decision": "drop"}, 400, "missing_field"),
        ]:
            answer = decide(**body)
            code = "bad_decision" if code == "bad" else code
            assert (answer["status"], answer["error"]) == (status, code), body
        surrogate = b'{"id": "laptop/000.jpg", "decision": "drop", "note": "\\ud800"}'
        refused = client.post("/review/curation/decision", content=surrogate, headers=AUTH)
        assert (refused.status_code, refused.json()["error"]) == (400, "bad_json")
        escape = {"id": "laptop/000.jpg", "decision": "drop", "note": "\x1b[2J a charger"}
        refused = client.post("/review/curation/decision", json=escape, headers=AUTH)
        assert refused.json() == {
            "error": "bad_json",
            "detail": "'note' holds the control character U+001B, not text",
        }
        listed = client.get("/review/curation", headers=AUTH).json()["candidates"]
    decisions = read_decisions(path, CLASSES)  # dedupe's own reader
    assert decisions.to_dict("records") == [
        {"id": "laptop/002.jpg", "decision": "drop", "new_label": "", "note": "a charger, boxed"},
        {"id": "phone/003.jpg", "decision": "keep", "new_label": "", "note": ""},
        {"id": "phone/005.jpg", "decision": "relabel", "new_label": "laptop", "note": ""},
        {"id": "phone/009.jpg", "decision": "drop", "new_label": "", "note": "a charger"},
    ]
    assert path.read_text() == (  # sorted by id, quoted only where CSV needs it
        "id,decision,new_label,note\n"
        'laptop/002.jpg,drop,,"a charger, boxed"\n'
        "phone/003.jpg,keep,,\n"
        "phone/005.jpg,relabel,laptop,\n"
        "phone/009.jpg,drop,,a charger\n"
    )
    assert [p.name for p in path.parent.iterdir()] == ["decisions.csv"]  # no temporary left
    shown = {c["id"]: c["decision"] for c in listed}
    assert shown["phone/005.jpg"] == {
        "id": "phone/005.jpg", "decision": "relabel", "new_label": "laptop", "note": "",
    }  # fmt: skip
    assert shown["laptop/002.jpg"]["decision"] == "drop"


# --- the HTTP reference -----------------------------------------------------------------------


def review_routes() -> set[tuple[str, str]]:
    """(method, path) of every @router.<method>(path) in service/review.py."""
    tree = ast.parse((REPO / "service/review.py").read_text())
    return {
        (deco.func.attr.upper(), ast.literal_eval(deco.args[0]))
        for node in ast.walk(tree)
        if isinstance(node, ast.AsyncFunctionDef)
        for deco in node.decorator_list
        if isinstance(deco, ast.Call) and ast.unparse(deco.func).startswith("router.")
    }


def test_the_http_reference_describes_every_review_route_and_its_token() -> None:
    page = http_api.page(REPO)
    routes = review_routes()
    assert len(routes) == 8 and routes == set(http_review.ANSWERS)
    for method, path in routes:
        assert f"\n### {method} {path}\n" in page
    assert page.count('curl -H "Authorization: Bearer $VITRINE_REVIEW_TOKEN"') == 7
    for code, status in [("not_found", 404), ("unauthorized", 401), ("forbidden", 403)]:
        assert f"| `{code}` | {status} |" in page
    assert "| `unknown_label` | 422 |" in page and "`service.review.review`" in page


def test_a_review_answer_that_gains_or_loses_a_key_fails_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = http_review.ANSWERS[("GET", "/review/queue")]
    item = {k: v for k, v in http_review.QUEUE_ITEM.items() if k != "review_value"}
    lacking = replace(queue, example={"classes": ["laptop"], "answers": [item]})
    monkeypatch.setitem(http_review.ANSWERS, ("GET", "/review/queue"), lacking)
    with pytest.raises(http_review.ExampleMismatch, match="lacks \\['review_value'\\]"):
        http_api.page(REPO)
    extra = replace(queue, example={"classes": [], "answers": [item | {"review_value": 1, "x": 2}]})
    monkeypatch.setitem(http_review.ANSWERS, ("GET", "/review/queue"), extra)
    with pytest.raises(http_review.ExampleMismatch, match="has \\['x'\\]"):
        http_api.page(REPO)
