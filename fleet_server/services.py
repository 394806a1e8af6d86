"""The services of one server, wired together over one store: what the API routes call.

:func:`build_services` is the composition root: it opens the store, the bundle directory
and the trust store, and builds each service with its collaborators. The result is a plain
container (:class:`Services`) that ``create_app`` puts on ``app.state`` and that the
rollout engine and the dashboard can take as well. Threads (ingest worker, evaluator,
webhook) and the MQTT link are started by :mod:`fleet_server.server`, not here.

Public service APIs (for the rollout shell and the dashboard):

- ``registry`` (:class:`~fleet_server.registry.devices.Registry`): devices, labels, groups,
  ``members(group)``;
- ``desired`` (:class:`~fleet_server.registry.desired.DesiredStates`): ``assign``,
  ``assign_many``, ``get``, ``republish_all``;
- ``bundles`` (:class:`~fleet_server.registry.bundles.Bundles`): ``upload``, ``get``,
  ``by_label``, ``list``, ``reference`` (spec, base profile, rollup layout);
- ``drift`` (:class:`~fleet_server.monitoring.drift.DriftService`): ``report``, ``series``,
  ``merged`` (a scope's merged rollup, for rollout gates);
- ``rollouts`` (:class:`~fleet_server.rollouts.engine.Rollouts`): ``create``, ``get``,
  ``list``, ``act``, ``preview``, ``tick`` (the engine thread is the server's);
- ``performance`` (:class:`~fleet_server.monitoring.performance.PerformanceService`):
  ``report`` (realized and estimated performance over a scope and range), ``judge``;
- ``audit`` (:class:`~fleet_server.registry.audit.AuditLog`): ``verify`` the hash chain,
  ``export``;
- ``retrains`` (:class:`~fleet_server.registry.retrains.Retrains`): the retraining runs,
  ``start``, ``claim``, ``update``, ``lineage``;
- ``outcomes`` (:class:`~fleet_server.telemetry.routing.OutcomeService`): ``upload``
  (outcomes queued for their devices), ``status``;
- ``capture`` (:class:`~fleet_server.telemetry.capture.CaptureService`): ``ingest`` (a
  device's batch of captured rows), ``export``, ``housekeeping``;
- ``governance`` (:class:`~fleet_server.monitoring.governance.Governance`): ``check_desired``,
  ``review_alerts``, ``show`` (the six questions of one bundle);
- ``alerts`` (:class:`~fleet_server.monitoring.alerts.Alerts`), ``auth``
  (:class:`~fleet_server.registry.auth.Auth`), ``ingestor``, ``metrics``, ``store``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefleet.contract.signing import Policy, TrustStore
from fleet_server.config import ServerConfig
from fleet_server.metrics import Metrics
from fleet_server.monitoring.alerts import Alerts
from fleet_server.monitoring.drift import DriftService
from fleet_server.monitoring.governance import Governance
from fleet_server.monitoring.performance import PerformanceService
from fleet_server.registry.audit import AuditLog
from fleet_server.registry.auth import Auth
from fleet_server.registry.blobs import BlobStore
from fleet_server.registry.bundles import Bundles
from fleet_server.registry.desired import DesiredStates, Publisher
from fleet_server.registry.devices import Registry
from fleet_server.registry.retrains import Retrains
from fleet_server.rollouts.engine import Rollouts
from fleet_server.store import Store
from fleet_server.telemetry.capture import CaptureService
from fleet_server.telemetry.ingest import Ingestor
from fleet_server.telemetry.routing import OutcomeService

__all__ = ["Services", "build_services"]


@dataclass
class Services:
    config: ServerConfig
    store: Store
    auth: Auth
    registry: Registry
    bundles: Bundles
    desired: DesiredStates
    drift: DriftService
    alerts: Alerts
    ingestor: Ingestor
    metrics: Metrics
    rollouts: Rollouts
    audit: AuditLog
    retrains: Retrains
    outcomes: OutcomeService
    governance: Governance
    performance: PerformanceService
    capture: CaptureService
    clock: Callable[[], float] = time.time
    mqtt_state: Callable[[], str] = field(default=lambda: "disabled")

    def close(self) -> None:
        self.store.close()


def build_services(config: ServerConfig, *, publisher: Publisher | None = None,
                   clock: Callable[[], float] = time.time) -> Services:
    """Open the store and build every service.

    Raises:
        StoreError: the database or the bundle directory cannot be opened.
        KeyFileError: a trust key cannot be read.
    """
    store = Store(config.db)
    try:
        trust = TrustStore.from_files(config.trust)
        metrics = Metrics(store)
        bundles = Bundles(store, BlobStore(config.bundles_path), trust,
                          Policy(config.threshold, config.required_roles), config.limits)
        registry = Registry(store)
        ingestor = Ingestor(store, bundles, config.ingest_config, metrics, clock)
        bundles.on_uploaded = ingestor.fold_pending
        desired = DesiredStates(store, bundles, publisher, clock)
        registry.on_membership = desired.sync_capture
        drift = DriftService(store, bundles, registry, config.drift,
                             config.ingest_config.levels)
        alerts = Alerts(store, metrics)
        performance = PerformanceService(store, bundles, registry, config.performance)
        return Services(
            config=config, store=store, auth=Auth(store), registry=registry, bundles=bundles,
            desired=desired, drift=drift, alerts=alerts, ingestor=ingestor,
            metrics=metrics,
            rollouts=Rollouts(store, registry, bundles, desired, drift, config, clock),
            audit=AuditLog(store), retrains=Retrains(store),
            outcomes=OutcomeService(store, config.outcomes, clock),
            governance=Governance(store, bundles, registry, alerts), performance=performance,
            capture=CaptureService(store, registry, config.capture, clock), clock=clock)
    except BaseException:
        store.close()
        raise
