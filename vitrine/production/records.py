"""The answers database: one row per served answer, through SQLAlchemy, SQLite or PostgreSQL.

The table `answers` (created and changed only by the Alembic migrations in migrations/, which
RecordStore.migrate runs to head when the service starts):

  request_id         varchar(32)   primary key: the service's own id of the answer (a UUIDv7 as
                                   32 hex digits, so time-ordered), returned to the client in
                                   the answer's `request_id` and its X-Request-ID header
  answered_at        timestamp     when the answer was made, UTC (timestamptz on PostgreSQL)
  endpoint           varchar(32)   /classify, /classify_batch or /check_category
  model_version      varchar(200)  the packaged model's version that answered
  image_sha256       varchar(64)   the photo's SHA-256; the photo: <photos>/<sha[:2]>/<sha>
  label              varchar(200)  the class answered
  confidence         float         its probability
  probabilities      JSON          {class: probability} over every class (JSONB on PostgreSQL)
  abstain            boolean       the confidence was below the packaged abstain threshold
  declared_category  varchar(200)  /check_category: the seller's category; NULL otherwise
  matches            boolean       /check_category: label == declared_category; NULL otherwise
  latency_ms         float         from the request's arrival in the handler to its answer
  batch_id           varchar(32)   /classify_batch: the request's own id, shared by its images
  client_request_id  varchar(128)  the client's X-Request-ID as sent: kept, never the key

Indexes serve the queries built on it: answered_at (a time window), (abstain, answered_at) and
(matches, answered_at) (the review queue: doubts and mismatches in a window), (model_version,
answered_at) (drift per model) and image_sha256 (every answer about one photo). Refused uploads
(4xx) are no answers and have no row.

Writes are insert-or-ignore on request_id (ON CONFLICT DO NOTHING on both databases), so a
record written twice (a spool replayed after a crash) is one row. SQLite runs in WAL mode with
synchronous=NORMAL (a committed transaction survives a crash of the process, and one of the
machine up to its last checkpoint); a postgresql:// URL uses psycopg 3.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite

RECORD_URL_ENV = "VITRINE_RECORD_URL"  # replaces serve.record.url at serve time when set
MIGRATIONS = Path(__file__).with_name("migrations")
# pg_advisory_xact_lock's key: one migration at a time across every worker and host.
MIGRATION_LOCK_KEY = zlib.crc32(b"vitrine.production.answers")
CONNECT_TIMEOUT_S = 10
SQLITE_BUSY_TIMEOUT_S = 10  # a writer waits this long for another worker's transaction
# PostgreSQL: a statement waiting longer (on a lock, a stalled server) fails, and the writer
# counts a failure and tries again, rather than hanging unseen. Migrations have no limit.
STATEMENT_TIMEOUT_MS = 60_000

metadata = sa.MetaData()
answers = sa.Table(
    "answers",
    metadata,
    sa.Column("request_id", sa.String(32), primary_key=True),
    sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("model_version", sa.String(200), nullable=False),
    sa.Column("image_sha256", sa.String(64), nullable=False),
    sa.Column("label", sa.String(200), nullable=False),
    sa.Column("confidence", sa.Float(), nullable=False),
    sa.Column(
        "probabilities", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
    ),
    sa.Column("abstain", sa.Boolean(), nullable=False),
    sa.Column("declared_category", sa.String(200), nullable=True),
    sa.Column("matches", sa.Boolean(), nullable=True),
    sa.Column("latency_ms", sa.Float(), nullable=False),
    sa.Column("batch_id", sa.String(32), nullable=True),
    sa.Column("client_request_id", sa.String(128), nullable=True),
    sa.Index("ix_answers_answered_at", "answered_at"),
    sa.Index("ix_answers_abstain", "abstain", "answered_at"),
    sa.Index("ix_answers_matches", "matches", "answered_at"),
    sa.Index("ix_answers_model_version", "model_version", "answered_at"),
    sa.Index("ix_answers_image_sha256", "image_sha256"),
)


@dataclass(frozen=True, slots=True)
class AnswerRecord:
    """One served answer, as its row (the columns above, in their order)."""

    request_id: str
    answered_at: datetime  # timezone-aware, UTC
    endpoint: str
    model_version: str
    image_sha256: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    abstain: bool
    declared_category: str | None = None
    matches: bool | None = None
    latency_ms: float = 0.0
    batch_id: str | None = None
    client_request_id: str | None = None

    def row(self) -> dict[str, Any]:
        """The record as its row's values (a shallow copy: quicker than dataclasses.asdict)."""
        return {name: getattr(self, name) for name in COLUMNS}

    def to_line(self) -> bytes:
        """The record as one JSON line (the spool's format)."""
        data = self.row()
        data["answered_at"] = self.answered_at.isoformat()
        return json.dumps(data, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> AnswerRecord:
        """A spooled line back; ValueError (or TypeError) when it is not one."""
        data = json.loads(line)
        data["answered_at"] = datetime.fromisoformat(data["answered_at"])
        return cls(**data)

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> AnswerRecord:
        data = dict(row._mapping)
        at = data["answered_at"]
        # SQLite keeps no time zone: every stored time is UTC.
        data["answered_at"] = at if at.tzinfo else at.replace(tzinfo=UTC)
        return cls(**data)


COLUMNS = tuple(f.name for f in fields(AnswerRecord))


def new_request_id() -> str:
    """A new answer's key: a UUIDv7 (RFC 9562) as 32 hex digits. Its first 48 bits are the
    Unix time in milliseconds, so keys sort by time and land at the end of the primary key's
    index; the other 74 bits (bar version and variant) are random."""
    millis = time.time_ns() // 1_000_000
    random = int.from_bytes(os.urandom(10), "big")
    value = (
        (millis & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (random >> 68) << 64
        | 0b10 << 62
        | random & ((1 << 62) - 1)
    )
    return f"{value:032x}"


def record_url(configured: str) -> str:
    """The answers database's URL: VITRINE_RECORD_URL when set, else serve.record.url (so a
    deployment points a packaged model at its PostgreSQL without packaging it again)."""
    return os.environ.get(RECORD_URL_ENV) or configured


def _url(url: str) -> sa.URL:
    parsed = sa.make_url(url)
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"answers database: only sqlite and postgresql URLs, got {parsed!r}")
    if parsed.drivername in ("postgresql", "postgres"):  # psycopg 3, the one driver shipped
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _on_sqlite_connect(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
    cursor.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable across process crashes
    cursor.close()


def create_engine(url: str) -> sa.Engine:
    """An engine for an answers database URL (sqlite:///... or postgresql://...)."""
    parsed = _url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        sa.event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
        },
    )


