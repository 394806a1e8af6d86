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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from edgefleet.contract.messages import LABEL_RE, valid_device_id
from fleet_server.config import (
    DEFAULT_DRIFT,
    DRIFT_KEYS,
    PERFORMANCE_KEYS,
    drift_overrides,
    performance_overrides,
)
from fleet_server.errors import ConfigError, InvalidRequestError, NotFoundError
from fleet_server.models import Device, Group, Issued
from fleet_server.registry.accounts import check_device_name
from fleet_server.registry.auth import DEVICE_PREFIX, mosquitto_hash, new_secret, secret_hash
from fleet_server.registry.capture_policy import CaptureChange, apply_change, check_features
from fleet_server.registry.governance import parse_requirements
from fleet_server.store import Store

__all__ = ["GROUP_RE", "Registry", "check_drift", "check_labels", "check_performance"]

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


def check_drift(drift: Mapping[str, Any], field: str = "drift") -> dict[str, float | int]:
    """A group's drift settings, checked against the defaults (known keys, each value in
    its range, consistent with the rest: a ``psi_warn`` above the default ``psi_drift``
    must come with a ``psi_drift`` too).

    Raises:
        InvalidRequestError: an unknown setting or a bad value, named.
    """
    try:
        checked = drift_overrides(drift, field)
        DEFAULT_DRIFT.with_overrides(checked, field)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc), field=field) from exc
    return checked


def check_performance(performance: Mapping[str, Any], field: str = "performance",
                      ) -> dict[str, float | int]:
    """A group's performance tolerances (known keys, each value in its range).

    Raises:
        InvalidRequestError: an unknown setting or a bad value, named.
    """
    try:
        return performance_overrides(performance, field)
    except ConfigError as exc:
        raise InvalidRequestError(str(exc), field=field) from exc


def _reset(settings: dict[str, Any], keys: Sequence[str], known: Sequence[str],
           field: str) -> None:
    for key in keys:
        if key == "all":
            settings.clear()
        elif key in settings or key in known:
            settings.pop(key, None)
        else:
            raise InvalidRequestError(f"{field}: unknown setting {key!r}", field=field)


