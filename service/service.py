"""The packaged classifier over HTTP, for the marketplace upload flow.

    curl -F image=@photo.jpg http://127.0.0.1:3000/classify
    {"label": "phone", "confidence": 0.97, "probabilities": {"laptop": 0.03, "phone": 0.97},
     "abstain": false, "model_version": "cnn64-...", "request_id": "01938f2a..."}
    curl -F image=@a.jpg -F image=@b.jpg http://127.0.0.1:3000/classify_batch
    curl -F image=@photo.jpg -F declared_category=laptop http://127.0.0.1:3000/check_category
    GET /  the seller's upload page; /readyz, /livez, /metrics: BentoML's own.
    GET /review  the moderators' page, and the review API under /review (service/review.py),
    behind the token in VITRINE_REVIEW_TOKEN.

One class-based service, one copy of the model per worker process (serve.workers; with more
than one, service/rebalance.py keeps their keep-alive connections evenly spread). Uploads
are checked and decoded with vitrine.images, the code that built the evaluated arrays, then go
through an adaptive micro-batcher (service/batching.py, which says why BentoML's own batching
is not used, and why one process runs several forward passes at once rather than a process per
core) into the model the package stage exported, run by ONNX Runtime (vitrine/runtime/onnx.py).

The public endpoints are FastAPI routes mounted with @bentoml.asgi_app rather than
@bentoml.api: a BentoML api cannot hand over a multipart file as in-memory bytes (a bytes field
breaks on binary data, a Path is written to disk, a PIL image answers a non-image with a 500),
and its 4xx bodies are not ours to shape. Every bad request gets a 4xx and a JSON body
{"error": <reason code>, "detail": <text>} (service.core.STATUS maps codes to statuses); an
upload the client abandons mid-body is answered 499 (to no one): a debug line of ours and a 499
in BentoML's access log and /metrics, no error.
Every response of the server, BentoML's own routes' and its 404s and 405s included, carries
security headers and has its error bodies in that shape (service/responses.py).

Every answer has a request_id (also the X-Request-ID header) and is recorded, with its photo,
before it is returned (service/recording.py, vitrine.production: a spool append on the request
path, the database written by a background thread, so a database that is down or slow holds
no answer up); refusals are not recorded.
"""

from __future__ import annotations

import gc
import html
import os
import time
from pathlib import Path
from typing import Any, cast

import anyio
import bentoml
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from service.batching import MicroBatcher
from service.core import (
    cheap_to_decode,
    check_answer,
    classify_answer,
    declared_category,
    detached,
    error_body,
    open_all,
    prepare_all,
    status_of,
)
from service.memory import hand_back_large_blocks
from service.rebalance import KeepAliveRebalancer
from service.recording import REQUEST_ID_HEADER, Answered, AnswerLog
from service.responses import ResponsePolicy, page_policy
from service.review import ReviewDesk, router
from service.uploads import read_form
from vitrine.contracts import DEFAULT_MODEL_NAME, MODEL_NAME_ENV, PackagedModel, read_packaged
from vitrine.images import Rejected
from vitrine.production.records import new_request_id
from vitrine.runtime.onnx import load_onnx

PAGE = Path(__file__).with_name("upload.html")
DECODE_THREADS = 2  # concurrent upload decodes per worker (see Classifier._prepare)
YOUNG_GC_THRESHOLD = 50_000  # allocations between young-generation collections (Python: 700)
MODEL_REF = bentoml.models.BentoModel(
    f"{os.environ.get(MODEL_NAME_ENV, DEFAULT_MODEL_NAME)}:latest"
)


def _stored_model() -> Path:
    """The packaged model's folder in the BentoML store; without one, a line saying how to make
    it (a fresh clone's store is empty until `dvc repro package` saves the model)."""
    if MODEL_REF.stored is None:
        home = os.environ.get("BENTOML_HOME", "~/bentoml")
        raise SystemExit(
            f"service: no model {MODEL_REF.tag} in the BentoML store {home}: "
            "run `make repro` (or `dvc repro package`) first"
        )
    return Path(MODEL_REF.stored.path)


