"""What every HTTP response of the server carries, whichever route (or none) answered it.

ResponsePolicy wraps the whole BentoML app (Classifier.add_asgi_middleware), so it also sees
the answers of BentoML's own routes (/metrics, /readyz, /livez) and of its router (a 404 for an
unknown path, a 405 for a wrong method on a BentoML route):
  - security headers: X-Content-Type-Options: nosniff, Referrer-Policy: no-referrer, and a
    Content-Security-Policy that lets nothing load, run or frame the answer (DATA_POLICY), unless
    the route set its own (the upload page: page_policy);
  - every error answer (4xx, 5xx) in the service's documented shape, a JSON object
    {"error": <reason code>, "detail": <text>}: one already in that shape passes unchanged; any
    other (Starlette's plain-text "Not Found", FastAPI's {"detail": "Method Not Allowed"}, a
    plain-text 500) is rewritten, its reason code named after the status ("not_found",
    "method_not_allowed", "internal_server_error").

BentoML's traffic middlewares sit outside this one: an answer they make themselves (504 at
the traffic timeout, 429 over max_concurrency, which this service does not set) keeps their
body {"error": <text>} and lacks these headers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from http import HTTPStatus
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",  # a JSON answer is never run as a script or page
    "referrer-policy": "no-referrer",
}
# Answers other than the upload page are data: nothing in them may load, run or be framed.
DATA_POLICY = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)  # the page's own inline code
NONE = " 'none'"


def page_policy(page: str) -> str:
    """The upload page's Content-Security-Policy: its own inline script and style (allowed by
    their SHA-256, so no other inline code runs), the photo's preview (a blob: URL), and its
    fetch of /check_category on this origin; nothing else."""
    allowed = {"script": "", "style": ""}
    for kind, body in INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        allowed[kind] += f" 'sha256-{digest}'"
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src{allowed['script'] or NONE}",
            f"style-src{allowed['style'] or NONE}",
            "img-src blob:",
            "connect-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )


def phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Client Error" if status < 500 else "Server Error"


def error_code(status: int) -> str:
    """A status's reason code, named as the service names its own: 404 -> "not_found"."""
    return re.sub(r"\W+", "_", phrase(status).lower()).strip("_")


def shaped(status: int, body: bytes, scope: Scope, allow: str | None) -> bytes | None:
    """An error answer's body in the documented shape, or None when it already is."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = body.decode("utf-8", "replace").strip()
    if isinstance(parsed, dict):
        if {"error", "detail"} <= parsed.keys():
            return None
        parsed = parsed.get("detail", parsed.get("error"))
    if status == 404:
        detail = f"no such endpoint: {scope['path']}"
    elif status == 405:
        detail = f"{scope['method']} is not allowed on {scope['path']} (allowed: {allow or 'none'})"
    else:
        detail = parsed if isinstance(parsed, str) and parsed else phrase(status)
    return json.dumps({"error": error_code(status), "detail": detail}).encode()


class ResponsePolicy:
    """ASGI middleware: security headers on every HTTP response, errors as the JSON body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # an error answer's start, until its body is complete
        chunks: list[bytes] = []

        async def send_with_policy(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                headers.setdefault("content-security-policy", DATA_POLICY)
                message = {**message, "headers": headers.raw}
                if message["status"] >= 400:
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start, held = held, None
                await send_error(start, b"".join(chunks))
                return
            await send(message)

        async def send_error(start: Message, body: bytes) -> None:
            headers = MutableHeaders(raw=start["headers"])
            replaced = shaped(start["status"], body, scope, headers.get("allow"))
            if replaced is not None:
                body = replaced
                headers["content-type"] = "application/json"
                headers["content-length"] = str(len(body))
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, send_with_policy)
