"""What one URL's download came to: `FetchResult`, its reason codes, and which codes are the
server's lasting answer (trusted from the cache by a later run) or worth another try within a
run. The code table is in vitrine/ingest/download.py's docstring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitrine.images import Rejected

OK = "ok"

# Statuses worth asking again within the run: overload, throttling, gateway trouble (and 5xx).
_RETRY_STATUSES = frozenset({408, 425, 429})
_RETRYABLE_CODES = frozenset({"timeout", "connection_error"})
# Failures that a later run trusts from the index: the server's answer will not change.
_PERMANENT_CODES = frozenset({"too_large", "too_many_redirects"})


@dataclass(frozen=True, slots=True)
class FetchResult:
    url: str
    code: str  # "ok" or a reason code (see vitrine/ingest/download.py)
    detail: str = ""
    sha256: str = ""
    path: Path | None = None  # the cached body, when ok
    size: int = 0  # body bytes; for too_large, the bytes known to exceed the cap
    attempts: int = 0  # requests made for this URL in this run (0: answered from the cache)
    from_cache: bool = False

    @property
    def ok(self) -> bool:
        return self.code == OK

    def read(self) -> bytes:
        """The body, or the failure as `Rejected(code, detail)` (what collect's readers raise)."""
        if not self.ok or self.path is None:
            raise Rejected(self.code, self.detail)
        return self.path.read_bytes()


def http_status(code: str) -> int | None:
    """The status of an `http_<status>` code, None for any other code."""
    if code.startswith("http_") and code[5:].isdigit():
        return int(code[5:])
    return None


def is_permanent(code: str) -> bool:
    """Whether a failure is the server's lasting answer, so a later run may trust the cache."""
    status = http_status(code)
    if status is not None:
        return status < 500 and status not in _RETRY_STATUSES
    return code in _PERMANENT_CODES


def is_retryable(code: str) -> bool:
    """Whether a failure is worth another try within the same run."""
    status = http_status(code)
    if status is not None:
        return status >= 500 or status in _RETRY_STATUSES
    return code in _RETRYABLE_CODES
