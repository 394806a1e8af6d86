"""The broker accounts' namespace: which names belong to the fleet's own services.

One broker, one password file, one ACL: devices and the fleet's services (the server,
each ingest worker) are accounts side by side, told apart only by their names. So the
names are split once, here: ``server`` and every name starting with ``server-`` (any
case) belong to services; every other valid id may be a device. The registry refuses a
device id in the service namespace, and ``fleet broker-config`` refuses a service
account outside it, so no device can ever be registered under a name the broker gives
server rights to, and no later service account can collide with a device.

With ``use_username_as_clientid`` (see :mod:`fleet_server.telemetry.broker`) the account name
is also the MQTT client id, so each process that connects needs an account of its own:
``server`` for ``fleet serve``, ``server-ingest-1``, ``server-ingest-2``, ... for
``fleet ingest`` workers (:func:`ingest_account`), ``server-bridge-<site>`` for a site
broker's bridge to the central one (:func:`bridge_account`).

This module holds names only: no passwords, no I/O.
"""

from __future__ import annotations

from fleet_server.errors import ReservedNameError

__all__ = [
    "SERVER_ACCOUNT",
    "SERVICE_PREFIX",
    "bridge_account",
    "check_device_name",
    "check_service_name",
    "ingest_account",
    "is_service_name",
]

SERVER_ACCOUNT = "server"
SERVICE_PREFIX = "server-"


def is_service_name(name: str) -> bool:
    """True for ``server`` and ``server-…`` in any case (``Server`` would confuse people
    reading logs and ACLs as much as ``server`` itself)."""
    low = name.lower()
    return low == SERVER_ACCOUNT or low.startswith(SERVICE_PREFIX)


def check_device_name(device: str) -> None:
    """Raises: ReservedNameError: ``device`` is in the service accounts' namespace."""
    if is_service_name(device):
        raise ReservedNameError(
            f"device id {device!r} is reserved: {SERVER_ACCOUNT!r} and names starting with "
            f"{SERVICE_PREFIX!r} are the fleet's own broker accounts", field="device")


def check_service_name(name: str, field: str = "server_user") -> None:
    """Raises: ReservedNameError: ``name`` is outside the service namespace (a device
    could be registered under it)."""
    if not is_service_name(name):
        raise ReservedNameError(
            f"{field} {name!r}: a service account must be {SERVER_ACCOUNT!r} or start with "
            f"{SERVICE_PREFIX!r}, names no device can be registered under", field=field)


def ingest_account(server_user: str, n: int) -> str:
    """The broker account of ingest worker ``n`` (1-based): ``<server_user>-ingest-<n>``."""
    return f"{server_user}-ingest-{n}"


def bridge_account(server_user: str, site: str) -> str:
    """The central broker's account of site ``site``'s bridge: ``<server_user>-bridge-<site>``."""
    return f"{server_user}-bridge-{site}"
