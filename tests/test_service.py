"""The service: its pure parts in-process, then the real BentoML server on loopback.

The server (`bentoml serve service.service:Classifier`, as `make serve` runs it) serves a tiny
untrained model packaged by the package stage with small serve limits, from two worker
processes, and gets real photos from the bundled Avito archive.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import io
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import types
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.testclient import TestClient

from service.batching import MicroBatcher
from service.core import (
    INLINE_DECODE_PIXELS,
    cheap_to_decode,
    check_answer,
    classify_answer,
    open_all,
    prepare_all,
    status_of,
)
from service.rebalance import KeepAliveRebalancer
from service.responses import DATA_POLICY, ResponsePolicy, page_policy
from service.uploads import Form, read_form
from tests.helpers.browser import ARTIFACTS, chromium_page, wait_for_image
from tests.helpers.candidates import PROVENANCE
from tests.helpers.photos import broken_avif, spider_image
from tests.helpers.records import record_config
from tests.helpers.server import start_server, stop
from tests.helpers.tiny_package import CLASSES, package_tiny_model
from vitrine.contracts import MODEL_NAME_ENV, PackagedModel, ServeConfig, read_packaged
from vitrine.images import Rejected, load_square
from vitrine.runtime.answers import model_input
from vitrine.runtime.decisions import decide
from vitrine.runtime.onnx import onnx_proba

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "data" / "raw" / "avito-raw.tar.gz"
MODEL_NAME = "vitrine-test-classifier"
PROJECT = (str(REPO / "service"), str(REPO / "vitrine"))  # frames of the service's own code
# The served model's decision rule (vitrine.runtime.decisions): a phone photo earns 3, any
# mistake costs 1, so a photo is answered "phone" from p(phone) = 1/3 on, not from 1/2.
DECISION_GAIN = np.array([[1.0, -1.0], [-1.0, 3.0]])
# Small limits, so that the hostile cases stay cheap (and prove the limits come from params).
SERVE = ServeConfig(
    max_upload_bytes=1_000_000,
    max_pixels=4_000_000,
    min_side=32,
    max_batch_images=6,
    max_batch_bytes=2_000_000,
    max_batch_size=8,
    max_batch_wait_ms=2.0,
    workers=2,  # two processes, as a small model is served: every test also crosses both
    torch_threads=1,
    concurrent_batches=2,
    rebalance_every=4,
)


@dataclass(frozen=True)
class Server:
    url: str
    package: Path  # the package stage's output folder the server's model came from
    log: Path  # what the server writes (stdout and stderr)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("service")
    serve = replace(SERVE, record=record_config(root / "records"))
    package = package_tiny_model(root, serve, DECISION_GAIN, MODEL_NAME)
    running = start_server(root / "home", MODEL_NAME, root / "server.log")
    try:
        yield Server(url=running.url, package=package, log=running.log)
    finally:
        stop(running)
    assert running.process.returncode == 0, "the server did not shut down cleanly on SIGTERM"


# --- Photos and hostile payloads ----------------------------------------------------------------


def archive_photos(label: str, n: int) -> list[bytes]:
    """The n largest photos of one class in the vendored archive."""
    with tarfile.open(ARCHIVE) as archive:
        members = [
            m
            for m in archive.getmembers()
            if m.isfile() and m.name.startswith(f"raw_data/{label}/")
        ]
        members.sort(key=lambda m: (-m.size, m.name))
        return [archive.extractfile(m).read() for m in members[:n]]


def phone_photo() -> bytes:
    return archive_photos("phone", 1)[0]


def sample_photos() -> list[bytes]:
    return archive_photos("laptop", 3) + archive_photos("phone", 3)


def png_bomb(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels (its few data bytes never get that far)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", side, side) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def in_process_probabilities(package: Path, data: bytes) -> list[float]:
    """What evaluate computes: load_square -> the served model.onnx (ONNX Runtime) -> softmax."""
    info = read_packaged(package)
    photo = load_square(data, info.image_size)[np.newaxis]
    model = (package / "model.onnx").read_bytes()
    return onnx_proba(model, info.input_size, photo, batch_size=1, desc="t")[0].tolist()


def truncated_jpeg() -> bytes:
    photo = phone_photo()
    return photo[: len(photo) // 2]


# --- In-process: batching and the answers -------------------------------------------------------


def package_info(threshold: float) -> PackagedModel:
    return PackagedModel(
        "cnn64", ("laptop", "phone"), 128, 64, "cnn64-x", threshold, SERVE, PROVENANCE
    )


def test_a_store_without_the_model_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """`make serve` in a fresh clone, before `make repro` has saved a model."""
    command = ["bentoml", "serve", "service.service:Classifier", "--port", "0"]
    done = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=REPO,
        env={**os.environ, "BENTOML_HOME": str(tmp_path), MODEL_NAME_ENV: "vitrine-absent"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"service: no model vitrine-absent:latest in the BentoML store {tmp_path}: "
        "run `make repro` (or `dvc repro package`) first"
    )


def test_answers_follow_the_packaged_decision_rule() -> None:
    likeliest = classify_answer([0.6, 0.4], package_info(0.0))
    decided = classify_answer(
        [0.6, 0.4], replace(package_info(0.0), decision_gain=tuple(map(tuple, DECISION_GAIN)))
    )
    assert likeliest["label"] == "laptop" and likeliest["confidence"] == 0.6
    assert decided["label"] == "phone" and decided["confidence"] == 0.4
    assert decided["probabilities"] == {"laptop": 0.6, "phone": 0.4}


def test_answers_abstain_below_the_threshold() -> None:
    confident = classify_answer([0.1, 0.9], package_info(0.6))
    unsure = classify_answer([0.45, 0.55], package_info(0.6))
    assert confident["label"] == "phone" and not confident["abstain"]
    assert unsure["label"] == "phone" and unsure["abstain"]
    info = package_info(0.6)
    assert check_answer("laptop", confident, info)["suggested_category"] == "phone"
    assert check_answer("laptop", unsure, info)["suggested_category"] == "laptop"  # no hint
    assert check_answer("phone", confident, info) == {
        "declared": "phone",
        "predicted": "phone",
        "matches": True,
        "confidence": 0.9,
        "suggested_category": "phone",
        "abstain": False,
    }


def jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def test_only_small_or_refused_uploads_are_cheap_to_decode() -> None:
    side = int(INLINE_DECODE_PIXELS**0.5)
    photos = [jpeg(120, 90), jpeg(side, side), jpeg(side + 1, side + 1), jpeg(4000, 30)]
    refused = [b"<html>not a photo</html>", b""]  # refused from their headers, never decoded
    opened = open_all(photos + refused, package_info(0.5))
    # Decided by pixels, not by the longer side (4000x30).
    assert [cheap_to_decode(upload) for upload in opened] == [True, True, False, True, True, True]


def test_uploads_are_judged_from_their_headers_then_decoded_once() -> None:
    info = package_info(0.5)
    photo = jpeg(120, 90)
    uploads = [
        photo,
        b"<html></html>",
        jpeg(2100, 2000),  # over SERVE.max_pixels
        b"\xff" * (SERVE.max_upload_bytes + 1),
        truncated_jpeg(),  # a sound header: only the decode finds it cut short
        jpeg(200, 20),
    ]
    opened = open_all(uploads, info)
    refused_unread = [o.code for o in opened if isinstance(o, Rejected)]
    assert refused_unread == ["not_an_image", "too_many_pixels", "too_large"]
    prepared = prepare_all(opened, info)
    np.testing.assert_array_equal(prepared[0], load_square(photo, info.image_size))
    codes = [p.code for p in prepared[1:]]
    assert codes == ["not_an_image", "too_many_pixels", "too_large", "truncated", "too_small"]


def test_batcher_groups_concurrent_calls_and_keeps_them_apart() -> None:
    calls: list[int] = []

    def forward(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        time.sleep(0.02)  # the model is busy: later requests queue meanwhile
        return images * 10

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(forward, max_batch_size=8, max_wait_ms=1)
        inputs = [np.full((1 + i % 2, 1), i) for i in range(20)]  # 1 or 2 images per call
        return inputs, await asyncio.gather(*(batcher(x) for x in inputs))

    inputs, outputs = asyncio.run(scenario())
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(y, x * 10)
    assert sum(calls) == 30 and max(calls) <= 8
    assert len(calls) < 20  # grouped


@pytest.mark.parametrize("max_concurrent", [1, 2, 3])
def test_batcher_runs_up_to_max_concurrent_forward_passes_at_once(max_concurrent: int) -> None:
    lock = threading.Lock()
    running, most = 0, 0

    def forward(images: np.ndarray) -> np.ndarray:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.03)  # long enough for the other slots to fill
        with lock:
            running -= 1
        return images + 1

    async def scenario() -> tuple[list[np.ndarray], list[np.ndarray]]:
        batcher = MicroBatcher(
            forward, max_batch_size=2, max_wait_ms=0, max_concurrent=max_concurrent
        )
        inputs = [np.full((1, 1), i) for i in range(12)]
        return inputs, await asyncio.gather(*(batcher(x) for x in inputs))

    inputs, outputs = asyncio.run(scenario())
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(y, x + 1)
    assert most == max_concurrent


def test_batcher_hands_the_model_error_to_every_caller() -> None:
    def forward(images: np.ndarray) -> np.ndarray:
        raise RuntimeError("model broke")

    async def scenario() -> list[object]:
        batcher = MicroBatcher(forward, max_batch_size=8, max_wait_ms=1)
        return await asyncio.gather(
            *(batcher(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True
        )

    assert [str(r) for r in asyncio.run(scenario())] == ["model broke"] * 3


def closing_responses(every: int, requests: int) -> list[bool]:
    """Whether each of `requests` responses through KeepAliveRebalancer asks to close."""

    async def app(scope: dict, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"1")]})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario() -> list[bool]:
        middleware, closing = KeepAliveRebalancer(app, every), []
        for _ in range(requests):
            sent: list[dict] = []

            async def send(message: dict, sent: list[dict] = sent) -> None:
                sent.append(message)

            await middleware({"type": "http"}, None, send)
            assert sent[0]["headers"][0] == (b"x", b"1") and sent[1]["body"] == b"{}"
            closing.append((b"connection", b"close") in sent[0]["headers"])
        return closing

    return asyncio.run(scenario())


def test_rebalancer_closes_every_nth_connection_and_leaves_the_rest_alone() -> None:
    assert closing_responses(every=3, requests=9) == [False, False, True] * 3
    assert closing_responses(every=1, requests=2) == [True, True]


def test_a_refused_upload_is_freed_without_the_garbage_collector() -> None:
    """No refusal keeps its upload in a reference cycle (its traceback's frames hold the bytes):
    the service collects cyclic garbage rarely, and such uploads would pile up in between."""
    info = package_info(0.5)
    uploads = [
        b"<html></html>",
        b"\xff" * (SERVE.max_upload_bytes + 1),
        jpeg(2100, 2000),
        truncated_jpeg(),
        jpeg(200, 20),
    ]
    prepare_all(open_all(uploads, info), info)  # first use: imports and caches settle
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep what the collector finds, to look at it
    try:
        prepared = prepare_all(open_all(uploads, info), info)
        assert all(isinstance(p, Rejected) and p.__traceback__ is None for p in prepared)
        del prepared
        gc.collect()
        frames = [o for o in gc.garbage if isinstance(o, types.FrameType)]
        ours = [f.f_code.co_filename for f in frames if f.f_code.co_filename.startswith(PROJECT)]
        assert ours == []  # no frame of ours (and so no upload) waited for the collector
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def multipart_body(image: bytes, boundary: str = "b") -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )


def read_messages(messages: list[dict], content_type: str, length: int) -> Form:
    """read_form over a request whose ASGI messages are `messages`, in order."""

    async def receive() -> dict:
        return messages.pop(0)

    headers = {"content-type": content_type, "content-length": length}
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/classify",
        "query_string": b"",
        "headers": [(k.encode(), str(v).encode()) for k, v in headers.items()],
    }
    return asyncio.run(read_form(Request(scope, receive), max_body_bytes=10**6, max_images=1))


def read_body(body: bytes, content_type: str) -> Form:
    """read_form over a whole body sent in one message."""
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    return read_messages(messages, content_type, len(body))


def test_an_upload_abandoned_mid_body_is_the_clients_doing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = multipart_body(jpeg(120, 90))
    messages = [
        {"type": "http.request", "body": body[: len(body) // 2], "more_body": True},
        {"type": "http.disconnect"},
    ]
    caplog.set_level(logging.DEBUG, logger="service.uploads")
    with pytest.raises(Rejected) as caught:
        read_messages(messages, "multipart/form-data; boundary=b", len(body))
    assert caught.value.code == "client_closed"
    assert status_of(caught.value) == 499  # a client's status (nginx's): never counted a 5xx
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_a_body_cut_before_its_closing_boundary_is_malformed_not_imageless() -> None:
    photo = jpeg(120, 90)
    whole = multipart_body(photo, "b")
    assert read_body(whole, "multipart/form-data; boundary=b").images == (photo,)
    epilogue = whole + b"an epilogue, which RFC 2046 allows\r\n"
    assert read_body(epilogue, "multipart/form-data; boundary=b").images == (photo,)
    for cut in (whole.removesuffix(b"--\r\n"), whole[: whole.rindex(b"\r\n--b")]):
        with pytest.raises(Rejected) as caught:
            read_body(cut, "multipart/form-data; boundary=b")
        assert caught.value.code == "bad_multipart"
        assert "ends before its closing boundary" in caught.value.detail


@pytest.mark.parametrize("boundary", ['""', "x" * 71])
def test_a_boundary_outside_1_to_70_characters_is_refused(boundary: str) -> None:
    body = multipart_body(jpeg(120, 90), boundary.strip('"'))
    with pytest.raises(Rejected) as caught:
        read_body(body, f"multipart/form-data; boundary={boundary}")
    assert caught.value.code == "bad_multipart"
    assert "a boundary is 1 to 70 characters" in caught.value.detail


def policy_app() -> FastAPI:
    app = FastAPI()

    @app.get("/answer")
    async def answer() -> JSONResponse:
        return JSONResponse({"label": "phone"})

    @app.post("/upload")
    async def upload() -> JSONResponse:
        return JSONResponse({"error": "too_large", "detail": "1 > 0"}, status_code=413)

    @app.get("/page")
    async def page() -> HTMLResponse:
        return HTMLResponse("<p>hi</p>", headers={"Content-Security-Policy": "default-src 'self'"})

    @app.get("/crash")
    async def crash() -> JSONResponse:
        raise RuntimeError("model broke")

    return app


@pytest.mark.parametrize(
    ("app", "method", "path", "status", "body"),
    [
        (policy_app(), "GET", "/answer", 200, {"label": "phone"}),
        (policy_app(), "POST", "/upload", 413, {"error": "too_large", "detail": "1 > 0"}),
        # FastAPI's own {"detail": ...} and Starlette's plain text are reshaped.
        (
            policy_app(),
            "GET",
            "/upload",
            405,
            {
                "error": "method_not_allowed",
                "detail": "GET is not allowed on /upload (allowed: POST)",
            },
        ),
        (
            policy_app(),
            "GET",
            "/nowhere",
            404,
            {"error": "not_found", "detail": "no such endpoint: /nowhere"},
        ),
        (
            Starlette(),
            "GET",
            "/nowhere",
            404,
            {"error": "not_found", "detail": "no such endpoint: /nowhere"},
        ),
        (
            policy_app(),
            "GET",
            "/crash",
            500,
            {"error": "internal_server_error", "detail": "Internal Server Error"},
        ),
    ],
    ids=["answer", "shaped-error", "fastapi-405", "fastapi-404", "starlette-404", "crash"],
)
def test_response_policy_shapes_errors_and_adds_headers(
    app: FastAPI, method: str, path: str, status: int, body: dict
) -> None:
    with TestClient(ResponsePolicy(app), raise_server_exceptions=False) as client:
        response = client.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json() == body
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["content-security-policy"] == DATA_POLICY


def test_a_route_keeps_its_own_content_security_policy() -> None:
    with TestClient(ResponsePolicy(policy_app())) as client:
        response = client.get("/page")
    assert response.headers["content-security-policy"] == "default-src 'self'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.text == "<p>hi</p>"


def csp_hash(code: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"


def test_the_page_policy_allows_the_pages_own_inline_code_only() -> None:
    policy = page_policy("<style>p { color: red }</style><p>x</p><script>go();</script>")
    directives = dict(d.split(" ", 1) for d in policy.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == csp_hash("go();")
    assert directives["style-src"] == csp_hash("p { color: red }")
    assert directives["img-src"] == "blob:"  # the photo's preview
    assert directives["connect-src"] == "'self'"  # its fetch of check_category
    assert "unsafe" not in policy
    assert "script-src 'none'" in page_policy("<p>no script</p>")


# --- The real server ----------------------------------------------------------------------------


def post(server: Server, endpoint: str, files: list, data: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/{endpoint}", files=files, data=data, timeout=30)


def image_part(data: bytes, field: str = "image") -> tuple:
    return (field, ("upload.jpg", data, "application/octet-stream"))


def classify(server: Server, data: bytes, field: str = "image") -> httpx.Response:
    return post(server, "classify", [image_part(data, field)])


@pytest.mark.slow
def test_photos_are_classified_as_evaluation_would(server: Server) -> None:
    """Served probabilities equal evaluate's (load_square -> exported model -> softmax), and so
    do the answers (evaluate's decision rule, not the most probable class)."""
    info = read_packaged(server.package)
    photos = sample_photos()
    labels = []
    batch = post(server, "classify_batch", [image_part(p) for p in photos])
    assert batch.status_code == 200, batch.text
    for photo, batched in zip(photos, batch.json()["results"], strict=True):
        body = classify(server, photo).json()
        assert set(body) == {
            "label",
            "level",
            "confidence",
            "probabilities",
            "abstain",
            "model_version",
            "request_id",
        }
        assert body["model_version"] == info.model_version
        probabilities = body["probabilities"]
        assert list(probabilities) == CLASSES
        decided = decide(np.array([list(probabilities.values())]), DECISION_GAIN)[0]
        assert body["label"] == CLASSES[decided]
        assert body["confidence"] == probabilities[body["label"]]
        assert body["level"] == 1  # flat classes: every answer is a class
        labels.append((body["label"], max(probabilities, key=probabilities.get)))
        assert body["abstain"] is False  # the report has no abstain threshold: never abstain
        expected = in_process_probabilities(server.package, photo)
        assert list(probabilities.values()) == pytest.approx(expected, abs=1e-5)
        assert list(batched["probabilities"].values()) == pytest.approx(expected, abs=1e-5)
        assert batched["label"] == body["label"]
    # The photos include some the two rules answer differently, so the rule was exercised.
    assert any(decided != likeliest for decided, likeliest in labels)


@pytest.mark.slow
def test_batch_answers_each_image_in_order(server: Server) -> None:
    laptop, phone = archive_photos("laptop", 1)[0], phone_photo()
    parts = [image_part(laptop), image_part(b"<html>no</html>"), image_part(phone)]
    response = post(server, "classify_batch", parts)

    assert response.status_code == 200, response.text
    first, bad, last = response.json()["results"]
    assert bad == {"error": "not_an_image", "detail": "HTML document"}
    for answer, photo in ((first, laptop), (last, phone)):
        alone = classify(server, photo).json()
        assert answer["label"] == alone["label"]
        # A batch of 2 runs other kernels than a batch of 1: equal up to float rounding.
        assert answer["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-6)


@pytest.mark.slow
def test_batch_refuses_more_images_than_the_cap(server: Server) -> None:
    photo = archive_photos("laptop", 1)[0]
    response = post(server, "classify_batch", [image_part(photo)] * (SERVE.max_batch_images + 1))
    assert response.status_code == 413
    assert response.json()["error"] == "too_many_images"


@pytest.mark.slow
def test_check_category_confirms_or_suggests(server: Server) -> None:
    photo = phone_photo()
    predicted = classify(server, photo).json()["label"]
    other = next(c for c in CLASSES if c != predicted)

    same = post(server, "check_category", [image_part(photo)], {"declared_category": predicted})
    wrong = post(server, "check_category", [image_part(photo)], {"declared_category": other})

    assert same.status_code == wrong.status_code == 200
    assert same.json()["matches"] is True and same.json()["suggested_category"] == predicted
    assert wrong.json()["matches"] is False
    assert wrong.json()["declared"] == other and wrong.json()["predicted"] == predicted
    assert wrong.json()["suggested_category"] == predicted


@pytest.mark.slow
@pytest.mark.parametrize(
    ("declared", "status", "code"),
    [("car", 422, "unknown_category"), (None, 400, "missing_field")],
    ids=["unknown", "missing"],
)
def test_check_category_needs_a_known_category(
    server: Server, declared: str | None, status: int, code: str
) -> None:
    data = None if declared is None else {"declared_category": declared}
    response = post(server, "check_category", [image_part(phone_photo())], data)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    if code == "unknown_category":
        assert body["known_categories"] == CLASSES


HOSTILE = {
    # name: (parts, status, reason code)
    "empty": (lambda: [image_part(b"")], 422, "empty"),
    "text": (lambda: [image_part(b"just some text, not a photo\n")], 422, "not_an_image"),
    "html": (lambda: [image_part(b"<!doctype html><html></html>")], 422, "not_an_image"),
    "truncated": (lambda: [image_part(truncated_jpeg())], 422, "truncated"),
    "bomb": (lambda: [image_part(png_bomb())], 413, "too_many_pixels"),
    "too-small": (lambda: [image_part(tiny_png())], 422, "too_small"),
    # A decoder's own exception (EOFError, libavif's RuntimeError): the photo's reason, no 500.
    "spider": (lambda: [image_part(spider_image())], 422, "undecodable"),
    "avif-payload": (lambda: [image_part(broken_avif("payload"))], 422, "undecodable"),
    "avif-no-item": (lambda: [image_part(broken_avif("no_item"))], 422, "undecodable"),
    # Over max_upload_bytes, within max_batch_bytes: a 413, or its own entry in a batch.
    "oversized": (lambda: [image_part(b"\xff" * 1_500_000)], 413, "too_large"),
    "misnamed-field": (lambda: [image_part(phone_photo(), "photo")], 400, "missing_image"),
    "no-file": (lambda: [("declared_category", (None, b"phone"))], 400, "missing_image"),
}
ENDPOINTS = ("classify", "classify_batch", "check_category")


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "PNG")
    return buffer.getvalue()


def assert_json_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code and isinstance(body["detail"], str)


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_upload_is_a_4xx_with_a_reason(server: Server, endpoint: str, case: str) -> None:
    make_parts, status, code = HOSTILE[case]
    response = post(server, endpoint, make_parts(), {"declared_category": "phone"})
    if endpoint == "classify_batch" and code != "missing_image":
        # A bad image in a batch gets its own error entry (see Classifier.classify_batch).
        assert response.status_code == 200, response.text
        [entry] = response.json()["results"]
        assert entry["error"] == code and isinstance(entry["detail"], str)
    else:
        assert_json_error(response, status, code)


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        ({"json": {"image": "x"}}, 400, "missing_image"),
        (
            {"content": b"raw bytes", "headers": {"content-type": "image/jpeg"}},
            400,
            "missing_image",
        ),
        (
            {"content": b"--x--", "headers": {"content-type": "multipart/form-data"}},
            400,
            "bad_multipart",
        ),
        (
            {
                "content": b"\xff" * 2_200_000,
                "headers": {"content-type": "multipart/form-data; boundary=x"},
            },
            413,
            "too_large",
        ),
    ],
    ids=["json", "not-multipart", "no-boundary", "oversized-body"],
)
def test_malformed_request_is_a_4xx(
    server: Server, endpoint: str, request_kwargs: dict, status: int, code: str
) -> None:
    response = httpx.post(f"{server.url}/{endpoint}", timeout=30, **request_kwargs)
    assert_json_error(response, status, code)


