"""The moderators' review: an API and a page on the service's app, behind a token.

The token is the environment variable `VITRINE_REVIEW_TOKEN`, sent as `Authorization: Bearer
<token>` (compared in constant time); without the variable every review route answers 404, as
if absent. No token: 401 (`unauthorized`); a wrong one: 403 (`forbidden`). Errors in the
service's shape {"error": <code>, "detail": <text>}.

- GET /review: the page (served without the token; its script asks for it, keeps it in the
  tab's sessionStorage and sends it with every call).
- GET /review/queue: recorded answers ranked by what a review is worth under the value model
  (vitrine.production.queue); answers already reviewed leave it.
- GET /review/photo/<request_id>: an answer's photo as a small JPEG, from the photo store.
- GET /review/heatmap/<request_id>/<which>: a Grad-CAM heat map over that photo, for the class
  answered or the alternative one, drawn on the float network by `python -m pipeline.heatmaps`
  (vitrine.production.heatmaps: the service runs model.onnx and no torch, it only serves them).
- POST /review: a moderator's label for an answer (vitrine.production.reviews: a later one
  supersedes, the history stays).
- With `VITRINE_PROJECT_DIR` (set by `make serve` to the repository), the training photos too:
  GET /review/curation (dedupe's noise candidates and near-duplicate clusters), GET
  /review/curation/photo and POST /review/curation/decision, which writes the decisions file
  dedupe applies (vitrine.production.curation). Without it these answer 404.

The answers database is the one the service records into (`serve.record.url`, or
`VITRINE_RECORD_URL`), migrated by the recorder as the service starts: until then, or while it is
down, the database routes answer 503 (`database_unavailable`).
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import anyio
import bentoml
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, ImageOps

from service.core import detached, error_body, status_of
from service.responses import page_policy
from vitrine.contracts import PackagedModel
from vitrine.images import Rejected, open_capped, undecodable
from vitrine.production.curation import (
    BadDecision,
    Decision,
    Project,
    checked_decision,
    write_decision,
)
from vitrine.production.curation import read_decision_file as read_decisions
from vitrine.production.heatmaps import WHICH, heatmap_path, heatmap_root, queue_maps, target
from vitrine.production.queue import Ranked, ReviewTerms, review_queue
from vitrine.production.recorder import Recorder
from vitrine.production.records import RecordStore, record_url
from vitrine.production.reviews import Review, UnknownAnswer, add_review

log = logging.getLogger(__name__)
REVIEW_TOKEN_ENV = "VITRINE_REVIEW_TOKEN"
PROJECT_DIR_ENV = "VITRINE_PROJECT_DIR"
PAGE = Path(__file__).with_name("review.html")
CURATION_TAB = '<button type="button" id="tab-curation" class="tab">Training photos</button>'
MAX_JSON_BYTES = 16_384  # a review's JSON body
MAX_NAME = 200  # characters of a reviewer's name (the reviews table's column)
DEFAULT_REVIEWER = "anonymous"
DEFAULT_LIMIT, MAX_LIMIT = 50, 500  # answers in one queue answer
DEFAULT_CLUSTERS = 50  # near-duplicate clusters in one curation answer
# C0 controls but tab, line feed and carriage return, and DEL: no note or name means them.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
THUMB_SIDE = 256  # longest side of a photo as the review page shows it

router = APIRouter()
# The Classifier instance, as BentoML hands its own routes their `self` (overridden in
# service/service.py by a coroutine, run on the event loop).
CurrentService = Annotated[Any, Depends(bentoml.get_current_service)]


class ReviewDesk:
    """What the review routes need, one per worker process (Classifier.review)."""

    def __init__(self, info: PackagedModel, recorder: Recorder | None) -> None:
        self.token = os.environ.get(REVIEW_TOKEN_ENV, "")
        if not self.token:  # a 404 on /review would not tell a wrong URL from a missing token
            log.warning("review routes are off (404): %s is not set", REVIEW_TOKEN_ENV)
        self.info = info
        self.terms = ReviewTerms.of(info)
        self.photos = Path(info.serve.record.photos)
        self.heatmaps = heatmap_root(self.photos)
        self._store = recorder.store if recorder is not None else None
        project = os.environ.get(PROJECT_DIR_ENV, "")
        self.project = Project.at(Path(project)) if project and self.token else None
        tab = CURATION_TAB if self.project else ""
        self.page_html = PAGE.read_text().replace("<!--CURATION-->", tab)
        self.page_headers = {"Content-Security-Policy": page_policy(self.page_html)}

    @property
    def store(self) -> RecordStore:
        if self._store is None:  # recording is off: the configured database, read as it is
            self._store = RecordStore(record_url(self.info.serve.record.url))
        return self._store

    def photo_path(self, sha256: str) -> Path:
        return self.photos / sha256[:2] / sha256


def _desk(service: Any, request: Request, authorized: bool = True) -> ReviewDesk:
    """The desk, once the request may use it: 404 when reviewing is off, 401 without the
    token, 403 with a wrong one."""
    desk: ReviewDesk = service.review
    if not desk.token:
        raise Rejected("not_found", f"no such endpoint: {request.url.path}")
    if authorized:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Rejected("unauthorized", "send the review token as Authorization: Bearer")
        if not hmac.compare_digest(given.strip().encode(), desk.token.encode()):
            raise Rejected("forbidden", "the review token is not the one this service holds")
    return desk


def _project(desk: ReviewDesk, request: Request) -> Project:
    if desk.project is None:
        raise Rejected("not_found", f"no such endpoint: {request.url.path}")
    return desk.project


def refusal(err: Rejected) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.code == "unauthorized" else None
    return JSONResponse(error_body(detached(err)), status_code=status_of(err), headers=headers)


async def _database(function: Any, *args: Any) -> Any:
    """function(*args) in a worker thread; a database that fails: 503."""
    try:
        return await anyio.to_thread.run_sync(function, *args)
    except sa.exc.SQLAlchemyError as err:
        raise Rejected("database_unavailable", f"the answers database failed: {err}") from None


async def _json_body(request: Request) -> dict[str, Any]:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise Rejected("too_large", f"the JSON body exceeds {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise Rejected("bad_json", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise Rejected("bad_json", "the body must be a JSON object")
    return data


def _text(data: dict[str, Any], name: str, default: str | None = None) -> str:
    value = data.get(name, default)
    if value is None:
        raise Rejected("missing_field", f"no field {name!r} in the JSON body")
    if not isinstance(value, str):
        raise Rejected("bad_json", f"{name!r} must be a string")
    if not value.isascii():  # JSON's \ud800 escapes decode to text no database can store
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Rejected("bad_json", f"{name!r} holds a lone surrogate, not text") from None
    control = CONTROL.search(value)
    if control:  # PostgreSQL refuses NUL in text; ESC would reach a terminal from decisions.csv
        char = f"U+{ord(control.group()):04X}"
        raise Rejected("bad_json", f"{name!r} holds the control character {char}, not text")
    return value


def _count(request: Request, name: str, default: int, most: int) -> int:
    text = request.query_params.get(name, str(default))
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= most:  # not '²
        raise Rejected("bad_parameter", f"{name} must be a whole number from 1 to {most}")
    return int(text)


def thumbnail(data: bytes, max_pixels: int) -> bytes:
    """A photo as a JPEG of at most THUMB_SIDE px: decoded and encoded again, so what the page
    shows is a plain small JPEG whatever was uploaded."""
    img = open_capped(data, max_pixels)
    try:
        img.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
        small = ImageOps.exif_transpose(img).convert("RGB")
        small.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        small.save(out, "JPEG", quality=85)
    except Exception as err:  # PIL's many ways of failing on a bad file
        raise undecodable(err) from None
    return out.getvalue()


def jpeg(data: bytes, media_type: str = "image/jpeg") -> Response:
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


def queue_answer(ranked: list[Ranked], desk: ReviewDesk) -> dict[str, Any]:
    """GET /review/queue's answer: the classes a moderator picks from, the answers best first."""
    items = []
    for r in ranked:
        a = r.answer
        kept = desk.photo_path(a.image_sha256).is_file()  # retention may have removed it
        items.append(
            {
                "request_id": a.request_id,
                "answered_at": a.answered_at.isoformat(),
                "endpoint": a.endpoint,
                "model_version": a.model_version,
                "label": a.label,
                "confidence": a.confidence,
                "probabilities": a.probabilities,
                "abstain": a.abstain,
                "declared_category": a.declared_category,
                "matches": a.matches,
                "review_value": round(r.value, 4),
                "photo": f"/review/photo/{a.request_id}" if kept else None,
                "heatmaps": queue_maps(a, desk.terms.classes, desk.heatmaps, desk.info.weights),
            }
        )
    return {"classes": list(desk.terms.classes), "answers": items}


