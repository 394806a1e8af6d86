"""Store table of retraining runs (``edgepack retrain``): one row a run, its lineage in ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fleet_server.errors import ConflictError, NotFoundError
from fleet_server.models import RetrainRun
from fleet_server.store._base import StoreBase, dumps, loads

__all__ = ["RetrainTables"]

# the fields a runner may set while a run is running or when it finishes
UPDATABLE = ("status", "champion", "challenger", "rollout", "data", "metrics", "reason",
             "finished")


def _run(row: dict[str, Any]) -> RetrainRun:
    return RetrainRun(row["id"], row["recipe"], row["recipe_hash"], row["revision"],
                      row["trigger"], row["alert_id"], row["status"], row["group_name"],
                      row["bundle"], row["champion"], row["challenger"], row["rollout"],
                      row["created"], row["started"], row["finished"], row["actor"],
                      loads(row["data"], {}), loads(row["metrics"], {}), row["reason"])


class RetrainTables(StoreBase):
    def add_retrain(self, *, recipe: str, recipe_hash: str, revision: str, trigger: str,
                    alert_id: int | None, status: str, group: str, bundle: str,
                    actor: str, now: float) -> RetrainRun:
        """Record a run (``requested`` or ``running``).

        Raises:
            ConflictError: a run of this recipe is running already (at most one at a time).
        """
        with self.transaction():
            made = self._exec(
                "INSERT INTO retrains (recipe, recipe_hash, revision, trigger, alert_id, status, "
                "group_name, bundle, created, started, actor) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING id",
                [recipe, recipe_hash, revision, trigger, alert_id, status, group, bundle, now,
                 now if status == "running" else None, actor]).fetchall()
            if not made:
                raise ConflictError(f"recipe {recipe!r} has a run in progress already; "
                                    "runs of one recipe never overlap")
            return self.get_retrain(int(made[0][0]))

    def claim_retrain(self, recipe: str, now: float) -> RetrainRun | None:
        """The oldest ``requested`` run of ``recipe``, now ``running``; None if there is none
        or one is running already."""
        with self.transaction():
            if self._one("SELECT id FROM retrains WHERE recipe = ? AND status = 'running'",
                         [recipe]) is not None:
                return None
            row = self._one("SELECT id FROM retrains WHERE recipe = ? AND status = 'requested' "
                            "ORDER BY id LIMIT 1", [recipe])
            if row is None:
                return None
            self._exec("UPDATE retrains SET status = 'running', started = ? WHERE id = ?",
                       [now, row["id"]])
            return self.get_retrain(row["id"])

    def update_retrain(self, run_id: int, changes: Mapping[str, Any]) -> RetrainRun:
        """Set fields of a run (``UPDATABLE``); ``data`` and ``metrics`` are merged into what
        is stored.

        Raises:
            NotFoundError: no such run.
        """
        unknown = set(changes) - set(UPDATABLE)
        if unknown:
            raise ValueError(f"not updatable: {', '.join(sorted(unknown))}")
        with self.transaction():
            run = self.get_retrain(run_id)
            values = dict(changes)
            for key in ("data", "metrics"):
                if key in values:
                    values[key] = dumps({**getattr(run, key), **values[key]})
            if values:
                sets = ", ".join(f"{k} = ?" for k in values)
                # the column names are UPDATABLE's (checked above), never the caller's
                self._exec(f"UPDATE retrains SET {sets} WHERE id = ?",
                           [*values.values(), run_id])
            return self.get_retrain(run_id)

    def get_retrain(self, run_id: int) -> RetrainRun:
        """Raises: NotFoundError: no such run."""
        row = self._one("SELECT * FROM retrains WHERE id = ?", [run_id])
        if row is None:
            raise NotFoundError("retrain run", str(run_id))
        return _run(row)

    def list_retrains(self, *, recipe: str | None = None, status: str | None = None,
                      alert_id: int | None = None, bundle: str | None = None,
                      limit: int = 100) -> list[RetrainRun]:
        """Runs, newest first; ``bundle`` (``name@version``): those that built it or were
        judged against it."""
        where: list[str] = []
        params: list[Any] = []
        for col, value in (("recipe", recipe), ("status", status), ("alert_id", alert_id)):
            if value is not None:
                where.append(f"{col} = ?")
                params.append(value)
        if bundle is not None:
            where.append("(challenger = ? OR champion = ?)")
            params += [bundle, bundle]
        sql = "SELECT * FROM retrains" + (" WHERE " + " AND ".join(where) if where else "")
        return [_run(r) for r in self._rows(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])]

    def count_retrains_since(self, recipe: str, since: float) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM retrains WHERE recipe = ? AND created >= ? "
                        "AND status <> 'requested'", [recipe, since])
        return int((row or {}).get("n") or 0)
