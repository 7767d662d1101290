"""The packaged classifier over HTTP: POST a product photo to /classify, get class probabilities.

    curl -F image=@photo.jpg http://127.0.0.1:3000/classify
    {"label": "phone", "confidence": 0.97, "probabilities": {"laptop": 0.03, "phone": 0.97},
     "model_version": "cnn64-..."}

Uploads go through vitrine.images.load_square and then the TorchScript model the package stage
exported: the same decode, resize and network that produced the evaluated predictions, so the
service answers exactly what evaluation measured for the same bytes. An upload that is not a
usable image gets a 4xx with a JSON body {"error": <reason code>, "detail": <text>}.

/classify is a FastAPI route mounted on the BentoML service rather than a @bentoml.api: a BentoML
api cannot hand over a multipart file as in-memory bytes (a bytes field breaks on binary data,
a Path is written to disk, a PIL image answers a non-image with a 500), and its 4xx bodies are
not ours to shape. BentoML still owns the process, model store, /readyz, /livez and /metrics.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bentoml
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser

from service import DEFAULT_MODEL_NAME, MODEL_INFO_FILE, MODEL_NAME_ENV, SCRIPTED_MODEL_FILE
from vitrine.images import Rejected, inspect_image, load_square

IMAGE_FIELD = "image"
# The limits collect applies to training images (params.yaml collect/validate blocks): a photo
# outside them never reached training, so the model has nothing meaningful to say about it.
MAX_UPLOAD_BYTES = 20_000_000
MAX_PIXELS = 40_000_000  # checked from the header, before any pixel is decoded
MIN_SIDE = 32
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers on top of the file itself

# Reason code -> HTTP status; any other vitrine.images reason is a 422.
STATUS = {
    "missing_image": 400,
    "bad_multipart": 400,
    "too_large": 413,
    "too_many_pixels": 413,
}
UNPROCESSABLE = 422


@dataclass(frozen=True)
class LoadedModel:
    module: torch.jit.ScriptModule  # uint8 (N, H, W, 3) -> logits
    classes: tuple[str, ...]
    image_size: int  # side of the square load_square produces, as in prepare
    version: str
    # One forward pass at a time: each already uses every core through torch's intra-op threads.
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)


def load_model(folder: Path) -> LoadedModel:
    """The package stage's output folder (model.pt + model.json) as a ready-to-call model."""
    info = json.loads((folder / MODEL_INFO_FILE).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        module = torch.jit.load(str(folder / SCRIPTED_MODEL_FILE), map_location="cpu")
    module.eval()
    model = LoadedModel(
        module=module,
        classes=tuple(info["classes"]),
        image_size=int(info["image_size"]),
        version=str(info["model_version"]),
    )
    # Warm-up, so that the first request is not the slow one and /readyz means ready.
    with torch.inference_mode():
        module(torch.zeros(1, model.image_size, model.image_size, 3, dtype=torch.uint8))
    return model


def predict_probabilities(model: LoadedModel, data: bytes) -> list[float]:
    """Encoded image bytes -> class probabilities, in `model.classes` order."""
    try:
        pixels = load_square(data, model.image_size)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's ways of failing on a bad file
        raise Rejected("undecodable", str(err)) from None
    batch = torch.from_numpy(pixels.copy()).unsqueeze(0)  # load_square's array is read-only
    with model.lock, torch.inference_mode():
        logits = model.module(batch)
    return torch.softmax(logits.float(), dim=1)[0].tolist()


def classify_bytes(model: LoadedModel, data: bytes) -> dict[str, Any]:
    """The /classify answer for one upload; raises Rejected for anything that is not a photo."""
    inspect_image(data, min_side=MIN_SIDE, max_pixels=MAX_PIXELS)
    probabilities = predict_probabilities(model, data)
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return {
        "label": model.classes[best],
        "confidence": probabilities[best],
        "probabilities": dict(zip(model.classes, probabilities, strict=True)),
        "model_version": model.version,
    }


class _InMemoryMultiPartParser(MultiPartParser):
    # Starlette spools file parts over 1 MB to a temporary file; the body is capped (see
    # _capped) below this size, so the upload always stays in memory.
    spool_max_size = MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD + 1


async def _capped(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The request body, refused as soon as it outgrows the cap (chunked uploads too)."""
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD:
            raise Rejected("too_large", f"upload exceeds {MAX_UPLOAD_BYTES} bytes")
        yield chunk


async def read_image_field(request: Request) -> bytes:
    """The raw bytes of the `image` part of a multipart/form-data request, read into memory."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD:
        raise Rejected("too_large", f"request of {length} bytes exceeds {MAX_UPLOAD_BYTES}")
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise Rejected(
            "missing_image",
            f"expected multipart/form-data with a file field {IMAGE_FIELD!r}, "
            f"got content type {content_type or 'none'!r}",
        )
    parser = _InMemoryMultiPartParser(
        request.headers, _capped(request.stream()), max_files=1, max_fields=8
    )
    try:
        form = await parser.parse()
    except (MultiPartException, KeyError, ValueError) as err:  # KeyError: no boundary
        raise Rejected("bad_multipart", str(err) or type(err).__name__) from None
    try:
        part = form.get(IMAGE_FIELD)
        if part is None:
            fields = sorted(form.keys())
            raise Rejected("missing_image", f"no field {IMAGE_FIELD!r} in the form (got {fields})")
        # A plain (non-file) field arrives as text; let the image check say what it is.
        data = part.encode() if isinstance(part, str) else await part.read()
    finally:
        await form.close()
    if len(data) > MAX_UPLOAD_BYTES:
        raise Rejected("too_large", f"upload of {len(data)} bytes exceeds {MAX_UPLOAD_BYTES}")
    return data


def error_response(err: Rejected) -> JSONResponse:
    return JSONResponse(
        {"error": err.code, "detail": err.detail},
        status_code=STATUS.get(err.code, UNPROCESSABLE),
    )


app = FastAPI(title="vitrine classifier", docs_url=None, redoc_url=None, openapi_url=None)


@bentoml.service(traffic={"timeout": 60})
@bentoml.asgi_app(app, path="/")
class Classifier:
    """Product photo -> class probabilities, with the model the package stage stored."""

    model_ref = bentoml.models.BentoModel(
        f"{os.environ.get(MODEL_NAME_ENV, DEFAULT_MODEL_NAME)}:latest"
    )

    def __init__(self) -> None:
        self.model = load_model(Path(self.model_ref.path))

    @app.post("/classify")
    async def classify(self, request: Request) -> JSONResponse:
        try:
            data = await read_image_field(request)
            result = await run_in_threadpool(classify_bytes, self.model, data)
        except Rejected as err:
            return error_response(err)
        return JSONResponse(result)
