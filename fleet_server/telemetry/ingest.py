"""Ingest: validate device messages, store them once, fold summaries into rollups.

:meth:`Ingestor.process` takes a batch of received messages and writes it in one
transaction:

- every message is decoded with :func:`edgefleet.contract.messages.decode` (topic, size, JSON,
  schema, fields, device in topic = device in body); a summary's profile is then checked
  against its bundle's reference with ``from_wire``'s rules
  (:meth:`fleet_server.profiles.rollups.Layout.pack_wire`). Anything
  refused goes to the dead-letter table with the exception's class and message and is
  counted; nothing a device sends can stop the worker;
- summaries and reports are stored once per (device, sequence): a repeat (the outbox
  re-sends after a lost PUBACK) is counted as a duplicate and changes nothing;
- a new summary of a known bundle is packed into that bundle's rollup layout and merged
  into the rollups of its device, of each group its device belongs to when it is stored
  (or folded), and of the whole fleet, at every level, in its bucket (the bucket holding
  the middle of its window). A device that changes group later leaves its past windows in
  the rollups of the group it reported under, as a report over time should; a group's
  rollups start at a bucket boundary after it is first seen (:meth:`Ingestor._group_scopes`).
  A summary whose bundle is not uploaded yet is stored *pending* and folded in when the
  bundle arrives (:meth:`fold_pending`).
  Folding happens inside the transaction that marks a summary folded, so no summary is
  ever counted twice, even with several workers and an upload racing them;
- status, heartbeat and every valid message keep the device registry: online/offline,
  agent version, bundle, reported labels, health, last seen (retained messages, which
  the broker replays at subscribe time, do not count as seen).

Outcome receipts (:class:`~edgefleet.contract.messages.Receipt`) move the device's receipt in
the outcomes queue (:meth:`Store.record_outcome_receipts`); a receipt naming a batch never
sent is ignored, logged and counted (``outcomes.receipt_ignored``). An ``online`` status
makes the device's unreceipted batches due again. Both wake the outcome router of this
process (``on_outcomes``, called after the commit).

A new summary's performance entries (:attr:`Summary.performance`, one per bundle that
answered rows of its window or whose predictions got labels in it) are stored per
(device, seq, bundle), and added into the performance rollups of its device, groups and
the fleet by hour and by day (:meth:`Ingestor._fold_performance`), attributed to the
entry's bundle, not the summary's: each block is read with that bundle's spec (from its
stored manifest, :meth:`Bundles.performance`), so its numbers are checked once, here. An
entry for a bundle the server does not hold, or whose blocks do not read, goes to the dead
letters on its own (topic, the entry as its payload); the summary and its other entries
are stored.

A summary ending more than ``max_clock_skew_s`` in the future is refused: its device's
clock is wrong, and its window would land in buckets no report asks for.

End-to-end acknowledgement: in the same transaction, for every device with a summary or
report in the batch (stored, duplicate or refused for good), the highest sequence up to
which its stream is stored or settled advances (:meth:`Store.advance_acks`; a device's
``floor`` lets it pass the gaps its outbox's counted drops leave, and a message refused
after decoding, e.g. for clock skew, is settled so that the device stops sending it). A
message that cannot even be decoded names no sequence: it holds its device's
acknowledgement until the device's outbox drops it (its bound; counted there).

:class:`IngestWorker` is the thread around it: drain the link, process, ack after the
commit, then publish each such device's :class:`~edgefleet.contract.messages.Ack` (retained, QoS
1, on the device's own ``ack`` topic): only then may the device forget the messages. On
every (re)connection it publishes every device's acknowledgement again from the store,
so a restarted server (or a broker that lost its retained messages) tells devices what
it holds. If the store fails (disk full, locked past the timeout) the batch is retried
with back-off and not acknowledged, so the broker holds further messages.

This module does not connect to the broker (:mod:`fleet_server.telemetry.link`) or judge drift.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.messages import (
    ACK_STREAMS,
    Ack,
    Heartbeat,
    Message,
    Receipt,
    Report,
    Status,
    Summary,
    decode,
    encode,
    topic,
)
from edgefleet.errors import EdgefleetError
from fleet_server.config import DEFAULT_INGEST, IngestConfig
from fleet_server.errors import StoreError
from fleet_server.metrics import Metrics
from fleet_server.models import BundleRecord, ReportRecord
from fleet_server.profiles.performance import ROLLUP_WIDTHS, add_blocks, entry_bytes, read_entry
from fleet_server.profiles.rollups import Packed
from fleet_server.registry.bundles import Bundles, Reference
from fleet_server.store import (
    FLEET_SCOPE,
    FOLDED,
    PENDING,
    REFUSED,
    PerformanceKey,
    PerformanceRollup,
    PerformanceRow,
    RollupKey,
    Store,
    SummaryRow,
    group_scope,
)
from fleet_server.telemetry.link import Incoming, ServerLink

__all__ = ["BatchResult", "IngestWorker", "Ingestor"]

log = logging.getLogger(__name__)
_RETRY_S = (0.5, 1.0, 2.0, 5.0)


@dataclass
class BatchResult:
    stored: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    duplicates: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    dead: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    pending: int = 0
    lags: list[float] = field(default_factory=list)
    # device -> {stream: acknowledged seq}, for every device with a numbered message here
    acks: dict[str, dict[str, int]] = field(default_factory=dict)
    # devices whose outcome receipt moved or that came online: the router looks at them
    outcome_devices: set[str] = field(default_factory=set)

    @property
    def dead_total(self) -> int:
        return sum(self.dead.values())


@dataclass
class _Dead:
    received: float
    topic: str
    error: str
    reason: str
    payload: bytes
    settles: tuple[str, int] | None = None  # (stream, seq) this refusal settles for good

    @property
    def device(self) -> str:
        parts = self.topic.split("/")
        return parts[2][:64] if len(parts) > 2 else ""


_INT64 = 2**63 - 1


def _check_integers(msg: Message) -> None:
    """Integers that go into INTEGER columns must fit SQLite's 64 bits (the message schema
    bounds them below only).

    Raises:
        SchemaError: naming the field.
    """
    if isinstance(msg, Summary):
        fields = {"seq": msg.seq, "profile.rows": msg.rows, "dropped": msg.dropped}
    elif isinstance(msg, Report):
        fields = {"seq": msg.seq, "revision": msg.revision}
    else:
        return
    for name, value in fields.items():
        if value > _INT64:
            raise SchemaError(f"{msg.kind}.{name}: {value} does not fit 64 bits",
                              field=f"{msg.kind}.{name}")


def _settles(msg: Message | None) -> tuple[str, int] | None:
    """The (stream, seq) a refusal of a decoded message settles, if it is numbered and its
    number fits the store."""
    if isinstance(msg, (Summary, Report)) and msg.kind in ACK_STREAMS and msg.seq <= _INT64:
        return msg.kind, msg.seq
    return None


class Ingestor:
    """The ingest rules over batches; thread-safe (each call is its own transaction)."""

    def __init__(self, store: Store, bundles: Bundles, config: IngestConfig = DEFAULT_INGEST,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time
                 ) -> None:
        self.store = store
        self.bundles = bundles
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self._known: dict[tuple[str, str], int] = {}  # bundles are never deleted
        # called after a commit with BatchResult.outcome_devices (the router's kick)
        self.on_outcomes: Callable[[set[str]], None] | None = None

    # -- one batch -----------------------------------------------------------------------

    def process(self, batch: Sequence[Incoming], now: float | None = None) -> BatchResult:
        """Validate and store a batch in one transaction.

        Raises:
            StoreError: the database failed; nothing of the batch was stored.
        """
        now = self.clock() if now is None else now
        result = BatchResult()
        dead: list[_Dead] = []
        decoded: list[tuple[Incoming, Message]] = []
        for item in batch:
            msg = None
            try:
                msg = decode(item.topic, item.payload)
                if isinstance(msg, Summary) and \
                        msg.window_end > now + self.config.max_clock_skew_s:
                    raise SchemaError(f"summary.window_end: {msg.window_end:.0f} is more than "
                                      f"{self.config.max_clock_skew_s:.0f} s in the future "
                                      "(the device's clock is wrong)", field="window_end")
                if not isinstance(msg, (Summary, Report, Heartbeat, Status, Receipt)):
                    raise SchemaError(f"a {msg.kind} message is not ingested", field="type")
                _check_integers(msg)
            except EdgefleetError as exc:
                dead.append(_Dead(item.received, item.topic, type(exc).__name__, str(exc),
                                  item.payload, _settles(msg)))
                continue
            except Exception as exc:  # a contract bug must not stop ingest
                log.exception("decoding a message on %r failed unexpectedly", item.topic[:200])
                dead.append(_Dead(item.received, item.topic, type(exc).__name__,
                                  f"internal error: {exc}", item.payload))
                continue
            decoded.append((item, msg))
        with self.store.transaction():
            self._write(decoded, dead, result, now)
        if result.outcome_devices and self.on_outcomes is not None:
            self.on_outcomes(result.outcome_devices)
        done = self.clock()
        for kind, n in result.dead.items():
            log.debug("dead-lettered %d %s message(s)", n, kind)
        if self.metrics is not None:
            m = self.metrics
            for kind, n in result.stored.items():
                m.messages.labels(kind).inc(n)
            for kind, n in result.duplicates.items():
                m.duplicates.labels(kind).inc(n)
            for error, n in result.dead.items():
                m.dead_letters.labels(error).inc(n)
            for end in result.lags:
                m.lag.observe(max(0.0, done - end))
        result.lags = [max(0.0, done - end) for end in result.lags]
        return result

    # One function on purpose: one write transaction over a batch, accumulating per-device
    # deltas in one pass; its steps share the accumulators.
    def _write(self, decoded: list[tuple[Incoming, Message]], dead: list[_Dead],
               result: BatchResult, now: float) -> None:
        store = self.store
        store.ensure_devices({m.device for _, m in decoded}, now)
        seen: dict[str, float] = {}
        beats: dict[str, tuple[float, dict]] = {}
        counts: dict[str, list] = {}
        deltas: dict[RollupKey, list[Packed]] = defaultdict(list)
        statuses: list[tuple[float, Status]] = []
        receipts: dict[str, int] = {}
        summaries: list[tuple[Summary, SummaryRow, Packed | None, Reference | None]] = []
        folding: list[tuple[int, Summary, Packed]] = []
        for item, msg in decoded:
            if not item.retained:
                seen[msg.device] = max(seen.get(msg.device, 0.0), item.received)
            if isinstance(msg, Summary):
                prepared = self._summary(item, msg, dead)
                if prepared is not None:
                    summaries.append(prepared)
            elif isinstance(msg, Report):
                rec = ReportRecord(msg.device, msg.seq, msg.revision, msg.outcome, msg.bundle,
                                   msg.reason, msg.time or item.received, item.received)
                if store.insert_report(rec):
                    result.stored["report"] += 1
                else:
                    result.duplicates["report"] += 1
            elif isinstance(msg, Heartbeat):
                body = msg.to_dict()
                for key in ("schema", "type", "device"):
                    body.pop(key, None)
                t = msg.time or item.received
                if t >= beats.get(msg.device, (-1.0, {}))[0]:
                    beats[msg.device] = (t, body)
                result.stored["heartbeat"] += 1
            elif isinstance(msg, Receipt):
                receipts[msg.device] = max(receipts.get(msg.device, 0), msg.outcomes)
                result.stored["receipt"] += 1
            else:
                assert isinstance(msg, Status)
                statuses.append((msg.time or item.received, msg))
                result.stored["status"] += 1
        # one existence query and one executemany for the batch's summaries
        inserted = store.insert_summaries([row for _, row, _, _ in summaries])
        performance: list[PerformanceRow] = []
        for (msg, _, packed, ref), fresh in zip(summaries, inserted, strict=True):
            if not fresh:
                result.duplicates["summary"] += 1
                continue
            result.stored["summary"] += 1
            if msg.performance:
                performance += self._performance(msg, dead)
            result.lags.append(msg.window_end)
            c = counts.setdefault(msg.device, [0, 0.0, 0])
            c[0] += 1
            c[1] = max(c[1], msg.window_end)
            c[2] = max(c[2], msg.dropped)
            if packed is None or ref is None:
                result.pending += 1
                continue
            folding.append((ref.bundle.id, msg, packed))
        online: set[str] = set()
        for t, s in sorted(statuses, key=lambda x: x[0]):
            if store.apply_status(s.device, online=s.state == "online", time=t,
                                  agent_version=s.agent_version, bundle=s.bundle,
                                  shadow=s.shadow, labels=s.labels or None) \
                    and s.state == "online":
                online.add(s.device)
        if online:
            store.outcomes_due_again(online)
        if receipts:
            self._receipts(receipts, now, result)
        result.outcome_devices |= online
        store.apply_heartbeats(beats)
        store.touch_devices(seen)
        store.note_summaries({d: tuple(v) for d, v in counts.items()})
        store.insert_performance(performance)
        # the groups of each device as it is now, after this batch's statuses (labels)
        groups = self._group_scopes({msg.device for _, msg, _ in folding} |
                                    {r.device for r in performance}, now)
        self._fold_performance(performance, groups)
        for bundle_id, msg, packed in folding:
            for k in self._keys(bundle_id, msg.device, msg.window_start, msg.window_end,
                                groups.get(msg.device, ())):
                deltas[k].append(packed)
        self._merge(deltas)
        if dead:
            self._dead_letters(dead, result)
        self._advance_acks(decoded, dead, result)

    def _receipts(self, receipts: dict[str, int], now: float, result: BatchResult) -> None:
        advanced, ignored = self.store.record_outcome_receipts(receipts, now)
        result.outcome_devices |= set(advanced)
        for device, batch in ignored.items():
            log.warning("device %r receipted outcome batch %d, which was never sent to it: "
                        "ignored", device, batch)
        if ignored:
            self.store.add_counters({"outcomes.receipt_ignored": len(ignored)})

    def _advance_acks(self, decoded: list[tuple[Incoming, Message]], dead: list[_Dead],
                      result: BatchResult) -> None:
        seen: dict[tuple[str, str], int] = {}
        for _, msg in decoded:
            if isinstance(msg, (Summary, Report)):
                key = (msg.device, msg.kind)
                seen[key] = max(seen.get(key, 0), msg.floor)
        settled = [(d.device, *d.settles) for d in dead if d.settles is not None]
        for device, stream, _ in settled:
            seen.setdefault((device, stream), 0)
        self.store.add_settled(settled)
        result.acks = self.store.advance_acks(seen)

    def _summary(self, item: Incoming, msg: Summary, dead: list[_Dead]
                 ) -> tuple[Summary, SummaryRow, Packed | None, Reference | None] | None:
        """Check a summary against its bundle's reference and make its row (None: refused)."""
        key = (msg.bundle.name, msg.bundle.version)
        ref = self._reference(key)
        packed = None
        if ref is not None:
            try:
                packed = self._pack(ref, msg)
            except (SchemaError, ReferenceMismatchError) as exc:
                dead.append(_Dead(item.received, item.topic, type(exc).__name__, str(exc),
                                  item.payload, _settles(msg)))
                return None
        row = SummaryRow(msg.device, msg.seq, msg.bundle.name, msg.bundle.version,
                         msg.reference_hash, msg.window_start, msg.window_end, msg.rows,
                         item.received, msg.latency_counts, dict(msg.errors),
                         None if msg.shadow is None else msg.shadow.to_dict(), msg.dropped,
                         item.payload, FOLDED if packed is not None else PENDING,
                         None if packed is None else packed.to_bytes())
        return msg, row, packed, ref

    def _performance(self, msg: Summary, dead: list[_Dead]) -> list[PerformanceRow]:
        """The rows of a new summary's performance entries; an entry that cannot be read
        (unknown bundle, bad numbers) is dead-lettered alone."""
        out = []
        where = f"{msg.kind}.performance"
        for i, entry in enumerate(msg.performance):
            try:
                bundle_id = self._bundle_id((entry.bundle.name, entry.bundle.version))
                if bundle_id is None:
                    raise SchemaError(f"{where}[{i}].bundle: {entry.bundle.name}@"
                                      f"{entry.bundle.version} is not a bundle this server "
                                      "holds", field=f"{where}[{i}].bundle")
                perf = self.bundles.performance(bundle_id)
                labelled, served = read_entry(perf.spec, entry, f"{where}[{i}]")
            except EdgefleetError as exc:
                dead.append(_Dead(self.clock(), topic(msg.device, "summary"),
                                  type(exc).__name__, str(exc), entry_bytes(entry)))
                continue
            out.append(PerformanceRow(msg.device, msg.seq, bundle_id, msg.window_start,
                                      msg.window_end, labelled, served, entry.realized,
                                      entry.estimated))
        return out

    def _bundle_id(self, key: tuple[str, str]) -> int | None:
        bundle_id = self._known.get(key)
        if bundle_id is None:
            # inside the write transaction: an upload committed before it is seen here,
            # and one committing after it will find this summary pending and fold it
            bundle_id = self.store.bundle_id(*key)
            if bundle_id is not None:
                self._known[key] = bundle_id
        return bundle_id

    def _reference(self, key: tuple[str, str]) -> Reference | None:
        bundle_id = self._bundle_id(key)
        return None if bundle_id is None else self.bundles.reference(bundle_id)

    @staticmethod
    def _pack(ref: Reference, msg: Summary) -> Packed:
        if msg.reference_hash != ref.layout.reference_hash:  # the layout caches the hash
            raise ReferenceMismatchError(
                f"summary.profile.reference_hash {msg.reference_hash[:12]}… is not the "
                f"reference of {ref.bundle.label} ({ref.layout.reference_hash[:12]}…)")
        # from_wire's checks, without building a Profile (see Layout.pack_wire)
        return ref.layout.pack_wire(msg.profile, "summary.profile")

    def _keys(self, bundle_id: int, device: str, start: float, end: float,
              groups: Sequence[tuple[str, int]] = ()) -> list[RollupKey]:
        """The rollups a window goes into at every level: its device's, the fleet's, and
        those of ``groups`` (``(scope, first bucket)``) from their first bucket on."""
        mid = (start + end) / 2
        out = []
        for width in self.config.levels:
            bucket = int(mid // width) * width
            out += [(bundle_id, width, bucket, device), (bundle_id, width, bucket, FLEET_SCOPE)]
            out += [(bundle_id, width, bucket, scope) for scope, first in groups
                    if bucket >= first]
        return out

    def _group_scopes(self, devices: set[str], now: float
                      ) -> dict[str, list[tuple[str, int]]]:
        """Per device, ``(rollup scope, first bucket)`` of each group its labels match now.

        A group's own rollups start at the first bucket of the coarsest level that begins
        at least ``max_clock_skew_s`` after the group is first seen here: every summary
        stored before that ended before it, so from that bucket on the group's rollups hold
        every window its members sent (:meth:`Store.group_rollups_from`, what the drift
        report reads them from; before it, the report merges device rollups)."""
        if not devices:
            return {}
        store = self.store
        starts = store.group_rollup_starts()
        coarse = self.config.levels[-1]
        first = int(-(-(now + self.config.max_clock_skew_s) // coarse)) * coarse
        groups, new = [], []
        for g in store.list_groups():
            known = starts.get(g.name)
            if known is None or known[0] != g.created:
                known = (g.created, first)
                new.append((g.name, g.created, first))
            groups.append((g, group_scope(g.name), known[1]))
        store.set_group_rollup_starts(new)
        labels = store.device_labels(sorted(devices))
        return {d: [(scope, start) for g, scope, start in groups if g.matches(ls)]
                for d, ls in labels.items()}

    def _merge(self, deltas: dict[RollupKey, list[Packed]]) -> None:
        """Merge a batch's new windows into their stored rollups, one grouped merge per
        layout (bundle), and write them back."""
        if not deltas:
            return
        existing = self.store.load_rollups(list(deltas))
        by_layout: dict[int, list[RollupKey]] = defaultdict(list)
        for key in deltas:
            by_layout[key[0]].append(key)
        rows = []
        for keys in by_layout.values():
            layout = deltas[keys[0]][0].layout
            parts: list[Packed] = []
            groups: list[int] = []
            blobs: list[bytes] = []
            blob_groups: list[int] = []
            for g, key in enumerate(keys):
                if key in existing:
                    blobs.append(existing[key])
                    blob_groups.append(g)
                parts += deltas[key]
                groups += [g] * len(deltas[key])
            merged = layout.merge_parts(parts, np.asarray(groups, dtype=np.intp), len(keys),
                                        blobs, blob_groups)
            rows += [(key, m.rows, m.summaries, m.to_bytes())
                     for key, m in zip(keys, merged, strict=True)]
        self.store.save_rollups(rows)

    def _fold_performance(self, rows: list[PerformanceRow],
                          groups: dict[str, list[tuple[str, int]]]) -> None:
        """Add new performance entries into the rollups of their device, groups and the
        fleet, at every width, in the bucket holding the middle of their window (inside
        the transaction that stored them: only a new summary's entries are added)."""
        if not rows:
            return
        deltas: dict[PerformanceKey, list[PerformanceRow]] = defaultdict(list)
        shared: dict[PerformanceKey, list[str]] = {}  # a device's key -> its other scopes
        for r in rows:
            for width in ROLLUP_WIDTHS:
                bucket = int(r.middle // width) * width
                scopes = [FLEET_SCOPE, *(scope for scope, first in groups.get(r.device, ())
                                         if bucket >= first)]
                own = (r.bundle_id, width, bucket, r.device)
                deltas[own].append(r)
                shared[own] = scopes
                for scope in scopes:
                    deltas[(r.bundle_id, width, bucket, scope)].append(r)
        stored = self.store.load_performance_rollups(list(deltas))
        # a device new in a bucket counts once more in its fleet's and groups' bucket
        more: dict[PerformanceKey, int] = defaultdict(int)
        for own, scopes in shared.items():
            if own not in stored:
                for scope in scopes:
                    more[(*own[:3], scope)] += 1
        out = []
        for key, parts in deltas.items():
            old = stored.get(key)
            items: list[PerformanceRow | PerformanceRollup] = [*([old] if old else []), *parts]
            devices = 1 if key in shared else (old.devices if old else 0) + more[key]
            out.append((key, PerformanceRollup(
                key[3], key[2], len(parts) + (old.entries if old else 0),
                sum(x.labelled for x in items), sum(x.served for x in items), devices,
                add_blocks([x.realized for x in items]),
                add_blocks([x.estimated for x in items]))))
        self.store.save_performance_rollups(out)

    def _dead_letters(self, dead: list[_Dead], result: BatchResult) -> None:
        keep = self.config.dead_letter_payload_bytes
        self.store.add_dead_letters([
            (d.received, d.topic[:512], d.device, d.error[:64], d.reason[:2000],
             len(d.payload), d.payload[:keep]) for d in dead])
        counts: dict[str, int] = defaultdict(int)
        for d in dead:
            result.dead[d.error] += 1
            counts[f"dead_letters.{d.error}"] += 1
        self.store.add_counters(counts)

    def refuse(self, item: Incoming, exc: Exception) -> None:
        """Dead-letter one message whose processing failed for a reason of the server's."""
        try:
            with self.store.transaction():
                self._dead_letters([_Dead(item.received, item.topic, type(exc).__name__,
                                          f"internal error: {exc}", item.payload)],
                                   BatchResult())
        except StoreError:
            log.exception("cannot even dead-letter a message on %r", item.topic[:200])
        if self.metrics is not None:
            self.metrics.dead_letters.labels(type(exc).__name__).inc()

    # -- folding summaries that waited for their bundle -----------------------------------

    def fold_pending(self, bundle: BundleRecord, *, chunk: int = 500) -> int:
        """Fold the stored summaries of ``bundle`` that were waiting for it; returns how
        many were folded (refused ones go to the dead letters)."""
        ref = self.bundles.reference(bundle.id)
        self._known[(bundle.name, bundle.version)] = bundle.id
        folded, after = 0, 0
        while True:
            rows = self.store.pending_summaries(bundle.name, bundle.version, chunk, after)
            if not rows:
                return folded
            after = rows[-1].id
            packed: dict[int, tuple[Summary, Packed]] = {}
            refused: list[tuple[int, _Dead]] = []
            for row in rows:
                topic = f"edgefleet/v1/{row.device}/summary"
                try:
                    msg = decode(topic, row.profile)
                    assert isinstance(msg, Summary)
                    packed[row.id] = (msg, self._pack(ref, msg))
                except (EdgefleetError, AssertionError) as exc:
                    refused.append((row.id, _Dead(self.clock(), topic, type(exc).__name__,
                                                  str(exc), row.profile)))
            with self.store.transaction():
                # re-read under the write lock: another folder may have taken some
                still = {r.id for r in self.store.pending_summaries(
                    bundle.name, bundle.version, len(rows), rows[0].id - 1)}
                deltas: dict[RollupKey, list[Packed]] = defaultdict(list)
                ids = [i for i in packed if i in still]
                groups = self._group_scopes({packed[i][0].device for i in ids}, self.clock())
                for i in ids:
                    msg, p = packed[i]
                    for k in self._keys(bundle.id, msg.device, msg.window_start,
                                        msg.window_end, groups.get(msg.device, ())):
                        deltas[k].append(p)
                self._merge(deltas)
                self.store.fold_summaries({i: packed[i][1].to_bytes() for i in ids})
                gone = [r for r in refused if r[0] in still]
                self.store.mark_summaries([i for i, _ in gone], REFUSED)
                if gone:
                    self._dead_letters([d for _, d in gone], BatchResult())
            folded += len(ids)

    def sweep_pending(self) -> int:
        """Fold every pending summary whose bundle is known (at start-up, after a
        migration, or after an upload in another process)."""
        total = 0
        for name, version in self.store.pending_bundles():
            record = self.store.get_bundle(name, version)
            if record is not None:
                total += self.fold_pending(record)
        return total


class IngestWorker:
    """The thread that drains a :class:`ServerLink` into an :class:`Ingestor`."""

    def __init__(self, link: ServerLink, ingestor: Ingestor, config: IngestConfig) -> None:
        self.link = link
        self.ingestor = ingestor
        self.config = config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.failures = 0
        self.acks_published = 0
        self._acks_connection = 0  # the link's connection count all acks were published on

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="fleet-ingest", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after committing and acknowledging what has been received."""
        if self._thread is None:
            return
        if self.link.config.session_expiry_s == 0:
            # a clean session forgets what it holds: stop the flow, drain what came
            self.link.unsubscribe()
        # (a kept session must keep its subscriptions: the broker queues for them while we
        # are away, and what we received and did not acknowledge comes again)
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("ingest worker did not stop within %.1f s", timeout)
        self._thread = None

    def _main(self) -> None:
        while True:
            stopping = self._stop.is_set()
            if self.link.connects != self._acks_connection and self.link.connected:
                self._republish_acks()
            batch = self.link.drain(self.config.batch_max, 0.0 if stopping else 0.2,
                                    self.config.batch_wait_s)
            if not batch:
                if stopping:
                    return
                continue
            self._commit(batch)

    def _republish_acks(self) -> None:
        """Every device's acknowledgement again, from the store (after each connect)."""
        connects = self.link.connects
        try:
            acks = self.ingestor.store.acks()
        except StoreError:
            log.exception("cannot read the acknowledgements to publish them again")
            return
        if all(self._publish_acks(device, acked) for device, acked in acks.items()):
            self._acks_connection = connects

    def _publish_acks(self, device: str, acked: dict[str, int]) -> bool:
        ok = self.link.publish_retained(topic(device, "ack"),
                                        encode(Ack(device, acked, time.time())))
        self.acks_published += ok
        return ok

    def _commit(self, batch: list[Incoming]) -> None:
        attempt = 0
        acks: dict[str, dict[str, int]] = {}
        while True:
            started = time.monotonic()
            try:
                acks = self.ingestor.process(batch).acks
            except StoreError:
                # not acked: the broker keeps the rest of its window for us
                self.failures += 1
                delay = _RETRY_S[min(attempt, len(_RETRY_S) - 1)]
                log.exception("ingest batch of %d failed; retrying in %.1f s", len(batch), delay)
                attempt += 1
                if self._stop.wait(delay) and attempt > len(_RETRY_S):
                    log.error("stopping with %d uncommitted messages", len(batch))
                    return
                continue
            except Exception:
                # a bug on this batch: process message by message so one bad message
                # cannot hold the rest (or the broker's window) forever
                log.exception("ingest batch failed unexpectedly; retrying one by one")
                for item in batch:
                    try:
                        acks.update(self.ingestor.process([item]).acks)
                    except Exception as exc:
                        log.exception("refusing one message on %r", item.topic[:200])
                        self.ingestor.refuse(item, exc)
            if self.ingestor.metrics is not None:
                self.ingestor.metrics.batch.observe(time.monotonic() - started)
            self.link.ack(batch)
            self.batches += 1
            # after the commit, never before: the device forgets what these cover. One not
            # published (no connection) goes out with all of them on the next connect.
            for device, acked in acks.items():
                self._publish_acks(device, acked)
            return
