"""The output of a scoring run: its rows, written a chunk at a time so that a killed run resumes.

Chunk n of the source (records n * chunk_photos onwards, in input order) is written, once
scored, to `<output>.parts/<n>.parquet`: to a temporary name, flushed to disk, then renamed, so
a part either is whole or is not there. A restarted run skips every chunk whose part is there
and holds the chunk's ids, and scores only the others. `run.json` beside the parts says what
they were scored from (the source, the model's sha256, the chunk size, the category column):
when any of it differs, the parts are stale and are deleted first. At the end the parts are
merged, in chunk order, into the output (a temporary file renamed: a reader never sees half a
file) and the parts folder is removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PARTS_SUFFIX = ".parts"
RUN_FILE = "run.json"
_PART = re.compile(r"^(\d{8})\.parquet$")

# One row per input record. An answer's fields are null on a quarantined row, which has its
# reason and detail instead (collect's manifest codes, and the service's photo checks).
SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # the record's position in the source, from 0
        ("id", pa.string()),
        ("source", pa.string()),  # kind:path, as collect names a source
        ("url", pa.string()),  # a catalog row's URL, else ""
        ("status", pa.string()),  # accepted (answered) | quarantined
        ("reason", pa.string()),  # why quarantined, else ""
        ("detail", pa.string()),
        ("label", pa.string()),  # the answer: the decision rule's class, or taxonomy ancestor
        ("level", pa.int64()),  # its taxonomy level, 1 = coarsest (a class: the deepest level)
        ("confidence", pa.float64()),  # the answered class's probability
        ("probabilities", pa.map_(pa.string(), pa.float64())),  # class -> probability
        ("abstain", pa.bool_()),  # confidence below the packaged abstain threshold
        ("model_version", pa.string()),
        ("category", pa.string()),  # the declared category, when the source has the column
        ("matches", pa.bool_()),  # the answer is the declared category (null: none known)
        ("suggested_category", pa.string()),  # as /check_category: the answer on a confident
        # mismatch, the declared category otherwise
    ]
)
CATEGORY_COLUMNS = ("category", "matches", "suggested_category")


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + PARTS_SUFFIX)


def _write_durably(table: pa.Table, path: Path) -> None:
    """table to path, whole or not at all: a temporary file, fsynced, renamed over path."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Parts:
    """The part files of one output."""

    def __init__(self, output: Path, run: dict[str, Any]):
        self.output = output
        self.folder = parts_dir(output)
        self.run = run

    def path(self, n: int) -> Path:
        return self.folder / f"{n:08d}.parquet"

    def start(self) -> set[int]:
        """The chunks finished by an earlier run of the same job; stale parts are deleted."""
        run_file = self.folder / RUN_FILE
        if self.folder.is_dir():
            try:
                same = json.loads(run_file.read_text()) == self.run
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not run_file.is_file():
            run_file.write_text(json.dumps(self.run, indent=2) + "\n")
        return {int(m.group(1)) for p in self.folder.iterdir() if (m := _PART.match(p.name))}

    def ids(self, n: int) -> list[str] | None:
        """The ids part n holds, None if it cannot be read."""
        try:
            return pq.read_table(self.path(n), columns=["id"]).column("id").to_pylist()
        except (OSError, pa.ArrowException):
            return None

    def write(self, n: int, rows: list[dict[str, Any]]) -> None:
        _write_durably(pa.Table.from_pylist(rows, schema=SCHEMA), self.path(n))

    def merge(self, chunks: int, each: Callable[[pa.Table], None]) -> None:
        """Parts 0 .. chunks - 1, in order, into the output (`each` sees every part's table);
        the category columns only when some row has a category. Then the parts are removed."""
        paths = [self.path(n) for n in range(chunks)]
        with_category = any(_has_category(p) for p in paths)
        schema = SCHEMA if with_category else _without_category(SCHEMA)
        tmp = self.output.with_name(self.output.name + ".tmp")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(tmp, schema) as writer:
            if not paths:
                writer.write_table(schema.empty_table())
            for table in _tables(paths, schema.names):
                each(table)
                writer.write_table(table)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.output)
        shutil.rmtree(self.folder)


def _has_category(path: Path) -> bool:
    column = pq.read_table(path, columns=["category"]).column("category")
    return column.null_count < len(column)


def _without_category(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f for f in schema if f.name not in CATEGORY_COLUMNS])


def _tables(paths: Iterable[Path], columns: list[str]) -> Iterable[pa.Table]:
    for path in paths:
        yield pq.read_table(path, columns=columns)