def _photo_bytes(desk: ReviewDesk, request_id: str) -> bytes:
    answer = desk.store.get(request_id)
    if answer is None:
        raise Rejected("unknown_answer", f"no recorded answer has request_id {request_id!r}")
    try:
        data = desk.photo_path(answer.image_sha256).read_bytes()
    except FileNotFoundError:
        raise Rejected("photo_missing", "the photo is no longer kept (retention)") from None
    return thumbnail(data, desk.info.serve.max_pixels)


def _heatmap_bytes(desk: ReviewDesk, request_id: str, which: str) -> bytes:
    answer = desk.store.get(request_id)
    if answer is None:
        raise Rejected("unknown_answer", f"no recorded answer has request_id {request_id!r}")
    drawn = target(answer, desk.terms.classes, which)
    if drawn is not None:
        path = heatmap_path(
            desk.heatmaps, desk.info.weights, answer.image_sha256, drawn.class_index
        )
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
    raise Rejected("heatmap_missing", "not drawn yet: `python -m pipeline.heatmaps` draws them")


def curation_answer(project: Project, clusters: int) -> dict[str, Any]:
    """GET /review/curation's answer; each photo with the decision it has, if any."""
    try:
        candidates, groups = project.candidates(), project.clusters(clusters)
    except FileNotFoundError as err:
        raise Rejected("curation_unavailable", str(err)) from None
    decisions = read_decisions(project.decisions)

    def with_decision(entry: dict[str, Any]) -> dict[str, Any]:
        decided = decisions.get(entry["id"])
        return entry | {
            "decision": None if decided is None else decided.row(),
            "photo": "/review/curation/photo?id=" + quote(entry["id"], safe=""),
        }

    return {
        "decisions_path": str(project.paths.decisions),
        # the other class is the `other` decision (none of these), not a relabel
        "classes": [c for c in project.classes if c != project.other_class],
        "candidates": [with_decision(c) for c in candidates],
        "clusters": [c | {"photos": [with_decision(p) for p in c["photos"]]} for c in groups],
    }


