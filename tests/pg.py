"""A real PostgreSQL for tests: its own cluster in a temp directory, on a free loopback port.

The test session starts it (``initdb``, then the ``postgres`` server in the foreground as a
child of the test process, so the handle stops it and a killed test run takes it down too)
and each test gets a fresh database of its own (:meth:`Postgres.new_database`).

Facts this relies on (PostgreSQL 15, Debian): ``initdb`` and ``postgres`` live in a versioned
directory off the PATH, named by ``pg_config --bindir`` (``/usr/lib/postgresql/15/bin``);
PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user
(which the Debian package creates) and the temp directory is handed to it; the unix socket
goes in the temp directory, not in ``/var/run/postgresql`` (that is the system cluster's).
``fsync``, ``synchronous_commit`` and ``full_page_writes`` are off: a test cluster has nothing
to survive, and the suite runs on two shared cores.

This module does not set up TLS, passwords (``trust`` on loopback) or replication, and is
not a production configuration.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.broker import free_port

__all__ = ["INSTALL_HINT", "Postgres", "PostgresError", "find_bindir"]

INSTALL_HINT = (
    "PostgreSQL is not installed: run `scripts/ensure-system-packages postgresql`, or "
    "`sudo apt-get install -y postgresql` (Debian/Ubuntu) / `brew install postgresql@15`")
SUPERUSER = "edgefleet"
_ids = itertools.count(1)


def _die_with_parent() -> None:
    """In the child: SIGQUIT (immediate shutdown) when the test process dies. ``ctypes`` is
    loaded before the fork: after the switch to ``postgres`` the interpreter's own files
    (under /root) may be unreadable."""
    _LIBC.prctl(1, signal.SIGQUIT)  # PR_SET_PDEATHSIG


_LIBC = ctypes.CDLL(None, use_errno=True)


class PostgresError(RuntimeError):
    """The server did not start or stop as asked; the message carries its log."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None if PostgreSQL is missing."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            candidates.append(Path(out))
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        candidates += sorted((p / "bin" for p in root.iterdir()), reverse=True)
    for directory in candidates:
        if all(os.access(directory / b, os.X_OK) for b in ("initdb", "postgres")):
            return directory
    return None


def _account() -> tuple[int, int] | None:
    """The (uid, gid) to run the cluster as: ``postgres`` when we are root, else ourselves
    (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    return pw.pw_uid, pw.pw_gid


class Postgres:
    """One PostgreSQL server, started and stopped by its handle.

    Usage::

        pg = Postgres()            # skips the test if PostgreSQL is not installed
        pg.start()
        url = pg.new_database()    # postgresql://edgefleet@127.0.0.1:PORT/t_1
        pg.stop()                  # and pg.cleanup() removes the directory
    """

    def __init__(self, *, ready_timeout: float = 60.0, durable: bool = False) -> None:
        bindir = find_bindir()
        if bindir is None:
            pytest.skip(INSTALL_HINT)
        self.bindir = bindir
        self.ready_timeout = ready_timeout
        self.durable = durable  # fsync and synchronous commit on (a benchmark's fair setting)
        self.account = _account()
        self.dir = Path(tempfile.mkdtemp(prefix="postgres-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        if self.account is not None:
            os.chown(self.dir, *self.account)

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def _run_as(self) -> dict:
        if self.account is None:
            return {}
        return {"user": self.account[0], "group": self.account[1], "extra_groups": []}

    def start(self) -> None:
        """Create the cluster (once) and start the server; wait until it accepts queries.

        Raises:
            PostgresError: ``initdb`` failed, or the server exited or did not come up.
        """
        if not self.data.exists():
            done = subprocess.run(
                [str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                 "-A", "trust", "-E", "UTF8", "--locale=C",
                 *([] if self.durable else ["--no-sync"])],
                capture_output=True, text=True, timeout=120, **self._run_as())
            if done.returncode != 0:
                raise PostgresError(f"initdb failed ({done.returncode}):\n{done.stderr}")
        log = open(self.log, "ab")  # noqa: SIM115 - the child holds it; closed below
        if self.account is not None:
            os.chown(self.log, *self.account)
        try:
            self.process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", f"listen_addresses={self.host}",
                 "-c", f"unix_socket_directories={self.dir}",
                 *([] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off",
                                            "-c", "full_page_writes=off"]),
                 "-c", "max_connections=300", "-c", "shared_buffers=64MB"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent, **self._run_as())
        finally:
            log.close()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise PostgresError(f"postgres exited with {self.process.returncode}:\n"
                                    f"{self.log.read_text(errors='replace')[-4000:]}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresError(f"postgres did not accept queries within "
                                    f"{self.ready_timeout} s:\n"
                                    f"{self.log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.admin_url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t_{os.getpid()}_{next(_ids)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
        return self.url(name)

    def stop(self, timeout: float = 20.0) -> None:
        """Immediate shutdown (SIGQUIT: nothing to flush with fsync off), then SIGKILL."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