@pytest.mark.slow
def test_server_stays_up_and_ready_after_hostile_input(server: Server) -> None:
    for make_parts, _, _ in HOSTILE.values():
        for endpoint in ENDPOINTS:
            assert post(server, endpoint, make_parts()).status_code < 500
    for path in ("readyz", "livez", "metrics"):
        assert httpx.get(f"{server.url}/{path}", timeout=5).status_code == 200
    assert classify(server, phone_photo()).status_code == 200


def request_counts(server: Server) -> Counter:
    """/metrics' request count per (endpoint, status), over both worker processes."""
    counts: Counter = Counter()
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("bentoml_service_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            counts[labels["endpoint"], labels["http_response_code"]] += float(line.split()[-1])
    return counts


def abandon_upload(server: Server, endpoint: str) -> None:
    """Half a multipart body, then the connection closed: a client that gave up."""
    body = multipart_body(phone_photo())
    head = (
        f"POST /{endpoint} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])


@pytest.mark.slow
def test_an_abandoned_upload_is_no_server_error(server: Server) -> None:
    log_start = server.log.stat().st_size
    before = request_counts(server)
    for endpoint in ENDPOINTS:
        abandon_upload(server, endpoint)
    deadline = time.monotonic() + 20
    while True:  # until both workers have counted every abandoned request
        counts = request_counts(server) - before
        if sum(counts[f"/{e}", "499"] for e in ENDPOINTS) == len(ENDPOINTS):
            break
        assert time.monotonic() < deadline, f"not all counted as client-closed: {counts}"
        time.sleep(0.2)
    assert [key for key, n in counts.items() if key[1].startswith("5") and n] == []
    time.sleep(0.5)  # the log lines of those requests
    log = server.log.read_bytes()[log_start:].decode()
    assert "Traceback" not in log and "ClientDisconnect" not in log and "[ERROR]" not in log, log


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/classify", 405, "method_not_allowed"),
        ("PUT", "/check_category", 405, "method_not_allowed"),
        ("DELETE", "/metrics", 405, "method_not_allowed"),  # one of BentoML's routes
        ("GET", "/no/such/page", 404, "not_found"),
        ("POST", "/classify/more", 404, "not_found"),
    ],
)
def test_a_wrong_route_or_method_gets_the_json_error_body(
    server: Server, method: str, path: str, status: int, code: str
) -> None:
    response = httpx.request(method, f"{server.url}{path}", timeout=10)
    assert_json_error(response, status, code)
    assert path in response.json()["detail"]


