"""Store table of performance entries: a summary's realized and estimated blocks per bundle.

A row is one entry of one summary (``(device, seq, bundle)`` is its key), attributed to the
entry's bundle, in the wire form ingest checked against that bundle's spec. Readers get
them back as :class:`PerformanceRow` values and merge them (the merging rules are the
contract's, :mod:`edgefleet.contract.performance`); this module neither parses nor merges.

``performance_rollups`` holds, per bundle, width (an hour, a day), bucket and scope (a
device, a group as ``group:<name>``, the fleet as ``*``), the sum of the entries whose
window's middle falls in the bucket, as ingest added them (:class:`PerformanceRollup`): a
report over 30 days reads 30 of them per scope, not every entry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - the server installs it
    orjson = None

from edgefleet.contract.messages import MAX_PAYLOAD
from edgefleet.contract.wire import parse_json
from fleet_server.store._base import StoreBase, chunks, dumps
from fleet_server.store._fleet import selector_sql
from fleet_server.store._telemetry import FLEET_SCOPE, GROUP_PREFIX

__all__ = ["PerformanceRollup", "PerformanceRow", "PerformanceTables"]

_COLUMNS = ("device", "seq", "bundle_id", "window_start", "window_end", "labelled", "served",
            "realized", "estimated")


@dataclass(frozen=True)
class PerformanceRow:
    """One stored entry: ``realized`` and ``estimated`` are wire dicts (None: absent)."""

    device: str
    seq: int
    bundle_id: int
    window_start: float
    window_end: float
    labelled: int  # rows of the realized block (labelled predictions)
    served: int  # rows of the estimated block (every served prediction)
    realized: dict[str, Any] | None
    estimated: dict[str, Any] | None

    @property
    def middle(self) -> float:
        return (self.window_start + self.window_end) / 2


PerformanceKey = tuple[int, int, int, str]  # bundle id, width, bucket, scope


@dataclass(frozen=True)
class PerformanceRollup:
    """The sum of the entries of one bundle, scope and bucket (an entry counts in the
    bucket holding the middle of its window): ``realized`` and ``estimated`` are the added
    wire dicts (None: no entry had that block)."""

    scope: str
    bucket: int
    entries: int
    labelled: int
    served: int
    devices: int  # devices with entries in the bucket (1 for a device's own rollup)
    realized: dict[str, Any] | None
    estimated: dict[str, Any] | None


def _rollup(r: Mapping[str, Any]) -> PerformanceRollup:
    return PerformanceRollup(r["scope"], int(r["bucket"]), r["entries"], r["labelled"],
                             r["served"], r["devices"], _block(r["realized"]),
                             _block(r["estimated"]))


def _dump(block: dict[str, Any]) -> str:
    # orjson where installed (the server): ingest writes a block per entry and per rollup
    # it adds to, and the standard library's encoder was a third of that time
    if orjson is None:
        return dumps(block)
    return orjson.dumps(block, option=orjson.OPT_SORT_KEYS).decode()


def _block(text: str | None) -> dict[str, Any] | None:
    # orjson where installed (the server): a report reads thousands of blocks of some
    # hundred numbers each, and the standard library took most of its time
    if text is None:
        return None
    return parse_json(text.encode(), what="a stored performance block",
                      max_bytes=MAX_PAYLOAD, fast=True)


def _row(r: Mapping[str, Any]) -> PerformanceRow:
    return PerformanceRow(r["device"], r["seq"], r["bundle_id"], r["window_start"],
                          r["window_end"], r["labelled"], r["served"], _block(r["realized"]),
                          _block(r["estimated"]))


class PerformanceTables(StoreBase):
    def insert_performance(self, rows: Sequence[PerformanceRow]) -> None:
        """Store entries, each unless its (device, seq, bundle) is stored. Call inside the
        transaction that stores their summaries (only a new summary's entries are new)."""
        self._many(
            "INSERT INTO performance (device, seq, bundle_id, window_start, window_end, "
            "labelled, served, realized, estimated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [[r.device, r.seq, r.bundle_id, r.window_start, r.window_end, r.labelled,
              r.served, None if r.realized is None else _dump(r.realized),
              None if r.estimated is None else _dump(r.estimated)] for r in rows])

    def count_performance(self) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM performance")
        return int(row["n"]) if row else 0

    def read_performance(self, bundle_id: int, lo: float, hi: float, *,
                         device: str | None = None, selector: Mapping[str, str] | None = None,
                         limit: int = 100_000) -> list[PerformanceRow]:
        """Entries of a bundle whose window overlaps ``[lo, hi)``, oldest first, at most
        ``limit``: of one ``device``, of the devices a ``selector`` matches, or of all."""
        sql = ("SELECT * FROM performance WHERE bundle_id = ? AND window_end > ? AND "
               "window_start < ?")
        params: list[Any] = [bundle_id, lo, hi]
        if device is not None:
            sql += " AND device = ?"
            params.append(device)
        elif selector:
            sub, sub_params = selector_sql(selector)
            sql += f" AND device IN ({sub})"
            params += sub_params
        rows = self._rows(sql + " ORDER BY window_end, id LIMIT ?", [*params, limit])
        return [_row(r) for r in rows]

    def device_performance(self, devices: Sequence[str], since: float, *,
                           limit: int = 20_000) -> list[tuple[str, str, PerformanceRow]]:
        """``(name, version, entry)`` of every entry of ``devices`` whose window ends after
        ``since``, newest first, at most ``limit`` (the rollout gates' read)."""
        out: list[tuple[str, str, PerformanceRow]] = []
        for part in chunks(sorted(set(devices)), 500):
            marks = ",".join("?" * len(part))
            rows = self._rows(
                "SELECT p.*, b.name AS bundle_name, b.version AS bundle_version "
                "FROM performance p JOIN bundles b ON b.id = p.bundle_id "
                f"WHERE p.window_end > ? AND p.device IN ({marks}) "
                "ORDER BY p.window_end DESC LIMIT ?", [since, *part, limit - len(out)])
            out += [(r["bundle_name"], r["bundle_version"], _row(r)) for r in rows]
            if len(out) >= limit:
                break
        return out

    def performance_bundles(self, lo: float, hi: float) -> list[int]:
        """Ids of the bundles with entries whose window ends in ``(lo, hi]``."""
        return [int(r["bundle_id"]) for r in self._rows(
            "SELECT DISTINCT bundle_id FROM performance WHERE window_end > ? AND "
            "window_end <= ? ORDER BY bundle_id", [lo, hi])]

    def prune_performance(self, before: float) -> int:
        """Delete entries whose window ended before ``before``; how many."""
        with self.transaction():
            return self._exec("DELETE FROM performance WHERE window_end < ?",
                              [before]).rowcount

    # -- rollups -------------------------------------------------------------------------

    def load_performance_rollups(self, keys: Sequence[PerformanceKey]
                                 ) -> dict[PerformanceKey, PerformanceRollup]:
        out: dict[PerformanceKey, PerformanceRollup] = {}
        for part in chunks(list(keys), 200):
            values = ",".join(["(?, ?, ?, ?)"] * len(part))
            for r in self._rows(
                    "SELECT * FROM performance_rollups WHERE (bundle_id, width, bucket, scope) "
                    f"IN (VALUES {values})", [x for key in part for x in key]):
                out[(r["bundle_id"], r["width"], int(r["bucket"]), r["scope"])] = _rollup(r)
        return out

    def save_performance_rollups(self, rows: Sequence[tuple[PerformanceKey,
                                                            PerformanceRollup]]) -> None:
        """Write summed rollups; each replaces what is stored under its key."""
        self._many(
            "INSERT INTO performance_rollups (bundle_id, width, bucket, scope, entries, "
            "labelled, served, devices, realized, estimated) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bundle_id, width, bucket, scope) "
            "DO UPDATE SET entries = excluded.entries, labelled = excluded.labelled, "
            "served = excluded.served, devices = excluded.devices, "
            "realized = excluded.realized, estimated = excluded.estimated",
            [(*key, r.entries, r.labelled, r.served, r.devices,
              None if r.realized is None else _dump(r.realized),
              None if r.estimated is None else _dump(r.estimated)) for key, r in rows])

    @staticmethod
    def _scope_sql(scope: str | None, selector: Mapping[str, str] | None
                   ) -> tuple[str, list[Any]]:
        """``scope``: one scope; else the devices ``selector`` matches, or every device."""
        if scope is not None:
            return " AND scope = ?", [scope]
        if selector:
            sub, params = selector_sql(selector)
            return f" AND scope IN ({sub})", params
        return " AND scope != ? AND scope NOT LIKE ?", [FLEET_SCOPE, GROUP_PREFIX + "%"]

    def read_performance_rollups(self, bundle_id: int, width: int, lo: int, hi: int, *,
                                 scope: str | None = None,
                                 selector: Mapping[str, str] | None = None
                                 ) -> list[PerformanceRollup]:
        """Rollups of buckets ``lo <= bucket < hi`` of one width, by bucket: of one
        ``scope``, else of the devices a ``selector`` matches (every device for none)."""
        where, params = self._scope_sql(scope, selector)
        return [_rollup(r) for r in self._rows(
            "SELECT * FROM performance_rollups WHERE bundle_id = ? AND width = ? AND "
            f"bucket >= ? AND bucket < ?{where} ORDER BY bucket, scope",
            [bundle_id, width, lo, hi, *params])]

    def performance_devices(self, bundle_id: int, width: int, lo: int, hi: int, *,
                            selector: Mapping[str, str] | None = None) -> int:
        """Devices with entries in buckets ``lo <= bucket < hi`` of one width: of those a
        ``selector`` matches now, or of all (a skip scan: one probe per device, not one
        row per device and bucket)."""
        if selector:
            return self.count_member_scopes(bundle_id, [(width, lo, hi)], selector,
                                            table="performance_rollups")
        return len(self.device_scopes("performance_rollups", bundle_id, [(width, lo, hi)]))

    def performance_rollup_bundles(self, width: int, lo: int, hi: int) -> list[int]:
        return [int(r["bundle_id"]) for r in self._rows(
            "SELECT DISTINCT bundle_id FROM performance_rollups WHERE width = ? AND scope = ? "
            "AND bucket >= ? AND bucket < ? ORDER BY bundle_id", [width, FLEET_SCOPE, lo, hi])]

    def prune_performance_rollups(self, width: int, before: int) -> int:
        """Delete the rollups of one width whose bucket starts before ``before``."""
        with self.transaction():
            return self._exec("DELETE FROM performance_rollups WHERE width = ? AND "
                              "bucket < ?", [width, before]).rowcount
