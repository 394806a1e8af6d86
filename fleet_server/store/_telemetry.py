"""Store tables of what devices send: summaries, rollups, reports, dead letters, counters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.contract.messages import BundleRef
from fleet_server.models import FLEET_SCOPE, DeadLetter, ReportRecord, SummaryRecord
from fleet_server.store._base import StoreBase, chunks, dumps, loads
from fleet_server.store._fleet import selector_sql

PENDING, FOLDED, REFUSED = 0, 1, 2

RollupKey = tuple[int, int, int, str]  # bundle id, width, bucket, scope

# A group's own rollups are stored under the scope ``group:<name>``: a device id cannot hold
# ":" (messages.DEVICE_RE), so a group's scope never meets a device's, and the readers of
# device rollups leave these out.
GROUP_PREFIX = "group:"
_NOT_GROUP = "scope NOT LIKE ?"  # with the parameter GROUP_PREFIX + "%"


def group_scope(name: str) -> str:
    """The rollup scope of a group's own rollups."""
    return GROUP_PREFIX + name


def device_scopes_sql(table: str, spans: int) -> str:
    """The device scopes of ``table`` (rollups or performance_rollups) of one bundle and
    width with a row in any of ``spans`` bucket ranges. Parameters: bundle id and width
    twice, fleet scope, group pattern, then per span bundle id, width, lo, hi.

    A skip scan over the ``(bundle_id, width, scope, bucket)`` index: one probe per
    distinct scope, then one per scope and span, so counting the devices of 30 days does
    not read 30 days of device rows (720 per device at hours)."""
    probe = (f"EXISTS (SELECT 1 FROM {table} r WHERE r.bundle_id = ? AND r.width = ? AND "
             "r.scope = s.scope AND r.bucket >= ? AND r.bucket < ?)")
    return (f"WITH RECURSIVE s(scope) AS (SELECT MIN(scope) FROM {table} WHERE "
            "bundle_id = ? AND width = ? UNION ALL SELECT (SELECT MIN(scope) FROM "
            f"{table} WHERE bundle_id = ? AND width = ? AND scope > s.scope) FROM s "
            "WHERE s.scope IS NOT NULL) SELECT scope FROM s WHERE scope IS NOT NULL AND "
            f"scope != ? AND {_NOT_GROUP} AND ({' OR '.join([probe] * spans)})")


@dataclass(frozen=True)
class SummaryRow:
    """One summary as the ingest worker stores it: the message as received (``profile``,
    kept for a bundle that is not known yet and for export) and, once checked against its
    bundle's reference, the packed profile (``packed``) everything downstream reads."""

    device: str
    seq: int
    bundle_name: str
    bundle_version: str
    reference_hash: str
    window_start: float
    window_end: float
    rows: int
    received: float
    latency: tuple[int, ...]
    errors: dict[str, int]
    shadow: dict[str, Any] | None
    dropped: int
    profile: bytes
    folded: int
    packed: bytes | None = None


@dataclass(frozen=True)
class PendingSummary:
    id: int
    device: str
    window_start: float
    window_end: float
    reference_hash: str
    profile: bytes


_SUMMARY_COLUMNS = ("device", "seq", "bundle_name", "bundle_version", "reference_hash",
                    "window_start", "window_end", "rows", "received", "latency", "errors",
                    "shadow", "dropped", "profile", "folded", "packed")


