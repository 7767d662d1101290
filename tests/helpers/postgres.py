"""A real PostgreSQL server for the tests, from the installed binaries (Debian's `postgresql`
package: /usr/lib/postgresql/<version>/bin), in a throwaway folder on a free port.

initdb and postgres refuse to run as root, and the tests run as root here and in CI: the
cluster then belongs to the `postgres` system user (the package creates it), which runs every
server command through runuser. Its folder is made with tempfile (not pytest's tmp_path, whose
parent only root may enter). Without PostgreSQL the tests that need it skip, except under CI
(.ci/run installs the package), where they fail.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

SUPERUSER = "postgres"
START_TIMEOUT_S = 60


def postgres_bindir() -> Path | None:
    """The newest installed version's bin folder, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    bindir: Path
    base: Path  # data/, socket/ and server.log
    port: int

    @property
    def data(self) -> Path:
        return self.base / "data"

    def _run(self, *command: str) -> None:
        as_owner = ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []
        done = subprocess.run([*as_owner, *command], capture_output=True, text=True, check=False)
        if done.returncode:
            log = (
                (self.base / "server.log").read_text()
                if (self.base / "server.log").exists()
                else ""
            )
            raise RuntimeError(f"{command[0]} failed:\n{done.stdout}{done.stderr}{log[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base / 'socket'} -h 127.0.0.1 -c fsync=off"
        pg_ctl = str(self.bindir / "pg_ctl")
        self._run(
            pg_ctl,
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.base / "server.log"),
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "start",
        )

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database: its URL."""
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """initdb in a new folder, then the server on a free loopback port (trust authentication)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("no PostgreSQL installed (/usr/lib/postgresql/*/bin/initdb)")
    base = Path(tempfile.mkdtemp(prefix="vitrine-postgres-"))
    (base / "socket").mkdir()
    if os.geteuid() == 0:
        owner = pwd.getpwnam(SUPERUSER)
        for path in (base, base / "socket"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    server = PostgresServer(bindir, base, free_port())
    try:
        server._run(
            str(bindir / "initdb"),
            "-D",
            str(server.data),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        server.start()
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return server


def postgres_or_skip() -> PostgresServer:
    """A started server; without PostgreSQL a skip, or a failure under CI."""
    if postgres_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing; .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql); CI runs this test")
    return start_postgres()
