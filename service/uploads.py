"""Reading an untrusted multipart/form-data request into memory, within limits.

Every failure is a vitrine.images.Rejected with a stable reason code (see service.core.STATUS):
nothing here raises anything else on bad input, and no upload ever touches the disk. A client
that closes its connection before the body ends is one of them ("client_closed", answered 499,
which no one reads): an abandoned upload is the client's choice, not a server error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from vitrine.images import Rejected

IMAGE_FIELD = "image"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and text fields around the files
MAX_TEXT_FIELDS = 8
MAX_BOUNDARY = 70  # RFC 2046 section 5.1.1: a boundary is 1 to 70 characters
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Form:
    images: tuple[bytes, ...]  # every part named `image`, in request order
    fields: dict[str, str]  # the other text fields (a repeated name keeps its last value)


def _parser(request: Request, body_cap: int, max_images: int) -> MultiPartParser:
    parser = MultiPartParser(
        request.headers,
        _capped(request.stream(), body_cap),
        max_files=max_images,
        max_fields=MAX_TEXT_FIELDS,
    )
    # Starlette spools a file part over spool_max_size to a temporary file; no part can outgrow
    # the body cap, so every part stays in memory. (Set on the instance: a subclass made per
    # request is a new class each time, cyclic garbage that lingers until a collection.)
    parser.spool_max_size = body_cap + 1
    return parser


async def _capped(chunks: AsyncIterator[bytes], cap: int) -> AsyncGenerator[bytes, None]:
    """The request body, refused as soon as it outgrows the cap (chunked uploads too)."""
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > cap:
            raise Rejected("too_large", f"request body exceeds {cap} bytes")
        yield chunk


def _check_headers(request: Request, cap: int) -> None:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise Rejected("too_large", f"request of {length} bytes exceeds {cap}")
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise Rejected(
            "missing_image",
            f"expected multipart/form-data with a file field {IMAGE_FIELD!r}, "
            f"got content type {content_type or 'none'!r}",
        )
    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if boundary is not None and not 1 <= len(boundary) <= MAX_BOUNDARY:
        detail = f"a boundary is 1 to {MAX_BOUNDARY} characters, got {len(boundary)}"
        raise Rejected("bad_multipart", detail)


async def read_form(request: Request, *, max_body_bytes: int, max_images: int) -> Form:
    """The request's image parts (as bytes) and text fields; Rejected for a bad request.

    A body over `max_body_bytes` (plus multipart overhead) is refused from its Content-Length,
    or as soon as the stream outgrows it when it has none.
    """
    cap = max_body_bytes + MULTIPART_OVERHEAD
    _check_headers(request, cap)
    parser = _parser(request, cap, max_images)
    closed: list[bool] = []
    # python-multipart calls on_end at the closing boundary only; a body cut before it would
    # lose its last part without a word, so an image sent whole would read as none.
    parser.on_end = lambda: closed.append(True)  # type: ignore[method-assign]
    try:
        form = await parser.parse()
    except MultiPartException as err:
        # Starlette's own wording for a count over max_files; any other failure is malformed.
        if str(err).startswith("Too many files"):
            # Starlette counts every file part: a text field sent as a file counts too.
            detail = f"more than {max_images} file parts (images go in `image`, fields as text)"
            raise Rejected("too_many_images", detail) from None
        raise Rejected("bad_multipart", str(err)) from None
    except (KeyError, ValueError) as err:  # KeyError: no Content-Type parameters at all
        raise Rejected("bad_multipart", str(err) or type(err).__name__) from None
    except ClientDisconnect:  # the client went away: a debug line, not an error's traceback
        log.debug("%s: the client closed the connection mid-body", request.url.path)
        detail = "the client closed the connection before the body ended"
        raise Rejected("client_closed", detail) from None
    if not closed:
        await form.close()
        raise Rejected("bad_multipart", "the body ends before its closing boundary (--boundary--)")
    try:
        images = []
        fields = {}
        for name, value in form.multi_items():
            if name == IMAGE_FIELD:
                # A plain (non-file) `image` field is text; let the image check say so.
                images.append(await value.read() if isinstance(value, UploadFile) else value)
            elif isinstance(value, str):
                fields[name] = value
    finally:
        await form.close()
    if not images:
        got = sorted({name for name, _ in form.multi_items()})
        raise Rejected("missing_image", f"no field {IMAGE_FIELD!r} in the form (got {got})")
    return Form(
        images=tuple(i.encode() if isinstance(i, str) else i for i in images), fields=fields
    )
