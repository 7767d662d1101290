"""Recording answers in the tests: settings in tmp_path, /metrics read back, patient waits."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import sqlalchemy as sa

from vitrine.contracts import RecordConfig
from vitrine.production.recorder import photo_sha256
from vitrine.production.records import AnswerRecord, RecordStore, new_request_id

T = TypeVar("T")


def record_config(root: Path, url: str | None = None, **settings: object) -> RecordConfig:
    """Recording into `root` (SQLite there unless `url`), flushed every 50 ms."""
    values: dict[str, object] = {
        "url": url or f"sqlite:///{root / 'answers.sqlite'}",
        "spool": str(root / "spool"),
        "photos": str(root / "photos"),
        "flush_every_s": 0.05,
        **settings,
    }
    return RecordConfig(**values)  # type: ignore[arg-type]


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples in the server's /metrics (every worker's)."""
    # Patient: under load the scrape waits its turn behind every request the workers hold.
    text = httpx.get(f"{url}/metrics", timeout=60).text
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def rows_stored(url: str) -> int:
    """How many answers the database holds, read from the database itself (not the busy
    server); 0 while no worker has created the table yet."""
    store = RecordStore(url)
    try:
        return store.count()
    except (sa.exc.OperationalError, sa.exc.ProgrammingError):  # no answers table yet
        return 0
    finally:
        store.close()


def wait_for(check: Callable[[], T], timeout_s: float = 30.0, every_s: float = 0.1) -> T:
    """check()'s first truthy value; AssertionError with its last value after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {timeout_s} s")
        time.sleep(every_s)


def sample_answer(
    i: int,
    at: datetime | None = None,
    abstain: bool = False,
    declared: str | None = None,
    **extra: object,
) -> AnswerRecord:
    """An answer of a two-class model (laptop, phone): p(phone) = (i % 10) / 10."""
    p = (i % 10) / 10
    label = ("laptop", "phone")[p >= 0.5]
    return AnswerRecord(
        request_id=new_request_id(),
        answered_at=at or datetime.now(UTC),
        endpoint="/check_category" if declared else "/classify",
        model_version="cnn64-test",
        image_sha256=photo_sha256(f"photo {i}".encode()),
        label=label,
        confidence=max(p, 1 - p),
        probabilities={"laptop": 1 - p, "phone": p},
        abstain=abstain,
        declared_category=declared,
        matches=None if declared is None else declared == label,
        latency_ms=1.5 + i,
        **extra,  # type: ignore[arg-type]
    )


@contextmanager
def database_down(url: str, request: pytest.FixtureRequest) -> Iterator[None]:
    """PostgreSQL: its server stopped. SQLite: another connection holding an exclusive lock (a
    slow database: every write waits for the busy timeout, then fails as a locked database)."""
    if url.startswith("sqlite"):
        blocker = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    server = request.getfixturevalue("postgres_server")
    server.stop()
    try:
        yield
    finally:
        server.start()