@pytest.mark.slow
def test_every_response_carries_the_security_headers(server: Server) -> None:
    page = httpx.get(f"{server.url}/", timeout=10)
    responses = {
        "page": page,
        "page (HEAD)": httpx.head(f"{server.url}/", timeout=10),
        "answer": classify(server, phone_photo()),
        "refusal": classify(server, b"not a photo"),
        "not found": httpx.get(f"{server.url}/nowhere", timeout=10),
        "metrics": httpx.get(f"{server.url}/metrics", timeout=10),
    }
    for name, response in responses.items():
        assert response.headers.get("x-content-type-options") == "nosniff", name
        assert response.headers.get("referrer-policy") == "no-referrer", name
        expected = page_policy(page.text) if name.startswith("page") else DATA_POLICY
        assert response.headers.get("content-security-policy") == expected, name
    assert "'sha256-" in page.headers["content-security-policy"]  # the page's inline script
    assert "unsafe" not in page.headers["content-security-policy"]


@pytest.mark.slow
def test_a_keep_alive_connection_is_closed_within_every_rebalance_interval(server: Server) -> None:
    # Each worker counts its own responses; a connection it closes reopens on either worker.
    # Either way, no SERVE.rebalance_every responses in a row can all keep the connection.
    photo, every = phone_photo(), SERVE.rebalance_every
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answers = [client.post("/classify", files=[image_part(photo)]) for _ in range(3 * every)]
    assert [a.status_code for a in answers] == [200] * len(answers)
    closing = [a.headers.get("connection") == "close" for a in answers]
    assert all(any(closing[i : i + every]) for i in range(len(closing) - every + 1)), closing


