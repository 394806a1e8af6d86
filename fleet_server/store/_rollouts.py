"""Store tables of rollouts, and the reads the rollout engine makes of devices' telemetry.

A rollout row holds its plan and state as JSON documents (``RolloutPlan.to_dict`` and
``RolloutState.to_dict``; the service parses them), the last tick's gate results and the
desired state last sent to each device. The store does not parse them: it keeps text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleet_server.models import ROLLOUT_FINISHED
from fleet_server.store._base import StoreBase, chunks, dumps, loads


@dataclass(frozen=True)
class RolloutRow:
    id: str
    group: str
    bundle: str
    status: str
    plan: dict[str, Any]
    state: dict[str, Any]
    gate_results: list[dict[str, Any]]
    sent: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class WindowSummary:
    """What the gates count of one stored summary (the profile is read apart, by id)."""

    id: int
    device: str
    bundle_name: str
    bundle_version: str
    reference_hash: str
    window_end: float
    rows: int
    errors: dict[str, int]
    latency: tuple[int, ...]
    shadow: dict[str, Any] | None


def _rollout(row: dict[str, Any]) -> RolloutRow:
    return RolloutRow(row["id"], row["group_name"], row["bundle"], row["status"],
                      loads(row["plan"]), loads(row["state"]), loads(row["gate_results"], []),
                      loads(row["sent"], {}), row["created_at"], row["updated_at"])


class RolloutTables(StoreBase):
    # -- rollouts ------------------------------------------------------------------------

    def add_rollout(self, rollout_id: str, group: str, bundle: str, status: str,
                    plan: dict[str, Any], state: dict[str, Any], now: float) -> None:
        """Raises: ConflictError: a rollout of that id exists."""
        with self.transaction():
            self._exec(
                "INSERT INTO rollouts (id, group_name, bundle, status, plan, state, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [rollout_id, group, bundle, status, dumps(plan), dumps(state), now, now],
                conflict=f"rollout {rollout_id!r} exists already")

    def get_rollout(self, rollout_id: str) -> RolloutRow | None:
        row = self._one("SELECT * FROM rollouts WHERE id = ?", [rollout_id])
        return None if row is None else _rollout(row)

    def list_rollouts(self, *, status: str | None = None, active: bool | None = None,
                      limit: int = 1000) -> list[RolloutRow]:
        sql, params = "SELECT * FROM rollouts", []
        where = []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if active is not None:
            where.append("status NOT IN (?, ?)" if active else "status IN (?, ?)")
            params += list(ROLLOUT_FINISHED)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._rows(sql + " ORDER BY created_at DESC, id LIMIT ?", [*params, limit])
        return [_rollout(r) for r in rows]

    def save_rollout(self, rollout_id: str, *, status: str, state: dict[str, Any],
                     gate_results: list[dict[str, Any]], now: float,
                     sent: dict[str, Any] | None = None) -> None:
        with self.transaction():
            if sent is None:
                self._exec("UPDATE rollouts SET status = ?, state = ?, gate_results = ?, "
                           "updated_at = ? WHERE id = ?",
                           [status, dumps(state), dumps(gate_results), now, rollout_id])
            else:
                self._exec("UPDATE rollouts SET status = ?, state = ?, gate_results = ?, "
                           "sent = ?, updated_at = ? WHERE id = ?",
                           [status, dumps(state), dumps(gate_results), dumps(sent), now,
                            rollout_id])

    def rollout_unchanged(self, rollout_id: str, state: dict[str, Any]) -> bool:
        """Whether the rollout's stored state is still ``state`` (as read): inside
        :meth:`transaction`, a transition decided from it may be applied, by this process
        only, even with several processes (API replicas, an old and a new engine) acting
        on one database; otherwise another applied one first and this one is stale."""
        return self._one("SELECT 1 AS y FROM rollouts WHERE id = ? AND state = ?",
                         [rollout_id, dumps(state)]) is not None

    def save_rollout_sent(self, rollout_id: str, sent: dict[str, Any]) -> None:
        with self.transaction():
            self._exec("UPDATE rollouts SET sent = ? WHERE id = ?", [dumps(sent), rollout_id])

    # -- reads of telemetry for the gates -------------------------------------------------

    def window_summaries(self, devices: Sequence[str], since: float, *, limit: int = 20_000
                         ) -> list[WindowSummary]:
        """Summaries of ``devices`` whose window ends after ``since``, newest first, at
        most ``limit`` in all."""
        out: list[WindowSummary] = []
        for part in chunks(sorted(set(devices)), 500):
            marks = ",".join("?" * len(part))
            rows = self._rows(
                "SELECT id, device, bundle_name, bundle_version, reference_hash, window_end, "
                "rows, errors, latency, shadow FROM summaries WHERE window_end > ? "
                f"AND device IN ({marks}) ORDER BY window_end DESC LIMIT ?",
                [since, *part, limit - len(out)])
            out += [WindowSummary(r["id"], r["device"], r["bundle_name"], r["bundle_version"],
                                  r["reference_hash"], r["window_end"], r["rows"],
                                  loads(r["errors"], {}), tuple(loads(r["latency"], [])),
                                  loads(r["shadow"])) for r in rows]
            if len(out) >= limit:
                break
        return out

    def summary_profiles(self, ids: Sequence[int]) -> dict[int, bytes]:
        """The packed profiles (checked and packed at ingest) of these summary ids; a
        summary still waiting for its bundle has none and is left out."""
        out: dict[int, bytes] = {}
        for part in chunks(sorted(set(ids)), 500):
            marks = ",".join("?" * len(part))
            out.update((r["id"], r["packed"]) for r in self._rows(
                f"SELECT id, packed FROM summaries WHERE id IN ({marks}) "
                "AND packed IS NOT NULL", list(part)))
        return out

    def rows_served(self, devices: Sequence[str], name: str, version: str, since: float
                    ) -> dict[str, int]:
        """Per device, the rows its summaries of ``name@version`` ending after ``since``
        count."""
        out: dict[str, int] = {}
        for part in chunks(sorted(set(devices)), 500):
            marks = ",".join("?" * len(part))
            for r in self._rows(
                    "SELECT device, SUM(rows) AS n FROM summaries WHERE bundle_name = ? AND "
                    f"bundle_version = ? AND window_end > ? AND device IN ({marks}) "
                    "GROUP BY device", [name, version, since, *part]):
                out[r["device"]] = int(r["n"] or 0)
        return out

    def reports_since(self, devices: Sequence[str], since: float) -> list[dict[str, Any]]:
        """Install reports of ``devices`` received at or after ``since``, newest first:
        ``{"device", "outcome", "bundle" (dict), "reason", "received"}``."""
        out: list[dict[str, Any]] = []
        for part in chunks(sorted(set(devices)), 500):
            marks = ",".join("?" * len(part))
            out += [{"device": r["device"], "outcome": r["outcome"],
                     "bundle": loads(r["bundle"]), "reason": r["reason"],
                     "received": r["received"]} for r in self._rows(
                "SELECT device, outcome, bundle, reason, received FROM reports WHERE "
                f"received >= ? AND device IN ({marks}) ORDER BY received DESC, id DESC",
                [since, *part])]
        return out
