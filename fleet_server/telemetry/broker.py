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
be refused by ingest anyway, so the broker never holds, queues or forwards it.

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

from edgefleet.contract.messages import MAX_PAYLOAD
from fleet_server.errors import BrokerStartError, InvalidRequestError, ReservedNameError
from fleet_server.registry.accounts import (
    bridge_account,
    check_service_name,
    ingest_account,
    is_service_name,
)
from fleet_server.telemetry.bridge import (
    SiteBridge,
    bridge_acl,
    bridge_lines,
    check_site,
    local_acl,
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

CONF_NAME = "mosquitto.conf"
PASSWD_NAME = "passwd"
ACL_NAME = "acl"
SERVER_PASSWORD_NAME = "server-password"
PERSISTENCE_DIR = "data"
DEFAULT_TLS_PORT = 8883
# a whole MQTT packet: the largest payload plus the longest topic MQTT allows (65535
# bytes) and room for the fixed header, packet id and properties
MAX_PACKET_BYTES = MAX_PAYLOAD + 64 * 1024 + 4096
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


# One function on purpose: it is the mosquitto.conf text, each line with its reason, read
# top to bottom as the file will be; split, the order of the lines would hide.
def _conf(setup: BrokerSetup) -> str:
    out = setup.out.resolve()
    lines = [
        "# Written by `fleet broker-config`; regenerate it rather than editing it.",
        "# Start: mosquitto -c " + str(out / CONF_NAME),
        "# Every setting is checked against Mosquitto 2.0.11 (mosquitto.conf(5)).",
        "",
        "# authentication and ACL are broker-wide, the same on every listener (the TLS one",
        "# too): a listener without them would be a way around them",
        "per_listener_settings false",
        "# every client logs in with its own account: a device with its secret, the",
        "# server and each ingest worker with theirs",
        "allow_anonymous false",
        f"password_file {out / PASSWD_NAME}",
        f"acl_file {out / ACL_NAME}",
        "# (use_username_as_clientid is a listener option: it follows each listener",
        "# line below; before the first one it would open a default listener on 1883)",
        "",
        "# the largest publish payload accepted: the server's own limit",
        "# (edgefleet.contract.messages.MAX_PAYLOAD). A larger one is refused (PUBACK with an",
        "# error reason for MQTT 5 QoS 1), never stored, queued or forwarded. (2.0 logs",
        "# a note recommending max_packet_size instead; that one disconnects, this one",
        "# refuses a single message, so both are set.)",
        f"message_size_limit {MAX_PAYLOAD}",
        "# and a whole packet past that payload plus the longest topic: the client is",
        "# disconnected before the broker buffers it (MQTT 5 clients are told the limit",
        "# in CONNACK), so nobody can make the broker hold megabytes to refuse them",
        f"max_packet_size {MAX_PACKET_BYTES}",
        "",
        "# Ingest must never lose a message: the server's kept session (MQTT 5 session",
        "# expiry) is queued for while the server restarts or falls behind, and Mosquitto",
        "# drops a client's messages past max_queued_messages (1000 by default). 0 is no",
        "# limit (mosquitto.conf(5) of 2.0: \"Set to 0 for no maximum\"). Mosquitto has no",
        "# per-account form of this option, so it holds for every client; devices use",
        "# clean sessions and read only their retained desired state, so nothing queues",
        "# for them. Memory is bounded by the server's Receive Maximum in flight, by",
        "# message_size_limit and by the devices' own bounded outboxes. Checked on",
        "# Mosquitto 2.0.11; 2.0.21 is reported to mishandle 0 (clients disconnected with",
        "# \"Quota exceeded\": eclipse-mosquitto/mosquitto#3244).",
        "max_queued_messages 0",
        "# heartbeats (QoS 0) are not queued for an absent server: they are a live view",
        "queue_qos0_messages false",
        "# QoS 1 messages in flight per client: for MQTT 5 clients the Receive Maximum",
        "# Mosquitto announces (how many unacknowledged publishes a device may send); what",
        "# it sends to an MQTT 5 client is bounded by that client's own Receive Maximum",
        "# (the fleet server asks for 2000). Mosquitto's default, written out.",
        f"max_inflight_messages {setup.max_inflight_messages}",
        "",
        "# desired state is a retained message per device (a device offline for a week",
        "# gets it on connect): retained messages must stay on",
        "retain_available true",
        "# a retained message is delivered only while its publisher still has the right",
        "# to publish it: a decommissioned device's retained status goes with its account",
        "check_retain_source true",
        "# MQTT 5 clients asking for a longer (or no) keepalive are told 120 s, so a dead",
        "# connection is noticed (and a device's last will `offline` published) in minutes",
        "max_keepalive 120",
        "# sessions that ask never to expire (MQTT 3.1.1 clean session false) are dropped",
        "# after two weeks away; the server's own session expiry (a day) is shorter",
        "persistent_client_expiration 14d",
        "",
        "# connections, refusals and disconnections in the log, with times; no debug",
        "# (it would log every publish)",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
        "",
    ]
    if setup.persistence:
        lines += [
            "# sessions, subscriptions, retained and queued messages survive a broker",
            "# restart; saved every minute (default 30) and on a clean exit. A PUBACK still",
            "# means \"in memory\": what arrived since the last save is lost if the broker",
            "# is killed, so delivery is confirmed end to end, not by the broker's PUBACK.",
            "persistence true",
            f"persistence_location {out / PERSISTENCE_DIR}/",
            "autosave_interval 60",
            "# every autosave_interval seconds, not after that many changes",
            "autosave_on_changes false",
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
    bind_identity = [
        "# the client id a client sends is replaced by its username: identity is the",
        "# account, so no device can take over (kick off, or drain the kept session of)",
        "# another device's or the server's connection by sending its client id. One",
        "# connection per account: each server process has an account of its own.",
        "# (Not reloaded on SIGHUP: restart the broker after changing it.)",
        "use_username_as_clientid true",
    ]
    lines += ["", f"listener {setup.port} {setup.bind}", *bind_identity]
    if setup.tls:
        lines += ["", f"listener {setup.listener_tls_port} {setup.bind}", *bind_identity]
        if setup.cafile is not None:
            lines.append(f"cafile {Path(setup.cafile).resolve()}")
        lines += [f"certfile {Path(setup.certfile).resolve()}",  # type: ignore[arg-type]
                  f"keyfile {Path(setup.keyfile).resolve()}",  # type: ignore[arg-type]
                  f"require_certificate {'true' if setup.require_certificate else 'false'}"]
    if setup.bridge_to is not None:
        lines += bridge_lines(setup.bridge_to, setup.server_user)
    return "\n".join(lines) + "\n"


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
    return {CONF_NAME: _conf(setup), PASSWD_NAME: "".join(lines), ACL_NAME: acl}


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
