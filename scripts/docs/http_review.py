"""The review routes' part of the HTTP reference (the APIRouter `router` of service/review.py):
what each asks and answers, a curl example with the token, and an example answer checked
against the code: its keys, at any depth, must be exactly the string keys of the dict literals
the route's answer is built from (ANSWERS' sources), so the build fails when the answer gains
or loses a key.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.docs import markdown as md
from scripts.docs.source import docstring_markdown, load

MODULE = "service.review"
AUTH = '-H "Authorization: Bearer $VITRINE_REVIEW_TOKEN"'
REQUEST_ID = "01938f2a6c1e7b3c9d2f4a5b6c7d8e9f"
BY_CLASS = {"probabilities"}  # keys whose object is keyed by class


class ExampleMismatch(ValueError):
    """An example answer and the code that writes it disagree on the keys."""


@dataclass(frozen=True)
class Answer:
    about: str  # for the routes table
    # the example request after `curl` and the token header; {base}: the server's URL; " \n"
    # breaks a line
    curl: str
    example: Any = None  # the answer (JSON); None: not JSON
    # (module, function) whose dict literals' keys the answer holds; function "": the module's
    sources: tuple[tuple[str, str], ...] = ()
    answers: str = ""  # what a non-JSON answer is, in words


QUEUE_ITEM = {
    "request_id": REQUEST_ID,
    "answered_at": "2025-03-01T09:30:12.345678+00:00",
    "endpoint": "/check_category",
    "model_version": "effnet-lite0-int8-9974480fdd6d",
    "label": "phone",
    "confidence": 0.91,
    "probabilities": {"laptop": 0.09, "phone": 0.91},
    "abstain": False,
    "declared_category": "laptop",
    "matches": False,
    "review_value": 1.42,
    "photo": f"/review/photo/{REQUEST_ID}",
    "heatmaps": [
        {
            "which": "answered",
            "class": "phone",
            "role": "answered",
            "url": f"/review/heatmap/{REQUEST_ID}/answered",
        },
        {"which": "alternative", "class": "laptop", "role": "declared", "url": None},
    ],
}
DECISION = {"id": "laptop/3857706693.jpg", "decision": "drop", "new_label": "", "note": "a dock"}
CANDIDATE = {
    "id": "laptop/4541907272.jpg",
    "label": "laptop",
    "suggested_label": "phone",
    "noise_score": 0.9866,
    "outlier_score": 1.04,
    "cluster_id": "ece3575daf33c42c",
    "decision": None,
    "photo": "/review/curation/photo?id=laptop%2F4541907272.jpg",
}
CLUSTER_PHOTO = {
    "id": "phone/5009917167.jpg",
    "label": "phone",
    "status": "label_conflict",
    "reason": "label_conflict",
    "decision": {
        "id": "phone/5009917167.jpg",
        "decision": "keep",
        "new_label": "",
        "note": "another shot",
    },
    "photo": "/review/curation/photo?id=phone%2F5009917167.jpg",
}
ANSWERS: dict[tuple[str, str], Answer] = {
    ("GET", "/review"): Answer(
        "the moderators' review page (HTML)", "", answers="`text/html`: the review page"
    ),
    ("GET", "/review/queue"): Answer(
        "recorded answers most worth a review, best first",
        "'{base}/review/queue?limit=20'",
        {"classes": ["laptop", "phone"], "answers": [QUEUE_ITEM]},
        ((MODULE, "queue_answer"), ("vitrine.production.heatmaps", "queue_maps")),
    ),
    ("GET", "/review/photo/{request_id}"): Answer(
        "an answer's photo, as a small JPEG",
        f"{{base}}/review/photo/{REQUEST_ID} -o photo.jpg",
        answers="`image/jpeg`: the photo, at most 256 px on its longer side",
    ),
    ("GET", "/review/heatmap/{request_id}/{which}"): Answer(
        "a heat map of the float network over an answer's photo, as a PNG",
        f"{{base}}/review/heatmap/{REQUEST_ID}/answered -o heatmap.png",
        answers="`image/png`: the heat map over the photo, at most 128 px on its longer side",
    ),
    ("POST", "/review"): Answer(
        "records a moderator's label for an answer",
        "-H 'Content-Type: application/json' \n"
        f'-d \'{{{{"request_id": "{REQUEST_ID}", "label": "phone", "reviewer": "ana"}}}}\' \n'
        "{base}/review",
        {
            "request_id": REQUEST_ID,
            "label": "phone",
            "reviewer": "ana",
            "reviewed_at": "2025-03-01T10:02:44.120000+00:00",
            "review_id": 17,
        },
        ((MODULE, "review_answer"),),
    ),
    ("GET", "/review/curation"): Answer(
        "dedupe's noise candidates and near-duplicate clusters, with their decisions",
        "'{base}/review/curation?clusters=20'",
        {
            "decisions_path": "data/review/decisions.csv",
            "classes": ["laptop", "phone"],
            "candidates": [CANDIDATE],
            "clusters": [
                {"cluster_id": "6006d8828451c0c1", "conflict": True, "photos": [CLUSTER_PHOTO]}
            ],
        },
        ((MODULE, "curation_answer"), ("vitrine.production.curation", "")),
    ),
    ("GET", "/review/curation/photo"): Answer(
        "a training photo's thumbnail, as a JPEG",
        "'{base}/review/curation/photo?id=laptop%2F4541907272.jpg' -o photo.jpg",
        answers="`image/jpeg`: the thumbnail, at most 256 px on its longer side",
    ),
    ("POST", "/review/curation/decision"): Answer(
        "writes a keep, drop or relabel decision on a training photo",
        "-H 'Content-Type: application/json' \n"
        '-d \'{{"id": "laptop/3857706693.jpg", "decision": "drop", "note": "a dock"}}\' \n'
        "{base}/review/curation/decision",
        DECISION | {"decisions_path": "data/review/decisions.csv"},
        ((MODULE, "decision_answer"),),
    ),
}


def answer(method: str, path: str) -> Answer:
    found = ANSWERS.get((method, path))
    if found is None:
        raise ExampleMismatch(f"{method} {path}: scripts/docs/http_review.py does not describe it")
    return found


def keys_in(value: Any) -> set[str]:
    """Every key of every object in a JSON value (a mapping of classes is data, not keys)."""
    if isinstance(value, dict):
        return set(value) | {k for n, v in value.items() if n not in BY_CLASS for k in keys_in(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_in(v)}
    return set()


def written_keys(root: Path, sources: tuple[tuple[str, str], ...]) -> set[str]:
    """The string keys of the dict literals in the source functions (or whole modules)."""
    keys: set[str] = set()
    for module_name, function in sources:
        module = load(root, module_name)
        if module is None:
            raise ExampleMismatch(f"{module_name}: no such module under {root}")
        node: ast.AST | None = module.functions.get(function) if function else module.tree
        if node is None:
            raise ExampleMismatch(f"{module_name} has no function {function!r}")
        for d in ast.walk(node):
            if isinstance(d, ast.Dict):
                keys |= {
                    k.value
                    for k in d.keys
                    if isinstance(k, ast.Constant) and isinstance(k.value, str)
                }
    return keys


def checked_example(root: Path, method: str, path: str) -> Any:
    """The route's example answer, refused when its keys are not the ones the code writes."""
    about = answer(method, path)
    if about.example is None:
        return None
    shown, written = keys_in(about.example), written_keys(root, about.sources)
    if shown != written:
        raise ExampleMismatch(
            f"{method} {path}: the example answer lacks {sorted(written - shown)} and has "
            f"{sorted(shown - written)} the code does not write (scripts/docs/http_review.py)"
        )
    return about.example


def route_section(
    root: Path, method: str, path: str, doc: str, refusals: list[str], base: str
) -> str:
    """One review route: what it does, a curl example, its answer and refusals."""
    about = answer(method, path)
    title = f"### {method} {path}"
    text = md.blocks(docstring_markdown(doc)) if doc else ""
    if method == "GET" and path == "/review":
        curl = md.fenced(f"curl {base}{path}", "bash")
        return md.section(title, text, f"Answers {about.answers}; needs no token.", curl)
    lines = about.curl.format(base=base).split(" \n")
    curl = md.fenced(" \\\n  ".join([f"curl {AUTH}", *lines]), "bash")
    out = [title, text, curl]
    example = checked_example(root, method, path)
    if example is None:
        out.append(md.paragraph(f"Answers {about.answers}."))
    else:
        out += [
            "Answer (200, `application/json`):",
            md.fenced(json.dumps(example, indent=2), "json"),
        ]
    out += ["Refused with (status per code):", "\n".join(refusals)]
    return md.section(*out)
