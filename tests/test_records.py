"""The answers store (vitrine.production), in-process, each test on SQLite and on a real
PostgreSQL server: the schema from its migrations, one row per answer, the spool's replay, a
database that is down, the photos' retention."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.helpers import REPO
from tests.helpers.records import database_down, record_config, sample_answer, wait_for
from vitrine.config import load_params
from vitrine.contracts import RecordConfig, ServeConfig
from vitrine.production import records as records_module
from vitrine.production import reviews as _reviews  # noqa: F401  (its table is in the schema)
from vitrine.production import spool as spool_module
from vitrine.production.photos import PhotoStore
from vitrine.production.recorder import Recorder, open_recorder, photo_sha256
from vitrine.production.records import (
    RECORD_URL_ENV,
    AnswerRecord,
    RecordStore,
    metadata,
    new_request_id,
    record_url,
)
from vitrine.production.spool import Spool, read_records

# The newest migration: the last file of the versions folder.
HEAD = sorted((records_module.MIGRATIONS / "versions").glob("v*.py"))[-1].name[1:5]


def recorder_for(tmp_path: Path, url: str, **settings: object) -> Recorder:
    return Recorder(record_config(tmp_path / "records", url, **settings))


def test_migrations_create_the_schema_from_empty(answers_url: str) -> None:
    store = RecordStore(answers_url)
    with store.engine.connect() as connection:
        assert "answers" not in sa.inspect(connection).get_table_names()
    store.migrate()
    store.migrate()  # at head already: nothing to do
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection)
        assert context.get_current_revision() == HEAD
        # The migrations build exactly the tables the code describes, indexes included.
        assert compare_metadata(context, metadata) == []
        indexes = {i["name"] for i in sa.inspect(connection).get_indexes("answers")}
    assert indexes == {
        "ix_answers_answered_at",
        "ix_answers_abstain",
        "ix_answers_matches",
        "ix_answers_model_version",
        "ix_answers_image_sha256",
    }
    store.close()


def test_sqlite_runs_in_wal_mode_with_synchronous_normal(tmp_path: Path) -> None:
    store = RecordStore(f"sqlite:///{tmp_path / 'deep' / 'answers.sqlite'}")  # folder made
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    store.close()


def test_each_answer_is_one_row_whatever_is_written_twice(store: RecordStore) -> None:
    records = [sample_answer(i) for i in range(5)] + [
        sample_answer(7, declared="laptop", batch_id="b" * 32)
    ]
    store.insert(records)
    store.insert(records[2:])  # a replay: nothing doubles
    assert store.count() == 6
    for record in records:
        assert store.get(record.request_id) == record  # every column back as written
    assert store.get("0" * 32) is None


def test_queries_by_time_window_doubt_mismatch_and_request_id(store: RecordStore) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    hour = timedelta(hours=1)
    early = sample_answer(1, start)
    doubt = sample_answer(2, start + hour, abstain=True)
    mismatch = sample_answer(3, start + 2 * hour, declared="phone")  # answered laptop
    confirmed = sample_answer(9, start + 3 * hour, declared="phone")
    store.insert([confirmed, mismatch, doubt, early])

    def ids(found: list[AnswerRecord]) -> list[str]:
        return [r.request_id for r in found]

    window = store.find(since=start + hour, until=start + 3 * hour)
    assert ids(window) == [doubt.request_id, mismatch.request_id]  # oldest first, end excluded
    assert ids(store.find(abstain=True)) == [doubt.request_id]
    assert ids(store.find(mismatch=True)) == [mismatch.request_id]
    assert ids(store.find(mismatch=False)) == [confirmed.request_id]
    assert ids(store.find(request_ids=[early.request_id, confirmed.request_id])) == [
        early.request_id,
        confirmed.request_id,
    ]
    assert ids(store.find(model_version="other")) == []
    assert len(store.find(limit=2)) == 2


def test_request_ids_are_uuid7_in_time_order() -> None:
    first = new_request_id()
    time.sleep(0.002)
    later = [new_request_id() for _ in range(1000)]
    assert len(set(later)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in later)
    parsed = uuid.UUID(first)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert all(first < i for i in later)  # a later millisecond sorts after
    millis = int(first[:12], 16)
    assert abs(millis / 1000 - time.time()) < 5


def test_the_environment_overrides_the_packaged_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RECORD_URL_ENV, raising=False)
    assert record_url("sqlite:///a.sqlite") == "sqlite:///a.sqlite"
    monkeypatch.setenv(RECORD_URL_ENV, "postgresql://db.internal/answers")
    assert record_url("sqlite:///a.sqlite") == "postgresql://db.internal/answers"
    assert RecordStore(record_url("")).engine.url.drivername == "postgresql+psycopg"
    with pytest.raises(ValueError, match="only sqlite and postgresql"):
        RecordStore("mysql://db/answers")


def test_models_packaged_before_recording_still_load() -> None:
    old = {
        "max_upload_bytes": 1,
        "max_pixels": 1,
        "min_side": 1,
        "max_batch_images": 1,
        "max_batch_bytes": 1,
        "max_batch_size": 1,
        "max_batch_wait_ms": 1.0,
        "workers": 1,
        "torch_threads": 1,
    }
    assert ServeConfig(**old).record == RecordConfig()
    assert RecordConfig().enabled and RecordConfig().url.startswith("sqlite:///data/production/")


def test_every_recorded_answer_reaches_the_database_once(answers_url: str, tmp_path: Path) -> None:
    recorder = recorder_for(tmp_path, answers_url, batch_rows=7)
    records = [sample_answer(i) for i in range(50)]
    for i, record in enumerate(records):
        assert recorder.record(record, f"photo {i}".encode())
    wait_for(lambda: recorder.backlog == 0 and recorder.written == 50)
    recorder.close()
    store = RecordStore(answers_url)
    assert store.count() == 50
    assert store.get(records[13].request_id) == records[13]
    # Every segment was deleted once written; the lock file went at a clean close.
    assert sorted(p.name for p in (tmp_path / "records" / "spool").iterdir()) == []


def test_records_past_the_memory_limit_are_read_back_from_the_spool(
    answers_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer takes its own records from memory, up to MEMORY_RECORDS a segment; a longer
    segment (a database down for a while) is read back from its file."""
    monkeypatch.setattr(spool_module, "MEMORY_RECORDS", 5)
    recorder = Recorder(record_config(tmp_path, answers_url, batch_rows=3), start=False)
    short = [sample_answer(i) for i in range(4)]
    for record in short:
        recorder.record(record, b"photo")
    in_memory = recorder.spool.rotate()
    long = [sample_answer(i) for i in range(4, 16)]
    for record in long:
        recorder.record(record, b"photo")
    from_file = recorder.spool.rotate(force=True)
    assert in_memory is not None and in_memory.memory == short
    assert from_file is not None and from_file.memory is None
    recorder.write_all()
    assert recorder.written == 16 and recorder.backlog == 0
    assert {r.request_id for r in RecordStore(answers_url).find()} == {
        r.request_id for r in short + long
    }