def _curation_photo(project: Project, photo_id: str, max_pixels: int) -> bytes:
    data = project.thumbnail(photo_id)
    if data is None:
        raise Rejected("unknown_photo", f"dedupe's manifest has no photo {photo_id!r}")
    return thumbnail(data, max_pixels)


def decision_answer(decision: Decision, project: Project) -> dict[str, str]:
    """POST /review/curation/decision's answer: the decision as written, and where."""
    return {
        "id": decision.id,
        "decision": decision.decision,
        "new_label": decision.new_label,
        "note": decision.note,
        "decisions_path": str(project.paths.decisions),
    }


def review_answer(done: Review) -> dict[str, Any]:
    """POST /review's answer: the decision as recorded."""
    return {
        "request_id": done.request_id,
        "label": done.label,
        "reviewer": done.reviewer,
        "reviewed_at": done.reviewed_at.isoformat(),
        "review_id": done.review_id,
    }


def _decide(project: Project, data: dict[str, Any]) -> dict[str, str]:
    photo_id = _text(data, "id")
    try:
        decision = checked_decision(
            photo_id,
            _text(data, "decision"),
            _text(data, "new_label", ""),
            _text(data, "note", ""),
            project.classes,
        )
    except BadDecision as err:
        raise Rejected("bad_decision", str(err)) from None
    if not project.knows(photo_id):
        raise Rejected("unknown_photo", f"dedupe's manifest has no photo {photo_id!r}")
    write_decision(project.decisions, decision)
    return decision_answer(decision, project)


@router.get("/review")
async def review_page(request: Request, service: CurrentService) -> HTMLResponse:
    """The moderators' page: the review queue as cards (photo, the model's answer, the declared
    category, a button per class), and the training photos when the project is configured."""
    try:
        desk = _desk(service, request, authorized=False)
    except Rejected as err:
        return refusal(err)  # type: ignore[return-value]
    return HTMLResponse(desk.page_html, headers=desk.page_headers)


