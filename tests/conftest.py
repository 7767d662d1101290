"""Shared fixtures: tiny, generated image datasets built in tmp_path (helpers in tests/helpers),
and the answers databases: SQLite in tmp_path, or a real PostgreSQL server
(tests/helpers/postgres.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.photos import photo_bytes
from tests.helpers.postgres import PostgresServer, postgres_or_skip
from vitrine.production.records import RecordStore

# No network here: keep every tool's telemetry off in the tests too.
os.environ.update(
    DVC_NO_ANALYTICS="1",
    BENTOML_DO_NOT_TRACK="true",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    GX_ANALYTICS_ENABLED="false",
)


@pytest.fixture
def make_photo():
    return photo_bytes


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """A folder source: 12 photos per class under <root>/<class>/."""
    root = tmp_path / "photos"
    for c, cls in enumerate(("laptop", "phone")):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            (root / cls / f"{i:03d}.jpg").write_bytes(photo_bytes(1000 * c + i))
    return root


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, started on first use."""
    server = postgres_or_skip()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new, empty database on that server."""
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def answers_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty answers database, each test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'answers.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(answers_url: str) -> Iterator[RecordStore]:
    """A migrated answers store on `answers_url` (so on SQLite and on PostgreSQL)."""
    store = RecordStore(answers_url)
    store.migrate()
    yield store
    store.close()
