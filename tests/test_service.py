"""The real BentoML server (`bentoml serve service.service:Classifier`) on a packaged tiny model."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import lightning
import numpy as np
import pytest
import torch
from bentoml._internal.models import ModelStore
from PIL import Image

from service import MODEL_NAME_ENV
from stages.package import export_package, save_to_store
from vitrine.images import load_square
from vitrine.models import ImageClassifier

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "data" / "raw" / "avito-raw.tar.gz"
CLASSES = ["laptop", "phone"]
MODEL_NAME = "vitrine-test-classifier"
START_TIMEOUT_S = 120


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
    (root / "evaluate.json").write_text(json.dumps({"accuracy": 0.5, "n_test": 2}))
    export_package(train, root / "evaluate.json", root / "package")
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


def phone_photo() -> bytes:
    """The largest phone photo of the vendored archive (or a synthetic JPEG without it)."""
    if ARCHIVE.exists():
        with tarfile.open(ARCHIVE) as archive:
            phones = [
                m
                for m in archive.getmembers()
                if m.isfile() and m.name.startswith("raw_data/phone/")
            ]
            member = max(phones, key=lambda m: m.size)
            return archive.extractfile(member).read()
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def in_process_probabilities(package: Path, data: bytes) -> list[float]:
    """What evaluation computes: load_square -> the packaged model -> softmax."""
    info = json.loads((package / "model.json").read_text())
    model = torch.jit.load(str(package / "model.pt"))
    batch = torch.from_numpy(load_square(data, info["image_size"]).copy()).unsqueeze(0)
    with torch.inference_mode():
        return torch.softmax(model(batch), dim=1)[0].tolist()


def classify(server: Server, data: bytes, field: str = "image") -> httpx.Response:
    files = {field: ("upload.jpg", data, "application/octet-stream")}
    return httpx.post(f"{server.url}/classify", files=files, timeout=30)


def test_photo_is_classified_as_evaluation_would(server: Server) -> None:
    data = phone_photo()
    response = classify(server, data)

    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads((server.package / "model.json").read_text())
    assert set(body) == {"label", "confidence", "probabilities", "model_version"}
    assert body["model_version"] == info["model_version"]
    probabilities = body["probabilities"]
    assert list(probabilities) == CLASSES
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert body["label"] in CLASSES
    assert body["label"] == max(probabilities, key=probabilities.get)
    assert body["confidence"] == probabilities[body["label"]]
    expected = in_process_probabilities(server.package, data)
    assert list(probabilities.values()) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("data", "field", "status", "code"),
    [
        (b"just some text, not a photo\n", "image", 422, "not_an_image"),
        (b"", "image", 422, "empty"),
        (None, "image", 422, "truncated"),  # None: the first half of a real JPEG
        (b"\xff\xd8\xff", "photo", 400, "missing_image"),
        (b"\xff" * 20_000_001, "image", 413, "too_large"),
    ],
    ids=["text", "empty", "truncated", "wrong-field", "too-large"],
)
def test_bad_upload_is_a_4xx_with_a_reason(
    server: Server, data: bytes | None, field: str, status: int, code: str
) -> None:
    if data is None:
        photo = phone_photo()
        data = photo[: len(photo) // 2]
    response = classify(server, data, field)

    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == code and isinstance(body["detail"], str)


def test_json_request_is_a_4xx(server: Server) -> None:
    response = httpx.post(f"{server.url}/classify", json={"image": "x"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == "missing_image"


def test_server_still_answers_after_bad_uploads(server: Server) -> None:
    classify(server, b"<html>not an image</html>")
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    assert classify(server, phone_photo()).status_code == 200
