"""A Mosquitto 2.0 configuration for the fleet: ``mosquitto.conf``, ``passwd`` and ``acl``.

:func:`render` is pure: a :class:`BrokerSetup` and the ``(username, $7$ hash)`` pairs of
the devices (``Store.mosquitto_users()``) in, file name → text out. :func:`write_broker_config`
is the thin shell around it that ``fleet broker-config`` and the demo call: it reads the
store, writes the three files atomically (``passwd`` 0600, the others 0644) and, when no
server password is given, makes one (kept in ``server-password``, 0600, and reused the next
time, so regenerating after adding devices does not lock the server out).

The ACL is the one the design asks for, ``pattern`` lines keyed on ``%u`` (the
authenticated username; ``%c``, the client id, is the client's to choose):

- a device may write ``summary``, ``report``, ``heartbeat``, ``status`` and ``receipt``
  under ``edgefleet/v1/<its username>/`` and read only
  ``edgefleet/v1/<its username>/desired``, ``.../ack`` (what the server has stored) and
  ``.../outcomes`` (true labels uploaded centrally: no device reads another's);
- the server account may read ``edgefleet/v1/+/#`` and write ``edgefleet/v1/+/desired``,
  ``edgefleet/v1/+/ack`` and ``edgefleet/v1/+/outcomes``;
- each ingest worker (``fleet ingest``) has an account of its own
  (:func:`fleet_server.registry.accounts.ingest_account`) that may read the five device
  kinds and write only acknowledgements (never desired state, never outcomes: those are
  the engine's, on the server account).

Identity is bound to the account: ``use_username_as_clientid`` makes the broker replace
whatever client id a client sends with its username, so a device that connects as
``dev-b-agent`` or ``fleet-serve`` is still only ``dev-a`` to the broker and cannot
take over (and so disconnect, or drain the kept session of) anyone else's connection.
The price: one connection per account. Hence one account per process of the server.
Service account names are a namespace of their own (:mod:`fleet_server.registry.accounts`).

The message size limit is the server's payload limit,
:data:`edgefleet.contract.messages.MAX_PAYLOAD`, imported, not repeated: anything larger would
be refused by ingest anyway, so the broker never holds, queues or forwards it. The
``mosquitto.conf`` text, each setting with its reason, is
:mod:`fleet_server.telemetry.mosquitto_conf`'s; this module names the accounts and writes
the files.

:data:`ACL_TEMPLATE` is the single source of that text: the test broker
(``tests/broker.py``) uses it too, so the tests exercise what production runs. That is
also why this module imports nothing of the server at load time (agent-only test
environments import it through ``tests/broker.py``).

Sites (:mod:`fleet_server.telemetry.bridge`): the central broker's setup names the sites
(``bridge_sites``) and each gets a bridge account allowed to speak only for the devices
labelled with its name (``site_label``, ``site=<name>`` by default); a site broker's setup
names the central broker (``bridge_to``): it then has accounts only for its own devices and
appends its bridge to ``mosquitto.conf`` (written 0600, as it holds the bridge's password).

This module does not start, stop or signal Mosquitto, make or check TLS certificates,
configure websockets or the dynamic-security plugin, and never logs a password.
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fleet_server.errors import BrokerStartError, InvalidRequestError, ReservedNameError
from fleet_server.registry.accounts import (
    bridge_account,
    check_service_name,
    ingest_account,
    is_service_name,
)
from fleet_server.telemetry.bridge import SiteBridge, bridge_acl, check_site, local_acl
from fleet_server.telemetry.mosquitto_conf import (
    ACL_NAME,
    CONF_NAME,
    MAX_PACKET_BYTES,
    PASSWD_NAME,
    PERSISTENCE_DIR,
    conf_text,
)

if TYPE_CHECKING:
    from fleet_server.store import Store

__all__ = [
    "ACL_NAME",
    "ACL_TEMPLATE",
    "CONF_NAME",
    "MAX_PACKET_BYTES",
    "PASSWD_NAME",
    "SERVER_PASSWORD_NAME",
    "BrokerSetup",
    "acl_text",
    "password_file_name",
    "render",
    "write_broker_config",
]

log = logging.getLogger(__name__)

SERVER_PASSWORD_NAME = "server-password"
DEFAULT_TLS_PORT = 8883
# the read rights of an ingest worker: the kinds the server ingests (fleet_server.telemetry.link)
_INGEST_KINDS = ("summary", "report", "heartbeat", "status", "receipt")

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
pattern write edgefleet/v1/%u/receipt
pattern read edgefleet/v1/%u/desired
pattern read edgefleet/v1/%u/ack
pattern read edgefleet/v1/%u/outcomes

# the fleet server's ingest account
user {server}
topic read edgefleet/v1/+/#
topic write edgefleet/v1/+/desired
topic write edgefleet/v1/+/ack
topic write edgefleet/v1/+/outcomes
"""

