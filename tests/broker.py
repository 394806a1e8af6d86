"""A real Mosquitto for tests: its own config, password file and ACL, on a free loopback port.

The ACL is the one the design asks of production (``fleet_server.telemetry.broker.ACL_TEMPLATE``,
its one source), so tests exercise what the broker really enforces:

- every user (a device) may publish ``summary``, ``report``, ``heartbeat`` and ``status``
  under ``edgefleet/v1/<its username>/``, and read only ``edgefleet/v1/<its username>/desired``;
- the account ``server`` may read ``edgefleet/v1/+/#`` and write ``edgefleet/v1/+/desired``.

Facts this relies on (Mosquitto 2.0): started as root, Mosquitto switches to the user
``mosquitto`` *before* reading ``password_file``, so a 0600 root-owned file makes it exit
with status 13; the config therefore says ``user root`` when the tests run as root. In ACL
files ``pattern`` lines apply to every user and anything not granted is refused. A
``deny`` line is not an exception to a wider grant: Mosquitto 2.0.11 checks every matching
``deny`` first, whatever its place in the file, and it refuses reads as well as writes. So
"publish ``<user>/#`` except ``desired``, read ``desired``" cannot be written with ``deny``;
the device's write topics are listed one by one instead. A refused publish is answered
with PUBACK reason 0x87 (Not authorized) under MQTT 5; a subscription to a topic the user
may not read is granted (SUBACK QoS 1) and then nothing is delivered on it.

This module does not configure TLS, persistence or bridges, and is not a production config.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fleet_server.telemetry.broker import ACL_TEMPLATE

__all__ = ["INSTALL_HINT", "BrokerError", "Mosquitto", "find_mosquitto"]

INSTALL_HINT = (
    "mosquitto is not installed: run `scripts/ensure-system-packages mosquitto`, "
    "or `sudo apt-get install -y mosquitto` (Debian/Ubuntu) / `brew install mosquitto` (macOS)"
)
SERVER_USER = "server"

# the production ACL, from its one source (``{server}``: the server account's name)
_ACL = ACL_TEMPLATE


class BrokerError(RuntimeError):
    """The broker did not start or stop as asked; the message carries its log."""


def find_mosquitto() -> tuple[Path, Path] | None:
    """The ``mosquitto`` and ``mosquitto_passwd`` binaries, or None if either is missing."""
    broker = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )
    passwd = shutil.which("mosquitto_passwd") or next(
        (p for p in ("/usr/bin/mosquitto_passwd",) if os.access(p, os.X_OK)), None
    )
    if broker is None or passwd is None:
        return None
    return Path(broker), Path(passwd)


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no broker outlives a
    killed test run (finalizers do not run on SIGKILL or a timeout's SIGTERM)."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    """One Mosquitto process, started and stopped by its handle.

    Usage::

        broker = Mosquitto()           # skips the test if mosquitto is not installed
        broker.add_user("dev-1", "pw")
        with broker:                   # start() ... stop()
            broker.restart()           # same port, same config

    Args:
        directory: where config, password file and log go (a new temp dir if None; it
            is removed by :meth:`cleanup` only if this object made it).
        ready_timeout: seconds :meth:`start` waits for the port to accept connections.
        persistence: off by default. On, Mosquitto saves its state (sessions, their
            subscriptions and queued messages) in ``directory`` when stopped and reloads it
            on restart, as the production broker does: a test that restarts the broker
            under a persistent-session subscriber then loses nothing the broker acked.
        acl: the ACL file text; ``{server}`` is replaced by the server account's name.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        ready_timeout: float = 10.0,
        persistence: bool = False,
        acl: str = _ACL,
    ) -> None:
        found = find_mosquitto()
        if found is None:
            pytest.skip(INSTALL_HINT)
        self.binary, self.passwd_binary = found
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="mosquitto-")) if directory is None else directory
        self.port = free_port()
        self.host = "127.0.0.1"
        self.ready_timeout = ready_timeout
        self.persistence = persistence
        self.acl = acl
        self.users: dict[str, str] = {}
        self.hashed_users: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.config_path = self.dir / "mosquitto.conf"
        self.log_path = self.dir / "mosquitto.log"

    # -- configuration -----------------------------------------------------------------

    def add_user(self, username: str, password: str) -> None:
        """Add an account; only before the first :meth:`start`."""
        if self.starts:
            raise BrokerError("add users before the broker first starts")
        self.users[username] = password

    def add_hashed_user(self, username: str, hashed: str) -> None:
        """Add an account by its password-file hash (Mosquitto's ``$7$…`` form, as the fleet
        server stores it for each device); only before the first :meth:`start`."""
        if self.starts:
            raise BrokerError("add users before the broker first starts")
        self.hashed_users[username] = hashed

    def _write_config(self) -> None:
        passwd = self.dir / "passwd"
        passwd.unlink(missing_ok=True)
        for i, (user, password) in enumerate(self.users.items()):
            args = [str(self.passwd_binary), "-b"]
            if i == 0:
                args.append("-c")
            result = subprocess.run(
                [*args, str(passwd), user, password], capture_output=True, timeout=30
            )
            if result.returncode != 0:
                stderr = result.stderr.decode(errors="replace")
                raise BrokerError(f"mosquitto_passwd failed for {user!r}: {stderr}")
        if not self.users:
            passwd.touch(mode=0o600)
        if self.hashed_users:
            with passwd.open("a") as fh:
                fh.writelines(f"{user}:{hashed}\n" for user, hashed in self.hashed_users.items())
        acl = self.dir / "acl"
        acl.write_text(self.acl.format(server=SERVER_USER))
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous false",
            f"password_file {passwd}",
            f"acl_file {acl}",
            *(
                # the autosave interval `fleet broker-config` writes: a broker killed between
                # two saves loses what it held in memory only
                ["persistence true", f"persistence_location {self.dir}/",
                 "autosave_interval 60"]
                if self.persistence
                else ["persistence false"]
            ),
            # the ingest account must never lose messages to a slow subscriber (DESIGN, MQTT)
            "max_queued_messages 0",
            # a file, not stdout: mosquitto block-buffers stdout into a pipe or file, while
            # it flushes its log file line by line, so the log is readable while it runs
            f"log_dest file {self.log_path}",
            "log_type all",
            "log_timestamp true",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # as root mosquitto drops to user `mosquitto` before reading password_file,
            # and a 0600 root-owned file then makes it exit 13
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker and wait until its port accepts connections.

        Raises:
            BrokerError: it exited or did not listen within ``ready_timeout`` (log attached).
        """
        if self.proc is not None:
            raise BrokerError("broker already running")
        if self.starts == 0:
            self._write_config()
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise BrokerError(f"mosquitto exited with status {code}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(
                    f"mosquitto did not listen on {self.port} within "
                    f"{self.ready_timeout} s:\n{self.log()}"
                )
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker by its handle (SIGTERM, then SIGKILL) and wait. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL the broker (a crash: nothing saved since the last autosave) and wait."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=timeout)

    def restart(self) -> None:
        """Stop, then start again on the same port with the same config."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        """Stop and remove the temp dir if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