class TelemetryTables(StoreBase):
    # -- summaries -----------------------------------------------------------------------

    def insert_summary(self, s: SummaryRow) -> bool:
        """Store a summary unless (device, seq) is stored; True if this call stored it."""
        self._summary_days([s.window_end])
        cur = self._exec(
            "INSERT INTO summaries (device, seq, bundle_name, bundle_version, "
            "reference_hash, window_start, window_end, rows, received, latency, errors, "
            "shadow, dropped, profile, folded, packed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
            "?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [s.device, s.seq, s.bundle_name, s.bundle_version, s.reference_hash,
             s.window_start, s.window_end, s.rows, s.received, dumps(list(s.latency)),
             dumps(s.errors), None if s.shadow is None else dumps(s.shadow), s.dropped,
             s.profile, s.folded, s.packed])
        return cur.rowcount == 1

    def insert_summaries(self, rows: Sequence[SummaryRow]) -> list[bool]:
        """Store many summaries, each unless its (device, seq) is stored or repeated earlier
        in ``rows``; which ones this call stored. Call inside :meth:`transaction` (the
        existence check and the inserts must see the same table)."""
        if not rows:
            return []
        keys = sorted({(r.device, r.seq) for r in rows})
        stored = self._existing("summaries", ("device", "seq"), ("text", "bigint"), keys)
        fresh, out = [], []
        for s in rows:
            key = (s.device, s.seq)
            if key in stored:
                out.append(False)
                continue
            stored.add(key)
            out.append(True)
            fresh.append([s.device, s.seq, s.bundle_name, s.bundle_version, s.reference_hash,
                          s.window_start, s.window_end, s.rows, s.received,
                          dumps(list(s.latency)), dumps(s.errors),
                          None if s.shadow is None else dumps(s.shadow), s.dropped,
                          s.profile, s.folded, s.packed])
        self._copy_in("summaries", _SUMMARY_COLUMNS, fresh)
        return out

    def pending_summaries(self, name: str, version: str, limit: int = 1000,
                          after_id: int = 0) -> list[PendingSummary]:
        rows = self._rows(
            "SELECT id, device, window_start, window_end, reference_hash, profile "
            "FROM summaries WHERE bundle_name = ? AND bundle_version = ? AND folded = 0 "
            "AND id > ? ORDER BY id LIMIT ?", [name, version, after_id, limit])
        return [PendingSummary(r["id"], r["device"], r["window_start"], r["window_end"],
                               r["reference_hash"], r["profile"]) for r in rows]

    def pending_bundles(self) -> list[tuple[str, str]]:
        """(name, version) of every bundle some summary is waiting for."""
        return [(r["bundle_name"], r["bundle_version"]) for r in self._rows(
            "SELECT DISTINCT bundle_name, bundle_version FROM summaries WHERE folded = 0")]

    def mark_summaries(self, ids: Sequence[int], state: int) -> None:
        self._many("UPDATE summaries SET folded = ? WHERE id = ?", [(state, i) for i in ids])

    def fold_summaries(self, packed: Mapping[int, bytes]) -> None:
        """Mark these pending summaries folded, keeping each one's packed profile."""
        self._many("UPDATE summaries SET folded = ?, packed = ? WHERE id = ?",
                   [(FOLDED, blob, i) for i, blob in packed.items()])

    def count_summaries(self, *, folded: int | None = None) -> int:
        if folded is None:
            row = self._one("SELECT COUNT(*) AS n FROM summaries")
        else:
            row = self._one("SELECT COUNT(*) AS n FROM summaries WHERE folded = ?", [folded])
        return int(row["n"]) if row else 0

    def list_summaries(self, *, device: str | None = None, bundle: tuple[str, str] | None = None,
                       since: float | None = None, until: float | None = None,
                       limit: int = 100, offset: int = 0) -> list[SummaryRecord]:
        where, params = [], []
        if device is not None:
            where.append("device = ?")
            params.append(device)
        if bundle is not None:
            where += ["bundle_name = ?", "bundle_version = ?"]
            params += list(bundle)
        if since is not None:
            where.append("window_end >= ?")
            params.append(since)
        if until is not None:
            where.append("window_end < ?")
            params.append(until)
        sql = ("SELECT device, seq, bundle_name, bundle_version, reference_hash, window_start,"
               " window_end, rows, received, folded, errors, latency, shadow, dropped "
               "FROM summaries")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY window_end DESC, device, seq LIMIT ? OFFSET ?"
        return [SummaryRecord(r["device"], r["seq"], f"{r['bundle_name']}@{r['bundle_version']}",
                              r["reference_hash"], r["window_start"], r["window_end"], r["rows"],
                              r["received"], r["folded"] == FOLDED, loads(r["errors"], {}),
                              tuple(loads(r["latency"], [])), loads(r["shadow"]), r["dropped"])
                for r in self._rows(sql, [*params, limit, offset])]

    def prune_summaries(self, before: float) -> int:
        """Delete the summaries whose window ended before ``before``; how many. On
        PostgreSQL whole days go by dropping their partitions."""
        with self.transaction():
            dropped = self.engine.drop_summaries_before(self._db(), before)
            return dropped + self._exec("DELETE FROM summaries WHERE window_end < ?",
                                        [before]).rowcount

    # -- rollups -------------------------------------------------------------------------

    def load_rollups(self, keys: Sequence[RollupKey]) -> dict[RollupKey, bytes]:
        out: dict[RollupKey, bytes] = {}
        for part in chunks(list(keys), 200):
            values = ",".join(["(?, ?, ?, ?)"] * len(part))
            params = [x for key in part for x in key]
            cur = self._exec(
                "SELECT bundle_id, width, bucket, scope, data FROM rollups WHERE "
                f"(bundle_id, width, bucket, scope) IN (VALUES {values})", params)
            for b, w, k, s, data in cur.fetchall():
                out[(b, w, k, s)] = data
        return out

    def save_rollups(self, rows: Sequence[tuple[RollupKey, int, int, bytes]]) -> None:
        """Write merged rollups: ``(key, rows, summaries, data)``; replaces what is there."""
        self._many(
            "INSERT INTO rollups (bundle_id, width, bucket, scope, rows, summaries, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bundle_id, width, bucket, scope) DO "
            "UPDATE SET rows = excluded.rows, summaries = excluded.summaries, "
            "data = excluded.data",
            [(*key, n_rows, n_summaries, data) for key, n_rows, n_summaries, data in rows])

    def read_rollups(self, bundle_id: int, width: int, lo: int, hi: int, *,
                     scope: str | None = None, selector: Mapping[str, str] | None = None
                     ) -> list[tuple[str, int, bytes]]:
        """``(scope, bucket, data)`` of buckets ``lo <= bucket < hi`` of one level.

        ``scope`` picks one scope (a device, or :data:`FLEET_SCOPE`); else ``selector``
        picks the devices whose labels match (every device for an empty one).
        """
        sql = ("SELECT scope, bucket, data FROM rollups WHERE bundle_id = ? AND width = ? "
               "AND bucket >= ? AND bucket < ?")
        params: list[Any] = [bundle_id, width, lo, hi]
        if scope is not None:
            sql += " AND scope = ?"
            params.append(scope)
        elif selector:
            sub, sub_params = selector_sql(selector)
            sql += f" AND scope IN ({sub})"
            params += sub_params
        else:
            sql += f" AND scope != ? AND {_NOT_GROUP}"
            params += [FLEET_SCOPE, GROUP_PREFIX + "%"]
        return [(s, b, d) for s, b, d in self._exec(sql, params).fetchall()]

    def count_rollup_scopes(self, bundle_id: int, tiles: Sequence[tuple[int, int, int]]
                            ) -> int:
        """Distinct devices with a rollup in any of ``(width, lo, hi)``."""
        return len(self.device_scopes("rollups", bundle_id, tiles))

    def device_scopes(self, table: str, bundle_id: int, tiles: Sequence[tuple[int, int, int]]
                      ) -> set[str]:
        """The devices with a row of ``table`` in any of ``(width, lo, hi)``."""
        by_width: dict[int, list[tuple[int, int]]] = {}
        for w, lo, hi in tiles:
            by_width.setdefault(w, []).append((lo, hi))
        out: set[str] = set()
        for w, spans in by_width.items():
            params = [bundle_id, w, bundle_id, w, FLEET_SCOPE, GROUP_PREFIX + "%",
                      *(x for lo, hi in spans for x in (bundle_id, w, lo, hi))]
            out.update(r[0] for r in self._exec(device_scopes_sql(table, len(spans)),
                                                params).fetchall())
        return out

    def count_member_scopes(self, bundle_id: int, tiles: Sequence[tuple[int, int, int]],
                            selector: Mapping[str, str], table: str = "rollups") -> int:
        """The devices a ``selector`` matches now with a row of ``table`` (rollups or
        performance_rollups) in any of ``(width, lo, hi)``: one index probe per member,
        not a scan of every device's rows in the range (a group's report over 30 days has
        720 of them per member)."""
        if not tiles:
            return 0
        sub, sub_params = selector_sql(selector)
        probe = (f"EXISTS (SELECT 1 FROM {table} WHERE bundle_id = ? AND width = ? AND "
                 "scope = m.id AND bucket >= ? AND bucket < ?)")
        params = [*sub_params, *(x for w, lo, hi in tiles for x in (bundle_id, w, lo, hi))]
        row = self._exec(f"SELECT COUNT(*) FROM ({sub}) AS m WHERE "
                         + " OR ".join([probe] * len(tiles)), params).fetchone()
        return int(row[0])

    # -- groups' own rollups ---------------------------------------------------------------

    def device_labels(self, devices: Sequence[str]) -> dict[str, dict[str, str]]:
        """The effective labels of ``devices`` (those stored)."""
        out: dict[str, dict[str, str]] = {}
        for part in chunks(sorted(set(devices)), 500):
            marks = ",".join("?" * len(part))
            for r in self._rows(f"SELECT id, labels FROM devices WHERE id IN ({marks})", part):
                out[r["id"]] = loads(r["labels"], {})
        return out

    def group_rollup_starts(self) -> dict[str, tuple[float, int]]:
        """``{group: (its creation time, first bucket of its own rollups)}``."""
        return {r["group_name"]: (r["created"], int(r["start"])) for r in self._rows(
            "SELECT group_name, created, start FROM group_rollup_starts")}

    def group_rollups_from(self, name: str, created: float) -> int | None:
        """The first bucket (of every level) from which the group of that name and creation
        time has complete rollups of its own; None: none yet."""
        row = self._one("SELECT created, start FROM group_rollup_starts WHERE group_name = ?",
                        [name])
        return None if row is None or row["created"] != created else int(row["start"])

    def set_group_rollup_starts(self, rows: Sequence[tuple[str, float, int]]) -> None:
        """Record ``(group, created, start)``: a group (re)created starts anew."""
        self._many("INSERT INTO group_rollup_starts (group_name, created, start) VALUES "
                   "(?, ?, ?) ON CONFLICT (group_name) DO UPDATE SET created = "
                   "excluded.created, start = excluded.start", rows)

    def rollup_buckets(self, bundle_id: int, width: int, lo: int, hi: int,
                       scope: str = FLEET_SCOPE) -> list[int]:
        return [r[0] for r in self._exec(
            "SELECT bucket FROM rollups WHERE bundle_id = ? AND width = ? AND scope = ? AND "
            "bucket >= ? AND bucket < ? ORDER BY bucket", [bundle_id, width, scope, lo, hi])]

    def rollup_span(self, bundle_id: int, width: int) -> tuple[int, int] | None:
        row = self._exec("SELECT MIN(bucket), MAX(bucket) FROM rollups WHERE bundle_id = ? "
                         "AND width = ? AND scope = ?", [bundle_id, width, FLEET_SCOPE]).fetchone()
        return None if row is None or row[0] is None else (int(row[0]), int(row[1]))

    def bundles_with_rollups(self, width: int, lo: int, hi: int) -> list[int]:
        return [r[0] for r in self._exec(
            "SELECT DISTINCT bundle_id FROM rollups WHERE width = ? AND scope = ? AND "
            "bucket >= ? AND bucket < ? ORDER BY 1", [width, FLEET_SCOPE, lo, hi])]

    def prune_rollups(self, width: int, before: int) -> int:
        with self.transaction():
            return self._exec("DELETE FROM rollups WHERE width = ? AND bucket < ?",
                              [width, before]).rowcount

    # -- reports -------------------------------------------------------------------------

    def insert_report(self, r: ReportRecord) -> bool:
        cur = self._exec(
            "INSERT INTO reports (device, seq, revision, outcome, bundle, reason, "
            "time, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [r.device, r.seq, r.revision, r.outcome, dumps(r.bundle.to_dict()), r.reason,
             r.time, r.received])
        return cur.rowcount == 1

    def list_reports(self, device: str | None = None, *, limit: int = 20,
                     revision: int | None = None) -> list[ReportRecord]:
        where, params = [], []
        if device is not None:
            where.append("device = ?")
            params.append(device)
        if revision is not None:
            where.append("revision = ?")
            params.append(revision)
        sql = "SELECT * FROM reports" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._rows(sql + " ORDER BY received DESC, id DESC LIMIT ?", [*params, limit])
        return [ReportRecord(r["device"], r["seq"], r["revision"], r["outcome"],
                             BundleRef(**loads(r["bundle"])), r["reason"], r["time"],
                             r["received"]) for r in rows]

    # -- delivery acknowledgements ---------------------------------------------------------

    def advance_acks(self, seen: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
        """Move the acknowledgement of each ``(device, stream)`` in ``seen`` (mapped to the
        highest ``floor`` its messages carried) as far as the stored (or settled) rows
        allow, and return
        every stream's acknowledgement of those devices. Call inside :meth:`transaction`,
        after the batch's rows are inserted.

        The acknowledgement is the highest ``n`` such that each sequence ``1..n`` is stored
        or below a floor the device declared (gone for good on the device): it never
        passes a sequence that may still arrive.
        """
        tables = {"summary": "summaries", "report": "reports"}
        devices = sorted({d for d, _ in seen})
        state: dict[tuple[str, str], tuple[int, int]] = {}
        for part in chunks(devices, 500):
            marks = ", ".join("?" * len(part))
            for r in self._rows(f"SELECT device, stream, acked, floor FROM acks "
                                f"WHERE device IN ({marks})", part):
                state[(r["device"], r["stream"])] = (r["acked"], r["floor"])
        changed = []
        for (device, stream), floor in sorted(seen.items()):
            table = tables[stream]  # the caller passes messages.ACK_STREAMS only
            acked, old_floor = state.get((device, stream), (0, 0))
            floor = max(floor, old_floor)
            acked = max(acked, floor - 1)
            while True:
                seqs = [r["seq"] for r in self._rows(
                    f"SELECT seq FROM {table} WHERE device = ? AND seq > ? UNION "
                    "SELECT seq FROM settled WHERE device = ? AND stream = ? AND seq > ? "
                    "ORDER BY seq LIMIT 500", [device, acked, device, stream, acked])]
                for seq in seqs:
                    if seq != acked + 1:
                        break
                    acked = seq
                else:
                    if len(seqs) == 500:
                        continue
                break
            if state.get((device, stream)) != (acked, floor):
                state[(device, stream)] = (acked, floor)
                changed.append((device, stream, acked, floor))
        self._many("INSERT INTO acks (device, stream, acked, floor) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (device, stream) DO UPDATE SET acked = excluded.acked, "
                   "floor = excluded.floor", changed)
        self._many("DELETE FROM settled WHERE device = ? AND stream = ? AND seq <= ?",
                   [(d, st, a) for d, st, a, _ in changed])
        out: dict[str, dict[str, int]] = {d: {} for d in devices}
        for (device, stream), (acked, _) in state.items():
            out[device][stream] = acked
        return out

    def add_settled(self, rows: Sequence[tuple[str, str, int]]) -> None:
        """Record ``(device, stream, seq)`` refused for good: the acknowledgement may pass
        them (a device would otherwise send them again forever)."""
        self._many("INSERT INTO settled (device, stream, seq) VALUES (?, ?, ?) "
                   "ON CONFLICT DO NOTHING", rows)

    def acks(self, device: str | None = None) -> dict[str, dict[str, int]]:
        """``{device: {stream: acknowledged sequence}}``, of one device or of all."""
        sql, params = "SELECT device, stream, acked FROM acks", []
        if device is not None:
            sql, params = sql + " WHERE device = ?", [device]
        out: dict[str, dict[str, int]] = {} if device is None else {device: {}}
        for r in self._rows(sql, params):
            out.setdefault(r["device"], {})[r["stream"]] = r["acked"]
        return out

    # -- dead letters and counters -------------------------------------------------------

    def add_dead_letters(self, rows: Sequence[tuple[float, str, str, str, str, int, bytes]]
                         ) -> None:
        """``(received, topic, device, error, reason, size, payload prefix)`` each."""
        self._many("INSERT INTO dead_letters (received, topic, device, error, reason, size, "
                   "payload) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def list_dead_letters(self, *, limit: int = 100, offset: int = 0,
                          device: str | None = None) -> list[DeadLetter]:
        sql, params = "SELECT * FROM dead_letters", []
        if device is not None:
            sql += " WHERE device = ?"
            params.append(device)
        rows = self._rows(sql + " ORDER BY id DESC LIMIT ? OFFSET ?", [*params, limit, offset])
        return [DeadLetter(r["id"], r["received"], r["topic"], r["device"], r["error"],
                           r["reason"], r["size"], r["payload"]) for r in rows]

    def count_dead_letters(self) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM dead_letters")
        return int(row["n"]) if row else 0

    def prune_dead_letters(self, keep: int) -> int:
        with self.transaction():
            return self._exec("DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM "
                              "dead_letters) - ?", [keep]).rowcount

    def add_counters(self, deltas: Mapping[str, int]) -> None:
        self._many("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
                   "DO UPDATE SET value = counters.value + excluded.value",
                   [(k, v) for k, v in sorted(deltas.items()) if v])

    def counters(self) -> dict[str, int]:
        return {r["name"]: r["value"] for r in self._rows("SELECT name, value FROM counters")}
