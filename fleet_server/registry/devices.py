"""The device registry and groups: credentials, labels, named label selectors.

A device's labels come from two sides: those it reports in its status message, and those
an operator sets (``fleet device add --label``, ``PUT .../labels``); the operator's win
key by key. Groups are named selectors over the effective labels (every selector label
must match), evaluated when asked, so a relabelled device moves between groups at once.
Rollups are per device, so a group's drift report always follows current membership.

A device's credential (:meth:`Registry.add_device`) is one secret used twice: as its MQTT
password (the broker checks the stored ``$7$`` hash) and as its HTTP bearer token (the
server checks the stored sha256). Device ids in the service accounts' namespace
(``server``, ``server-…``; :mod:`fleet_server.registry.accounts`) are refused, so no device gets
the server's broker rights. :meth:`Registry.remove_device` decommissions a device: its
credential (HTTP at once, the broker's account when ``fleet broker-config`` is run again)
and its desired state go; its history stays.

This module does not talk to the broker; :meth:`Registry.mosquitto_password_file` renders
the lines a broker's ``password_file`` needs, for whoever installs it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from edgefleet.contract.messages import LABEL_RE, valid_device_id
from fleet_server.errors import InvalidRequestError, NotFoundError
from fleet_server.models import Device, Group, Issued
from fleet_server.registry.accounts import check_device_name
from fleet_server.registry.auth import DEVICE_PREFIX, mosquitto_hash, new_secret, secret_hash
from fleet_server.registry.governance import parse_requirements
from fleet_server.store import Store

__all__ = ["GROUP_RE", "Registry", "check_labels"]

GROUP_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}\Z")
MAX_LABELS = 32
MAX_IMPORTANT = 256


def check_labels(labels: Mapping[str, str], field: str = "labels") -> dict[str, str]:
    """Raises: InvalidRequestError: a bad key or value, or too many labels."""
    if len(labels) > MAX_LABELS:
        raise InvalidRequestError(f"{field}: at most {MAX_LABELS} labels", field=field)
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_RE.match(key):
            raise InvalidRequestError(f"{field}: key {key!r} must be lower-case letters, "
                                      "digits, '_', '.' or '-'", field=field)
        if not isinstance(value, str) or len(value) > 128:
            raise InvalidRequestError(f"{field}: value of {key!r} must be a string of at "
                                      "most 128 characters", field=field)
    return dict(labels)


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- devices -------------------------------------------------------------------------

    def add_device(self, device: str, labels: Mapping[str, str], actor: str, now: float,
                   *, rotate: bool = False) -> tuple[Device, Issued]:
        """Create a device's credential; the secret is in the result and nowhere else.

        Raises:
            InvalidRequestError: a bad device id or label.
            ReservedNameError: a device id in the service accounts' namespace.
            ConflictError: the device has a credential and ``rotate`` is false.
        """
        if not valid_device_id(device):
            raise InvalidRequestError(f"device id {device!r}: letters, digits, '.', '_', '-',"
                                      " at most 64, starting with a letter or digit",
                                      field="device")
        check_device_name(device)
        labels = check_labels(labels)
        secret = new_secret(DEVICE_PREFIX)
        with self.store.transaction():
            found = self.store.add_device(device, labels, secret_hash(secret),
                                          mosquitto_hash(secret), actor, now, rotate=rotate)
            self.store.audit(actor, "device.rotate" if rotate else "device.add",
                             f"device:{device}", {"labels": labels}, now)
        return found, Issued(device, secret, "device")

    def remove_device(self, device: str, actor: str, now: float) -> None:
        """Decommission ``device``: its credential, labels and desired state go at once
        (its secret downloads nothing more); the retained desired state on the broker is
        cleared by :meth:`fleet_server.registry.desired.DesiredStates.clear_removed`, and the broker
        account goes when ``fleet broker-config`` writes the password file again.

        Raises:
            NotFoundError: no such device.
        """
        with self.store.transaction():
            self.store.remove_device(device, actor, now)
            self.store.audit(actor, "device.remove", f"device:{device}", {}, now)

    def get(self, device: str) -> Device:
        """Raises: NotFoundError: no such device."""
        found = self.store.get_device(device)
        if found is None:
            raise NotFoundError("device", device)
        return found

    def list(self, selector: Mapping[str, str] | None = None, *, online: bool | None = None,
             limit: int = 1000, offset: int = 0) -> list[Device]:
        return self.store.list_devices(check_labels(selector or {}, "label"), online=online,
                                       limit=limit, offset=offset)

    def set_labels(self, device: str, labels: Mapping[str, str], actor: str, now: float
                   ) -> Device:
        """Replace the operator-set labels of a device.

        Raises:
            InvalidRequestError: a bad label. NotFoundError: no such device.
        """
        labels = check_labels(labels)
        with self.store.transaction():
            found = self.store.set_labels(device, labels)
            self.store.audit(actor, "device.labels", f"device:{device}", {"labels": labels},
                             now)
        return found

    def mosquitto_password_file(self) -> str:
        """``device:$7$…`` lines for every device with a credential (plus a newline)."""
        return "".join(f"{d}:{h}\n" for d, h in self.store.mosquitto_users())

    # -- groups --------------------------------------------------------------------------

    def create_group(self, name: str, selector: Mapping[str, str], actor: str, now: float, *,
                     requires_approval: bool = False,
                     important_features: Sequence[str] = (),
                     requires: Sequence[str] = ()) -> Group:
        """Raises: InvalidRequestError (bad name, selector, features), ConflictError,
        UnknownRequirementError (a requirement that is none of ``card``, ``approval``,
        ``fairness``, ``champion``; names it)."""
        if not GROUP_RE.match(name):
            raise InvalidRequestError(f"group name {name!r}: lower-case letters, digits, "
                                      "'_', '.', '-', at most 64", field="name")
        selector = check_labels(selector, "selector")
        features = tuple(dict.fromkeys(important_features))
        if len(features) > MAX_IMPORTANT or not all(
                isinstance(f, str) and 0 < len(f) <= 128 for f in features):
            raise InvalidRequestError(f"important_features: at most {MAX_IMPORTANT} names of "
                                      "1-128 characters", field="important_features")
        group = Group(name, selector, requires_approval, features, now, actor,
                      parse_requirements(requires))
        with self.store.transaction():
            self.store.add_group(group)
            self.store.audit(actor, "group.create", f"group:{name}", group.to_dict(), now)
        return group

    def group(self, name: str) -> Group:
        """Raises: NotFoundError: no such group."""
        found = self.store.get_group(name)
        if found is None:
            raise NotFoundError("group", name)
        return found

    def groups(self) -> list[Group]:
        return self.store.list_groups()

    def delete_group(self, name: str, actor: str, now: float) -> None:
        """Raises: NotFoundError: no such group."""
        with self.store.transaction():
            self.store.delete_group(name)
            self.store.audit(actor, "group.delete", f"group:{name}", {}, now)

    def members(self, group: Group) -> list[str]:
        return self.store.device_ids(group.selector)
