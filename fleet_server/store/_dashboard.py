"""Store reads of the operator dashboard: one page of devices, and counts by state.

The dashboard must stay fast at 10,000 devices and hundreds of rollouts, so it never loads
a table to count or page it in Python: every filter, sort, count and page here is one SQL
query (``LIMIT``/``OFFSET`` for a page). A device's displayed status (online, stale,
offline) is computed in SQL from the times the caller's rule gives (``stale_before``): the
rule itself belongs to the dashboard, the store only applies it.

This module writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet_server.models import ROLLOUT_FINISHED, Device
from fleet_server.store._base import StoreBase
from fleet_server.store._fleet import _device, selector_sql
from fleet_server.store._rollouts import RolloutRow, _rollout

__all__ = ["DEVICE_SORTS", "DashboardReads", "DeviceQuery", "DevicesPage"]

# the moment a device was last heard of, by any message
_HEARD = ("GREATEST(COALESCE(last_seen, 0), COALESCE(heartbeat_time, 0), "
          "COALESCE(status_time, 0))")
_STATUS = (f"CASE WHEN online = 0 THEN 'offline' WHEN {_HEARD} < :stale_before "
           "THEN 'stale' ELSE 'online' END")
_BUNDLE = "COALESCE(json_extract(bundle, '$.name') || '@' || json_extract(bundle, '$.version'), '')"
_VERDICT_OF = {0: "drift", 1: "warn", 2: "ok", 3: "insufficient"}
_SEVERITY = ("CASE verdict WHEN 'drift' THEN 0 WHEN 'warn' THEN 1 WHEN 'ok' THEN 2 "
             "ELSE 3 END")
DEVICE_SORTS = {
    "id": "id",
    "status": f"CASE {_STATUS} WHEN 'offline' THEN 0 WHEN 'stale' THEN 1 ELSE 2 END",
    "heard": _HEARD,
    "bundle": _BUNDLE,
    "agent": "agent_version",
    "summaries": "summaries",
    "dropped": "dropped",
    "created": "created",
}


@dataclass(frozen=True)
class DeviceQuery:
    """One page of the device list: filters, order and page (all applied in SQL)."""

    stale_before: float  # online by its last status but unheard since: stale
    search: str = ""  # a substring of the id or of a label's ``key=value``
    status: str | None = None  # online | stale | offline
    selector: Mapping[str, str] = field(default_factory=dict)
    bundle: str | None = None  # name@version running, or "none"
    sort: str = "id"  # a key of DEVICE_SORTS
    descending: bool = False
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True)
class DevicesPage:
    devices: tuple[Device, ...]
    statuses: Mapping[str, str]  # device id -> online | stale | offline
    total: int  # devices matching the filters, all pages


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class DashboardReads(StoreBase):
    def device_page(self, q: DeviceQuery) -> DevicesPage:
        """The devices of one page, with the count of all that match.

        Raises:
            KeyError: ``q.sort`` is not a key of :data:`DEVICE_SORTS`.
        """
        order = DEVICE_SORTS[q.sort]
        sub, sel = selector_sql(q.selector)
        params: dict[str, Any] = {f"s{i}": v for i, v in enumerate(sel)}
        for i in range(len(sel)):
            sub = sub.replace("?", f":s{i}", 1)
        params["stale_before"] = q.stale_before
        where = [f"id IN ({sub})"]
        if q.search:
            where.append("(id LIKE :like ESCAPE '\\' OR id IN (SELECT device FROM device_labels "
                         "WHERE key || '=' || value LIKE :like ESCAPE '\\'))")
            params["like"] = _like(q.search)
        if q.status is not None:
            where.append(f"{_STATUS} = :status")
            params["status"] = q.status
        if q.bundle is not None:
            where.append("bundle IS NULL" if q.bundle == "none" else f"{_BUNDLE} = :bundle")
            params["bundle"] = q.bundle
        cond = " AND ".join(where)
        total = self._one(f"SELECT COUNT(*) AS n FROM devices WHERE {cond}", params)
        direction = "DESC" if q.descending else "ASC"
        rows = self._rows(
            f"SELECT *, {_STATUS} AS shown_status FROM devices WHERE {cond} "
            f"ORDER BY {order} {direction}, id {direction} LIMIT :limit OFFSET :offset",
            {**params, "limit": q.limit, "offset": q.offset})
        return DevicesPage(tuple(_device(r) for r in rows),
                           {r["id"]: r["shown_status"] for r in rows},
                           int(total["n"]) if total else 0)

    def count_device_statuses(self, stale_before: float) -> dict[str, int]:
        """Devices by displayed status (online, stale, offline)."""
        rows = self._rows(f"SELECT {_STATUS} AS s, COUNT(*) AS n FROM devices GROUP BY 1",
                          {"stale_before": stale_before})
        return {r["s"]: int(r["n"]) for r in rows}

    def count_devices_by_bundle(self) -> dict[str, int]:
        """Devices by the bundle they run (``name@version``; ``""`` for none)."""
        return {r["b"]: int(r["n"]) for r in self._rows(
            f"SELECT {_BUNDLE} AS b, COUNT(*) AS n FROM devices GROUP BY 1")}

    def count_running(self, label: str, selector: Mapping[str, str] | None = None) -> int:
        """How many devices (matching ``selector``, when given) report running ``label``
        (``name@version``)."""
        sub, params = selector_sql(selector or {})
        row = self._one(f"SELECT COUNT(*) AS n FROM devices WHERE {_BUNDLE} = ? AND id IN "
                        f"({sub})", [label, *params])
        return int(row["n"]) if row else 0

    def bundles_in_service(self) -> set[str]:
        """The labels (``name@version``) of the bundles some device runs or shadows (as it
        last reported) or is told to run or shadow (its desired state)."""
        shadow = _BUNDLE.replace("bundle", "shadow")
        out: set[str] = set()
        for table in ("devices", "desired"):
            for column in (_BUNDLE, shadow):
                out |= {r["label"] for r in self._rows(
                    f"SELECT DISTINCT {column} AS label FROM {table}") if r["label"]}
        return out

    def count_selected(self, selector: Mapping[str, str]) -> int:
        """How many devices match a label selector."""
        sub, params = selector_sql(selector)
        row = self._one(f"SELECT COUNT(*) AS n FROM ({sub}) AS m", params)
        return int(row["n"]) if row else 0

    def count_rollouts(self) -> dict[str, int]:
        """Rollouts by status."""
        return {r["status"]: int(r["n"]) for r in self._rows(
            "SELECT status, COUNT(*) AS n FROM rollouts GROUP BY status")}

    def drift_grid(self, since: float, width: float, columns: int
                   ) -> list[tuple[int, str, int, str]]:
        """The drift index's cells: per bundle id, scope and column (``width`` seconds
        from ``since``), the most severe verdict of the windows evaluated in it; in that
        order (bundle id, scope, column)."""
        rows = self._exec(
            f"SELECT bundle_id, scope, LEAST(CAST((window_start - ?) / ? AS INTEGER), ?) AS col, "
            f"MIN({_SEVERITY}) FROM drift_windows WHERE window_start >= ? GROUP BY 1, 2, 3 "
            "ORDER BY 1, 2, 3",
            [since, width, columns - 1, since]).fetchall()
        return [(b, s, int(c), _VERDICT_OF[v]) for b, s, c, v in rows]

    def drift_latest(self, since: float) -> dict[tuple[int, str], tuple[str, str, int]]:
        """Per (bundle id, scope) evaluated since ``since``: the verdict of its newest
        window, its most severe verdict, and how many windows."""
        rows = self._exec(
            "SELECT w.bundle_id, w.scope, w.verdict, m.worst, m.n FROM drift_windows w JOIN ("
            f"SELECT bundle_id, scope, MAX(window_start) AS ws, MIN({_SEVERITY}) AS worst, "
            "COUNT(*) AS n FROM drift_windows WHERE window_start >= ? GROUP BY 1, 2) m "
            "ON m.bundle_id = w.bundle_id AND m.scope = w.scope AND m.ws = w.window_start",
            [since]).fetchall()
        return {(b, s): (v, _VERDICT_OF[worst], int(n)) for b, s, v, worst, n in rows}

    def rollouts_touched_since(self, since: float, *, limit: int = 1000) -> list[RolloutRow]:
        """Rollouts still active, or changed since ``since`` (finished or aborted lately),
        newest first."""
        rows = self._rows(
            "SELECT * FROM rollouts WHERE status NOT IN (?, ?) OR updated_at >= ? "
            "ORDER BY created_at DESC, id LIMIT ?", [*ROLLOUT_FINISHED, since, limit])
        return [_rollout(r) for r in rows]

    def count_drift_windows(self, *, latest: bool = False) -> dict[str, int]:
        """Evaluated drift windows by verdict; ``latest``: only each (bundle, scope)'s
        newest window, i.e. what the fleet looks like now."""
        if not latest:
            sql = "SELECT verdict, COUNT(*) AS n FROM drift_windows GROUP BY verdict"
        else:
            sql = ("SELECT w.verdict, COUNT(*) AS n FROM drift_windows w JOIN ("
                   "SELECT bundle_id, scope, MAX(window_start) AS ws FROM drift_windows "
                   "GROUP BY bundle_id, scope) m ON m.bundle_id = w.bundle_id AND "
                   "m.scope = w.scope AND m.ws = w.window_start GROUP BY w.verdict")
        return {r["verdict"]: int(r["n"]) for r in self._rows(sql)}
