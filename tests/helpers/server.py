"""The real BentoML server on loopback, over a model in a throwaway store (tests/helpers/
tiny_package.py): `bentoml serve service.service:Classifier`, as `make serve` runs it, in its own
process group (so that a test can SIGKILL all of it)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.helpers import REPO
from vitrine.contracts import MODEL_NAME_ENV

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    url: str
    log: Path  # what the server writes (stdout and stderr)


def start_server(
    home: Path,
    model_name: str,
    log: Path,
    env: dict[str, str] | None = None,
    port: int = 0,
    cwd: Path = REPO,
) -> RunningServer:
    """The server over <model_name>:latest in the store at `home` (BENTOML_HOME), ready;
    AssertionError with its log's end when it exits or is not ready in time. cwd: where it runs
    (`make serve` runs in the repository), which relative serve.record paths are read from.

    BentoML reserves its arbiter's two control ports by binding port 0 and closing the socket
    before circus binds them again; a connection opened in between (a test's clients, a
    database session) can take the port. That start is retried on fresh ports, a few times."""
    for _ in range(PORT_RACE_ATTEMPTS - 1):
        with contextlib.suppress(PortTaken):
            return _start_once(home, model_name, log, env, port, cwd)
    return _start_once(home, model_name, log, env, port, cwd)


PORT_RACE_ATTEMPTS = 3


class PortTaken(AssertionError):
    """The server exited at start because a port it had reserved was taken meanwhile."""


def _start_once(
    home: Path,
    model_name: str,
    log: Path,
    env: dict[str, str] | None,
    port: int,
    cwd: Path,
) -> RunningServer:
    port = port or free_port()
    environment = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        MODEL_NAME_ENV: model_name,
        **(env or {}),
    }
    command = ["bentoml", "serve", "service.service:Classifier", "--host", "127.0.0.1"]
    start_of_log = log.stat().st_size if log.exists() else 0
    with log.open("a") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", *command, "--port", str(port)],
            cwd=cwd,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = RunningServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            tail = log.read_bytes()[start_of_log:].decode(errors="replace")
            error = PortTaken if "address already in use" in tail.lower() else AssertionError
            raise error(f"server exited ({process.returncode}):\n{tail[-3000:]}")
        if time.monotonic() > deadline:
            kill(server)
            raise AssertionError(f"server not ready in {START_TIMEOUT_S} s")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)


def stop(server: RunningServer) -> None:
    """SIGTERM (BentoML shuts down gracefully), then SIGKILL to all of it if it lingers."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill(server)


def kill(server: RunningServer) -> None:
    """SIGKILL to every process of the server, the arbiter and its workers, at once; returns
    when none of them runs any more (their files and locks closed). BentoML starts each worker
    in a session of its own, so the server's process group is the arbiter alone: the workers
    are found as its descendants."""
    try:
        tree = [psutil.Process(server.process.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for process in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while alive := [p.pid for p in tree if running(p)]:
        assert time.monotonic() < deadline, f"the server's processes outlived SIGKILL: {alive}"
        time.sleep(0.05)


def running(process: psutil.Process) -> bool:
    """Not gone, nor a zombie (whose files and locks are already closed)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
