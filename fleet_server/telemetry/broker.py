"""A Mosquitto 2.0 configuration for the fleet: ``mosquitto.conf``, ``passwd`` and ``acl``.

:func:`render` is pure: a :class:`BrokerSetup` and the ``(username, $7$ hash)`` pairs of
the devices (``Store.mosquitto_users()``) in, file name → text out. :func:`write_broker_config`
is the thin shell around it that ``fleet broker-config`` and the demo call: it reads the
store, writes the three files atomically (``passwd`` 0600, the others 0644) and, when no
server password is given, makes one (kept in ``server-password``, 0600, and reused the next
time, so regenerating after adding devices does not lock the server out).

The ACL is the one the design asks for, ``pattern`` lines keyed on ``%u`` (the
authenticated username; ``%c``, the client id, is the client's to choose):

- a device may write ``summary``, ``report``, ``heartbeat`` and ``status`` under
  ``edgefleet/v1/<its username>/`` and read only ``edgefleet/v1/<its username>/desired``;
- the server account may read ``edgefleet/v1/+/#`` and write ``edgefleet/v1/+/desired``.

:data:`ACL_TEMPLATE` is the single source of that text: the test broker
(``tests/broker.py``) uses it too, so the tests exercise what production runs. That is
also why this module imports nothing of the server at load time (agent-only test
environments import it through ``tests/broker.py``).

This module does not start, stop or signal Mosquitto, make or check TLS certificates,
configure bridges, websockets or the dynamic-security plugin, and never logs a password.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fleet_server.errors import BrokerStartError, InvalidRequestError

if TYPE_CHECKING:
    from fleet_server.store import Store

__all__ = [
    "ACL_NAME",
    "ACL_TEMPLATE",
    "CONF_NAME",
    "PASSWD_NAME",
    "SERVER_PASSWORD_NAME",
    "BrokerSetup",
    "acl_text",
    "render",
    "write_broker_config",
]

log = logging.getLogger(__name__)

CONF_NAME = "mosquitto.conf"
PASSWD_NAME = "passwd"
ACL_NAME = "acl"
SERVER_PASSWORD_NAME = "server-password"
PERSISTENCE_DIR = "data"
DEFAULT_TLS_PORT = 8883

# Mosquitto 2.0.11 facts this text relies on (checked against a real broker in
# tests/fleet_server/test_brokerconf.py): `pattern` lines apply to every user and anything
# not granted is refused; a `deny` line is checked before every grant whatever its place
# in the file, and refuses reads as well as writes.
ACL_TEMPLATE = """\
# devices: one username per device; %u is the authenticated username, never the client id.
# Write topics are listed one by one: "write %u/# except desired" cannot be said, because a
# `deny` line wins over every grant whatever its place in the file, and denies reads too.
pattern write edgefleet/v1/%u/summary
pattern write edgefleet/v1/%u/report
pattern write edgefleet/v1/%u/heartbeat
pattern write edgefleet/v1/%u/status
pattern read edgefleet/v1/%u/desired