class RecordStore:
    """The answers table of one database: migrate, insert (insert-or-ignore) and query."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.backend = self.engine.url.get_backend_name()

    def __repr__(self) -> str:
        return f"RecordStore({self.engine.url.render_as_string(hide_password=True)})"

    def close(self) -> None:
        self.engine.dispose()

    def migrate(self) -> None:
        """Alembic's `upgrade head` over this database, one worker at a time: several workers
        (or hosts) starting together wait for each other, and all but the first find it done."""
        with self._migration_lock(), self.engine.begin() as connection:
            if self.backend == "postgresql":
                connection.execute(sa.text("SET LOCAL statement_timeout = 0"))
                connection.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        """SQLite: an flock on a file beside the database (PostgreSQL: an advisory lock)."""
        database = self.engine.url.database
        if self.backend != "sqlite" or not database or database == ":memory:":
            yield
            return
        fd = os.open(f"{database}.migrate.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def insert(self, records: Sequence[AnswerRecord]) -> None:
        """Every record in one transaction; one already there (same request_id) is left as is."""
        if not records:
            return
        dialect_insert = postgresql.insert if self.backend == "postgresql" else sqlite.insert
        statement = dialect_insert(answers).on_conflict_do_nothing(index_elements=["request_id"])
        with self.engine.begin() as connection:
            connection.execute(statement, [r.row() for r in records])

    def get(self, request_id: str) -> AnswerRecord | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(answers).where(answers.c.request_id == request_id)
            ).first()
        return None if row is None else AnswerRecord.from_row(row)

    def find(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        abstain: bool | None = None,
        mismatch: bool | None = None,
        model_version: str | None = None,
        request_ids: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[AnswerRecord]:
        """Answers in [since, until) matching every filter given, oldest first. mismatch=True:
        /check_category answers whose label differs from the declared category."""
        query = sa.select(answers).order_by(answers.c.answered_at, answers.c.request_id)
        if since is not None:
            query = query.where(answers.c.answered_at >= since)
        if until is not None:
            query = query.where(answers.c.answered_at < until)
        if abstain is not None:
            query = query.where(answers.c.abstain == abstain)
        if mismatch is not None:
            query = query.where(answers.c.matches == (not mismatch))
        if model_version is not None:
            query = query.where(answers.c.model_version == model_version)
        if request_ids is not None:
            query = query.where(answers.c.request_id.in_(list(request_ids)))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as connection:
            return [AnswerRecord.from_row(row) for row in connection.execute(query)]

    def count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(answers)).one()[0])
