"""Prometheus metrics of one server instance (``GET /metrics``).

Each :class:`Metrics` has its own :class:`prometheus_client.CollectorRegistry`, not the
process-global one, so several servers (tests, an API and a worker in one process) never
share or double-register counters. Event counters are incremented by the services as
things happen; the gauges that describe the fleet (devices online, open alerts, pending
summaries) are read from the store at scrape time, so they are right in every process
even when the events happened in another one (``fleet ingest`` workers).

Names (all prefixed ``edgefleet_``): ``messages_ingested_total{type}``,
``dead_letters_total{error}``, ``duplicates_total{type}``, ``ingest_lag_seconds``
(histogram: window end to commit), ``ingest_batch_seconds``, ``ingest_queue_depth``,
``ingest_qos0_dropped``, ``devices{state}``, ``devices_online``,
``summaries_pending``, ``alerts_raised_total{kind}``, ``alerts_open{kind}`` (every kind,
0 included), ``rollouts{status}`` (every status, 0 included), ``drift_windows{verdict}``
(evaluated windows stored), ``drift_scopes{verdict}`` (each bundle and scope by the verdict
of its newest window: what drifts now), ``webhook_deliveries_total``,
``webhook_failures_total``.

This module does not serve HTTP (the API route does) and decides nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fleet_server.errors import StoreError
from fleet_server.models import ROLLOUT_STATUSES
from fleet_server.profiles.drift import VERDICTS
from fleet_server.store import PENDING, Store

__all__ = ["CONTENT_TYPE", "Metrics"]

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
               900.0, 3600.0, 6 * 3600.0, 86400.0)


class _StoreCollector(Collector):
    """Fleet-wide gauges read from the store at each scrape."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            online = self.store.count_devices(online=True)
            total = self.store.count_devices()
            pending = self.store.count_summaries(folded=PENDING)
            alerts = self.store.count_alerts()
            rollouts = self.store.count_rollouts()
            windows = self.store.count_drift_windows()
            scopes = self.store.count_drift_windows(latest=True)
        except StoreError:
            log.exception("metrics: cannot read the store")
            return
        yield GaugeMetricFamily("edgefleet_devices_online", "Devices whose status is online",
                                value=online)
        devices = GaugeMetricFamily("edgefleet_devices", "Devices in the registry",
                                    labels=["state"])
        devices.add_metric(["online"], online)
        devices.add_metric(["offline"], total - online)
        yield devices
        yield GaugeMetricFamily("edgefleet_summaries_pending",
                                "Stored summaries waiting for their bundle's upload",
                                value=pending)
        open_alerts = GaugeMetricFamily("edgefleet_alerts_open", "Open alerts, by kind",
                                        labels=["kind"])
        kinds = sorted({"drift", "suspect_sensor", *(k for k, _ in alerts)})
        for kind in kinds:
            open_alerts.add_metric([kind], alerts.get((kind, "open"), 0))
        yield open_alerts
        by_status = GaugeMetricFamily("edgefleet_rollouts", "Rollouts, by status",
                                      labels=["status"])
        for status in ROLLOUT_STATUSES:
            by_status.add_metric([status], rollouts.get(status, 0))
        yield by_status
        for name, text, counts in (
                ("edgefleet_drift_windows", "Evaluated drift windows stored, by verdict",
                 windows),
                ("edgefleet_drift_scopes", "Bundles and scopes (fleet, groups) by the verdict "
                 "of their newest evaluated window", scopes)):
            family = GaugeMetricFamily(name, text, labels=["verdict"])
            for verdict in VERDICTS:
                family.add_metric([verdict], counts.get(verdict, 0))
            yield family


class Metrics:
    """The counters and gauges of one server; ``store`` adds the fleet gauges."""

    def __init__(self, store: Store | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.messages = Counter("edgefleet_messages_ingested", "Messages stored, by type",
                                ["type"], registry=r)
        self.dead_letters = Counter("edgefleet_dead_letters",
                                    "Messages refused into the dead-letter table, by error",
                                    ["error"], registry=r)
        self.duplicates = Counter("edgefleet_duplicates",
                                  "Messages already stored (same device and sequence)",
                                  ["type"], registry=r)
        self.lag = Histogram("edgefleet_ingest_lag_seconds",
                             "Seconds from a summary's window end to its commit",
                             buckets=LAG_BUCKETS, registry=r)
        self.batch = Histogram("edgefleet_ingest_batch_seconds",
                               "Seconds to decode and commit one ingest batch", registry=r)
        self.qos0_dropped = Gauge("edgefleet_ingest_qos0_dropped",
                                  "QoS 0 messages (heartbeats) dropped since start because "
                                  "ingest was behind", registry=r)
        self.alerts = Counter("edgefleet_alerts_raised", "Alerts raised, by kind", ["kind"],
                              registry=r)
        self.webhook_deliveries = Counter("edgefleet_webhook_deliveries",
                                          "Webhook calls answered with 2xx", registry=r)
        self.webhook_failures = Counter("edgefleet_webhook_failures",
                                        "Webhook attempts that failed (each retry counts)",
                                        registry=r)
        self.queue_depth = Gauge("edgefleet_ingest_queue_depth",
                                 "Messages received and not yet committed", registry=r)
        self._depth: Callable[[], int] = lambda: 0
        self._dropped: Callable[[], int] = lambda: 0
        self.queue_depth.set_function(lambda: self._depth())
        self.qos0_dropped.set_function(lambda: self._dropped())
        if store is not None:
            r.register(_StoreCollector(store))

    def watch_link(self, depth: Callable[[], int], dropped: Callable[[], int]) -> None:
        """Read the ingest queue's depth and QoS 0 drops from the MQTT link at scrape time."""
        self._depth, self._dropped = depth, dropped

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 if absent): for tests and the benchmark."""
        got: Any = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else float(got)