# the fleet server's ingest account
user {server}
topic read edgefleet/v1/+/#
topic write edgefleet/v1/+/desired
"""

# a Mosquitto username that is also safe in a passwd line (no ':'), an ACL line (no
# space) and a topic level (no '/', '+', '#'): the device id rule, which the server
# account must follow too
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
_HASH_RE = re.compile(r"^\$7\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+\Z")
_BIND_RE = re.compile(r"^[A-Za-z0-9.:_-]{1,253}\Z")


def acl_text(server_user: str) -> str:
    """The fleet ACL with ``server_user`` as the server account.

    Raises:
        InvalidRequestError: ``server_user`` is not a valid account name.
    """
    _check_user(server_user, "server_user")
    return ACL_TEMPLATE.format(server=server_user)


def _check_user(name: str, what: str) -> None:
    if not isinstance(name, str) or not _USER_RE.match(name):
        raise InvalidRequestError(f"{what} {name!r}: letters, digits, '_', '.', '@' or '-', "
                                  "at most 64, starting with a letter or digit", field=what)


def _check_port(port: int, what: str) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidRequestError(f"{what} must be 1..65535, got {port!r}", field=what)


@dataclass(frozen=True)
class BrokerSetup:
    """What the broker is to look like.

    Args:
        out: the directory the files are written to (created if missing); the config
            names files in it by absolute path.
        port, bind: the plain MQTT listener.
        server_user, server_password: the fleet server's account (``fleet serve
            --broker-user``); no password: :func:`write_broker_config` makes one.
        persistence: Mosquitto saves sessions, their subscriptions and queued messages in
            ``out/data/`` and reloads them on restart (the server's kept session survives a
            broker restart only with it).
        cafile, certfile, keyfile: with ``certfile`` and ``keyfile``, a TLS listener on
            ``tls_port`` (8883 if not given) besides the plain one; ``cafile`` verifies
            client certificates, required with ``require_certificate``.
        max_inflight_messages: Mosquitto's default, said out loud (see :func:`render`).
        run_as_root: whether the broker will be started as root (adds ``user root``);
            None: as this process runs.
    """

    out: Path
    port: int = 1883
    bind: str = "0.0.0.0"
    server_user: str = "server"
    server_password: str | None = field(default=None, repr=False)
    persistence: bool = True
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    require_certificate: bool = False
    tls_port: int | None = None
    max_inflight_messages: int = 20
    run_as_root: bool | None = None

    def __post_init__(self) -> None:
        _check_port(self.port, "port")
        _check_user(self.server_user, "server_user")
        if not _BIND_RE.match(self.bind):
            raise InvalidRequestError(f"bind {self.bind!r}: an address or host name",
                                      field="bind")
        if self.server_password is not None and (
                not self.server_password or any(c in self.server_password for c in "\r\n")):
            raise InvalidRequestError("server_password: empty, or a line break in it",
                                      field="server_password")
        if (self.certfile is None) != (self.keyfile is None):
            raise InvalidRequestError("TLS needs both certfile and keyfile", field="certfile")
        if not self.tls and (self.tls_port is not None or self.require_certificate
                             or self.cafile is not None):
            raise InvalidRequestError("tls_port, cafile and require_certificate need "
                                      "certfile and keyfile", field="certfile")
        if self.require_certificate and self.cafile is None:
            raise InvalidRequestError("require_certificate needs a cafile to check client "
                                      "certificates against", field="cafile")
        if self.tls:
            _check_port(self.listener_tls_port, "tls_port")
            if self.listener_tls_port == self.port:
                raise InvalidRequestError(f"tls_port {self.listener_tls_port} is also the "
                                          "plain listener's port", field="tls_port")
        for name in ("cafile", "certfile", "keyfile"):
            path = getattr(self, name)
            if path is not None and any(c in str(path) for c in "\r\n"):
                raise InvalidRequestError(f"{name}: a line break in the path", field=name)
        if self.max_inflight_messages < 0:
            raise InvalidRequestError("max_inflight_messages must be >= 0 (0: no limit)",
                                      field="max_inflight_messages")

    @property
    def tls(self) -> bool:
        return self.certfile is not None and self.keyfile is not None

    @property
    def listener_tls_port(self) -> int:
        return DEFAULT_TLS_PORT if self.tls_port is None else self.tls_port

    @property
    def as_root(self) -> bool:
        if self.run_as_root is not None:
            return self.run_as_root
        return hasattr(os, "geteuid") and os.geteuid() == 0


def _conf(setup: BrokerSetup) -> str:
    out = setup.out.resolve()
    lines = [
        "# Written by `fleet broker-config`; regenerate it rather than editing it.",
        "# Start: mosquitto -c " + str(out / CONF_NAME),
        "",
        "# authentication and ACL are broker-wide, the same on every listener",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {out / PASSWD_NAME}",
        f"acl_file {out / ACL_NAME}",
        "",
        "# Ingest must never lose a message: the server's kept session (MQTT 5 session",
        "# expiry) is queued for while the server restarts or falls behind, and Mosquitto",
        "# drops a client's messages past max_queued_messages (1000 by default). 0 is no",
        "# limit (mosquitto.conf(5) of 2.0: \"Set to 0 for no maximum\"); memory is bounded",
        "# instead by the server's Receive Maximum in flight and by the devices' own",
        "# outboxes. Checked on Mosquitto 2.0.11; 2.0.21 is reported to mishandle 0 (clients",
        "# disconnected with \"Quota exceeded\": eclipse-mosquitto/mosquitto#3244).",
        "max_queued_messages 0",
        "# QoS 1 messages in flight per client: for MQTT 5 clients the Receive Maximum",
        "# Mosquitto announces (how many unacknowledged publishes a device may send); what",
        "# it sends to an MQTT 5 client is bounded by that client's own Receive Maximum",
        "# (the fleet server asks for 2000). Mosquitto's default, written out.",
        f"max_inflight_messages {setup.max_inflight_messages}",
        "",
    ]
    if setup.persistence:
        lines += [
            "# sessions, subscriptions and queued messages survive a broker restart;",
            "# saved every minute (default 30) and on a clean exit",
            "persistence true",
            f"persistence_location {out / PERSISTENCE_DIR}/",
            "autosave_interval 60",
        ]
    else:
        lines.append("persistence false")
    if setup.as_root:
        lines += [
            "",
            "# Started as root, Mosquitto switches to the user `mosquitto` *before* reading",
            "# password_file, and the 0600 root-owned passwd file written here is then",
            "# unreadable: it exits with status 13. So it keeps running as root. Better in",
            "# production: chown these files to `mosquitto` and drop this line.",
            "user root",
        ]
    lines += ["", f"listener {setup.port} {setup.bind}"]
    if setup.tls:
        lines += ["", f"listener {setup.listener_tls_port} {setup.bind}"]
        if setup.cafile is not None:
            lines.append(f"cafile {Path(setup.cafile).resolve()}")
        lines += [f"certfile {Path(setup.certfile).resolve()}",  # type: ignore[arg-type]
                  f"keyfile {Path(setup.keyfile).resolve()}",  # type: ignore[arg-type]
                  f"require_certificate {'true' if setup.require_certificate else 'false'}"]
    return "\n".join(lines) + "\n"


def render(setup: BrokerSetup, users: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The three files' texts: ``mosquitto.conf``, ``passwd``, ``acl``.

    Args:
        setup: the broker's shape; ``server_password`` must be set.
        users: ``(device id, $7$ hash)`` of every device account, as
            ``Store.mosquitto_users()`` returns them.

    Raises:
        InvalidRequestError: no server password, a device id that is not a valid
            account name or is the server account's name (it would get the server's
            rights), a device listed twice, or a hash not in Mosquitto's ``$7$`` form.
    """
    from fleet_server.registry.auth import mosquitto_hash  # lazily: see the module docstring

    if setup.server_password is None:
        raise InvalidRequestError("the server account needs a password",
                                  field="server_password")
    seen: set[str] = set()
    lines = []
    for device, hashed in users:
        _check_user(device, "device id")
        if device == setup.server_user:
            raise InvalidRequestError(f"device {device!r} has the server account's name; "
                                      "it would get the server's rights", field="server_user")
        if device in seen:
            raise InvalidRequestError(f"device {device!r} listed twice", field="users")
        if not isinstance(hashed, str) or not _HASH_RE.match(hashed):
            raise InvalidRequestError(f"device {device!r}: not a Mosquitto $7$ hash",
                                      field="users")
        seen.add(device)
        lines.append(f"{device}:{hashed}\n")
    lines.append(f"{setup.server_user}:{mosquitto_hash(setup.server_password)}\n")
    return {CONF_NAME: _conf(setup), PASSWD_NAME: "".join(lines),
            ACL_NAME: acl_text(setup.server_user)}


