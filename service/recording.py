"""Request ids, and each answer's record handed to vitrine.production's recorder.

Every answer gets an id of the service's own (vitrine.production.records.new_request_id, a
UUIDv7 as 32 hex digits): /classify's and /check_category's in their JSON `request_id` and in
the X-Request-ID response header; in /classify_batch each answered image's in its result, and
the request's own in the header (and in each of its records' batch_id). A refused upload (4xx,
or an image's error entry in a batch) is no answer: it gets no id and no record. A client's
own X-Request-ID is never the key (two clients could send the same one): it is recorded beside
it as client_request_id (its first CLIENT_ID_CHARS characters; dropped unless printable ASCII).

The record (the answers table's columns, vitrine.production.records) is spooled before the
answer is returned; see vitrine.production.recorder for why that never holds an answer up.
serve.record.enabled false: ids still, records none.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request

from vitrine.contracts import PackagedModel
from vitrine.production.recorder import now_utc, open_recorder, photo_sha256
from vitrine.production.records import AnswerRecord
from vitrine.runtime.answers import category_check

REQUEST_ID_HEADER = "X-Request-ID"
CLIENT_ID_CHARS = 128
# A photo up to this size is hashed and written on the event loop (microseconds); a larger one
# by a worker thread, as service.service.Classifier._prepare decodes large photos.
INLINE_RECORD_BYTES = 256 * 1024


@dataclass(frozen=True)
class Answered:
    """One answer to record: its id, the photo, the classify answer (service.core
    classify_answer) and, for /check_category, the declared category."""

    request_id: str
    photo: bytes
    answer: dict[str, Any]
    declared: str | None = None


def client_request_id(request: Request) -> str | None:
    value = request.headers.get(REQUEST_ID_HEADER)
    if not value:
        return None
    value = value[:CLIENT_ID_CHARS]
    return value if value.isascii() and value.isprintable() else None


class AnswerLog:
    """The service's side of recording: answers -> AnswerRecords -> the recorder."""

    def __init__(self, info: PackagedModel) -> None:
        self.info = info
        self.recorder = open_recorder(info.serve.record)

    async def record(
        self,
        request: Request,
        endpoint: str,
        started: float,
        answered: Sequence[Answered],
        batch_id: str | None = None,
    ) -> None:
        """Every answer's record spooled (never raises: see vitrine.production.recorder).
        started: time.perf_counter() when the handler began, for latency_ms."""
        if self.recorder is None or not answered:
            return
        client = client_request_id(request)
        if sum(len(a.photo) for a in answered) <= INLINE_RECORD_BYTES:
            self._record(endpoint, started, answered, batch_id, client)
        else:
            await anyio.to_thread.run_sync(
                self._record, endpoint, started, answered, batch_id, client
            )

    def _record(
        self,
        endpoint: str,
        started: float,
        answered: Sequence[Answered],
        batch_id: str | None,
        client: str | None,
    ) -> None:
        assert self.recorder is not None
        latency_ms = (time.perf_counter() - started) * 1000
        at = now_utc()
        for item in answered:
            answer = item.answer
            record = AnswerRecord(
                request_id=item.request_id,
                answered_at=at,
                endpoint=endpoint,
                model_version=answer["model_version"],
                image_sha256=photo_sha256(item.photo),
                label=answer["label"],
                confidence=answer["confidence"],
                probabilities=answer["probabilities"],
                abstain=answer["abstain"],
                declared_category=item.declared,
                matches=None
                if item.declared is None
                else category_check(item.declared, answer, self.info)[0],
                latency_ms=latency_ms,
                batch_id=batch_id,
                client_request_id=client,
            )
            self.recorder.record(record, item.photo)

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
