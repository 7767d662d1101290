"""The training photos' review from the service: dedupe's noise candidates and near-duplicate
clusters read from the project folder, and moderators' keep/drop/relabel decisions written to
the decisions file dedupe applies (params.yaml paths.decisions, data/review/decisions.csv).

Only where the service runs beside the project (VITRINE_PROJECT_DIR, which `make serve` sets to
the repository): a deployed Bento has no project files. Reading dedupe's manifest takes pandas,
imported when it is read (the Bento ships no pandas, and never gets here).

The decisions file keeps dedupe's format (columns id,decision,new_label,note; decision keep,
drop, relabel or other (none of the classes: an example of params.yaml's other_class, or a drop
without one); new_label a class for a relabel, empty otherwise; read back by
stages.dedupe.read_decisions): one row per id, a later decision replacing the earlier one, rows
sorted by id so that it diffs well, rewritten whole to a temporary file then renamed (a reader
never sees half a file), one writer at a time (an flock on its folder).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitrine.config import Paths, load_params, load_paths
from vitrine.config import other_class as configured_other_class

COLUMNS = ("id", "decision", "new_label", "note")
DECISIONS = ("keep", "drop", "relabel", "other")  # stages/dedupe.py's DECISIONS
MANIFEST = "manifest.parquet"  # dedupe's table in paths.deduped (vitrine.data.shards.MANIFEST)
MAX_NOTE = 500  # characters of a note
MAX_ID = 1000  # characters of a photo id


class BadDecision(ValueError):
    """A decision dedupe would refuse."""


@dataclass(frozen=True)
class Decision:
    id: str
    decision: str  # keep | drop | relabel | other
    new_label: str = ""  # a class, for a relabel
    note: str = ""

    def row(self) -> dict[str, str]:
        return {
            "id": self.id,
            "decision": self.decision,
            "new_label": self.new_label,
            "note": self.note,
        }


def checked_decision(
    photo_id: str, decision: str, new_label: str, note: str, classes: Sequence[str]
) -> Decision:
    """A decision as dedupe reads it, or BadDecision saying what is wrong. A note is kept on one
    line (its line breaks become spaces)."""
    if not photo_id or len(photo_id) > MAX_ID or not photo_id.isprintable():
        raise BadDecision(f"id must be 1 to {MAX_ID} printable characters")
    if decision not in DECISIONS:
        raise BadDecision(f"decision {decision!r} is not one of {list(DECISIONS)}")
    if decision == "relabel" and new_label not in classes:
        raise BadDecision(f"new_label {new_label!r} is not one of {list(classes)}")
    if decision != "relabel" and new_label:
        raise BadDecision(f"new_label is for a relabel only, not for {decision!r}")
    note = " ".join(note.split())
    if len(note) > MAX_NOTE:
        raise BadDecision(f"note is over {MAX_NOTE} characters")
    return Decision(photo_id, decision, new_label, note)


def read_decision_file(path: Path) -> dict[str, Decision]:
    """The decisions by id (a later row for the same id replaces the earlier); none if there is
    no file yet."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise BadDecision(f"{path}: missing column(s) {sorted(missing)}")
        return {r["id"]: Decision(*(r[c] or "" for c in COLUMNS)) for r in reader}