@router.get("/review/queue")
async def queue(request: Request, service: CurrentService) -> Response:
    """Recorded answers most worth a moderator's review, best first: abstained answers,
    /check_category answers whose label differs from the declared category and low-confidence
    ones, by the value of a review (what a moderator's label is expected to earn, less what the
    answer that stands earns, less evaluate.review_cost). Query: `limit` (default 50, at most
    500). Reviewed answers leave the queue; `photo` is null once retention removed the photo."""
    try:
        desk = _desk(service, request)
        limit = _count(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        ranked = await _database(review_queue, desk.store, desk.terms, limit)
        return JSONResponse(await anyio.to_thread.run_sync(queue_answer, ranked, desk))
    except Rejected as err:
        return refusal(err)


@router.get("/review/photo/{request_id}")
async def photo(request_id: str, request: Request, service: CurrentService) -> Response:
    """An answer's photo as a JPEG of at most 256 px; 404 `photo_missing` once retention
    removed it."""
    try:
        desk = _desk(service, request)
        return jpeg(await _database(_photo_bytes, desk, request_id))
    except Rejected as err:
        return refusal(err)


@router.get("/review/heatmap/{request_id}/{which}")
async def heatmap(
    request_id: str, which: str, request: Request, service: CurrentService
) -> Response:
    """A Grad-CAM heat map over an answer's photo as a PNG of at most 128 px, computed on the
    float network (model.pt) by `python -m pipeline.heatmaps`: `which` is `answered` (the class
    the model answered) or `alternative` (the declared category when it differs, else the
    runner-up), as the queue's `heatmaps` list them; 404 `heatmap_missing` until drawn."""
    try:
        desk = _desk(service, request)
        if which not in WHICH:
            raise Rejected("bad_parameter", f"which must be one of {list(WHICH)}")
        return jpeg(await _database(_heatmap_bytes, desk, request_id, which), "image/png")
    except Rejected as err:
        return refusal(err)


@router.post("/review")
async def review(request: Request, service: CurrentService) -> Response:
    """A moderator's label for a recorded answer: JSON {"request_id", "label", "reviewer"
    (optional)}. A later decision on the same answer supersedes this one; every one is kept."""
    try:
        desk = _desk(service, request)
        data = await _json_body(request)
        request_id, label = _text(data, "request_id"), _text(data, "label")
        reviewer = _text(data, "reviewer", DEFAULT_REVIEWER).strip() or DEFAULT_REVIEWER
        if label not in desk.terms.classes:
            raise Rejected("unknown_label", f"{label!r} is not one of {list(desk.terms.classes)}")
        if len(reviewer) > MAX_NAME:
            raise Rejected("bad_json", f"'reviewer' is over {MAX_NAME} characters")
        try:
            done = await _database(add_review, desk.store, request_id, label, reviewer)
        except UnknownAnswer:
            raise Rejected(
                "unknown_answer", f"no recorded answer has request_id {request_id!r}"
            ) from None
    except Rejected as err:
        return refusal(err)
    return JSONResponse(review_answer(done))


@router.get("/review/curation")
async def curation(request: Request, service: CurrentService) -> Response:
    """dedupe's noise candidates (most suspicious first, as its review gallery) and its
    near-duplicate clusters of several photos (label conflicts first; query `clusters`, default
    50), each photo with its decision in the decisions file, if any."""
    try:
        project = _project(_desk(service, request), request)
        clusters = _count(request, "clusters", DEFAULT_CLUSTERS, 100_000)
        return JSONResponse(await anyio.to_thread.run_sync(curation_answer, project, clusters))
    except Rejected as err:
        return refusal(err)


@router.get("/review/curation/photo")
async def curation_photo(request: Request, service: CurrentService) -> Response:
    """A training photo's thumbnail (query `id`: its id in dedupe's manifest) as a JPEG."""
    try:
        desk = _desk(service, request)
        project = _project(desk, request)
        photo_id = request.query_params.get("id", "")
        max_pixels = desk.info.serve.max_pixels
        return jpeg(await anyio.to_thread.run_sync(_curation_photo, project, photo_id, max_pixels))
    except Rejected as err:
        return refusal(err)


@router.post("/review/curation/decision")
async def curation_decision(request: Request, service: CurrentService) -> Response:
    """A keep, drop or relabel decision on a training photo: JSON {"id", "decision",
    "new_label" (a class, for a relabel), "note"}, written to the decisions file dedupe applies
    on the next `dvc repro` (a later decision for the same id replaces the earlier one)."""
    try:
        project = _project(_desk(service, request), request)
        data = await _json_body(request)
        return JSONResponse(await anyio.to_thread.run_sync(_decide, project, data))
    except Rejected as err:
        return refusal(err)
