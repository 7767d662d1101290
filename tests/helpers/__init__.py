"""Helpers shared by the tests: tiny data built in tmp_path, known candidates, photos."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The temporary Prefect API server (prefect_test_harness) creates and migrates its SQLite DB on
# start; Prefect's 30 s default ran out on a slower 2-core CI machine under load.
PREFECT_START_TIMEOUT_S = 180
