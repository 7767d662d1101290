"""Recorded answers with their photos kept and moderators' reviews, as production leaves them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.photos import photo_bytes
from tests.helpers.records import sample_answer
from vitrine.production.photos import PhotoStore
from vitrine.production.recorder import photo_sha256
from vitrine.production.records import AnswerRecord, RecordStore


def record_answer(
    store: RecordStore, photos: Path, seed: int, *, keep_photo: bool = True
) -> AnswerRecord:
    """An answer about a distinct photo-like JPEG (photo_bytes(seed)), recorded, and its photo
    kept in the photo store under `photos` unless keep_photo is false (the retention sweep
    deleted it)."""
    photo = photo_bytes(seed)
    answer = dataclasses.replace(sample_answer(seed), image_sha256=photo_sha256(photo))
    store.insert([answer])
    if keep_photo:
        PhotoStore(photos, keep_days=0, keep_bytes=0).keep(photo, answer.image_sha256)
    return answer


def feedback_params(root: Path, url: str, **extra: Any) -> Path:
    """params.yaml in root with what the export reads (paths.raw, collect.sources, serve.record,
    feedback) plus `extra` blocks; the photo store at root/photos."""
    params = {
        "paths": {"raw": "raw"},
        "collect": {"sources": [{"kind": "catalog", "path": "reviewed/catalog.csv"}]},
        "serve": {"record": {"enabled": True, "url": url, "photos": "photos"}},
        "feedback": {"catalog": "reviewed/catalog.csv", "report": "reports/feedback.json"},
        **extra,
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"
