"""Moderators' labels back into training: the reviewed answers as a catalog source.

`python -m pipeline.feedback [PROJECT_DIR] [--replace]` (and the retrain flows, as their first
task) reads every answer a moderator reviewed from the answers database (params.yaml
`serve.record.url`, VITRINE_RECORD_URL overriding it), each with the decision that stands (its
latest: vitrine.production.reviews.latest), and writes under paths.raw:

  <feedback.catalog>                 (reviewed/catalog.csv) one row per reviewed answer, by
                                     request_id: id (the request_id), label (the standing
                                     review's), path (photos/<sha256>.<ext>, relative to the
                                     catalog's folder) and, kept by collect as the row's meta,
                                     request_id, reviewer, reviewed_at (UTC), model_label (what
                                     the model answered) and model_version
  photos/<sha256>.<ext> beside it    each reviewed photo once, copied from serve.record.photos

and the report <feedback.report>: how many were exported, by label, and every reviewed answer
left out with its reason (missing_photo: the retention sweep deleted its photo before any
export copied it), also printed. collect.sources lists the catalog, so its photos go through
collect, dedupe and the cluster split like every other source's, and evaluate scores the test
photos that come from it on their own (reports/evaluate.json `reviewed`).

The files hold nothing of the export itself (no time, no counts): an unchanged review set
gives byte-identical files, so the inventory, and with it DVC, sees no change. An exported
photo stays as long as a row names it, even once the service's retention has deleted it from
the photo store. New photos are copied in first (each renamed into place), then the catalog
is replaced by a rename, then the photos no row names any more are removed: a reader sees the
previous export or the new one, never a row without its photo. Reviews are never deleted, so
an export that would drop rows of the previous one is refused (another database, e.g. an unset
VITRINE_RECORD_URL) unless --replace says so.

Git: the repository ships catalog.csv with its header only (so a fresh clone's `make repro`
reads an empty source) and ignores photos/: sellers' uploads do not belong in the repository.
A deployment keeps data/raw, the exported catalog and its photos with it, on its own storage,
as it keeps the answers database and the photo store; it does not commit the exported catalog
(a clone would lack the photos it names).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import secrets
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC
from pathlib import Path, PurePosixPath
from typing import Any

import sqlalchemy as sa
from PIL import Image

from pipeline.workspace import WorkspaceBusy, workspace_lock
from vitrine.config import ConfigError, from_mapping, load_params, params_block, run_cli
from vitrine.contracts import RecordConfig
from vitrine.images import READ_FORMATS
from vitrine.production.records import AnswerRecord, RecordStore, record_url
from vitrine.production.reviews import Review, latest

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS = "photos"  # beside the catalog
# The catalog's columns: collect's id, label and path, then the meta it keeps with each photo.
HEADER = (
    *("id", "label", "path"),
    *("request_id", "reviewer", "reviewed_at", "model_label", "model_version"),
)
MISSING_PHOTO = "missing_photo"  # the retention sweep deleted it before an export copied it
MISSING_ANSWER = "missing_answer"  # a review of no recorded answer (the foreign key forbids it)
TEMPORARY_SUFFIX = ".tmp"  # this module's temporary files, all named .<name>.<random>.tmp
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
QUERY_CHUNK = 500  # request ids per `IN (...)` query
SHOWN = 20  # answers left out, printed one a line; the report lists them all


@params_block
class FeedbackConfig:
    catalog: str  # relative to paths.raw; collect.sources lists it as {kind: catalog}
    report: str  # the export's report (JSON), relative to the project

    def __post_init__(self) -> None:
        parts = PurePosixPath(self.catalog).parts
        if not parts or PurePosixPath(self.catalog).is_absolute() or ".." in parts:
            raise ConfigError(f"feedback.catalog: a path inside paths.raw, got {self.catalog!r}")


class FeedbackError(RuntimeError):
    """The export cannot run (no database, another database) or was refused."""


def recording_problem(params: Mapping[str, Any]) -> str | None:
    """Why there is nothing to export from (no `feedback` block, recording off), or None."""
    if not params.get("feedback"):
        return "params.yaml has no feedback block"
    record = (params.get("serve") or {}).get("record")
    if record is None:
        return "params.yaml has no serve.record block: answers are not recorded"
    if not record.get("enabled", True):
        return "serve.record.enabled is false: answers are not recorded"
    return None


def database_url(configured: str, project_dir: Path) -> str:
    """serve.record.url (or VITRINE_RECORD_URL), a relative SQLite path read from project_dir
    (where the service runs); FeedbackError when that SQLite file does not exist, rather than
    letting SQLAlchemy create an empty database."""
    url = sa.make_url(record_url(configured))
    if url.get_backend_name() != "sqlite":
        return url.render_as_string(hide_password=False)
    database = url.database or ""
    if database in ("", ":memory:"):
        raise FeedbackError(f"answers database {database or 'in memory'}: nothing to export")
    path = Path(database) if Path(database).is_absolute() else project_dir / database
    if not path.is_file():
        raise FeedbackError(f"no answers database at {path} (serve.record.url, VITRINE_RECORD_URL)")
    return url.set(database=str(path)).render_as_string(hide_password=False)


def reviewed_answers(store: RecordStore) -> list[tuple[Review, AnswerRecord | None]]:
    """Every reviewed answer with its standing decision, by request_id (None: the answer's row
    is gone, which the reviews' foreign key should prevent)."""
    if not sa.inspect(store.engine).has_table("reviews"):
        return []  # a database the reviews migration never reached holds no review
    standing = latest(store)
    ids = sorted(standing)
    answers: dict[str, AnswerRecord] = {}
    for start in range(0, len(ids), QUERY_CHUNK):
        for answer in store.find(request_ids=ids[start : start + QUERY_CHUNK]):
            answers[answer.request_id] = answer
    return [(standing[i], answers.get(i)) for i in ids]


def photo_extension(path: Path) -> str:
    """`.jpg`, `.png`, ... from the photo's header; "" when Pillow cannot tell (collect then
    quarantines the photo with its reason)."""
    try:
        with Image.open(path, formats=READ_FORMATS) as image:
            return "." + EXTENSIONS.get(image.format or "", (image.format or "bin").lower())
    except (OSError, ValueError, Image.DecompressionBombError):
        return ""


def _temporary(folder: Path, name: str) -> Path:
    return folder / f".{name}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"


def _remove_temporaries(*folders: Path) -> None:
    """What a killed export left (it would show in the inventory as a change)."""
    for folder in folders:
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name.startswith(".") and entry.name.endswith(TEMPORARY_SUFFIX):
                    entry.unlink(missing_ok=True)


def _exported_photos(folder: Path) -> dict[str, str]:
    """sha256 -> file name of the photos a previous export left in `folder`."""
    if not folder.is_dir():
        return {}
    return {
        p.name.split(".", 1)[0]: p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".")
    }