# Read at import: the number of worker processes is an argument of @bentoml.service below.
INFO = read_packaged(_stored_model())


app = FastAPI(title="vitrine classifier", docs_url=None, redoc_url=None, openapi_url=None)


async def _current_service() -> Any:
    return bentoml.get_current_service()


# BentoML hands each route method its `self` through a plain `def` dependency, which FastAPI
# runs in its thread pool: a thread hop per request, 9% of the GIL's time at 32 concurrent
# uploads (py-spy). The same lookup as a coroutine runs on the event loop.
app.dependency_overrides[bentoml.get_current_service] = _current_service
app.include_router(router)  # the moderators' review API and page (service/review.py)
if INFO.serve.workers > 1 and INFO.serve.rebalance_every:
    app.add_middleware(KeepAliveRebalancer, every=INFO.serve.rebalance_every)


def error_response(err: Rejected) -> JSONResponse:
    """The 4xx answer to a refused request. The exception is detached (service.core.detached):
    raised from a frame that held it, it would keep that frame and the upload in a cycle."""
    return JSONResponse(error_body(detached(err)), status_code=status_of(err))


def answer_response(body: dict[str, Any], request_id: str) -> JSONResponse:
    return JSONResponse(body, headers={REQUEST_ID_HEADER: request_id})


def upload_page(info: PackagedModel) -> str:
    """The seller's page: a category per class, but the other class (none of the categories:
    not one a seller lists under), whose name the page's script is given to explain it."""
    options = "".join(
        f'<option value="{html.escape(c)}">{html.escape(c)}</option>'
        for c in info.classes
        if c != info.other_class
    )
    page = PAGE.read_text().replace("<!--OPTIONS-->", options)
    return page.replace("<!--OTHER-->", html.escape(info.other_class))


