"""Store tables of data capture: rows devices sampled and uploaded, their central labels.

``captured`` holds one row per (device, prediction id): the allowlisted features and the
model's outputs as JSON, and the true label (JSON) once an outcome for it is uploaded
centrally. ``capture_batches`` remembers each device's batch ids, so a batch sent again
(the device lost the answer) is stored once. ``capture_labels`` keeps the outcomes
uploaded centrally by (device, prediction id), so a row captured *after* its outcome
arrived is labelled as it is stored. The first label of a row stands, as on the device.

The store decides nothing: bounds, retention and who may upload are the capture service's
(:mod:`fleet_server.telemetry.capture`); every time is a parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleet_server.store._base import StoreBase, chunks

__all__ = ["CaptureTables", "CapturedRow"]


@dataclass(frozen=True)
class CapturedRow:
    """One stored captured row; ``features``, ``prediction`` and ``label`` are JSON text."""

    id: int
    device: str
    pid: str
    served: float
    bundle: str
    version: str
    features: str
    prediction: str
    label: str | None


class CaptureTables(StoreBase):
    def add_capture_batch(self, device: str, batch: str,
                          rows: Sequence[tuple[str, float, str, str, str, str]],
                          now: float) -> tuple[int, bool]:
        """Store a batch of ``(pid, served, bundle, version, features, prediction)`` rows
        from ``device`` unless its batch id was stored before.

        Returns:
            ``(rows stored, duplicate batch)``; a row whose (device, pid) is stored already
            is skipped (not counted).
        """
        with self.transaction():
            made = self._exec(
                "INSERT INTO capture_batches (device, batch, rows, received) "
                "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING batch",
                [device, batch, len(rows), now]).fetchall()
            if not made:
                return 0, True
            labels: dict[str, str] = {}
            for part in chunks(sorted({r[0] for r in rows}), 500):
                marks = ", ".join("?" * len(part))
                labels.update((r["pid"], r["label"]) for r in self._rows(
                    f"SELECT pid, label FROM capture_labels WHERE device = ? AND pid IN "
                    f"({marks})", [device, *part]))
            stored = 0
            for pid, served, bundle, version, features, prediction in rows:
                label = labels.get(pid)
                cur = self._exec(
                    "INSERT INTO captured (device, pid, served, received, bundle, version, "
                    "features, prediction, size, label, labelled_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [device, pid, served, now, bundle, version, features, prediction,
                     len(features) + len(prediction) + len(pid), label,
                     now if label is not None else None])
                stored += max(cur.rowcount, 0)
            return stored, False

    def record_capture_labels(self, labels: Sequence[tuple[str, str, str]], now: float
                              ) -> None:
        """Record ``(device, pid, label JSON)`` outcomes uploaded centrally; label the
        captured rows they name (the first label stands). Call inside the upload's
        transaction (one batched statement each: an upload may hold a million rows)."""
        self._many("INSERT INTO capture_labels (device, pid, label, at) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT DO NOTHING", [(d, p, lab, now) for d, p, lab in labels])
        self._many("UPDATE captured SET label = ?, labelled_at = ? "
                   "WHERE device = ? AND pid = ? AND label IS NULL",
                   [(lab, now, d, p) for d, p, lab in labels])

    def captured_rows(self, bundle: str, version: str, *, since: float, labelled: bool,
                      devices: Sequence[str] | None, after: int, limit: int
                      ) -> list[CapturedRow]:
        """A page of captured rows of one bundle served at or after ``since``, by id above
        ``after``; only from ``devices`` unless None; only labelled ones if ``labelled``."""
        sql = ("SELECT id, device, pid, served, bundle, version, features, prediction, label "
               "FROM captured WHERE bundle = ? AND version = ? AND served >= ? AND id > ?")
        params: list[object] = [bundle, version, since, after]
        if labelled:
            sql += " AND label IS NOT NULL"
        if devices is not None:
            if not devices:
                return []
            sql += f" AND device IN ({', '.join('?' * len(devices))})"
            params += list(devices)
        sql += " ORDER BY id LIMIT ?"
        return [CapturedRow(r["id"], r["device"], r["pid"], r["served"], r["bundle"],
                            r["version"], r["features"], r["prediction"], r["label"])
                for r in self._rows(sql, [*params, limit])]

    def capture_usage(self) -> tuple[int, int]:
        """(captured rows, their bytes as the budget counts them)."""
        r = self._one("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS b FROM captured")
        return (int(r["n"]), int(r["b"])) if r else (0, 0)

    def prune_capture(self, before: float, max_bytes: int) -> int:
        """Delete captured rows received before ``before`` (and batch ids and central labels
        as old), then the oldest rows until their bytes are within ``max_bytes``. Returns
        the captured rows deleted."""
        with self.transaction():
            gone = self._exec("DELETE FROM captured WHERE received < ?", [before]).rowcount
            self._exec("DELETE FROM capture_batches WHERE received < ?", [before])
            self._exec("DELETE FROM capture_labels WHERE at < ?", [before])
            _, total = self.capture_usage()
            if total <= max_bytes:
                return gone
            over, cut, after = total - max_bytes, None, 0
            while over > 0:
                page = self._rows("SELECT id, size FROM captured WHERE id > ? ORDER BY id "
                                  "LIMIT 1000", [after])
                if not page:
                    break
                for r in page:
                    cut, over = r["id"], over - r["size"]
                    if over <= 0:
                        break
                after = page[-1]["id"]
            if cut is not None:
                gone += self._exec("DELETE FROM captured WHERE id <= ?", [cut]).rowcount
            return gone