def test_a_record_is_in_the_spool_file_when_record_returns(tmp_path: Path) -> None:
    recorder = Recorder(record_config(tmp_path), start=False)  # no writer: nothing moves it
    record = sample_answer(1)
    recorder.record(record, b"photo")
    [segment] = (tmp_path / "spool").glob("*.spool")
    assert segment.read_bytes() == record.to_line()
    assert (tmp_path / "photos" / record.image_sha256[:2] / record.image_sha256).exists()
    assert recorder.backlog == 1


SPOOLING_PROCESS = """
import sys, time
from tests.helpers.records import record_config, sample_answer
from vitrine.production.recorder import Recorder
from pathlib import Path
recorder = Recorder(record_config(Path(sys.argv[1]), sys.argv[2]), start=False)
for i in range(int(sys.argv[3])):
    record = sample_answer(i)
    recorder.record(record, b"photo")
    print(record.request_id, flush=True)
print("done", flush=True)
time.sleep(600)
"""


def spool_and_die(root: Path, url: str, n: int) -> list[str]:
    """A process that spools n records (its writer never runs) and is then SIGKILLed: its ids."""
    process = subprocess.Popen(
        [sys.executable, "-c", SPOOLING_PROCESS, str(root), url, str(n)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    ids = []
    for line in process.stdout:
        if line.strip() == "done":
            break
        ids.append(line.strip())
    assert process.poll() is None, "the spooling process died by itself"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return ids


def test_a_killed_process_spool_is_replayed_once_and_replays_are_idempotent(
    answers_url: str, tmp_path: Path
) -> None:
    root = tmp_path / "records"
    ids = spool_and_die(root, answers_url, 40)
    spool = root / "spool"
    leftovers = {p.name: p.read_bytes() for p in spool.iterdir()}
    assert len(ids) == 40 and len(leftovers) == 2  # its lock file and its segment

    recorder = recorder_for(tmp_path, answers_url)
    wait_for(lambda: recorder.written == 40 and recorder.backlog == 0)
    assert not set(leftovers) & {p.name for p in spool.iterdir()}  # replayed, then deleted
    # The same dead process's files again (a crash between commit and delete): adopted on the
    # next look, written again, still one row each.
    for name, data in leftovers.items():
        (spool / name).write_bytes(data)
    recorder.look_for_orphans()
    wait_for(lambda: recorder.written == 80 and recorder.backlog == 0)
    recorder.close()
    store = RecordStore(answers_url)
    assert store.count() == 40
    assert {r.request_id for r in store.find()} == set(ids)


def test_a_dead_owners_spool_is_adopted_by_one_process_only(tmp_path: Path) -> None:
    dead = Spool(tmp_path)
    dead.append(sample_answer(1).to_line())
    os.close(dead._lock_fd)  # what the kernel does when its process dies
    first, second, alive = Spool(tmp_path), Spool(tmp_path), Spool(tmp_path)
    alive.append(sample_answer(2).to_line())
    [orphan] = first.adopt_orphans()
    assert orphan.owner == dead.owner and [s.records for s in orphan.segments] == [1]
    assert second.adopt_orphans() == []  # held by `first`; `alive` holds its own
    Spool.release(orphan)
    assert second.adopt_orphans() == []  # replayed and released: nothing left to adopt


def test_a_database_down_delays_no_record_and_its_backlog_drains(
    answers_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(records_module, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    RecordStore(answers_url).migrate()
    recorder = recorder_for(tmp_path, answers_url)
    records = [sample_answer(i) for i in range(30)]
    with database_down(answers_url, request):
        slowest = 0.0
        for record in records:
            started = time.perf_counter()
            assert recorder.record(record, b"photo")
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 0.05  # the writer's waits and failures are not the request path's
        wait_for(lambda: recorder.write_failures >= 2)
        assert recorder.backlog == 30 and recorder.written == 0
    wait_for(lambda: recorder.backlog == 0, timeout_s=60)  # backoff: at most 30 s apart
    recorder.close()
    assert RecordStore(answers_url).count() == 30


def test_shutdown_with_the_database_down_leaves_the_spool_for_the_next_start(
    answers_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(records_module, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    RecordStore(answers_url).migrate()
    with database_down(answers_url, request):
        first = recorder_for(tmp_path, answers_url)
        for i in range(10):
            first.record(sample_answer(i), b"photo")
        first.close(timeout_s=5)
    second = recorder_for(tmp_path, answers_url)
    wait_for(lambda: second.written == 10 and second.backlog == 0, timeout_s=60)
    second.close()
    assert RecordStore(answers_url).count() == 10


def test_a_stalled_postgresql_write_times_out_and_is_retried(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock held on the table (a slow database, not a down one): each write gives up after
    the statement timeout, counted as a failure, until the lock goes."""
    monkeypatch.setattr(records_module, "STATEMENT_TIMEOUT_MS", 200)
    RecordStore(postgres_url).migrate()
    recorder = recorder_for(tmp_path, postgres_url)
    blocker = sa.create_engine(records_module._url(postgres_url)).connect()
    blocker.execute(sa.text("LOCK TABLE answers IN ACCESS EXCLUSIVE MODE"))
    try:
        for i in range(10):
            assert recorder.record(sample_answer(i), b"photo")
        wait_for(lambda: recorder.write_failures >= 2)
        assert recorder.backlog == 10
    finally:
        blocker.rollback()
        blocker.close()
    wait_for(lambda: recorder.backlog == 0, timeout_s=60)
    recorder.close()
    assert RecordStore(postgres_url).count() == 10


def test_an_unwritable_spool_costs_the_record_not_the_answer(tmp_path: Path) -> None:
    recorder = Recorder(record_config(tmp_path), start=False)
    os.close(recorder.spool._fd)  # the spool's file gone bad (a full disk answers likewise)
    assert recorder.record(sample_answer(1), b"photo") is False
    assert recorder.spool_failures == 1


def test_a_write_cut_short_by_a_full_disk_leaves_no_half_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    first, lost, last = (sample_answer(i) for i in range(3))
    spool.append(first.to_line())
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        spool.append(lost.to_line())
    monkeypatch.setattr(os, "write", real_write)
    spool.append(last.to_line())
    segment = spool.rotate()
    assert segment is not None
    [(records, _, lines)] = list(read_records(segment, batch=10))
    assert records == [first, last] and lines == segment.records == 2


def photo_at(store: PhotoStore, content: bytes, seen: float) -> Path:
    sha = photo_sha256(content)
    store.keep(content, sha)
    path = store.path(sha)
    os.utime(path, (seen, seen))
    return path


def test_photos_are_kept_once_by_content(tmp_path: Path) -> None:
    store = PhotoStore(tmp_path, keep_days=1, keep_bytes=0)
    content = b"a photo"
    sha = photo_sha256(content)
    store.keep(content, sha)
    path = tmp_path / sha[:2] / sha
    inode = path.stat().st_ino
    os.utime(path, (1000, 1000))
    store.keep(content, sha)  # seen again: not rewritten, its time refreshed
    assert path.read_bytes() == content and path.stat().st_ino == inode
    assert path.stat().st_mtime > time.time() - 60
    assert [p.name for p in path.parent.iterdir()] == [sha]  # no temporary file left


def test_retention_deletes_the_oldest_photos_past_the_byte_limit(tmp_path: Path) -> None:
    now = time.time()
    store = PhotoStore(tmp_path, keep_days=0, keep_bytes=250)
    photos = [photo_at(store, bytes([i]) * 100, now - 1000 + i) for i in range(5)]
    sweep = store.sweep(now)
    assert sweep is not None and (sweep.deleted, sweep.kept_bytes) == (3, 200)
    assert [p.exists() for p in photos] == [False, False, False, True, True]


def test_retention_deletes_photos_unseen_for_longer_than_the_age_limit(tmp_path: Path) -> None:
    now = time.time()
    store = PhotoStore(tmp_path, keep_days=2, keep_bytes=0)
    old = photo_at(store, b"old", now - 3 * 86400)
    recent = photo_at(store, b"recent", now - 86400)
    stale_temporary = tmp_path / "ab" / ".ab.1234.tmp"
    stale_temporary.parent.mkdir(exist_ok=True)
    stale_temporary.write_bytes(b"half a photo")
    os.utime(stale_temporary, (now - 7200, now - 7200))
    sweep = store.sweep(now)
    assert sweep is not None and sweep.deleted == 1
    assert not old.exists() and recent.exists() and not stale_temporary.exists()


def test_the_recorder_sweeps_photos_in_the_background(tmp_path: Path) -> None:
    recorder = Recorder(
        record_config(tmp_path, keep_photos_days=0, keep_photos_bytes=150, sweep_every_s=0.05)
    )
    for i in range(4):
        record = sample_answer(i)
        recorder.record(record, bytes([i]) * 100)
        os.utime(recorder.photos.path(record.image_sha256), (1000 + i, 1000 + i))
    wait_for(lambda: len(list((tmp_path / "photos").glob("*/*"))) == 1, timeout_s=90)
    recorder.close()


def dvc_outputs() -> list[str]:
    """Every output path of dvc.yaml, its ${paths.*} resolved from params.yaml."""
    paths = load_params(REPO / "params.yaml")["paths"]
    outputs = []
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        stage = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path = next(iter(out)) if isinstance(out, dict) else out
                outputs.append(re.sub(r"\$\{paths\.(\w+)\}", lambda m: str(paths[m[1]]), path))
    return outputs


def test_the_default_records_are_ignored_by_git_and_no_dvc_output() -> None:
    """Production data lives beside the project, never in its history or its pipeline."""
    config = RecordConfig()
    database = config.url.removeprefix("sqlite:///")
    for path in (database, config.spool, config.photos):
        assert path.startswith("data/production/")
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{path}/x"], cwd=REPO, check=False)
        assert ignored.returncode == 0, f"{path} is not ignored by git"
    outputs = dvc_outputs()
    assert "models/package" in outputs  # the resolution works
    production = Path("data/production")
    clashes = [
        o for o in outputs if production.is_relative_to(o) or Path(o).is_relative_to(production)
    ]
    assert clashes == []


def test_recording_can_be_turned_off(tmp_path: Path) -> None:
    assert open_recorder(record_config(tmp_path, enabled=False)) is None
    assert not (tmp_path / "spool").exists() and not (tmp_path / "photos").exists()
