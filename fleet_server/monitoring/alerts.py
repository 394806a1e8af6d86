"""Alerts: stored, de-duplicated while open, handed to the webhook when raised.

An alert is identified by (kind, bundle, group, device); while one is open the same
condition does not open another, so a drift that persists for a day is one alert, not
288. The evaluator resolves it when the condition clears; an operator can resolve it by
hand. Kinds: ``drift`` (a group's or the fleet's persistent verdict is drift),
``suspect_sensor`` (a device drifts alone while its group does not), ``review_due`` (a
bundle running on devices is due for review within 14 days), ``review_overdue`` (a bundle
still running on devices after its review date), ``performance_drop`` (realized
performance below the packaged expectation, beyond the tolerance and the interval) and
``estimated_performance_drop`` (the same on the label-free estimate).

The drift and performance kinds are judged only while a bundle sends data; once no
device runs, shadows or is told to run a bundle (retired, rolled back, replaced
everywhere) nothing would judge them again, so :meth:`Alerts.resolve_retired` resolves
them (the evaluator's housekeeping calls it every window).

This module does not evaluate anything and does not speak HTTP; the webhook thread
(:mod:`fleet_server.monitoring.webhook`) delivers.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

from fleet_server.metrics import Metrics
from fleet_server.models import Alert, BundleRecord
from fleet_server.store import Store

__all__ = ["KINDS", "WHILE_IN_SERVICE", "Alerts"]

log = logging.getLogger(__name__)
KINDS = ("drift", "suspect_sensor", "review_due", "review_overdue", "performance_drop",
         "estimated_performance_drop")
# the kinds judged from a bundle's data, which a bundle out of service no longer sends
# (the review kinds resolve by their own rule, which already asks what runs)
WHILE_IN_SERVICE = ("drift", "suspect_sensor", "performance_drop",
                    "estimated_performance_drop")
MAX_SWEEP = 10_000  # open alerts of one kind looked at per sweep
STATES = ("open", "resolved")


class Notifier(Protocol):
    def submit(self, alert: Alert) -> bool: ...


class Alerts:
    def __init__(self, store: Store, metrics: Metrics | None = None,
                 notifier: Notifier | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.notifier = notifier

    def raise_alert(self, kind: str, bundle: BundleRecord, *, group: str = "",
                    device: str = "", message: str, details: Mapping[str, Any],
                    now: float) -> Alert | None:
        """Open an alert unless the same one is open; the new alert goes to the webhook."""
        alert = self.store.open_alert(
            kind=kind, bundle_id=bundle.id, group=group, device=device, message=message,
            details=details, now=now, webhook="pending" if self.notifier else "none")
        if alert is None:
            return None
        log.warning("alert %d (%s): %s", alert.id, kind, message)
        if self.metrics is not None:
            self.metrics.alerts.labels(kind).inc()
        if self.notifier is not None:
            self.notifier.submit(alert)
        return alert

    def resolve(self, kind: str, bundle: BundleRecord, *, group: str = "",
                device: str | None = None, keep: Sequence[str] = (), now: float) -> int:
        n = self.store.resolve_alerts(kind=kind, bundle_id=bundle.id, group=group,
                                      device=device, keep=keep, now=now)
        if n:
            log.info("resolved %d %s alert(s) of %s@%s%s", n, kind, bundle.name,
                     bundle.version, f" in group {group}" if group else "")
        return n

    def resolve_retired(self, in_service: Collection[str], now: float) -> int:
        """Resolve the open :data:`WHILE_IN_SERVICE` alerts of bundles not ``in_service``
        (labels of the bundles devices run, shadow or are told to); returns how many."""
        n = 0
        for kind in WHILE_IN_SERVICE:
            for alert in self.store.list_alerts(state="open", kind=kind, limit=MAX_SWEEP):
                if alert.bundle in in_service:
                    continue
                self.store.resolve_alert(alert.id, now)
                n += 1
                log.info("resolved alert %d (%s of %s%s): no device runs the bundle any more",
                         alert.id, kind, alert.bundle,
                         f" in group {alert.group}" if alert.group else "")
        return n

    def resolve_by_id(self, alert_id: int, actor: str, now: float) -> Alert:
        """Raises: NotFoundError: no such alert."""
        with self.store.transaction():
            alert = self.store.resolve_alert(alert_id, now)
            self.store.audit(actor, "alert.resolve", f"alert:{alert_id}", {}, now)
        return alert

    def list(self, *, state: str | None = None, kind: str | None = None,
             bundle: BundleRecord | None = None, limit: int = 100) -> list[Alert]:
        return self.store.list_alerts(state=state, kind=kind,
                                      bundle_id=None if bundle is None else bundle.id,
                                      limit=limit)

    def get(self, alert_id: int) -> Alert:
        """Raises: NotFoundError: no such alert."""
        return self.store.get_alert(alert_id)

    def attempts(self, alert_id: int) -> list[dict[str, Any]]:
        return self.store.list_attempts(alert_id)
