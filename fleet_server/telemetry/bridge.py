"""Mosquitto per site, bridged to a central one: the two halves of a bridge's configuration.

A fleet spread over sites (plants, stores, vehicles' depots) runs a Mosquitto at each site
for its devices and one central Mosquitto for the fleet server's ingest workers. Each site
broker opens one bridge connection to the central broker (:func:`bridge_lines`, appended to
the site's ``mosquitto.conf``); the central broker gives each site an account of its own,
``<server_user>-bridge-<site>`` (:func:`fleet_server.registry.accounts.bridge_account`),
whose ACL (:func:`bridge_acl`) lets it speak **only for the devices of its site**, named one
by one: a site broker that is taken over can forge nothing for another site's devices.

What crosses a bridge, and which way (the device's own topics, :mod:`edgefleet.contract.messages`):

- out, site → central: ``summary``, ``report``, ``status`` (QoS 1) and ``heartbeat`` (QoS 0);
- in, central → site: ``desired`` and ``ack`` (QoS 1).

No topic goes both ways, so no message loops. Retained messages keep their retain flag
across the bridge (``try_private``: Mosquitto tells its peer it is a bridge, and the peer
then forwards retained messages as retained): a device's retained desired state published
centrally is retained at its site too, and a device's last will ``offline`` reaches the
centre retained. The bridge's session is kept (``cleansession false``): while the link is
down the central broker queues the site's desired and ack messages and the site broker
queues what its devices send (``max_queued_messages 0``, as on every fleet broker); the
devices' durable outboxes keep every summary until the server's ``ack`` comes back through
the bridge, so a link down for hours loses nothing.

This module renders text only (no I/O); :mod:`fleet_server.telemetry.broker` writes it. It
does not configure MQTT 5 bridges (``try_private`` is the MQTT 3.1.1 mechanism Mosquitto
2.0 uses to keep retained flags), bridges to a non-Mosquitto broker, or bridges of bridges.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fleet_server.errors import InvalidRequestError
from fleet_server.registry.accounts import bridge_account

__all__ = ["IN_KINDS", "OUT_KINDS", "SITE_RE", "SiteBridge", "bridge_acl", "bridge_lines",
           "check_site", "local_acl"]

# (kind, QoS) of what a bridge carries each way
OUT_KINDS: tuple[tuple[str, int], ...] = (("summary", 1), ("report", 1), ("status", 1),
                                          ("heartbeat", 0))
IN_KINDS: tuple[tuple[str, int], ...] = (("desired", 1), ("ack", 1))
SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_HOST_RE = re.compile(r"^[A-Za-z0-9.:_-]{1,253}\Z")


def check_site(site: str) -> None:
    """Raises: InvalidRequestError: ``site`` is not a site name (letters, digits, ``_``,
    ``.``, ``-``; at most 32)."""
    if not isinstance(site, str) or not SITE_RE.match(site):
        raise InvalidRequestError(f"site {site!r}: letters, digits, '_', '.' or '-', at most "
                                  "32, starting with a letter or digit", field="site")


@dataclass(frozen=True)
class SiteBridge:
    """This (site) broker's bridge to the central broker.

    Args:
        site: the site's name; its account on the central broker is
            ``<server_user>-bridge-<site>``.
        host, port: the central broker's MQTT listener.
        password: that account's password (``fleet broker-config --bridge-site`` on the
            central side made it and kept it in ``<account>-password``).
        cafile: the CA that signed the central broker's certificate: the bridge then
            speaks TLS (verifying the central broker's host name).
    """

    site: str
    host: str
    port: int = 1883
    password: str = field(default="", repr=False)
    cafile: Path | None = None

    def __post_init__(self) -> None:
        check_site(self.site)
        if not _HOST_RE.match(self.host):
            raise InvalidRequestError(f"bridge host {self.host!r}: an address or host name",
                                      field="host")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or \
                not 1 <= self.port <= 65535:
            raise InvalidRequestError(f"bridge port must be 1..65535, got {self.port!r}",
                                      field="port")
        if not self.password or any(c in self.password for c in "\r\n \t"):
            raise InvalidRequestError("the bridge account needs a password (no spaces or "
                                      "line breaks)", field="password")
        if self.cafile is not None and any(c in str(self.cafile) for c in "\r\n"):
            raise InvalidRequestError("cafile: a line break in the path", field="cafile")


def bridge_lines(bridge: SiteBridge, server_user: str) -> list[str]:
    """The site broker's ``mosquitto.conf`` lines of its bridge (they hold its password:
    the file is written 0600)."""
    account = bridge_account(server_user, bridge.site)
    lines = [
        "",
        f"# the bridge of site {bridge.site!r} to the central broker: what this site's devices",
        "# send goes up, their desired state and the server's acknowledgements come down",
        "# (fleet_server/telemetry/bridge.py). The central broker binds the client id to",
        "# the account, so the account is the connection's name too.",
        f"connection {account}",
        f"address {bridge.host}:{bridge.port}",
        f"remote_username {account}",
        f"remote_password {bridge.password}",
        f"remote_clientid {account}",
        f"local_clientid {account}.local",
        "# the bridge's side of this broker is that account too (no password here, so no",
        "# client can log in as it): its ACL block (local_acl) lets it write what comes",
        "# down, and check_retain_source then keeps delivering the retained desired states",
        "# it wrote; without a username the broker would not",
        f"local_username {account}",
        "# kept sessions both ends: while the link is down each side queues for the other",
        "cleansession false",
        "# tell the central broker this is a bridge: retained flags cross it as they were",
        "try_private true",
        "bridge_protocol_version mqttv311",
        "# the central ACL gives this account no $SYS topics: no notifications there",
        "notifications false",
        "keepalive_interval 30",
        "# reconnect after 1 s, backing off to 30 s while the centre is unreachable",
        "restart_timeout 1 30",
        "start_type automatic",
    ]
    lines += [f"topic edgefleet/v1/+/{kind} out {qos}" for kind, qos in OUT_KINDS]
    lines += [f"topic edgefleet/v1/+/{kind} in {qos}" for kind, qos in IN_KINDS]
    if bridge.cafile is not None:
        lines += [f"bridge_cafile {Path(bridge.cafile).resolve()}",
                  "bridge_insecure false"]
    return lines


def local_acl(account: str) -> str:
    """The site ACL block of the bridge's local side: it reads what the site's devices send
    and writes what comes down for them (the broker's own devices' rights still bound
    what each device reads)."""
    return (f"\n# this site's bridge to the central broker (local side; not a login)\n"
            f"user {account}\n"
            + "".join(f"topic read edgefleet/v1/+/{kind}\n" for kind, _ in OUT_KINDS)
            + "".join(f"topic write edgefleet/v1/+/{kind}\n" for kind, _ in IN_KINDS))


def bridge_acl(account: str, devices: Iterable[str]) -> str:
    """The central ACL block of a site's bridge account: it may write what ``devices`` send
    and read what is sent to them, each device by name, nothing else."""
    names = sorted(set(devices))
    text = (f"\n# the bridge of a site (its broker's account): speaks for its own {len(names)} "
            f"device(s) only\nuser {account}\n")
    for device in names:
        text += "".join(f"topic write edgefleet/v1/{device}/{kind}\n" for kind, _ in OUT_KINDS)
        text += "".join(f"topic read edgefleet/v1/{device}/{kind}\n" for kind, _ in IN_KINDS)
    return text