@pytest.mark.slow
def test_hundreds_of_concurrent_requests_all_succeed(server: Server) -> None:
    photos = sample_photos()

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
            gate = asyncio.Semaphore(32)

            async def one(i: int) -> int:
                async with gate:
                    files = [image_part(photos[i % len(photos)])]
                    return (await client.post("/classify", files=files)).status_code

            return await asyncio.gather(*(one(i) for i in range(300)))

    statuses = asyncio.run(load())
    assert statuses == [200] * 300
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 'endpoint="/classify"' in metrics


# --- The upload page in a real browser ----------------------------------------------------------


@pytest.mark.slow
def test_upload_page_confirms_or_switches_the_category(server: Server, tmp_path: Path) -> None:

    photo = tmp_path / "phone.jpg"
    photo.write_bytes(phone_photo())
    predicted = classify(server, photo.read_bytes()).json()["label"]
    other = next(c for c in CLASSES if c != predicted)

    with chromium_page() as (page, blocked):
        page.goto(server.url + "/")
        assert page.locator("#category option").all_inner_texts() == CLASSES
        for declared, kind in ((predicted, "success"), (other, "warning")):
            page.select_option("#category", declared)
            page.set_input_files("#image", str(photo))
            # The preview (a blob: URL) shows: the policy lets the page's own script run.
            wait_for_image(page, "#preview")
            page.click("#submit")
            message = page.locator(f"#message.{kind}")
            message.wait_for(timeout=15_000)
            screenshot = ARTIFACTS / f"upload_page_{kind}.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot: {screenshot}")
            assert predicted in page.inner_text("#prediction")
            # Matching or not, the category box ends up on the model's class.
            assert page.input_value("#category") == predicted
            if kind == "success":
                assert "matches" in message.inner_text()
            else:
                assert f"looks like a {predicted}, not a {other}" in message.inner_text()
        assert blocked == []


@pytest.mark.parametrize("resize", ["letterbox", "center_crop"])
def test_uploads_are_made_square_by_the_packaged_models_rule(resize: str) -> None:
    """The packaged model.json names how prepare made the training squares; the service, and
    the scorer and heat maps through the same function, make uploads square the same way."""
    info = replace(package_info(0.5), resize=resize)
    ramp = np.repeat(np.linspace(0, 255, 160, dtype=np.uint8)[None, :, None], 90, axis=0)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(ramp, 3, axis=2)).save(buf, "JPEG")  # dark left, light right
    photo = buf.getvalue()
    np.testing.assert_array_equal(
        model_input(photo, info), load_square(photo, info.image_size, resize)
    )
    assert not np.array_equal(model_input(photo, info), load_square(photo, info.image_size))