def _write_atomic(path: Path, text: str, mode: int) -> None:
    """Write beside, fsync, chmod, rename: a reader (or a broker reload) sees the old file
    or the new one, never half of one, and a passwd file is never readable by others."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _server_password(setup: BrokerSetup) -> tuple[str, Path | None]:
    if setup.server_password is not None:
        return setup.server_password, None
    path = setup.out / SERVER_PASSWORD_NAME
    try:
        kept = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        kept = ""
    if kept:
        return kept, path
    made = secrets.token_urlsafe(32)
    _write_atomic(path, made + "\n", 0o600)
    return made, path


def write_broker_config(setup: BrokerSetup, store: Store) -> dict[str, Path]:
    """Render the configuration for every device account in ``store`` and write it.

    Returns:
        file name → path written: ``mosquitto.conf``, ``passwd``, ``acl``, and
        ``server-password`` when the password was made here (or reused from there).

    Raises:
        InvalidRequestError: as :func:`render`.
        OSError: ``out`` cannot be created or written.
    """
    setup.out.mkdir(parents=True, exist_ok=True)
    password, password_path = _server_password(setup)
    texts = render(replace(setup, server_password=password), store.mosquitto_users())
    modes = {PASSWD_NAME: 0o600}
    written: dict[str, Path] = {}
    if setup.persistence:
        (setup.out / PERSISTENCE_DIR).mkdir(mode=0o700, exist_ok=True)
    for name, text in texts.items():
        path = setup.out / name
        _write_atomic(path, text, modes.get(name, 0o644))
        written[name] = path
    if password_path is not None:
        written[SERVER_PASSWORD_NAME] = password_path
    log.info("broker config in %s: %d account(s), listener %s:%d%s", setup.out,
             texts[PASSWD_NAME].count("\n"), setup.bind, setup.port,
             f", TLS on {setup.listener_tls_port}" if setup.tls else "")
    return written


# --------------------------------------------------------------------------- running it


def mosquitto_binary() -> Path | None:
    """Mosquitto's path (Debian puts it in /usr/sbin, off a normal user's PATH), or None."""
    found = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return Path(found) if os.access(found, os.X_OK) else None


def start_broker(conf: Path, port: int, log: Path, *, timeout: float = 10.0,
                 new_session: bool = False,
                 preexec_fn: Callable[[], object] | None = None) -> subprocess.Popen[bytes]:
    """Start ``mosquitto -c conf`` (output to ``log``) and wait until it listens on ``port``.

    ``new_session``: not in this terminal's process group, so a Ctrl-C reaches only the
    caller, which stops the broker last (:func:`stop_broker`).

    Raises:
        BrokerStartError: not installed, exited (the log's text in the message), or not
            listening within ``timeout`` seconds (then killed).
    """
    binary = mosquitto_binary()
    if binary is None:
        raise BrokerStartError("mosquitto is not installed (Debian/Ubuntu: "
                               "sudo apt-get install -y mosquitto)")
    with log.open("ab") as fh:
        proc = subprocess.Popen([str(binary), "-c", str(conf)], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=new_session, preexec_fn=preexec_fn)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BrokerStartError(f"mosquitto -c {conf} exited with status {proc.returncode}:"
                                   f"\n{log.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                stop_broker(proc)
                raise BrokerStartError(f"mosquitto -c {conf} did not listen on port {port} "
                                       f"within {timeout:.0f} s; see {log}") from None
            time.sleep(0.02)


def stop_broker(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Terminate a broker :func:`start_broker` started, by its handle; kill if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
