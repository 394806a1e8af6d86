"""The fleet server's storage layer: the only code that touches SQL.

One SQLite file through sqlite-utils, in WAL mode, migrated on open
(:mod:`fleet_server.store.migrations`). :class:`Store` is thread-safe: each thread gets
its own connection and writes run in ``BEGIN IMMEDIATE`` transactions
(:meth:`Store.transaction`, which nests: a service can group several store calls into one
atomic write). Everything above it sees records (:mod:`fleet_server.models`), never rows,
so a server database for larger fleets can replace this package behind the same methods.

The parts, by table:

- ``_fleet``: tokens, devices and their labels, groups, desired state, audit;
- ``_telemetry``: summaries, rollups, reports, dead letters, counters;
- ``_drift``: bundles, evaluated drift windows, alerts, webhook attempts;
- ``_rollouts``: rollouts, and the telemetry reads their gates make;
- ``_dashboard``: the dashboard's paged device list and its counts (reads only).

The store decides nothing: it does not judge, validate messages, hash secrets or read the
clock (every time is a parameter). Bundle files live outside it
(:mod:`fleet_server.registry.blobs`).
"""

from __future__ import annotations

from fleet_server.store._base import StoreBase
from fleet_server.store._dashboard import DEVICE_SORTS, DashboardReads, DeviceQuery, DevicesPage
from fleet_server.store._drift import DriftTables
from fleet_server.store._fleet import FleetTables, selector_sql
from fleet_server.store._rollouts import RolloutRow, RolloutTables, WindowSummary
from fleet_server.store._telemetry import (
    FLEET_SCOPE,
    FOLDED,
    PENDING,
    REFUSED,
    PendingSummary,
    RollupKey,
    SummaryRow,
    TelemetryTables,
)
from fleet_server.store.migrations import LATEST

__all__ = [
    "DEVICE_SORTS",
    "FLEET_SCOPE",
    "FOLDED",
    "LATEST",
    "PENDING",
    "REFUSED",
    "DeviceQuery",
    "DevicesPage",
    "PendingSummary",
    "RolloutRow",
    "RollupKey",
    "Store",
    "SummaryRow",
    "WindowSummary",
    "selector_sql",
]


class Store(FleetTables, TelemetryTables, DriftTables, RolloutTables, DashboardReads,
            StoreBase):
    """The fleet database. ``Store(path)`` opens (creating and migrating) the file."""