# a Mosquitto username that is also safe in a passwd line (no ':'), an ACL line (no
# space) and a topic level (no '/', '+', '#'): the device id rule, which the server
# account must follow too
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
_HASH_RE = re.compile(r"^\$7\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+\Z")
_BIND_RE = re.compile(r"^[A-Za-z0-9.:_-]{1,253}\Z")


def acl_text(server_user: str, ingest_users: Iterable[str] = (),
             bridges: Mapping[str, Iterable[str]] | None = None) -> str:
    """The fleet ACL with ``server_user`` as the server account, a read-only block for
    each ingest worker's account, and a block for each site bridge's account (``bridges``:
    account → the devices it speaks for).

    Raises:
        InvalidRequestError: ``server_user`` or an ingest account is not a valid
            account name.
    """
    _check_user(server_user, "server_user")
    text = ACL_TEMPLATE.format(server=server_user)
    for user in ingest_users:
        _check_user(user, "ingest user")
        text += (f"\n# an ingest worker (fleet ingest --broker-user {user}): reads what devices "
                 "send, writes only\n# the acknowledgement of what it stored (never desired "
                 f"state)\nuser {user}\n"
                 + "".join(f"topic read edgefleet/v1/+/{kind}\n" for kind in _INGEST_KINDS)
                 + "topic write edgefleet/v1/+/ack\n")
    for account, devices in (bridges or {}).items():
        _check_user(account, "bridge account")
        text += bridge_acl(account, devices)
    return text


