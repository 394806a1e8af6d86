"""MQTT topics and message schemas: the one place both sides read them from.

Topics (5 levels, within managed brokers' limit of 7), ``{device}`` being the device
id, which is also its MQTT username (the broker's ACL ``pattern`` lines key on ``%u``):

    edgefleet/v1/{device}/summary     device → server  QoS 1, through the durable outbox
    edgefleet/v1/{device}/report      device → server  QoS 1, through the outbox (installs)
    edgefleet/v1/{device}/heartbeat   device → server  QoS 0, health
    edgefleet/v1/{device}/status      device → server  retained; last will "offline"
    edgefleet/v1/{device}/desired     server → device  retained desired state
    edgefleet/v1/{device}/ack         server → device  retained, QoS 1: what the server stored
    edgefleet/v1/{device}/outcomes    server → device  QoS 1: true labels uploaded centrally
    edgefleet/v1/{device}/receipt     device → server  QoS 1: outcome batches applied

Delivery is end to end: a summary or report leaves the agent's outbox only when an
:class:`Ack` says the server has *committed* it (a broker's PUBACK only means the broker
holds it in memory). Summaries and reports are numbered per device in two streams
(:data:`ACK_STREAMS`), and the ack carries, per stream, the highest sequence ``n`` such that
every sequence ``1..n`` is stored or settled. "Settled" is what makes gaps from the outbox's
counted drops harmless: every numbered message carries ``floor``, the lowest sequence of
its stream still in the device's outbox when it was stored, so every sequence below a
``floor`` the server has seen is either stored already or gone for good (dropped when the
outbox was full, or refused by the broker; both counted on the device), and the ack may
pass it.

Outcomes uploaded to the server travel to their device in numbered batches
(:class:`Outcomes`, ``batch`` 1, 2, ... per device). The device applies batch ``n`` only
when it has applied ``n - 1`` (it ignores a batch from the future and re-receipts one from
the past), records the batch number in the same transaction as the joins, and answers
with a :class:`Receipt` naming the highest batch applied. The server resends every batch
above the last receipt until it is receipted, so each outcome is applied exactly once,
through crashes of either side. Only the device may read its ``outcomes`` topic (an ACL
``pattern read`` line keyed on ``%u``): raw inputs never leave it, and no device reads
another's labels.

Every payload is canonical JSON with ``schema`` and ``type`` fields; a summary is sent
deflated (zlib), recognised by its first byte. :func:`decode` bounds both the payload
and its inflated size, checks that the device in the topic is the device in the body,
and raises :class:`~edgefleet.contract.errors.SchemaError` naming the field for anything else.

A summary's latency histograms are versioned by ``latency_format``: 2 (``LATENCY_EDGES_MS``,
1.25x apart from 50 µs to 10 s) is what agents send; a summary without the field is format 1
(agents before it, 2-2.5x apart) and still decodes, since its edges are a subset of format 2's
(:func:`merge_latency` sums the two exactly at format-1 resolution). A server older than
format 2 refuses the new field by name: upgrade the server before the agents.
:func:`latency_p95` is the one reading of a p95 from a histogram.

This module is the public face: it holds the :class:`Summary` and the codec
(:func:`encode`, :func:`decode`) and names every message; the other kinds live beside it,
one concept each (``messages_base``: topics, the device id, the bundle reference, the
base; ``messages_control``: reports, heartbeats, presence, desired state, acks;
``messages_outcomes``: outcomes and receipts; ``latency``: the latency histograms).
Import from here.

This module does not talk to a broker (see :mod:`edge_agent.mqtt`) and does not
interpret profiles beyond their framing (see :mod:`edgefleet.contract.profile`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.latency import (
    LATENCY_EDGES_BY_FORMAT,
    LATENCY_EDGES_MS,
    LATENCY_EDGES_V1_MS,
    LATENCY_FORMAT,
    latency_counts,
    latency_format,
    latency_p95,
    merge_latency,
)
from edgefleet.contract.messages_base import (
    ACK_STREAMS,
    DEVICE_RE,
    ID_RE,
    KINDS,
    LABEL_RE,
    MAX_INFLATED,
    MAX_OUTCOMES,
    MAX_PAYLOAD,
    MESSAGE_SCHEMA,
    TOPIC_PREFIX,
    BundleRef,
    Message,
    parse_topic,
    seq_floor,
    topic,
    valid_device_id,
)
from edgefleet.contract.messages_control import (
    MAX_CAPTURE_ROWS,
    Ack,
    CapturePolicy,
    DesiredState,
    Heartbeat,
    Report,
    Status,
)
from edgefleet.contract.messages_outcomes import Label, Outcome, Outcomes, Receipt
from edgefleet.contract.wire import FAST_CHECKS_FLOATS, Fields, canonical_json, parse_json

if TYPE_CHECKING:  # performance imports BundleRef from here
    from edgefleet.contract.performance import PerformanceEntry

__all__ = [
    "ACK_STREAMS",
    "DEVICE_RE",
    "ID_RE",
    "KINDS",
    "LABEL_RE",
    "LATENCY_EDGES_MS",
    "LATENCY_EDGES_V1_MS",
    "LATENCY_FORMAT",
    "MAX_CAPTURE_ROWS",
    "MAX_INFLATED",
    "MAX_OUTCOMES",
    "MAX_PAYLOAD",
    "MESSAGE_SCHEMA",
    "TOPIC_PREFIX",
    "Ack",
    "BundleRef",
    "CapturePolicy",
    "DesiredState",
    "Heartbeat",
    "Label",
    "Message",
    "Outcome",
    "Outcomes",
    "Paired",
    "Receipt",
    "Report",
    "ShadowStats",
    "Status",
    "Summary",
    "decode",
    "encode",
    "latency_format",
    "latency_p95",
    "merge_latency",
    "parse_topic",
    "topic",
    "valid_device_id",
]


MAX_PAIRED = 10**12  # a paired count beyond it is not a device's


@dataclass(frozen=True)
class Paired:
    """The shadow's and the live model's answers on the same labelled rows: McNemar's
    table (classifiers; a row is one the shadow answered and whose outcome came back)."""

    both: int = 0  # both right
    live_only: int = 0  # the live model right, the shadow wrong
    shadow_only: int = 0
    neither: int = 0

    @property
    def n(self) -> int:
        return self.both + self.live_only + self.shadow_only + self.neither

    def __add__(self, other: Paired) -> Paired:
        return Paired(self.both + other.both, self.live_only + other.live_only,
                      self.shadow_only + other.shadow_only, self.neither + other.neither)

    def to_dict(self) -> dict[str, int]:
        return {"both": self.both, "live_only": self.live_only,
                "shadow_only": self.shadow_only, "neither": self.neither}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Paired:
        """Raises: SchemaError naming the count at fault."""
        f = Fields(obj, where)
        out = cls(*(f.int(k, maximum=MAX_PAIRED) for k in ("both", "live_only",
                                                            "shadow_only", "neither")))
        f.done()
        return out


@dataclass(frozen=True)
class ShadowStats:
    """A candidate bundle run beside the live one in a window; ``paired``, when outcomes
    came back for rows the candidate answered, how both fared on them (possibly for a
    candidate that no longer runs: then ``rows`` is 0)."""

    bundle: BundleRef
    rows: int
    agreed: int  # rows where the candidate's label (or value, within tolerance) matched
    latency_counts: tuple[int, ...] = ()
    errors: int = 0
    paired: Paired | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"bundle": self.bundle.to_dict(), "rows": self.rows, "agreed": self.agreed,
               "latency_counts": list(self.latency_counts), "errors": self.errors}
        if self.paired is not None:  # absent, not null: servers before it refuse the key
            out["paired"] = self.paired.to_dict()
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str, fmt: int = LATENCY_FORMAT) -> ShadowStats:
        f = Fields(obj, where)
        paired = f.raw("paired", None)
        out = cls(BundleRef.from_dict(f.raw("bundle"), f"{where}.bundle"), f.int("rows"),
                  f.int("agreed"), latency_counts(f, "latency_counts", fmt), f.int("errors", 0),
                  None if paired is None else Paired.from_dict(paired, f"{where}.paired"))
        f.done()
        if out.agreed > out.rows:
            raise f.bad("agreed", "more agreeing rows than rows")
        return out


def _finite_profile(profile: dict[str, Any]) -> bool:
    """Whether every float in a wire profile is finite (decode skips the per-float hook)."""
    floats: list[Any] = []
    for key in ("in", "out"):
        for item in profile[key]:
            if type(item) is not list:
                continue  # malformed: from_wire names it
            for part in item:
                if type(part) is list:
                    floats.extend(part)
                elif type(part) is float:
                    floats.append(part)
    try:
        return all(map(math.isfinite, floats))
    except TypeError:  # a None min/max or a malformed cell: check the numbers only
        return all(map(math.isfinite, (x for x in floats if type(x) in (int, float))))


@dataclass(frozen=True)
class Summary(Message):
    """One closed window of a device: profile of inputs and outputs, latency, errors."""

    kind: ClassVar[str] = "summary"
    device: str
    seq: int  # per device, increasing; (device, seq) is the de-duplication key
    bundle: BundleRef
    window_start: float  # epoch seconds
    window_end: float
    profile: dict[str, Any]  # profile.to_wire(); its reference_hash decides merges
    latency_counts: tuple[int, ...] = ()  # over LATENCY_EDGES_MS (or format 1's, see below)
    errors: dict[str, int] = field(default_factory=dict)  # refused inputs, runtime errors
    shadow: ShadowStats | None = None
    dropped: int = 0  # messages this device's outbox dropped so far (bound reached)
    floor: int = 0  # every summary seq below it is stored or gone for good (see the top)
    # per bundle that answered: realized and estimated blocks (edgefleet.contract.performance)
    performance: tuple[PerformanceEntry, ...] = ()

    @property
    def reference_hash(self) -> str:
        return str(self.profile.get("reference_hash", ""))

    @property
    def rows(self) -> int:
        return int(self.profile.get("rows", 0))

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
               "seq": self.seq, "bundle": self.bundle.to_dict(),
               "window_start": self.window_start, "window_end": self.window_end,
               "profile": self.profile, "latency_counts": list(self.latency_counts),
               "errors": dict(sorted(self.errors.items())),
               "shadow": None if self.shadow is None else self.shadow.to_dict(),
               "dropped": self.dropped, "floor": self.floor}
        fmt = self.latency_format
        if fmt != 1:  # format 1 is what a summary without the field means
            out["latency_format"] = fmt
        if self.performance:  # written only when there is one: an old summary keeps its bytes
            out["performance"] = [e.to_dict() for e in self.performance]
        return out

    @property
    def latency_format(self) -> int:
        """The latency format of ``latency_counts`` (and the shadow's): 1 or 2."""
        counts = self.latency_counts or (self.shadow.latency_counts if self.shadow else ())
        return latency_format(counts)

    @classmethod
    def from_fields(cls, f: Fields) -> Summary:
        profile = f.mapping("profile")
        pf = Fields(profile, f"{f.where}.profile")
        pf.str("reference_hash", max_len=64)
        pf.int("rows")
        pf.list("in", max_len=4096)
        pf.list("out", max_len=16)
        pf.done()  # the framing only: from_wire() checks the numbers against the reference
        if not FAST_CHECKS_FLOATS and not _finite_profile(profile):
            raise f.bad("profile", "holds a number that is not finite (an overflowing literal)")
        errors = f.mapping("errors", {})
        if len(errors) > 32 or not all(isinstance(v, int) and not isinstance(v, bool)
                                       and v >= 0 for v in errors.values()):
            raise f.bad("errors", "at most 32 non-negative integer counters")
        start, end = f.float("window_start"), f.float("window_end")
        if end < start:
            raise f.bad("window_end", "ends before it starts")
        shadow = f.raw("shadow", None)
        # latency_format versions the histograms' edges; absent means format 1 (agents
        # before format 2), which is still read (merge_latency combines the two)
        fmt = f.int("latency_format", 1)
        if fmt not in LATENCY_EDGES_BY_FORMAT:
            raise f.bad("latency_format", f"unknown latency format (this edgefleet reads "
                                          f"{', '.join(map(str, LATENCY_EDGES_BY_FORMAT))})")
        from edgefleet.contract.performance import MAX_ENTRIES, PerformanceEntry

        entries = f.list("performance", [], max_len=MAX_ENTRIES)
        return cls(f.str("device", max_len=64), f.int("seq"),
                   BundleRef.from_dict(f.raw("bundle"), f"{f.where}.bundle"), start, end,
                   profile, latency_counts(f, "latency_counts", fmt), errors,
                   None if shadow is None else
                   ShadowStats.from_dict(shadow, f"{f.where}.shadow", fmt),
                   f.int("dropped", 0), seq_floor(f),
                   tuple(PerformanceEntry.from_dict(e, f"{f.where}.performance[{i}]")
                         for i, e in enumerate(entries)))


_TYPES: dict[str, type[Message]] = {c.kind: c for c in
                                    (Summary, Report, Heartbeat, Status, DesiredState, Ack,
                                     Outcomes, Receipt)}


def encode(message: Message) -> bytes:
    """Payload bytes: canonical JSON, deflated for summaries.

    Raises:
        SchemaError: the encoded message exceeds :data:`MAX_PAYLOAD`.
    """
    data = canonical_json(message.to_dict())
    if isinstance(message, Summary):
        data = zlib.compress(data, 9)
    if len(data) > MAX_PAYLOAD:
        raise SchemaError(f"{message.kind} for {message.device}: {len(data)} bytes exceeds "
                          f"{MAX_PAYLOAD}", field="payload")
    return data


def _inflate(payload: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(payload, MAX_INFLATED)
    except zlib.error as exc:
        raise SchemaError(f"payload: corrupt deflate stream ({exc})", field="payload") from exc
    if inflater.unconsumed_tail or not inflater.eof:
        raise SchemaError(f"payload: inflates past {MAX_INFLATED} bytes or is truncated",
                          field="payload")
    return data


def decode(topic_name: str, payload: bytes) -> Message:
    """Parse and check one message received on ``topic_name``.

    Raises:
        SchemaError: bad topic, oversized, not JSON, wrong schema/type, a bad field
            (named), or a body whose device differs from the topic's.
    """
    device, kind = parse_topic(topic_name)
    if len(payload) > MAX_PAYLOAD:
        raise SchemaError(f"payload: {len(payload)} bytes exceeds {MAX_PAYLOAD}",
                          field="payload")
    if payload[:1] == b"\x78":
        payload = _inflate(payload)
    # every field goes through a reader, and a summary checks its floats in one pass
    # (Summary.from_fields): the fast parser is safe here
    f = Fields(parse_json(payload, what=kind, max_bytes=MAX_INFLATED, fast=True), kind)
    if f.int("schema") != MESSAGE_SCHEMA:
        raise f.bad("schema", f"unsupported message schema (this edgefleet reads "
                              f"{MESSAGE_SCHEMA})")
    if f.str("type", max_len=16) != kind:
        raise f.bad("type", f"a {kind} topic carries type {kind!r}")
    message = _TYPES[kind].from_fields(f)
    f.done()
    if message.device != device:
        raise f.bad("device", f"body names {message.device!r}, the topic {device!r}")
    if not valid_device_id(message.device):
        raise f.bad("device", "invalid device id")
    return message
