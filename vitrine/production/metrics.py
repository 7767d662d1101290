"""The recorder's Prometheus metrics, served in the service's /metrics with BentoML's own.

  vitrine_record_backlog               gauge: records spooled but not yet in the database (the
                                       live workers' sum); rises while the database is down or
                                       slow, falls back to 0 when it has caught up
  vitrine_records_written_total        counter: records committed to the database (a replayed
                                       record counts again; the row is still one)
  vitrine_record_write_failures_total  counter: failed attempts to reach or write the database
                                       (each is retried with backoff; the records stay spooled)
  vitrine_record_spool_failures_total  counter: answers whose record could not be spooled (disk
                                       full, folder gone): answered, but not recorded
  vitrine_record_photos_deleted_total  counter: photos deleted by the retention sweep

BentoML runs prometheus_client in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set in each
worker before it builds the service), which is why prometheus_client is imported only when the
first recorder starts; elsewhere (tests, scripts) they land in its default registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecorderMetrics:
    backlog: Any  # prometheus_client.Gauge
    written: Any  # prometheus_client.Counter
    write_failures: Any
    spool_failures: Any
    photos_deleted: Any


_METRICS: list[RecorderMetrics] = []  # one set per process: a name registers once


def recorder_metrics() -> RecorderMetrics:
    if not _METRICS:
        import prometheus_client  # here, not at import: see the module's docstring

        _METRICS.append(
            RecorderMetrics(
                backlog=prometheus_client.Gauge(
                    "vitrine_record_backlog",
                    "Answer records spooled but not yet in the database",
                    multiprocess_mode="livesum",
                ),
                written=prometheus_client.Counter(
                    "vitrine_records_written", "Answer records committed to the database"
                ),
                write_failures=prometheus_client.Counter(
                    "vitrine_record_write_failures",
                    "Failed attempts to reach or write the answers database (retried)",
                ),
                spool_failures=prometheus_client.Counter(
                    "vitrine_record_spool_failures",
                    "Answers whose record could not be written to the spool (not recorded)",
                ),
                photos_deleted=prometheus_client.Counter(
                    "vitrine_record_photos_deleted", "Photos deleted by the retention sweep"
                ),
            )
        )
    return _METRICS[0]
