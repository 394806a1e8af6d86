"""The fleet server's storage layer: the only code that touches SQL.

A SQLite file through sqlite-utils, in WAL mode (the embedded default), or a PostgreSQL
database through psycopg 3 (``Store("postgresql://user@host/dbname")``, for fleets beyond
one machine), both migrated on open by the same migrations
(:mod:`fleet_server.store.migrations`, rewritten per engine by ``_dialect``).
:class:`Store` is thread-safe: each thread gets its own connection and writes run one at a
time (SQLite's ``BEGIN IMMEDIATE``; on PostgreSQL a transaction-scoped advisory lock) in
:meth:`Store.transaction`, which nests: a service can group several store calls into one
atomic write. Everything above it sees records (:mod:`fleet_server.models`), never rows.

The parts, by table:

- ``_fleet``: tokens and dashboard sessions, devices and their labels, groups, desired
  state, audit;
- ``_telemetry``: summaries, rollups (of devices, groups and the fleet), reports, dead
  letters, counters;
- ``_drift``: bundles, evaluated drift windows, alerts, webhook attempts;
- ``_rollouts``: rollouts, and the telemetry reads their gates make;
- ``_retrains``: retraining runs and their lineage;
- ``_outcomes``: the outcomes queue (batches of true labels waiting for their device);
- ``_capture``: captured rows devices uploaded, their batch ids, central labels;
- ``_performance``: summaries' performance entries (realized and estimated, per bundle)
  and their rollups;
- ``_dashboard``: the dashboard's paged device list and its counts (reads only).

The store decides nothing: it does not judge, validate messages, hash secrets or read the
clock (every time is a parameter). Bundle files live outside it
(:mod:`fleet_server.registry.blobs`).
"""

from __future__ import annotations

from fleet_server.store._base import StoreBase
from fleet_server.store._capture import CapturedRow, CaptureTables
from fleet_server.store._dashboard import DEVICE_SORTS, DashboardReads, DeviceQuery, DevicesPage
from fleet_server.store._drift import DriftTables
from fleet_server.store._fleet import FleetTables, selector_sql
from fleet_server.store._outcomes import OutcomeBatchRow, OutcomeQueueRow, OutcomeTables
from fleet_server.store._performance import (
    PerformanceKey,
    PerformanceRollup,
    PerformanceRow,
    PerformanceTables,
)
from fleet_server.store._retrains import RetrainTables
from fleet_server.store._rollouts import RolloutRow, RolloutTables, WindowSummary
from fleet_server.store._telemetry import (
    FLEET_SCOPE,
    FOLDED,
    GROUP_PREFIX,
    PENDING,
    REFUSED,
    PendingSummary,
    RollupKey,
    SummaryRow,
    TelemetryTables,
    group_scope,
)
from fleet_server.store.migrations import LATEST

__all__ = [
    "DEVICE_SORTS",
    "FLEET_SCOPE",
    "FOLDED",
    "GROUP_PREFIX",
    "LATEST",
    "PENDING",
    "REFUSED",
    "CapturedRow",
    "DeviceQuery",
    "DevicesPage",
    "OutcomeBatchRow",
    "OutcomeQueueRow",
    "PendingSummary",
    "PerformanceKey",
    "PerformanceRollup",
    "PerformanceRow",
    "RolloutRow",
    "RollupKey",
    "Store",
    "SummaryRow",
    "WindowSummary",
    "group_scope",
    "selector_sql",
]


class Store(FleetTables, TelemetryTables, DriftTables, RolloutTables, RetrainTables,
            OutcomeTables, PerformanceTables, CaptureTables, DashboardReads, StoreBase):
    """The fleet database. ``Store(db)`` opens (creating and migrating) a SQLite file (a
    path or ``sqlite:///path``) or a PostgreSQL database (``postgresql://...``)."""
