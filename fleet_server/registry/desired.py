"""Desired state: what each device should run, kept in the store and retained on the broker.

The server never commands a device; it keeps per device a :class:`DesiredState` (bundle,
optional shadow, ``allow_downgrade``, a ``revision`` that increases with every change)
and publishes it *retained* (QoS 1) on ``edgefleet/v1/<device>/desired``, which only that
device may read. A device that was offline for a week gets it on connect from the broker;
and when the server's own connection (re)connects it republishes every device's state
(:meth:`DesiredStates.republish_all`), so a broker that lost its retained store (a restart
without persistence) is repaired. The agent reconciles toward it and answers with
:class:`~edgefleet.contract.messages.Report` messages carrying the revision (stored by ingest).

:meth:`DesiredStates.assign` is the one way to change the bundles: the API's ``PUT
/api/v1/devices/{device}/desired`` and the rollout engine call it; :meth:`assign_many`
changes many devices in one transaction (a rollout stage). The data capture a state
carries (issue 15) is its device's groups' (:func:`~fleet_server.registry.capture_policy.combine`),
kept so by :meth:`DesiredStates.sync_capture` whenever groups or memberships change. Bundle
references are completed from the stored bundle (sha256, size, download URL), so a
device can only be pointed at a bundle the server has verified.

Publishing reads the state back from the store under a lock, so with two assignments
racing the broker ends with the newer revision. This module does not know rollouts or
talk HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from edgefleet.contract.messages import BundleRef, CapturePolicy, DesiredState, encode, topic
from fleet_server.errors import NotFoundError
from fleet_server.models import DesiredRecord
from fleet_server.registry.bundles import Bundles, parse_label
from fleet_server.registry.capture_policy import combine
from fleet_server.store import Store

__all__ = ["Assignment", "DesiredStates", "Publisher"]

log = logging.getLogger(__name__)
BundleSpec = BundleRef | str | None  # a ref (name and version count) or "name@version"


class Publisher(Protocol):
    def publish_retained(self, topic: str, payload: bytes, qos: int = 1) -> bool: ...


@dataclass(frozen=True)
class Assignment:
    device: str
    bundle: BundleSpec
    shadow: BundleSpec = None
    allow_downgrade: bool = False


def message(record: DesiredRecord) -> DesiredState:
    return DesiredState(record.device, record.revision, record.bundle, record.shadow,
                        record.allow_downgrade, record.updated, record.capture)


class DesiredStates:
    """The desired-state service.

    Args:
        store: the database.
        bundles: resolves bundle references to stored, verified bundles.
        publisher: the MQTT link (None: store only; republished when one connects).
        clock: the time source for ``updated``.
    """

    def __init__(self, store: Store, bundles: Bundles, publisher: Publisher | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.bundles = bundles
        self.publisher = publisher
        self.clock = clock
        self._lock = threading.Lock()

    def _resolve(self, spec: BundleSpec, field: str) -> BundleRef | None:
        if spec is None:
            return None
        name, version = parse_label(spec, field) if isinstance(spec, str) else \
            (spec.name, spec.version)
        return self.bundles.get(name, version).ref

    def assign(self, device: str, bundle: BundleSpec, shadow: BundleSpec = None,
               allow_downgrade: bool = False, *, actor: str, now: float | None = None
               ) -> DesiredState:
        """Set what ``device`` should run; a no-op (same revision) if nothing changes.

        Raises:
            NotFoundError: no such device, or a bundle that is not uploaded.
            InvalidRequestError: a bundle label that is not ``name@version``.
        """
        return self.assign_many([Assignment(device, bundle, shadow, allow_downgrade)],
                                actor=actor, now=now)[0]

    def assign_many(self, assignments: Sequence[Assignment], *, actor: str,
                    now: float | None = None) -> list[DesiredState]:
        """Set several devices' desired states in one transaction, then publish them.

        Raises:
            NotFoundError, InvalidRequestError: as :meth:`assign`; nothing is changed.
        """
        now = self.clock() if now is None else now
        resolved = [(a.device, self._resolve(a.bundle, "bundle"),
                     self._resolve(a.shadow, "shadow"), a.allow_downgrade) for a in assignments]
        out: list[DesiredRecord] = []
        with self.store.transaction():
            current = {r.device: r for r in self.store.list_desired([d for d, *_ in resolved])}
            changed: list[DesiredRecord] = []
            for device, bundle, shadow, downgrade in resolved:
                if self.store.get_device(device) is None:
                    raise NotFoundError("device", device)
                old = current.get(device)
                if old is not None and (old.bundle, old.shadow, old.allow_downgrade) == \
                        (bundle, shadow, downgrade):
                    out.append(old)
                    continue
                record = DesiredRecord(device, (old.revision if old else 0) + 1, bundle, shadow,
                                       downgrade, now, actor, old.capture if old else None)
                current[device] = record
                changed.append(record)
                out.append(record)
            self.store.put_desired(changed)
            for r in changed:
                self.store.audit(actor, "desired.set", f"device:{r.device}",
                                 {"revision": r.revision,
                                  "bundle": r.bundle.label if r.bundle else None,
                                  "shadow": r.shadow.label if r.shadow else None,
                                  "allow_downgrade": r.allow_downgrade}, now)
            # published once committed, also when the caller's transaction encloses this
            # one (a rollout's tick): a device downloads at once what it is sent, and the
            # download is authorised by the stored desired state
            devices = [r.device for r in out]
            self.store.after_commit(lambda: self.publish(devices))
        return [message(r) for r in out]

    def sync_capture(self, actor: str, now: float | None = None,
                     devices: Sequence[str] | None = None) -> list[str]:
        """Give every device (or only ``devices``: one added or relabelled) the data capture
        of its groups now (the stricter of their policies; none when no group of it sets
        one): a device whose policy changes gets a new revision, audited
        (``desired.capture``) and published once committed. A device with no desired state
        yet gets one without a bundle. Returns the devices changed.
        """
        now = self.clock() if now is None else now
        with self.store.transaction():
            groups = [(g, g.capture) for g in self.store.list_groups() if g.capture is not None]
            want: dict[str, list[CapturePolicy]] = {}
            if devices is None:
                for group, policy in groups:
                    for device in self.store.device_ids(group.selector):
                        want.setdefault(device, []).append(policy)
                current = {r.device: r for r in self.store.list_desired()}
            else:  # a device's own change: its groups only, no scan of the fleet
                for device in devices:
                    found = self.store.get_device(device)
                    for group, policy in groups if found is not None else ():
                        if group.matches(found.labels):
                            want.setdefault(device, []).append(policy)
                current = {r.device: r for r in self.store.list_desired(list(devices))}
            devices = sorted(set(want) | {d for d, r in current.items() if r.capture is not None})
            changed: list[DesiredRecord] = []
            for device in devices:
                policy, old = combine(want.get(device, ())), current.get(device)
                if (None if old is None else old.capture) == policy:
                    continue
                changed.append(DesiredRecord(
                    device, (old.revision if old else 0) + 1, old.bundle if old else None,
                    old.shadow if old else None, old.allow_downgrade if old else False, now,
                    actor, policy))
            if not changed:
                return []
            self.store.put_desired(changed)
            for r in changed:
                self.store.audit(actor, "desired.capture", f"device:{r.device}",
                                 {"revision": r.revision, "capture": None if r.capture is None
                                  else r.capture.to_dict()}, now)
            names = [r.device for r in changed]
            self.store.after_commit(lambda: self.publish(names))
        return names

    def may_download(self, device: str, name: str, version: str) -> bool:
        """Whether ``device`` is assigned bundle ``name@version``: its desired bundle, its
        shadow, or its rollback slot (the desired bundle before the current one, which
        a rollback returns it to). What a device *reports* running does not count: a
        device could claim anything."""
        return (name, version) in self.store.assigned_bundles(device)

    def get(self, device: str) -> DesiredState | None:
        record = self.store.get_desired(device)
        return None if record is None else message(record)

    def record(self, device: str) -> DesiredRecord | None:
        return self.store.get_desired(device)

    def publish(self, devices: Sequence[str]) -> int:
        """Publish the stored state of ``devices`` (retained); returns how many went out."""
        if self.publisher is None:
            return 0
        sent = 0
        with self._lock:
            for record in self.store.list_desired(devices):
                payload = encode(message(record))
                if self.publisher.publish_retained(topic(record.device, "desired"), payload):
                    sent += 1
        return sent

    def clear_removed(self) -> int:
        """Clear the retained desired state of removed devices (an empty retained message
        deletes it on the broker), so a device registered later under the same id is not
        handed the old one; each is marked done once the MQTT link took it. Returns how many
        were cleared now; the rest are tried again on the next (re)connect.
        """
        if self.publisher is None:
            return 0
        with self._lock:
            done = [d for d in self.store.retained_to_clear()
                    if self.publisher.publish_retained(topic(d, "desired"), b"")]
            self.store.mark_retained_cleared(done)
        return len(done)

    def republish_all(self) -> int:
        """Publish every device's desired state (on each MQTT (re)connect), and clear
        those of removed devices."""
        if self.publisher is None:
            return 0
        try:  # memberships may have changed meanwhile (devices added offline, relabelled)
            self.sync_capture("server")
        except Exception:
            log.exception("could not bring the desired states' data capture up to date")
        with self._lock:
            records = self.store.list_desired()
            sent = sum(1 for r in records if self.publisher.publish_retained(
                topic(r.device, "desired"), encode(message(r))))
        log.info("republished %d of %d desired states", sent, len(records))
        cleared = self.clear_removed()
        if cleared:
            log.info("cleared the retained desired state of %d removed device(s)", cleared)
        return sent
