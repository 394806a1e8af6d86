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
  rollups start at a bucket boundary after it is first seen (the rollup keys and the merge
  are :mod:`fleet_server.telemetry.folding`'s).
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
the fleet by hour and by day (:meth:`~fleet_server.telemetry.folding.Folder.performance`),
attributed to the entry's bundle, not the summary's: each block is read with that bundle's
spec (from its stored manifest, :meth:`Bundles.performance`), so its numbers are checked
once, here. An entry for a bundle the server does not hold, or whose blocks do not read,
goes to the dead letters on its own (topic, the entry as its payload); the summary and its
other entries are stored.

A summary ending more than ``max_clock_skew_s`` in the future is refused: its device's
clock is wrong, and its window would land in buckets no report asks for.

End-to-end acknowledgement: in the same transaction, for every device with a summary or
report in the batch (stored, duplicate or refused for good), the highest sequence up to
which its stream is stored or settled advances (:meth:`Store.advance_acks`; a device's
``floor`` lets it pass the gaps its outbox's counted drops leave, and a message refused
after decoding, e.g. for clock skew, is settled so that the device stops sending it). A
message that cannot even be decoded names no sequence: it holds its device's
acknowledgement until the device's outbox drops it (its bound; counted there).

The thread that drains the link into an :class:`Ingestor` and publishes the devices'
acknowledgements after each commit is :class:`fleet_server.telemetry.worker.IngestWorker`.

This module does not connect to the broker (:mod:`fleet_server.telemetry.link`) or judge drift.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.messages import (
    ACK_STREAMS,
    Heartbeat,
    Message,
    Receipt,
    Report,
    Status,
    Summary,
    decode,
    topic,
)
from edgefleet.errors import EdgefleetError
from fleet_server.config import DEFAULT_INGEST, IngestConfig
from fleet_server.errors import StoreError
from fleet_server.metrics import Metrics
from fleet_server.models import BundleRecord, ReportRecord
from fleet_server.profiles.performance import entry_bytes, read_entry
from fleet_server.profiles.rollups import Packed
from fleet_server.registry.bundles import Bundles, Reference
from fleet_server.store import (
    FOLDED,
    PENDING,
    REFUSED,
    PerformanceRow,
    Store,
    SummaryRow,
)
from fleet_server.telemetry.folding import Folder
from fleet_server.telemetry.link import Incoming

__all__ = ["BatchResult", "Ingestor"]

log = logging.getLogger(__name__)


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


@dataclass
class _Batch:
    """What one batch's messages leave for the steps of :meth:`Ingestor._write`."""

    seen: dict[str, float] = field(default_factory=dict)  # device -> last received
    beats: dict[str, tuple[float, dict]] = field(default_factory=dict)  # the newest
    counts: dict[str, list] = field(default_factory=dict)  # [summaries, last end, dropped]
    statuses: list[tuple[float, Status]] = field(default_factory=list)
    receipts: dict[str, int] = field(default_factory=dict)  # device -> outcome batch
    summaries: list[tuple[Summary, SummaryRow, Packed | None, Reference | None]] = field(
        default_factory=list)


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
        self._fold = Folder(store, config)
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

    def _write(self, decoded: list[tuple[Incoming, Message]], dead: list[_Dead],
               result: BatchResult, now: float) -> None:
        """One write transaction over a batch, in named steps that share its accumulators
        (:class:`_Batch`): sort the messages, store the new summaries, apply statuses and
        receipts, keep the device registry, fold into rollups, settle and acknowledge."""
        self.store.ensure_devices({m.device for _, m in decoded}, now)
        batch = self._sort(decoded, dead, result)
        performance, folding = self._store_summaries(batch, dead, result)
        self._apply_statuses(batch, now, result)
        self._keep_registry(batch)
        self.store.insert_performance(performance)
        # the groups of each device as it is now, after this batch's statuses (labels)
        groups = self._fold.group_scopes({msg.device for _, msg, _ in folding} |
                                         {r.device for r in performance}, now)
        self._fold.performance(performance, groups)
        self._fold.windows(folding, groups)
        if dead:
            self._dead_letters(dead, result)
        self._advance_acks(decoded, dead, result)

    def _sort(self, decoded: list[tuple[Incoming, Message]], dead: list[_Dead],
              result: BatchResult) -> _Batch:
        """Each message to its accumulator; a report is stored at once (once per seq)."""
        batch = _Batch()
        for item, msg in decoded:
            if not item.retained:
                batch.seen[msg.device] = max(batch.seen.get(msg.device, 0.0), item.received)
            if isinstance(msg, Summary):
                prepared = self._summary(item, msg, dead)
                if prepared is not None:
                    batch.summaries.append(prepared)
            elif isinstance(msg, Report):
                rec = ReportRecord(msg.device, msg.seq, msg.revision, msg.outcome, msg.bundle,
                                   msg.reason, msg.time or item.received, item.received)
                if self.store.insert_report(rec):
                    result.stored["report"] += 1
                else:
                    result.duplicates["report"] += 1
            elif isinstance(msg, Heartbeat):
                body = msg.to_dict()
                for key in ("schema", "type", "device"):
                    body.pop(key, None)
                t = msg.time or item.received
                if t >= batch.beats.get(msg.device, (-1.0, {}))[0]:
                    batch.beats[msg.device] = (t, body)
                result.stored["heartbeat"] += 1
            elif isinstance(msg, Receipt):
                batch.receipts[msg.device] = max(batch.receipts.get(msg.device, 0),
                                                 msg.outcomes)
                result.stored["receipt"] += 1
            else:
                assert isinstance(msg, Status)
                batch.statuses.append((msg.time or item.received, msg))
                result.stored["status"] += 1
        return batch

    def _store_summaries(self, batch: _Batch, dead: list[_Dead], result: BatchResult
                         ) -> tuple[list[PerformanceRow], list[tuple[int, Summary, Packed]]]:
        """Insert the batch's summaries (one existence query, one executemany); of the new
        ones, the performance rows to store and the packed windows to fold."""
        inserted = self.store.insert_summaries([row for _, row, _, _ in batch.summaries])
        performance: list[PerformanceRow] = []
        folding: list[tuple[int, Summary, Packed]] = []
        for (msg, _, packed, ref), fresh in zip(batch.summaries, inserted, strict=True):
            if not fresh:
                result.duplicates["summary"] += 1
                continue
            result.stored["summary"] += 1
            if msg.performance:
                performance += self._performance(msg, dead)
            result.lags.append(msg.window_end)
            c = batch.counts.setdefault(msg.device, [0, 0.0, 0])
            c[0] += 1
            c[1] = max(c[1], msg.window_end)
            c[2] = max(c[2], msg.dropped)
            if packed is None or ref is None:
                result.pending += 1
                continue
            folding.append((ref.bundle.id, msg, packed))
        return performance, folding

    def _apply_statuses(self, batch: _Batch, now: float, result: BatchResult) -> None:
        """Statuses in time order, then receipts; a device that came online has its
        unreceipted outcome batches due again."""
        store = self.store
        online: set[str] = set()
        for t, s in sorted(batch.statuses, key=lambda x: x[0]):
            if store.apply_status(s.device, online=s.state == "online", time=t,
                                  agent_version=s.agent_version, bundle=s.bundle,
                                  shadow=s.shadow, labels=s.labels or None) \
                    and s.state == "online":
                online.add(s.device)
        if online:
            store.outcomes_due_again(online)
        if batch.receipts:
            self._receipts(batch.receipts, now, result)
        result.outcome_devices |= online

    def _keep_registry(self, batch: _Batch) -> None:
        """The devices' heartbeats, last seen, and summary counts."""
        self.store.apply_heartbeats(batch.beats)
        self.store.touch_devices(batch.seen)
        self.store.note_summaries({d: tuple(v) for d, v in batch.counts.items()})

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
                ids = [i for i in packed if i in still]
                groups = self._fold.group_scopes({packed[i][0].device for i in ids},
                                                 self.clock())
                self._fold.windows([(bundle.id, *packed[i]) for i in ids], groups)
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
