"""How long the drift monitor's database work takes over a large answers table.

    python benchmarks/monitor.py [--rows 1000000] [--reviews 10000] [--hours 24] [--url URL]

Inserts --rows synthetic answers (two classes, a third of them /check_category, a tenth
abstained, spread evenly over the last --hours) and --reviews decisions on some of them into a
fresh SQLite database in a temporary folder, or into the empty database --url names (migrated
first). SQLite takes them through executemany in transactions of 100,000 rows; other databases
through SQLAlchemy in batches of 20,000. Then it times what the monitor flow asks of the
database over a window holding every row: vitrine.production.drift's summarize (the GROUP BY
scans), count_answers over the window before, reviewed and photo_sample (800 photos, as for
monitor.photo_sample 200), each --repeat times, and prints the best time of each and of all
together, as rows, seconds and rows/s, with the CPU model from /proc/cpuinfo.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from vitrine.production import drift
from vitrine.production.records import COLUMNS, RecordStore, answers
from vitrine.production.reviews import reviews

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model
from options import at_least, positive_float

CLASSES = ("laptop", "phone")
CHUNK_SQLITE = 100_000
CHUNK_OTHER = 20_000
BINS = 20
PHOTO_SAMPLE = 800  # 4 x monitor.photo_sample: the flow looks up more than it embeds


def synthetic_rows(start: int, n: int, since: datetime, hours: float, total: int) -> list[tuple]:
    """Rows start..start+n of `total`, in COLUMNS order, answered_at evenly over the window."""
    rng = np.random.default_rng(start)
    index = np.arange(start, start + n)
    offsets_us = (index * (hours * 3600e6 / total)).astype(np.int64)
    at = np.datetime64(since.replace(tzinfo=None), "us") + offsets_us.astype("timedelta64[us]")
    stamps = np.char.replace(np.datetime_as_string(at, unit="us"), "T", " ").tolist()
    p_phone = rng.beta(2, 1.5, n)
    label = np.where(p_phone >= 0.5, 1, 0)
    confidence = np.where(label == 1, p_phone, 1 - p_phone)
    abstain = confidence < 0.55
    checked = index % 3 == 0
    declared = np.where(rng.random(n) < 0.9, label, 1 - label)
    photo = rng.integers(0, total, n)
    rows = []
    for i in range(n):
        is_checked = bool(checked[i])
        p = float(p_phone[i])
        rows.append(
            (
                f"{start + i:032x}",
                stamps[i],
                "/check_category" if is_checked else "/classify",
                "effnet-bench",
                f"{int(photo[i]):064x}",
                CLASSES[label[i]],
                float(confidence[i]),
                f'{{"laptop": {1 - p:.6f}, "phone": {p:.6f}}}',
                int(abstain[i]),
                CLASSES[declared[i]] if is_checked else None,
                int(declared[i] == label[i]) if is_checked else None,
                5.0,
                None,
                None,
            )
        )
    return rows


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(size, total - start)


def insert_sqlite(store: RecordStore, total: int, since: datetime, hours: float) -> None:
    placeholders = ", ".join("?" * len(COLUMNS))
    statement = f"INSERT INTO answers ({', '.join(COLUMNS)}) VALUES ({placeholders})"
    connection = store.engine.raw_connection()
    try:
        cursor = connection.cursor()
        cursor.execute("PRAGMA synchronous=OFF")  # a throwaway database: no fsync per commit
        for start, n in chunks(total, CHUNK_SQLITE):
            cursor.executemany(statement, synthetic_rows(start, n, since, hours, total))
            connection.commit()
    finally:
        connection.close()


def insert_other(store: RecordStore, total: int, since: datetime, hours: float) -> None:
    for start, n in chunks(total, CHUNK_OTHER):
        rows = []
        for values in synthetic_rows(start, n, since, hours, total):
            row = dict(zip(COLUMNS, values, strict=True))
            row["answered_at"] = datetime.fromisoformat(row["answered_at"]).replace(tzinfo=UTC)
            row["probabilities"] = json.loads(row["probabilities"])
            row["abstain"] = bool(row["abstain"])
            row["matches"] = None if row["matches"] is None else bool(row["matches"])
            rows.append(row)
        with store.engine.begin() as connection:
            connection.execute(answers.insert(), rows)


def insert_reviews(store: RecordStore, n: int, total: int, at: datetime) -> None:
    rng = np.random.default_rng(7)
    picked = rng.choice(total, size=min(n, total), replace=False)
    labels = rng.integers(0, len(CLASSES), len(picked))
    rows = [
        {
            "request_id": f"{int(i):032x}",
            "label": CLASSES[y],
            "reviewer": "bench",
            "reviewed_at": at,
        }
        for i, y in zip(picked, labels, strict=True)
    ]
    with store.engine.begin() as connection:
        for start, size in chunks(len(rows), CHUNK_OTHER):
            connection.execute(reviews.insert(), rows[start : start + size])


def best_of(repeat: int, work: Callable[[], Any]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=at_least(1), default=1_000_000)
    parser.add_argument("--reviews", type=at_least(0), default=10_000)
    parser.add_argument("--hours", type=positive_float, default=24.0)
    parser.add_argument("--repeat", type=at_least(1), default=3)
    parser.add_argument("--url", help="an empty answers database (default: SQLite in a tmp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        store = RecordStore(args.url or f"sqlite:///{Path(folder) / 'answers.sqlite'}")
        store.migrate()
        until = datetime.now(UTC).replace(microsecond=0)
        since = until - timedelta(hours=args.hours)
        start = time.perf_counter()
        insert = insert_sqlite if store.backend == "sqlite" else insert_other
        insert(store, args.rows, since, args.hours)
        insert_reviews(store, args.reviews, args.rows, until)
        inserted_s = time.perf_counter() - start
        rows = store.count()
        print(f"{store!r}: {rows:,} answers inserted in {inserted_s:.1f} s")
        before = since - (until - since)
        steps: dict[str, Callable[[], Any]] = {
            "summarize": lambda: drift.summarize(store, since, until, BINS),
            "count_answers (window before)": lambda: drift.count_answers(store, before, since),
            "reviewed": lambda: drift.reviewed(store, since, until),
            "photo_sample": lambda: drift.photo_sample(store, since, until, PHOTO_SAMPLE),
        }
        total = 0.0
        for name, work in steps.items():
            seconds, result = best_of(args.repeat, work)
            total += seconds
            print(f"  {name:<30} {seconds:7.2f} s")
            if name == "summarize":
                assert result.answers == rows, (result.answers, rows)
        store.close()
    print(f"rows {rows}  seconds {total:.2f}  rows/s {rows / total:,.0f}  cpu {cpu_model()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
