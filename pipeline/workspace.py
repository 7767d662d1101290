"""What keeps concurrent and interrupted runs from corrupting the workspace.

- `workspace_lock`: one flow run at a time per project, an fcntl lock on a file under
  `.dvc/tmp/`. A Prefect global concurrency limit would not do: in ephemeral mode (no
  PREFECT_API_URL) every process starts its own temporary API server, so two processes
  would each see their own limit. The kernel drops an flock when its holder dies, even by
  SIGKILL, so a killed run never leaves a stale lock. DVC's own repo lock still guards each
  `dvc` command against a `dvc repro` run by hand (the flow passes `--wait-for-lock`).
- `params_overridden`: per-run parameter overrides, restored byte for byte afterwards.
- `Fingerprint` / `LastSuccess`: what `retrain_if_changed` compares against.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from dvc.fs import localfs
from dvc.rwlock import _edit_rwlock  # DVC's own guarded read-modify-write of its rwlock
from dvc.utils.serialize import modify_yaml

from vitrine.config import ConfigError, apply_overrides
from vitrine.ingest.inventory import inventory_digest

STATE_DIR = Path(".dvc/tmp/pipeline")  # ignored by git (.dvc/.gitignore) and by DVC
PARAMS = Path("params.yaml")
LOCK_POLL_S = 0.5

# Lock files this context already holds: `retrain_if_changed` holds the lock while it
# checks and then calls `retrain` as a subflow, which must not wait for its own caller.
_held: ContextVar[frozenset[Path]] = ContextVar("held_workspace_locks", default=frozenset())


class WorkspaceBusy(RuntimeError):
    """Another flow run holds the project's workspace lock."""


class OverrideError(ValueError):
    """An override names a key params.yaml does not have."""


def state_dir(project_dir: Path) -> Path:
    path = project_dir / STATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def _holder(lock_file: Path) -> str:
    try:
        return lock_file.read_text().strip() or "a run that is just starting"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def workspace_lock(project_dir: Path, wait_s: float, owner: str) -> Iterator[None]:
    """Hold the project's run lock, waiting up to wait_s for it, else raise WorkspaceBusy."""
    lock_file = state_dir(project_dir) / "run.lock"
    if lock_file in _held.get():
        yield
        return
    with lock_file.open("a+") as fh:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(
                        f"another retrain is running in {project_dir} ({_holder(lock_file)}); "
                        f"waited {wait_s:g} s (flow.lock_wait_s). Try again when it has finished."
                    ) from None
                time.sleep(LOCK_POLL_S)
        fh.truncate(0)
        fh.write(f"pid {os.getpid()}, {owner}, since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
        fh.flush()
        token = _held.set(_held.get() | {lock_file})
        try:
            yield
        finally:
            _held.reset(token)
            fh.truncate(0)
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def restore_interrupted_overrides(project_dir: Path) -> bool:
    """Put back params.yaml if a run with overrides was killed before restoring it."""
    backup = state_dir(project_dir) / "params.yaml.committed"
    if not backup.exists():
        return False
    _write_atomically(project_dir / PARAMS, backup.read_bytes())
    backup.unlink()
    return True


@contextlib.contextmanager
def params_overridden(project_dir: Path, overrides: Mapping[str, Any] | None) -> Iterator[None]:
    """Apply `{"train.lr": 0.0005, ...}` to params.yaml for the duration of the block, then
    restore the original bytes.

    Why edit params.yaml in place: the stages read params.yaml and DVC records the values it
    finds there in dvc.lock, so the override is seen by both exactly as with
    `dvc exp run -S`. The alternatives lose something: `dvc exp run --temp` runs the whole
    pipeline as one command in a copy (no per-stage tasks, timeouts or retries, and its
    outputs do not reach the workspace), and a full copy of the project per run would copy
    gigabytes of data. The edit is safe because it happens under the workspace lock and a
    copy of the committed bytes is kept under .dvc/tmp first: a run killed mid-way leaves
    the copy, and the next run restores it before doing anything
    (`restore_interrupted_overrides`). Comments and layout are kept (DVC's own YAML
    round-tripper), though that only matters while the run lasts.
    """
    if not overrides:
        yield
        return
    params = project_dir / PARAMS
    original = params.read_bytes()
    backup = state_dir(project_dir) / "params.yaml.committed"
    _write_atomically(backup, original)
    try:
        with modify_yaml(params) as data:
            try:
                apply_overrides(data, overrides.items())
            except ConfigError as err:
                raise OverrideError(f"override {err}") from err
        yield
    finally:
        _write_atomically(params, original)
        backup.unlink()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def release_dead_dvc_locks(project_dir: Path) -> list[str]:
    """Drop the entries of `dvc` processes that are no longer running from DVC's
    `.dvc/tmp/rwlock`; return who held them.

    DVC drops entries of PIDs that no longer exist itself, but a `dvc` killed a moment ago
    can linger as a zombie until its new parent reaps it (slow or never under some container
    inits), and DVC then calls its outputs busy. Only dead processes are dropped: a `dvc`
    run by hand keeps its entries.
    """
    tmp_dir = project_dir / ".dvc" / "tmp"
    if not (tmp_dir / "rwlock").exists():
        return []
    released = []
    with _edit_rwlock(str(tmp_dir), localfs, False) as lock:
        for mode in ("read", "write"):
            for path, infos in list(lock[mode].items()):
                holders = infos if isinstance(infos, list) else [infos]
                dead = [h for h in holders if not _running(h["pid"])]
                released += [f"{h['cmd']} (pid {h['pid']})" for h in dead]
                if len(dead) == len(holders):
                    del lock[mode][path]
                elif dead:
                    lock[mode][path] = [h for h in holders if h not in dead]
    return released


@dataclass(frozen=True)
class Fingerprint:
    """Content hashes of what a retrain starts from: params.yaml and the raw sources."""

    params: str
    sources: str


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fingerprint(project_dir: Path, sources: Path) -> Fingerprint:
    """Hash params.yaml and the inventory of `sources` (every entry's path, kind and content;
    no link followed, nothing but regular files opened: vitrine/ingest/inventory.py)."""
    return Fingerprint(
        params=_sha256(project_dir / PARAMS),
        sources=inventory_digest(project_dir / sources),
    )


@dataclass(frozen=True)
class LastSuccess:
    fingerprint: Fingerprint
    finished_at: str


def load_last_success(project_dir: Path) -> LastSuccess | None:
    path = state_dir(project_dir) / "last_success.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return LastSuccess(Fingerprint(**data["fingerprint"]), data["finished_at"])


def record_success(project_dir: Path, fp: Fingerprint) -> None:
    now = f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"
    data = json.dumps(asdict(LastSuccess(fp, now)), indent=2).encode()
    _write_atomically(state_dir(project_dir) / "last_success.json", data)