def password_file_name(account: str, server_user: str) -> str:
    """The file a service account's made password is kept in: ``server-password`` for
    the server account (whatever its name), ``<account>-password`` for the others."""
    return SERVER_PASSWORD_NAME if account == server_user else f"{account}-password"


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
        ingest_workers: how many ``fleet ingest`` workers get an account of their own
            (``<server_user>-ingest-1`` ...); their passwords are made and kept beside the
            server's (``<account>-password``, 0600).
        run_as_root: whether the broker will be started as root (adds ``user root``);
            None: as this process runs.
        bridge_sites: (central broker) the sites whose brokers bridge to this one: each
            gets the account ``<server_user>-bridge-<site>`` (password made and kept like
            an ingest worker's), allowed only the topics of the devices whose
            ``site_label`` label is the site's name.
        bridge_to: (site broker) this broker bridges to the central one; it then has
            accounts only for the devices of ``bridge_to.site``, and no server account.
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
    ingest_workers: int = 0
    ingest_passwords: tuple[str, ...] = field(default=(), repr=False)
    bridge_sites: tuple[str, ...] = ()
    bridge_passwords: tuple[str, ...] = field(default=(), repr=False)
    site_label: str = "site"
    bridge_to: SiteBridge | None = None

    def __post_init__(self) -> None:
        for site in self.bridge_sites:
            check_site(site)
        if len(set(self.bridge_sites)) != len(self.bridge_sites):
            raise InvalidRequestError("a site is named twice", field="bridge_sites")
        if self.bridge_sites and self.bridge_to is not None:
            raise InvalidRequestError("a broker is the central one (bridge_sites) or a site's "
                                      "(bridge_to), not both", field="bridge_to")
        _check_port(self.port, "port")
        _check_user(self.server_user, "server_user")
        check_service_name(self.server_user)
        if not isinstance(self.ingest_workers, int) or not 0 <= self.ingest_workers <= 64:
            raise InvalidRequestError("ingest_workers must be 0..64", field="ingest_workers")
        if any(not p or any(c in p for c in "\r\n") for p in self.ingest_passwords):
            raise InvalidRequestError("ingest_passwords: empty, or a line break in one",
                                      field="ingest_passwords")
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
    def ingest_users(self) -> tuple[str, ...]:
        return tuple(ingest_account(self.server_user, n)
                     for n in range(1, self.ingest_workers + 1))

    @property
    def bridge_users(self) -> tuple[str, ...]:
        return tuple(bridge_account(self.server_user, s) for s in self.bridge_sites)

    @property
    def as_root(self) -> bool:
        if self.run_as_root is not None:
            return self.run_as_root
        return hasattr(os, "geteuid") and os.geteuid() == 0


def render(setup: BrokerSetup, users: Iterable[tuple[str, str]],
           site_devices: Mapping[str, Iterable[str]] | None = None) -> dict[str, str]:
    """The three files' texts: ``mosquitto.conf``, ``passwd``, ``acl``.

    Args:
        setup: the broker's shape; ``server_password`` must be set (unless it is a site
            broker, ``bridge_to``, which has no server account).
        users: ``(device id, $7$ hash)`` of every device account, as
            ``Store.mosquitto_users()`` returns them (a site broker's: its site's).
        site_devices: site → the ids of its devices, for each of ``setup.bridge_sites``.

    Raises:
        InvalidRequestError: no server password (or not one per ingest worker), a device
            id that is not a valid account name, a device listed twice, or a hash not in
            Mosquitto's ``$7$`` form.
        ReservedNameError: a device id in the service accounts' namespace (registered
            before the registry refused those): it would get service rights.
    """
    from fleet_server.registry.auth import mosquitto_hash  # lazily: see the module docstring

    if setup.server_password is None and setup.bridge_to is None:
        raise InvalidRequestError("the server account needs a password",
                                  field="server_password")
    if len(setup.bridge_passwords) != len(setup.bridge_sites):
        raise InvalidRequestError(f"{len(setup.bridge_sites)} site bridge account(s) need as "
                                  "many passwords", field="bridge_passwords")
    if len(setup.ingest_passwords) != setup.ingest_workers:
        raise InvalidRequestError(f"{setup.ingest_workers} ingest worker account(s) need as "
                                  "many passwords", field="ingest_passwords")
    seen: set[str] = set()
    lines = []
    for device, hashed in users:
        _check_user(device, "device id")
        if is_service_name(device):
            raise ReservedNameError(f"device {device!r} has a service account's name; it "
                                    f"would get service rights: `fleet device remove "
                                    f"{device}` and register it under another id",
                                    field="device")
        if device in seen:
            raise InvalidRequestError(f"device {device!r} listed twice", field="users")
        if not isinstance(hashed, str) or not _HASH_RE.match(hashed):
            raise InvalidRequestError(f"device {device!r}: not a Mosquitto $7$ hash",
                                      field="users")
        seen.add(device)
        lines.append(f"{device}:{hashed}\n")
    if setup.server_password is not None:
        lines.append(f"{setup.server_user}:{mosquitto_hash(setup.server_password)}\n")
    for user, password in zip(setup.ingest_users + setup.bridge_users,
                              setup.ingest_passwords + setup.bridge_passwords, strict=True):
        lines.append(f"{user}:{mosquitto_hash(password)}\n")
    bridges = {account: (site_devices or {}).get(site, ())
               for site, account in zip(setup.bridge_sites, setup.bridge_users, strict=True)}
    acl = acl_text(setup.server_user, setup.ingest_users, bridges)
    if setup.bridge_to is not None:
        acl += local_acl(bridge_account(setup.server_user, setup.bridge_to.site))
    return {CONF_NAME: conf_text(setup), PASSWD_NAME: "".join(lines), ACL_NAME: acl}


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


def _kept_password(setup: BrokerSetup, account: str, given: str | None
                   ) -> tuple[str, Path | None]:
    """``given``, or the password kept for ``account`` in ``out``, or a new one kept there."""
    if given is not None:
        return given, None
    path = setup.out / password_file_name(account, setup.server_user)
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
        file name → path written: ``mosquitto.conf``, ``passwd``, ``acl``,
        ``server-password`` when the password was made here (or reused from there), and
        ``<account>-password`` of each ingest worker.

    Raises:
        InvalidRequestError: as :func:`render`.
        OSError: ``out`` cannot be created or written.
    """
    setup.out.mkdir(parents=True, exist_ok=True)
    password, password_path = None, None
    if setup.bridge_to is None:
        password, password_path = _kept_password(setup, setup.server_user,
                                                 setup.server_password)
    ingest = [_kept_password(setup, user, None) for user in setup.ingest_users]
    bridge = [_kept_password(setup, user, None) for user in setup.bridge_users]
    users = store.mosquitto_users()
    if setup.bridge_to is not None:  # a site broker: its own devices only
        mine = set(store.device_ids({setup.site_label: setup.bridge_to.site}))
        users = [(device, hashed) for device, hashed in users if device in mine]
    site_devices = {site: store.device_ids({setup.site_label: site})
                    for site in setup.bridge_sites}
    texts = render(replace(setup, server_password=password,
                           ingest_passwords=tuple(p for p, _ in ingest),
                           bridge_passwords=tuple(p for p, _ in bridge)),
                   users, site_devices)
    # a site's mosquitto.conf holds its bridge's password
    modes = {PASSWD_NAME: 0o600, CONF_NAME: 0o600 if setup.bridge_to else 0o644}
    written: dict[str, Path] = {}
    if setup.persistence:
        (setup.out / PERSISTENCE_DIR).mkdir(mode=0o700, exist_ok=True)
    for name, text in texts.items():
        path = setup.out / name
        _write_atomic(path, text, modes.get(name, 0o644))
        written[name] = path
    if password_path is not None:
        written[SERVER_PASSWORD_NAME] = password_path
    for user, (_, path) in zip(setup.ingest_users + setup.bridge_users, ingest + bridge,
                               strict=True):
        assert path is not None
        written[password_file_name(user, setup.server_user)] = path
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
