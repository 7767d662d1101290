"""The service: its pure parts in-process, then the real BentoML server on loopback.

The server (`bentoml serve service.service:Classifier`, as `make serve` runs it) serves a tiny
untrained model packaged by the package stage with small serve limits, from two worker
processes, and gets real photos from the bundled Avito archive.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import lightning
import numpy as np
import pytest
import torch
from bentoml._internal.models import ModelStore
from PIL import Image

from service.batching import MicroBatcher
from service.core import (
    INLINE_DECODE_PIXELS,
    cheap_to_decode,
    check_answer,
    classify_answer,
    open_all,
    prepare_all,
)
from service.rebalance import KeepAliveRebalancer
from tests.helpers.candidates import PROVENANCE, evaluation_report, serve_checkpoint
from vitrine.contracts import MODEL_NAME_ENV, PackagedModel, ServeConfig, read_packaged
from vitrine.images import Rejected, load_square
from vitrine.model.networks import ImageClassifier
from vitrine.packaging.bundle import export_package
from vitrine.packaging.store import save_to_store
from vitrine.runtime.decisions import decide
from vitrine.runtime.onnx import onnx_proba

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "data" / "raw" / "avito-raw.tar.gz"
CLASSES = ["laptop", "phone"]
MODEL_NAME = "vitrine-test-classifier"
START_TIMEOUT_S = 120
ARTIFACTS = REPO / "tests" / "artifacts"  # screenshots; ignored by git (see its .gitignore)
CHROMIUM = Path("/usr/bin/chromium")
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def package_tiny_model(root: Path) -> Path:
    """An untrained checkpoint through the package stage into a store at <root>/home."""
    torch.manual_seed(0)
    module = ImageClassifier("cnn64", CLASSES, lr=1e-3)
    train = root / "train"
    train.mkdir()
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        train / "best.ckpt",
    )
    info = {"model": "cnn64", "classes": CLASSES, "image_size": 128, "input_size": 64}
    (train / "model.json").write_text(json.dumps(info))
    served = serve_checkpoint(train, root / "served")
    report = evaluation_report({"accuracy": 0.5, "n": 2})
    export_package(train, served, report, root / "package", SERVE, PROVENANCE, DECISION_GAIN)
    models = root / "home" / "models"
    models.mkdir(parents=True)
    save_to_store(root / "package", MODEL_NAME, store=ModelStore(models))
    return root / "package"


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (BentoML shuts down gracefully), then SIGKILL to the whole group if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("service")
    package = package_tiny_model(root)
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(root / "home"),
        "BENTOML_DO_NOT_TRACK": "true",
        MODEL_NAME_ENV: MODEL_NAME,
    }
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bentoml",
            "serve",
            "service.service:Classifier",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"server exited ({process.returncode}):\n"
                    f"{(root / 'server.log').read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in {START_TIMEOUT_S} s")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield Server(url=url, package=package)
    finally:
        stop(process)
        log.close()
    assert process.returncode == 0, "the server did not shut down cleanly on SIGTERM"


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
    assert check_answer("laptop", confident)["suggested_category"] == "phone"
    assert check_answer("laptop", unsure)["suggested_category"] == "laptop"  # no confident hint
    assert check_answer("phone", confident) == {
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
        assert set(body) == {"label", "confidence", "probabilities", "abstain", "model_version"}
        assert body["model_version"] == info.model_version
        probabilities = body["probabilities"]
        assert list(probabilities) == CLASSES
        decided = decide(np.array([list(probabilities.values())]), DECISION_GAIN)[0]
        assert body["label"] == CLASSES[decided]
        assert body["confidence"] == probabilities[body["label"]]
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


def chromium_or_skip() -> Path:
    """Chromium, or a skip with the reason outside CI (CI installs it: .ci/run)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium); CI runs this test")


@pytest.mark.slow
def test_upload_page_confirms_or_switches_the_category(server: Server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = chromium_or_skip()
    photo = tmp_path / "phone.jpg"
    photo.write_bytes(phone_photo())
    predicted = classify(server, photo.read_bytes()).json()["label"]
    other = next(c for c in CLASSES if c != predicted)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            assert page.locator("#category option").all_inner_texts() == CLASSES
            for declared, kind in ((predicted, "success"), (other, "warning")):
                page.select_option("#category", declared)
                page.set_input_files("#image", str(photo))
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
        finally:
            browser.close()
