"""The recorder: every served answer into the answers database, never in the answer's way.

On the request path, Recorder.record keeps the photo (vitrine.production.photos) and appends
the record to this process's spool (vitrine.production.spool: durable against the process's
death once it returns); that is all an answer waits for, a few tens of microseconds, and it
never raises: a failure is logged and counted (vitrine.production.metrics), and the answer goes
out anyway. A background thread ("vitrine-recorder") does everything that touches the
database, so one that is down or slow delays no answer:
  - on start, `alembic upgrade head` (RecordStore.migrate, under its lock), retried until the
    database answers;
  - every serve.record.flush_every_s, it closes the active spool segment and writes its records
    in transactions of serve.record.batch_rows (insert-or-ignore), then deletes it; a failed
    write is retried with exponential backoff (up to MAX_BACKOFF_S), the records staying
    spooled meanwhile (vitrine_record_backlog counts them);
  - at start and every ADOPT_EVERY_S, it adopts and replays the spool segments of dead
    processes (a server killed with SIGKILL, a crashed worker): each is replayed by exactly one
    process, and a record replayed twice is still one row;
  - every serve.record.sweep_every_s, the photo retention sweep.
On shutdown (close), it writes what is left within a deadline; what the database did not take
stays spooled for the next start.

The database is serve.record.url, or VITRINE_RECORD_URL when set (records.record_url).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from vitrine.contracts import RecordConfig
from vitrine.production.metrics import RecorderMetrics, recorder_metrics
from vitrine.production.photos import PhotoStore
from vitrine.production.records import AnswerRecord, RecordStore, record_url
from vitrine.production.spool import Orphan, Segment, Spool, read_records

MAX_BACKOFF_S = 30.0  # longest wait between two attempts at a failing database
ADOPT_EVERY_S = 60.0  # how often dead processes' spools are looked for (and at start)
FIRST_SWEEP_S = 60.0  # the first photo sweep, this long after start
LOG_EVERY_S = 60.0  # one log line per kind of failure in this time, however many there are
log = logging.getLogger(__name__)


class _Throttled:
    """A log line at most every LOG_EVERY_S; the ones in between are counted in the next."""

    def __init__(self) -> None:
        self.last = -LOG_EVERY_S
        self.skipped = 0

    def __call__(self, emit: Callable[..., None], message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S:
            self.skipped += 1
            return
        suffix = f" ({self.skipped} more since the last line)" if self.skipped else ""
        emit(message + suffix, *args)
        self.last, self.skipped = now, 0


def photo_sha256(photo: bytes) -> str:
    return hashlib.sha256(photo).hexdigest()


def now_utc() -> datetime:
    return datetime.now(UTC)


class Recorder:
    """Spool on the request path, database in a background thread (see the module's docstring).

    record() is called from one thread at a time or several (it takes the spool's lock); the
    counters written, write_failures and spool_failures are this process's, for tests.
    """

    def __init__(self, config: RecordConfig, *, start: bool = True) -> None:
        self.config = config
        self.store = RecordStore(record_url(config.url))
        self.spool = Spool(Path(config.spool))
        self.photos = PhotoStore(config.photos, config.keep_photos_days, config.keep_photos_bytes)
        self.metrics: RecorderMetrics = recorder_metrics()
        self.orphans: list[Orphan] = []
        self.migrated = False
        self.written = 0
        self.write_failures = 0
        self.spool_failures = 0
        self._stop = threading.Event()
        self._adopt_now = False
        self._writing_failed = _Throttled()
        self._spooling_failed = _Throttled()
        self._thread = threading.Thread(target=self._run, name="vitrine-recorder", daemon=True)
        if start:
            self._thread.start()

    # --- the request path ------------------------------------------------------------------

    def record(self, record: AnswerRecord, photo: bytes) -> bool:
        """Keep the photo, then spool the record; True once the record is spooled. Never raises:
        the answer goes out whatever happens here."""
        try:
            self.photos.keep(photo, record.image_sha256)
        except Exception as err:  # the record still goes to the spool, naming the photo
            self._spooling_failed(log.error, "photo %s not kept: %s", record.image_sha256, err)
        try:
            self.spool.append(record.to_line(), record)
        except Exception as err:
            self.spool_failures += 1
            self.metrics.spool_failures.inc()
            self._spooling_failed(log.error, "answer %s not recorded: %s", record.request_id, err)
            return False
        self.metrics.backlog.inc()  # here, not by the writer: live even while it waits
        return True

    # --- the background thread -------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Records spooled but not yet in the database: ours and adopted dead processes'."""
        waiting = [*self.spool.closed, *(s for o in self.orphans for s in o.segments)]
        return self.spool.active_records + sum(s.records - s.done for s in waiting)

    def _run(self) -> None:
        delay = 0.0
        next_adopt = 0.0
        next_sweep = time.monotonic() + min(FIRST_SWEEP_S, self.config.sweep_every_s)
        while True:
            stopping = self._stop.wait(delay)
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep()
                next_sweep = now + self.config.sweep_every_s
            try:
                if now >= next_adopt or self._adopt_now:
                    self._adopt_now = False
                    adopted = self.spool.adopt_orphans()
                    self.metrics.backlog.inc(sum(s.records for o in adopted for s in o.segments))
                    self.orphans += adopted
                    next_adopt = now + ADOPT_EVERY_S
                self.write_all(final=stopping)
                delay = self.config.flush_every_s
            except Exception as err:  # the database (or the spool folder) failed: retry later
                self.write_failures += 1
                self.metrics.write_failures.inc()
                delay = min(max(2 * delay, self.config.flush_every_s), MAX_BACKOFF_S)
                self._writing_failed(
                    log.warning,
                    "answers database %s: %s; %d records wait in the spool, next try in %.1f s",
                    self.store,
                    err,
                    self.backlog,
                    delay,
                )
            if stopping:
                return

    def look_for_orphans(self) -> None:
        """Have the writer look for dead processes' spools now, not at its next minute."""
        self._adopt_now = True

    def write_all(self, final: bool = False) -> None:
        """Every closed segment (adopted ones first) into the database, each deleted once in;
        the active segment is closed first when nothing older waits (or when final). Raises
        on the first failure, leaving the rest for the next call."""
        if not self.migrated:
            self.store.migrate()
            self.migrated = True
        self.spool.rotate(force=final)
        while self.orphans:
            orphan = self.orphans[0]
            while orphan.segments:
                self._write(orphan.segments[0])
                orphan.segments.pop(0).path.unlink(missing_ok=True)
            Spool.release(self.orphans.pop(0))
        while self.spool.closed:
            self._write(self.spool.closed[0])
            self.spool.closed.pop(0).path.unlink(missing_ok=True)  # its memory goes with it

    def _write(self, segment: Segment) -> None:
        for records, offset, lines in read_records(segment, self.config.batch_rows):
            try:
                self.store.insert(records)
            except (sa.exc.DataError, sa.exc.IntegrityError):
                self._insert_each(records)  # one bad record must not hold up the others
            segment.committed = offset
            segment.done += lines
            self.written += len(records)
            self.metrics.written.inc(len(records))
            self.metrics.backlog.dec(lines)

    def _insert_each(self, records: list[AnswerRecord]) -> None:
        """The records one at a time; one the database refuses as data is logged and dropped
        (retrying it would hold up every later record forever)."""
        for record in records:
            try:
                self.store.insert([record])
            except (sa.exc.DataError, sa.exc.IntegrityError) as err:
                self.write_failures += 1
                self.metrics.write_failures.inc()
                log.error("answer %s refused by the database, dropped: %s", record.request_id, err)

    def _sweep(self) -> None:
        try:
            sweep = self.photos.sweep()
        except Exception as err:  # the writer thread must outlive anything the sweep meets
            log.warning("photo retention sweep of %s failed: %s", self.photos.root, err)
            return
        if sweep is not None and sweep.deleted:
            self.metrics.photos_deleted.inc(sweep.deleted)
            log.info(
                "photo retention: %d photos (%d bytes) deleted, %d (%d bytes) kept",
                sweep.deleted,
                sweep.deleted_bytes,
                sweep.kept,
                sweep.kept_bytes,
            )

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is left (within timeout_s: a slow database does not hold up the
        shutdown), then stop; unwritten records stay spooled for the next start."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("answers database: %d records left in the spool at shutdown", self.backlog)
            return  # the thread holds the spool; the process's exit releases its flock
        self.spool.close()
        for orphan in self.orphans:
            Spool.release_unfinished(orphan)
        self.store.close()


def open_recorder(config: RecordConfig) -> Recorder | None:
    """The service's recorder, or None when serve.record.enabled is false."""
    return Recorder(config) if config.enabled else None