@bentoml.service(traffic={"timeout": 60}, workers=INFO.serve.workers)
@bentoml.asgi_app(app, path="/")
class Classifier:
    """Product photos -> class answers and category checks, for untrusted uploads."""

    model_ref = MODEL_REF

    def __init__(self) -> None:
        self.info = INFO
        self.page_html = upload_page(INFO)
        self.page_headers = {"Content-Security-Policy": page_policy(self.page_html)}
        torch.set_num_threads(INFO.serve.torch_threads)
        self.module = load_onnx(
            Path(self.model_ref.path), INFO.image_size, INFO.input_size, INFO.serve.torch_threads
        )
        self.decoders = anyio.CapacityLimiter(DECODE_THREADS)
        self.batcher = MicroBatcher(
            self._forward,
            INFO.serve.max_batch_size,
            INFO.serve.max_batch_wait_ms,
            INFO.serve.concurrent_batches,
        )
        self.answers = AnswerLog(INFO)  # starts the recorder's thread (when enabled)
        self.review = ReviewDesk(INFO, self.answers.recorder)  # off without VITRINE_REVIEW_TOKEN
        # The few hundred thousand objects of torch, BentoML and their imports, alive for the
        # whole run, out of the garbage collector's sight: a full collection walked them all in
        # ~220 ms, stalling every request in flight (twice per 1,000 requests, the whole p99).
        gc.collect()
        gc.freeze()
        # The requests in flight keep a few thousand young objects alive, so at Python's default
        # threshold (700) the young generation was collected about once per 4 requests, each
        # time walking them all: ~0.5 s of the event loop's time per 4,000 cnn64 requests. At
        # YOUNG_GC_THRESHOLD it is collected twice in 4,000 requests (~20 ms each, 0.04 s).
        # So cyclic garbage waits long for its collection: nothing of a request's may be in a
        # cycle with its upload (service.core.detached).
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        hand_back_large_blocks()  # an upload's buffers go back to the system when freed

    def _forward(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, 3) -> class probabilities (N, classes)."""
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(images))
        return torch.softmax(logits.float(), dim=1).numpy()

    async def _prepare(self, images: tuple[bytes, ...]) -> list[np.ndarray | Rejected]:
        # A small photo (every Avito photo is 120x90) decodes in well under a millisecond: on
        # the event loop, since waiting for a decode thread cost up to 50 ms at 32 concurrent
        # uploads (the p99's largest share after the model queue). Larger ones go to worker
        # threads, a few at a time: with a thread per request, 32 concurrent decodes of big
        # photos would starve the forward passes of CPU.
        uploads = open_all(images, self.info)  # headers only: sizes checked, bombs refused
        if all(cheap_to_decode(upload) for upload in uploads):
            return prepare_all(uploads, self.info)
        return await anyio.to_thread.run_sync(
            prepare_all, uploads, self.info, limiter=self.decoders
        )

    async def _classify(self, data: bytes) -> dict[str, Any]:
        [pixels] = await self._prepare((data,))
        if isinstance(pixels, Rejected):
            raise pixels
        [probabilities] = await self.batcher(pixels[np.newaxis])
        return classify_answer(probabilities, self.info)

    @bentoml.on_shutdown
    async def close_records(self) -> None:
        """Records not yet in the database: written now, or left spooled for the next start."""
        await anyio.to_thread.run_sync(self.answers.close)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page_html, headers=self.page_headers)

    @app.post("/classify")
    async def classify(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            form = await read_form(
                request, max_body_bytes=self.info.serve.max_upload_bytes, max_images=1
            )
            answer = await self._classify(form.images[0])
        except Rejected as err:
            return error_response(err)
        answered = Answered(new_request_id(), form.images[0], answer)
        await self.answers.record(request, "/classify", started, [answered])
        return answer_response({**answer, "request_id": answered.request_id}, answered.request_id)

    @app.post("/check_category")
    async def check_category(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            form = await read_form(
                request, max_body_bytes=self.info.serve.max_upload_bytes, max_images=1
            )
            declared = declared_category(form.fields.get("declared_category"), self.info)
            answer = await self._classify(form.images[0])
        except Rejected as err:
            return error_response(err)
        answered = Answered(new_request_id(), form.images[0], answer, declared)
        await self.answers.record(request, "/check_category", started, [answered])
        body = {**check_answer(declared, answer, self.info), "request_id": answered.request_id}
        return answer_response(body, answered.request_id)

    @app.post("/classify_batch")
    async def classify_batch(self, request: Request) -> JSONResponse:
        """One answer per `image` part, in order: {"results": [...]}.

        A bad image gets its own entry {"error", "detail"} in its place and the others are
        still answered (200), each with its own request_id (the X-Request-ID header carries
        the request's); only a bad request as a whole (no image, too many, too large, not
        multipart) is a 4xx.
        """
        started = time.perf_counter()
        try:
            form = await read_form(
                request,
                max_body_bytes=self.info.serve.max_batch_bytes,
                max_images=self.info.serve.max_batch_images,
            )
        except Rejected as err:
            return error_response(err)
        prepared = await self._prepare(form.images)
        pixels = [p for p in prepared if isinstance(p, np.ndarray)]
        probabilities = iter(await self.batcher(np.stack(pixels)) if pixels else [])
        results: list[dict[str, Any]] = []
        answered: list[Answered] = []
        for photo, p in zip(form.images, prepared, strict=True):
            if isinstance(p, Rejected):
                results.append(error_body(p))
                continue
            answer = classify_answer(next(probabilities), self.info)
            answered.append(Answered(new_request_id(), photo, answer))
            results.append({**answer, "request_id": answered[-1].request_id})
        batch_id = new_request_id()
        await self.answers.record(request, "/classify_batch", started, answered, batch_id)
        return answer_response({"results": results}, batch_id)


# Around BentoML's whole app, not only ours (as app.add_middleware would be): its own routes'
# answers and its router's 404s get the headers and the error shape too. (A cast: @bentoml.service
# turns the class into a bentoml.Service, and mypy does not apply class decorators.)
cast("bentoml.Service[Classifier]", Classifier).add_asgi_middleware(ResponsePolicy)
