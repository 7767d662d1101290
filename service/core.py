"""The service's decisions, free of HTTP: upload bytes -> model input, probabilities -> answers.

One photo's rules (open_upload, prepare_image, classify_answer) are vitrine.runtime.answers', the
same code batch scoring runs; here they are applied to a request's uploads, refusals become HTTP
answers, and /check_category's answer is built. Preprocessing is vitrine.images (the code prepare
used to build the evaluated arrays); resizing and normalising to the network's input happen
inside the exported model, as in evaluate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vitrine.contracts import PackagedModel
from vitrine.images import Rejected
from vitrine.runtime.answers import (
    category_check,
    classify_answer,
    open_upload,
    prepare_image,
)

__all__ = ["classify_answer", "open_upload", "prepare_image"]  # and the names defined below

# Reason code -> HTTP status; any other reason (vitrine.images' codes) is a 422.
STATUS = {
    "bad_multipart": 400,
    "missing_image": 400,
    "missing_field": 400,
    "too_large": 413,
    "too_many_pixels": 413,
    "too_many_images": 413,
    "client_closed": 499,  # nginx's "client closed request": no one reads it, nothing failed
    # The review routes (service/review.py):
    "not_found": 404,  # reviewing is off (no VITRINE_REVIEW_TOKEN): as if the route were absent
    "unauthorized": 401,
    "forbidden": 403,
    "bad_json": 400,
    "bad_parameter": 400,
    "unknown_answer": 404,
    "photo_missing": 404,
    "heatmap_missing": 404,  # not drawn yet (python -m pipeline.heatmaps), or its photo deleted
    "unknown_photo": 404,
    "database_unavailable": 503,  # or not migrated yet: the recorder migrates it at start
    "curation_unavailable": 503,  # dedupe's outputs are missing from the project folder
}
UNPROCESSABLE = 422
# Photos up to this many pixels decode on the event loop (service.service.Classifier._prepare):
# a JPEG decodes at reduced DCT scale to about the 128 px square, so even 500x500 takes ~1 ms.
INLINE_DECODE_PIXELS = 250_000
Upload = Image.Image | Rejected  # an upload opened from its header, or why it was refused


class UnknownCategory(Rejected):
    """A declared category the model does not know; the answer lists the ones it does."""

    def __init__(self, declared: str, known: Sequence[str]):
        super().__init__("unknown_category", f"{declared!r} is not one of {list(known)}")
        self.known = list(known)


def detached(err: Rejected) -> Rejected:
    """err without its traceback and the exceptions it was raised from, fit to be kept.

    A kept exception's traceback holds the frames it passed through, and so their locals: the
    upload bytes (up to serve.max_upload_bytes each), and often the exception itself, in a
    reference cycle that only the garbage collector frees, and the service runs it rarely (see
    Classifier.__init__): kept with its traceback, a refused upload would stay in memory for
    hundreds of requests.
    """
    err.__traceback__ = err.__context__ = err.__cause__ = None
    return err


def status_of(err: Rejected) -> int:
    return STATUS.get(err.code, UNPROCESSABLE)


def error_body(err: Rejected) -> dict[str, Any]:
    body: dict[str, Any] = {"error": err.code, "detail": err.detail}
    if isinstance(err, UnknownCategory):
        body["known_categories"] = err.known
    return body


def open_all(images: Sequence[bytes], info: PackagedModel) -> list[Upload]:
    """open_upload for each upload, a bad one giving its Rejected in its place."""
    opened: list[Upload] = []
    for data in images:
        try:
            opened.append(open_upload(data, info))
        except Rejected as err:
            opened.append(detached(err))
    return opened


def cheap_to_decode(upload: Upload) -> bool:
    """Is this upload quick to prepare? At most INLINE_DECODE_PIXELS, or already refused."""
    return isinstance(upload, Rejected) or upload.width * upload.height <= INLINE_DECODE_PIXELS


def prepare_all(uploads: Sequence[Upload], info: PackagedModel) -> list[np.ndarray | Rejected]:
    """prepare_image for each opened upload; a refused one keeps its Rejected, and one that
    fails to decode gets its own."""
    prepared: list[np.ndarray | Rejected] = []
    for upload in uploads:
        try:
            prepared.append(upload if isinstance(upload, Rejected) else prepare_image(upload, info))
        except Rejected as err:
            prepared.append(detached(err))
    return prepared


def declared_category(value: str | None, info: PackagedModel) -> str:
    if value is None:
        raise Rejected("missing_field", "no field 'declared_category' in the form")
    if value not in info.classes:
        raise UnknownCategory(value, info.classes)
    return value


def check_answer(declared: str, answer: dict[str, Any], info: PackagedModel) -> dict[str, Any]:
    """The /check_category answer: does the photo show the category the seller picked?

    On a confident mismatch the suggestion is the predicted class (for a taxonomy ancestor, its
    most probable class); when the model abstains it suggests nothing new (the declared category
    stands) whatever it predicted. An ancestor answer matches every class under it
    (vitrine.runtime.answers.category_check, which batch scoring applies too).
    """
    matches, suggested = category_check(declared, answer, info)
    return {
        "declared": declared,
        "predicted": answer["label"],
        "matches": matches,
        "confidence": answer["confidence"],
        "suggested_category": suggested,
        "abstain": answer["abstain"],
    }