def _copy_in(source: Path, folder: Path, sha256: str) -> str:
    """The store's photo copied into folder as <sha256><ext> (renamed into place)."""
    name = sha256 + photo_extension(source)
    folder.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(folder, name)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, folder / name)
    finally:
        temporary.unlink(missing_ok=True)
    return name


def previous_ids(catalog: Path) -> set[str]:
    if not catalog.is_file():
        return set()
    with catalog.open(newline="", encoding="utf-8") as f:
        return {row["id"] for row in csv.DictReader(f) if row.get("id")}


def catalog_text(rows: Iterable[Mapping[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def export_reviewed(
    store: RecordStore, photo_store: Path, catalog: Path, *, replace: bool = False
) -> dict[str, Any]:
    """Write the catalog of every reviewed answer and copy the photos it names (see the module
    docstring); the report (exported, missing_photo, by label, every answer left out)."""
    folder = catalog.parent / PHOTOS
    _remove_temporaries(catalog.parent, folder)
    reviewed = reviewed_answers(store)
    dropped = previous_ids(catalog) - {review.request_id for review, _ in reviewed}
    if dropped and not replace:
        raise FeedbackError(
            f"{len(dropped)} answer(s) exported before are not reviewed in {store!r}, e.g. "
            f"{sorted(dropped)[:3]}: is it the production database? --replace exports anyway"
        )
    exported = _exported_photos(folder)
    rows: list[dict[str, str]] = []
    missing: list[dict[str, str]] = []
    by_label: dict[str, Counter[str]] = {}
    copied = 0
    for review, answer in reviewed:
        name = None
        if answer is not None:
            sha = answer.image_sha256
            name = exported.get(sha)
            source = photo_store / sha[:2] / sha  # vitrine.production.photos.PhotoStore.path
            if name is None and source.is_file():
                name = exported[sha] = _copy_in(source, folder, sha)
                copied += 1
        if answer is None or name is None:
            reason = MISSING_PHOTO if answer else MISSING_ANSWER
            by_label.setdefault(review.label, Counter())[reason] += 1
            missing.append(
                {
                    "request_id": review.request_id,
                    "label": review.label,
                    "image_sha256": answer.image_sha256 if answer else "",
                    "reason": reason,
                }
            )
            continue
        by_label.setdefault(review.label, Counter())["exported"] += 1
        rows.append(
            {
                "id": review.request_id,
                "label": review.label,
                "path": f"{PHOTOS}/{name}",
                "request_id": review.request_id,
                "reviewer": review.reviewer,
                "reviewed_at": review.reviewed_at.astimezone(UTC).isoformat(),
                "model_label": answer.label,
                "model_version": answer.model_version,
            }
        )
    catalog.parent.mkdir(parents=True, exist_ok=True)
    text = catalog_text(rows)
    if not catalog.is_file() or catalog.read_text(encoding="utf-8") != text:
        temporary = _temporary(catalog.parent, catalog.name)
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, catalog)
    named = {PurePosixPath(row["path"]).name for row in rows}
    removed = sorted(set(exported.values()) - named)
    for name in removed:
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # no photos: no folder (a fresh clone has none either)
        folder.rmdir()
    return {
        "database": repr(store),
        "catalog": str(catalog),
        "reviewed": len(reviewed),
        "exported": len(rows),
        "left_out": len(missing),
        "by_reason": dict(Counter(m["reason"] for m in missing)),
        "by_label": {label: dict(counts) for label, counts in sorted(by_label.items())},
        "photos": len(named),
        "photos_copied": copied,
        "photos_removed": len(removed),
        "missing": missing,
    }


def catalog_path(project_dir: Path) -> Path:
    """Where params.yaml in project_dir puts the catalog: paths.raw / feedback.catalog."""
    params = load_params(project_dir / "params.yaml")
    config = from_mapping(FeedbackConfig, params["feedback"], "feedback")
    return project_dir / Path(params["paths"]["raw"]) / config.catalog


def export_from_params(project_dir: Path, *, replace: bool = False) -> dict[str, Any]:
    """The export as params.yaml in project_dir sets it up (serve.record's database and photo
    folder, feedback's catalog and report), the report written; FeedbackError when recording
    is off or its database cannot be read."""
    params = load_params(project_dir / "params.yaml")
    problem = recording_problem(params)
    if problem:
        raise FeedbackError(problem)
    config = from_mapping(FeedbackConfig, params["feedback"], "feedback")
    record = from_mapping(RecordConfig, params["serve"]["record"], "serve.record")
    raw = project_dir / Path(params["paths"]["raw"])
    catalog = raw / config.catalog
    photos = project_dir / record.photos  # an absolute serve.record.photos stays as it is
    try:
        store = RecordStore(database_url(record.url, project_dir))
    except (ValueError, sa.exc.ArgumentError) as err:  # not an sqlite or postgresql URL
        raise FeedbackError(f"answers database: {err}") from err
    try:
        report = export_reviewed(store, photos, catalog, replace=replace)
    except sa.exc.SQLAlchemyError as err:
        raise FeedbackError(f"answers database {store!r}: {type(err).__name__}: {err}") from err
    finally:
        store.close()
    sources = (params.get("collect") or {}).get("sources") or []
    listed = any(s.get("kind") == "catalog" and s.get("path") == config.catalog for s in sources)
    report["catalog"] = str(catalog.relative_to(project_dir))
    report["source"] = f"catalog:{config.catalog}"  # the manifest's `source` of its photos
    report["read_by_collect"] = listed
    path = project_dir / config.report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    report["report"] = config.report
    return report


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """What the export did, for a terminal or a run log: counts, then each answer left out."""
    lines = [
        f"feedback: {report['reviewed']} reviewed answer(s): {report['exported']} exported into "
        f"{report['catalog']} ({report['photos']} photo(s), {report['photos_copied']} new), "
        f"{report['left_out']} left out {report['by_reason'] or ''}".rstrip()
    ]
    lines += [
        f"  left out: {m['request_id']} ({m['label']}): {m['reason']} {m['image_sha256']}".rstrip()
        for m in report["missing"][:SHOWN]
    ]
    if len(report["missing"]) > SHOWN:
        lines.append(f"  ... and {len(report['missing']) - SHOWN} more: {report.get('report')}")
    if not report.get("read_by_collect", True):
        lines.append(
            f"  warning: collect.sources does not list {{kind: catalog, path: "
            f"{report['source'].removeprefix('catalog:')}}}: collect will not read the export"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Export the moderators' reviewed answers as a catalog under paths.raw."
    )
    parser.add_argument("project_dir", nargs="?", type=Path, default=REPO_ROOT)
    parser.add_argument(
        "--replace",
        action="store_true",
        help="export even if rows of the previous export are no longer reviewed in the database",
    )
    args = parser.parse_args(argv)
    project_dir = args.project_dir.resolve()
    try:
        with workspace_lock(project_dir, 0, owner="python -m pipeline.feedback"):
            report = export_from_params(project_dir, replace=args.replace)
    except (FeedbackError, ConfigError, WorkspaceBusy) as err:
        print(f"feedback: {err}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(report)))
    return 0


if __name__ == "__main__":
    run_cli(main)
