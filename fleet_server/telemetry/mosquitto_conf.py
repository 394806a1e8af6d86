"""The text of the fleet broker's ``mosquitto.conf``, one named section at a time.

:func:`conf_text` is pure: a :class:`~fleet_server.telemetry.broker.BrokerSetup` in, the
file's text out, every setting with the reason for it, the sections composed in the order
the file reads (header and authentication, limits, retained messages and sessions, logging,
persistence, the listeners, a site's bridge). :mod:`fleet_server.telemetry.broker` writes it
beside ``passwd`` and ``acl``, whose file names are defined here because this text names
them.

This module does not check the setup (``BrokerSetup`` does, when it is built), write files,
or know any account but the one a site's bridge logs in with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.contract.messages import MAX_PAYLOAD
from fleet_server.telemetry.bridge import bridge_lines

if TYPE_CHECKING:
    from fleet_server.telemetry.broker import BrokerSetup

__all__ = [
    "ACL_NAME",
    "CONF_NAME",
    "MAX_PACKET_BYTES",
    "PASSWD_NAME",
    "PERSISTENCE_DIR",
    "conf_text",
]

CONF_NAME = "mosquitto.conf"
PASSWD_NAME = "passwd"
ACL_NAME = "acl"
PERSISTENCE_DIR = "data"
# a whole MQTT packet: the largest payload plus the longest topic MQTT allows (65535
# bytes) and room for the fixed header, packet id and properties
MAX_PACKET_BYTES = MAX_PAYLOAD + 64 * 1024 + 4096


def conf_text(setup: BrokerSetup) -> str:
    """``mosquitto.conf`` for ``setup``, read top to bottom as the broker reads it."""
    out = setup.out.resolve()
    lines = [*_header(out), "", *_limits(setup.max_inflight_messages), "", *_RETENTION, "",
             *_LOGGING, "", *_persistence(setup.persistence, out)]
    if setup.as_root:
        lines += ["", *_AS_ROOT]
    lines += _listeners(setup)
    if setup.bridge_to is not None:
        lines += bridge_lines(setup.bridge_to, setup.server_user)
    return "\n".join(lines) + "\n"


def _header(out: Path) -> list[str]:
    return [
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
    ]


def _limits(max_inflight_messages: int) -> list[str]:
    return [
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
        f"max_inflight_messages {max_inflight_messages}",
    ]


_RETENTION = (
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
)

_LOGGING = (
    "# connections, refusals and disconnections in the log, with times; no debug",
    "# (it would log every publish)",
    "log_dest stderr",
    "log_type error",
    "log_type warning",
    "log_type notice",
    "log_type information",
    "connection_messages true",
    "log_timestamp true",
)


def _persistence(enabled: bool, out: Path) -> list[str]:
    if not enabled:
        return ["persistence false"]
    return [
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


_AS_ROOT = (
    "# Started as root, Mosquitto switches to the user `mosquitto` *before* reading",
    "# password_file, and the 0600 root-owned passwd file written here is then",
    "# unreadable: it exits with status 13. So it keeps running as root. Better in",
    "# production: chown these files to `mosquitto` and drop this line.",
    "user root",
)

# a listener option, so it follows each listener line (before the first one it would open a
# default listener on 1883)
_BIND_IDENTITY = (
    "# the client id a client sends is replaced by its username: identity is the",
    "# account, so no device can take over (kick off, or drain the kept session of)",
    "# another device's or the server's connection by sending its client id. One",
    "# connection per account: each server process has an account of its own.",
    "# (Not reloaded on SIGHUP: restart the broker after changing it.)",
    "use_username_as_clientid true",
)


def _listeners(setup: BrokerSetup) -> list[str]:
    lines = ["", f"listener {setup.port} {setup.bind}", *_BIND_IDENTITY]
    if setup.tls:
        lines += ["", f"listener {setup.listener_tls_port} {setup.bind}", *_BIND_IDENTITY]
        if setup.cafile is not None:
            lines.append(f"cafile {Path(setup.cafile).resolve()}")
        lines += [f"certfile {Path(setup.certfile).resolve()}",  # type: ignore[arg-type]
                  f"keyfile {Path(setup.keyfile).resolve()}",  # type: ignore[arg-type]
                  f"require_certificate {'true' if setup.require_certificate else 'false'}"]
    return lines