def _important(features: Sequence[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(features))
    if len(out) > MAX_IMPORTANT or not all(isinstance(f, str) and 0 < len(f) <= 128
                                           for f in out):
        raise InvalidRequestError(f"important_features: at most {MAX_IMPORTANT} names of "
                                  "1-128 characters", field="important_features")
    return out


class Registry:
    """Devices and groups.

    ``on_membership`` (set by :func:`fleet_server.services.build_services` to
    :meth:`fleet_server.registry.desired.DesiredStates.sync_capture`) is called inside the
    transaction of every change that can change what a device's groups say about data
    capture: a group created, updated or deleted, a device added or relabelled.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.on_membership: Callable[..., object] | None = None

    def _membership_changed(self, actor: str, now: float, device: str | None = None) -> None:
        """``device``: only its groups changed (added, relabelled); else any device's."""
        if self.on_membership is not None:
            self.on_membership(actor, now, None if device is None else [device])

    def _bundle_inputs(self, selector: Mapping[str, str]) -> dict[str, list[str]]:
        """The input names of the bundles the devices matching ``selector`` are assigned
        (desired and shadow), by bundle label."""
        out: dict[str, list[str]] = {}
        for record in self.store.list_desired(self.store.device_ids(selector)):
            for ref in (record.bundle, record.shadow):
                if ref is None or ref.label in out:
                    continue
                bundle = self.store.get_bundle(ref.name, ref.version)
                if bundle is not None:
                    out[ref.label] = [str(i.get("name")) for i in
                                      bundle.manifest.get("inputs", [])]
        return out

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
            self._membership_changed(actor, now, device)
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
            self._membership_changed(actor, now, device)
        return found

    def mosquitto_password_file(self) -> str:
        """``device:$7$…`` lines for every device with a credential (plus a newline)."""
        return "".join(f"{d}:{h}\n" for d, h in self.store.mosquitto_users())

    # -- groups --------------------------------------------------------------------------

    def create_group(self, name: str, selector: Mapping[str, str], actor: str, now: float, *,
                     requires_approval: bool = False,
                     important_features: Sequence[str] = (),
                     requires: Sequence[str] = (),
                     drift: Mapping[str, Any] | None = None,
                     performance: Mapping[str, Any] | None = None,
                     capture: CaptureChange | None = None) -> Group:
        """Raises: InvalidRequestError (bad name, selector, features, drift settings or
        performance tolerances),
        ConflictError, UnknownRequirementError (a requirement that is none of ``card``,
        ``approval``, ``fairness``, ``champion``; names it), CapturePolicyError (a bad
        capture setting, named), UnknownCaptureFeatureError (a capture feature that is no
        input of the bundles the group's devices are assigned)."""
        if not GROUP_RE.match(name):
            raise InvalidRequestError(f"group name {name!r}: lower-case letters, digits, "
                                      "'_', '.', '-', at most 64", field="name")
        selector = check_labels(selector, "selector")
        features = _important(important_features)
        policy = None if capture is None or capture.empty else apply_change(None, capture)
        group = Group(name, selector, requires_approval, features, now, actor,
                      requires=parse_requirements(requires), drift=check_drift(drift or {}),
                      performance=check_performance(performance or {}),
                      capture=policy)
        with self.store.transaction():
            check_features(policy, self._bundle_inputs(selector))
            self.store.add_group(group)
            self.store.audit(actor, "group.create", f"group:{name}", group.to_dict(), now)
            if policy is not None:
                self._membership_changed(actor, now)
        return group

    def update_group(self, name: str, actor: str, now: float, *,
                     important_features: Sequence[str] | None = None,
                     drift: Mapping[str, Any] | None = None,
                     reset_drift: Sequence[str] = (),
                     performance: Mapping[str, Any] | None = None,
                     reset_performance: Sequence[str] = (),
                     capture: CaptureChange | None = None) -> Group:
        """Change a group's important features (replaced when given), drift settings
        (``drift`` set key by key, ``reset_drift`` keys back to the server's; ``"all"``
        resets every one), performance tolerances (``performance``,
        ``reset_performance``, the same way) and data capture (``capture``: values over the
        current policy, off, or reset; its devices' desired states follow in the same
        transaction).

        Raises:
            InvalidRequestError: a bad feature name or drift setting, or resetting an
                unknown setting. CapturePolicyError, UnknownCaptureFeatureError: a bad
                capture setting (see :meth:`create_group`). NotFoundError: no such group.
        """
        group = self.group(name)
        settings = dict(group.drift)
        _reset(settings, reset_drift, DRIFT_KEYS, "reset_drift")
        settings.update(drift or {})
        tolerances = dict(group.performance)
        _reset(tolerances, reset_performance, PERFORMANCE_KEYS, "reset_performance")
        tolerances.update(performance or {})
        policy = group.capture if capture is None or capture.empty else \
            apply_change(group.capture, capture)
        updated = replace(
            group, drift=check_drift(settings), performance=check_performance(tolerances),
            important_features=group.important_features if important_features is None
            else _important(important_features), capture=policy)
        with self.store.transaction():
            if policy != group.capture:
                check_features(policy, self._bundle_inputs(group.selector))
            self.store.update_group(updated)
            self.store.audit(actor, "group.update", f"group:{name}",
                             {"important_features": list(updated.important_features),
                              "drift": dict(updated.drift),
                              "performance": dict(updated.performance),
                              "capture": None if policy is None else policy.to_dict()}, now)
            if policy != group.capture:
                self._membership_changed(actor, now)
        return updated

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
            self._membership_changed(actor, now)

    def members(self, group: Group) -> list[str]:
        return self.store.device_ids(group.selector)
