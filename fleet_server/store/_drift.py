"""Store tables of bundles (and their approval statements) and of drift judgements: evaluated
windows, alerts, webhook attempts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgefleet.contract.approval import Approval, CheckedApproval
from fleet_server.errors import NotFoundError
from fleet_server.models import Alert, BundleRecord, DriftWindow
from fleet_server.store._base import StoreBase, dumps, loads

_ALERT_SQL = ("SELECT a.*, b.name || '@' || b.version AS bundle FROM alerts a "
              "JOIN bundles b ON b.id = a.bundle_id")


def _bundle(row: dict[str, Any]) -> BundleRecord:
    return BundleRecord(row["id"], row["name"], row["version"], row["sha256"], row["size"],
                        row["reference_hash"], row["uploaded"], row["uploaded_by"],
                        tuple(loads(row["signers"], [])), loads(row["manifest"], {}))


def _alert(row: dict[str, Any]) -> Alert:
    return Alert(row["id"], row["kind"], row["bundle"], row["group_name"], row["device"],
                 row["state"], row["opened"], row["resolved"], row["message"],
                 loads(row["details"], {}), row["webhook"], row["attempts"])


class DriftTables(StoreBase):
    # -- bundles -------------------------------------------------------------------------

    def add_bundle(self, *, name: str, version: str, sha256: str, size: int,
                   reference_hash: str, manifest: Mapping[str, Any], reference: bytes,
                   signers: Sequence[Mapping[str, str]], uploaded: float, uploaded_by: str
                   ) -> BundleRecord:
        """Raises: ConflictError: ``name@version`` is stored already."""
        with self.transaction():
            self._exec(
                "INSERT INTO bundles (name, version, sha256, size, reference_hash, "
                "manifest, reference, signers, uploaded, uploaded_by) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [name, version, sha256, size, reference_hash, dumps(dict(manifest)),
                 reference, dumps([dict(s) for s in signers]), uploaded, uploaded_by],
                conflict=f"bundle {name}@{version} exists already")
            found = self.get_bundle(name, version)
            assert found is not None
            return found

    def get_bundle(self, name: str, version: str) -> BundleRecord | None:
        row = self._one("SELECT * FROM bundles WHERE name = ? AND version = ?", [name, version])
        return None if row is None else _bundle(row)

    def get_bundle_by_id(self, bundle_id: int) -> BundleRecord | None:
        row = self._one("SELECT * FROM bundles WHERE id = ?", [bundle_id])
        return None if row is None else _bundle(row)

    def bundle_id(self, name: str, version: str) -> int | None:
        row = self._exec("SELECT id FROM bundles WHERE name = ? AND version = ?",
                         [name, version]).fetchone()
        return None if row is None else int(row[0])

    def bundle_reference(self, bundle_id: int) -> bytes:
        """Raises: NotFoundError: no bundle with that id."""
        row = self._exec("SELECT reference FROM bundles WHERE id = ?", [bundle_id]).fetchone()
        if row is None:
            raise NotFoundError("bundle", str(bundle_id))
        return bytes(row[0])

    def list_bundles(self, name: str | None = None) -> list[BundleRecord]:
        if name is None:
            rows = self._rows("SELECT * FROM bundles ORDER BY name, uploaded")
        else:
            rows = self._rows("SELECT * FROM bundles WHERE name = ? ORDER BY uploaded", [name])
        return [_bundle(r) for r in rows]

    # -- bundle approvals ----------------------------------------------------------------

    def add_approvals(self, bundle_id: int, approvals: Sequence[CheckedApproval],
                      now: float) -> int:
        """Record a bundle's checked approval statements; those recorded already (the same
        statement) are skipped. Returns how many are new."""
        added = 0
        with self.transaction():
            for a in approvals:
                st = a.statement
                cur = self._exec(
                    "INSERT INTO bundle_approvals (bundle_id, keyid, role, trusted_role, name, "
                    "comment, signed_at, review_by, statement, recorded) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bundle_id, statement) "
                    "DO NOTHING",
                    [bundle_id, st.keyid, st.role, a.trusted_role, a.name, st.comment,
                     st.signed_at, st.review_by, dumps(st.to_dict()), now])
                added += max(0, cur.rowcount)
        return added

    def list_approvals(self, bundle_id: int) -> list[CheckedApproval]:
        """A bundle's recorded approvals, oldest signature first."""
        rows = self._rows("SELECT * FROM bundle_approvals WHERE bundle_id = ? "
                          "ORDER BY signed_at, id", [bundle_id])
        return [CheckedApproval(Approval.from_dict(loads(r["statement"], {}), "approval"),
                                r["trusted_role"] is not None, r["name"], r["trusted_role"])
                for r in rows]

    # -- evaluated windows ---------------------------------------------------------------

    def save_window(self, bundle_id: int, w: DriftWindow) -> None:
        with self.transaction():
            self._exec(
                "INSERT INTO drift_windows (bundle_id, scope, window_start, "
                "window_end, verdict, share_drifted, rows, devices, features, evaluated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bundle_id, scope, "
                "window_start) DO UPDATE SET window_end = excluded.window_end, "
                "verdict = excluded.verdict, share_drifted = excluded.share_drifted, "
                "rows = excluded.rows, devices = excluded.devices, "
                "features = excluded.features, evaluated = excluded.evaluated",
                [bundle_id, w.scope, w.window_start, w.window_end, w.verdict, w.share_drifted,
                 w.rows, w.devices, dumps(w.features), w.evaluated])

    def list_windows(self, bundle_id: int, scope: str, *, since: float | None = None,
                     until: float | None = None, limit: int = 500) -> list[DriftWindow]:
        """Evaluated windows, oldest first (the newest ``limit`` of them)."""
        sql = ("SELECT w.*, b.name || '@' || b.version AS bundle FROM drift_windows w "
               "JOIN bundles b ON b.id = w.bundle_id WHERE w.bundle_id = ? AND w.scope = ?")
        params: list[Any] = [bundle_id, scope]
        if since is not None:
            sql += " AND w.window_start >= ?"
            params.append(since)
        if until is not None:
            sql += " AND w.window_end <= ?"
            params.append(until)
        rows = self._rows(sql + " ORDER BY w.window_start DESC LIMIT ?", [*params, limit])
        return [DriftWindow(r["bundle"], r["scope"], r["window_start"], r["window_end"],
                            r["verdict"], r["share_drifted"], r["rows"], r["devices"],
                            loads(r["features"], {}), r["evaluated"]) for r in reversed(rows)]

    def window_evaluated(self, bundle_id: int, scope: str, window_start: int) -> bool:
        return self._exec("SELECT 1 FROM drift_windows WHERE bundle_id = ? AND scope = ? AND "
                          "window_start = ?", [bundle_id, scope, window_start]).fetchone() \
            is not None

    # -- alerts --------------------------------------------------------------------------

    def open_alert(self, *, kind: str, bundle_id: int, group: str, device: str, message: str,
                   details: Mapping[str, Any], now: float, webhook: str) -> Alert | None:
        """Open an alert; None if the same one (kind, bundle, group, device) is open."""
        with self.transaction():
            made = self._exec(
                "INSERT INTO alerts (kind, bundle_id, group_name, device, state, opened, "
                "message, details, webhook) VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                [kind, bundle_id, group, device, now, message, dumps(dict(details)),
                 webhook]).fetchall()
            if not made:
                return None
            return self.get_alert(int(made[0][0]))

    def resolve_alerts(self, *, kind: str, bundle_id: int, group: str, now: float,
                       device: str | None = None, keep: Sequence[str] = ()) -> int:
        """Resolve open alerts of a kind for a bundle and group (one device, or all but
        ``keep``); returns how many."""
        sql = ("UPDATE alerts SET state = 'resolved', resolved = ? WHERE state = 'open' AND "
               "kind = ? AND bundle_id = ? AND group_name = ?")
        params: list[Any] = [now, kind, bundle_id, group]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        elif keep:
            sql += f" AND device NOT IN ({','.join('?' * len(keep))})"
            params += list(keep)
        with self.transaction():
            return self._exec(sql, params).rowcount

    def resolve_alert(self, alert_id: int, now: float) -> Alert:
        """Raises: NotFoundError: no such alert."""
        with self.transaction():
            self._exec("UPDATE alerts SET state = 'resolved', resolved = ? WHERE id = ? AND "
                       "state = 'open'", [now, alert_id])
            return self.get_alert(alert_id)

    def get_alert(self, alert_id: int) -> Alert:
        """Raises: NotFoundError: no such alert."""
        row = self._one(_ALERT_SQL + " WHERE a.id = ?", [alert_id])
        if row is None:
            raise NotFoundError("alert", str(alert_id))
        return _alert(row)

    def list_alerts(self, *, state: str | None = None, kind: str | None = None,
                    bundle_id: int | None = None, limit: int = 100) -> list[Alert]:
        where, params = [], []
        for col, value in (("a.state", state), ("a.kind", kind), ("a.bundle_id", bundle_id)):
            if value is not None:
                where.append(f"{col} = ?")
                params.append(value)
        sql = _ALERT_SQL + (" WHERE " + " AND ".join(where) if where else "")
        return [_alert(r) for r in self._rows(sql + " ORDER BY a.id DESC LIMIT ?",
                                              [*params, limit])]

    def count_alerts(self) -> dict[tuple[str, str], int]:
        """Alerts by (kind, state)."""
        return {(r["kind"], r["state"]): r["n"] for r in self._rows(
            "SELECT kind, state, COUNT(*) AS n FROM alerts GROUP BY kind, state")}

    def record_attempt(self, alert_id: int, attempt: int, now: float, status: int | None,
                       error: str, webhook: str) -> None:
        with self.transaction():
            self._exec("INSERT INTO webhook_attempts (alert_id, attempt, time, status, error) "
                       "VALUES (?, ?, ?, ?, ?)", [alert_id, attempt, now, status, error[:500]])
            self._exec("UPDATE alerts SET attempts = ?, webhook = ? WHERE id = ?",
                       [attempt, webhook, alert_id])

    def list_attempts(self, alert_id: int) -> list[dict[str, Any]]:
        return self._rows("SELECT attempt, time, status, error FROM webhook_attempts WHERE "
                          "alert_id = ? ORDER BY attempt", [alert_id])

    def undelivered_alerts(self, limit: int = 100) -> list[Alert]:
        return [_alert(r) for r in self._rows(
            _ALERT_SQL + " WHERE a.webhook = 'pending' ORDER BY a.id LIMIT ?", [limit])]