def decisions_csv(decisions: dict[str, Decision]) -> str:
    """The file's text: the header, then one row per id, sorted by id."""
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(decisions[k].row() for k in sorted(decisions))
    return out.getvalue()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_decision(path: Path, decision: Decision) -> dict[str, Decision]:
    """The decision into the file (replacing any earlier one for its id), atomically; returns
    every decision now in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(path.parent):
        decisions = read_decision_file(path)
        decisions[decision.id] = decision
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            with temporary.open("w", newline="") as f:
                f.write(decisions_csv(decisions))
                f.flush()
                os.fsync(f.fileno())
            temporary.chmod(mode)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    return decisions


# --- dedupe's outputs ------------------------------------------------------------------------


@dataclass
class Project:
    """The project folder the service was pointed at: its params, dedupe's outputs, decisions."""

    root: Path
    classes: tuple[str, ...]
    paths: Paths
    min_outlier_score: float  # dedupe.noise: which kept photos are candidates...
    max_candidates: int  # ...and how many, most suspicious first
    _manifest: tuple[int, Any] | None = field(default=None, repr=False)  # (mtime_ns, frame)
    other_class: str = ""  # params.yaml's other_class: offered as the `other` decision

    @classmethod
    def at(cls, root: Path) -> Project:
        params = load_params(root / "params.yaml")
        noise = params["dedupe"]["noise"]
        return cls(
            root,
            tuple(params["classes"]),
            load_paths(params),
            float(noise["min_outlier_score"]),
            int(noise["max_candidates"]),
            other_class=configured_other_class(params),
        )

    def path(self, relative: Path) -> Path:
        return relative if relative.is_absolute() else self.root / relative

    @property
    def decisions(self) -> Path:
        return self.path(self.paths.decisions)

    def manifest(self) -> Any:
        """dedupe's manifest (a pandas DataFrame), read again when dedupe rewrote it."""
        import pandas as pd

        path = self.path(self.paths.deduped) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `dvc repro dedupe`")
        mtime = path.stat().st_mtime_ns
        if self._manifest is None or self._manifest[0] != mtime:
            self._manifest = (
                mtime,
                pd.read_parquet(path).set_index("id", drop=False).rename_axis(None),
            )
        return self._manifest[1]

    def candidates(self) -> list[dict[str, Any]]:
        """dedupe's noise candidates (stages.dedupe.review_candidates): kept photos with a label
        issue or an outlier score from min_outlier_score on, most suspicious first."""
        frame = self.manifest()
        suspicious = frame["label_issue"] | (frame["outlier_score"] >= self.min_outlier_score)
        ranked = frame[suspicious & (frame["status"] == "kept")].sort_values(
            ["label_issue", "noise_score", "outlier_score"], ascending=False
        )
        return [
            {
                "id": str(r["id"]),
                "label": str(r["label"]),
                "suggested_label": str(r["suggested_label"]),
                "noise_score": round(float(r["noise_score"]), 4),
                "outlier_score": round(float(r["outlier_score"]), 2),
                "cluster_id": str(r["cluster_id"]),
            }
            for _, r in ranked.head(self.max_candidates).iterrows()
        ]

    def clusters(self, limit: int) -> list[dict[str, Any]]:
        """Near-duplicate clusters of several photos, label conflicts first, then by id."""
        frame = self.manifest()
        clustered = frame[frame["cluster_id"] != ""]
        sizes = clustered.groupby("cluster_id")["id"].transform("size")
        multi = clustered[sizes > 1]
        conflicts = set(multi.loc[multi["status"] == "label_conflict", "cluster_id"])
        order = sorted(set(multi["cluster_id"]), key=lambda c: (c not in conflicts, c))[:limit]
        groups = dict(
            tuple(multi.sort_values(["cluster_id", "status", "id"]).groupby("cluster_id"))
        )
        return [
            {
                "cluster_id": str(c),
                "conflict": c in conflicts,
                "photos": [
                    {
                        "id": str(r["id"]),
                        "label": str(r["label"]),
                        "status": str(r["status"]),
                        "reason": str(r["reason"] or "representative"),
                    }
                    for _, r in groups[c].iterrows()
                ],
            }
            for c in order
        ]

    def knows(self, photo_id: str) -> bool:
        return photo_id in self.manifest().index

    def thumbnail(self, photo_id: str) -> bytes | None:
        """The photo's thumbnail collect stored in its shards; None for an unknown id."""
        frame = self.manifest()
        if photo_id not in frame.index:
            return None
        row = frame.loc[photo_id]
        with (self.path(self.paths.collected) / str(row["thumb_shard"])).open("rb") as f:
            f.seek(int(row["thumb_offset"]))
            return f.read(int(row["thumb_length"]))
