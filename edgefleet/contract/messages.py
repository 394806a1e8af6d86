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

This module does not talk to a broker (see :mod:`edge_agent.mqtt`) and does not
interpret profiles beyond their framing (see :mod:`edgefleet.contract.profile`).
"""

from __future__ import annotations

import bisect
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.wire import FAST_CHECKS_FLOATS, Fields, canonical_json, parse_json

if TYPE_CHECKING:  # performance imports BundleRef from here
    from edgefleet.contract.performance import PerformanceEntry

__all__ = [
    "ACK_STREAMS",
    "LATENCY_EDGES_MS",
    "LATENCY_FORMAT",
    "MAX_PAYLOAD",
    "TOPIC_PREFIX",
    "Ack",
    "BundleRef",
    "DesiredState",
    "Heartbeat",
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
    "latency_p95",
    "merge_latency",
    "topic",
    "valid_device_id",
]

TOPIC_PREFIX = "edgefleet/v1"
MESSAGE_SCHEMA = 1
MAX_PAYLOAD = 128 * 1024  # AWS IoT Core's limit; Mosquitto's is far larger
MAX_INFLATED = 1024 * 1024
DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: "$" takes "x\n"
LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z")
# Request latency histogram (milliseconds), format 2: [0, 0.05), [0.05, 0.063), ...,
# [8000, 10000), [10000, inf). The edges are the Renard R10 preferred numbers (1, 1.25, 1.6,
# 2, 2.5, 3.15, 4, 5, 6.3, 8 per decade): log-spaced 1.25-1.28x apart, so a p95 is known to
# within about 25 %, and the 1-2-5 edges of format 1 are among them, so a format-2 histogram
# coarsens exactly onto format 1 (see merge_latency).
_R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
LATENCY_EDGES_MS = (0.05, 0.063, 0.08,
                    *(round(m * 10.0 ** e, 6) for e in range(-1, 4) for m in _R10), 10_000.0)
LATENCY_FORMAT = 2
# Format 1 (agents before format 2; a summary without ``latency_format``): 2-2.5x apart,
# too coarse for a 1.5 gate. Still decoded, so an agent upgraded late loses nothing.
LATENCY_EDGES_V1_MS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
_EDGES_BY_FORMAT = {1: LATENCY_EDGES_V1_MS, 2: LATENCY_EDGES_MS}
_FORMAT_BY_SLOTS = {len(e) + 1: v for v, e in _EDGES_BY_FORMAT.items()}
KINDS = ("summary", "report", "heartbeat", "status", "desired", "ack", "outcomes",
         "receipt")
MAX_OUTCOMES = 1000  # per Outcomes batch: about 100 KB at most, within MAX_PAYLOAD
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")  # a prediction id
# the numbered streams an Ack acknowledges; each is also the name of the device's counter
ACK_STREAMS = ("summary", "report")


def valid_device_id(device: str) -> bool:
    return bool(DEVICE_RE.match(device))


def topic(device: str, kind: str) -> str:
    """The topic of a message kind for a device.

    Raises:
        SchemaError: an invalid device id (no ``/``, ``+``, ``#``) or unknown kind.
    """
    if not valid_device_id(device):
        raise SchemaError(f"device id {device!r}: letters, digits, '.', '_', '-' (max 64)",
                          field="device")
    if kind not in KINDS:
        raise SchemaError(f"unknown message kind {kind!r}", field="type")
    return f"{TOPIC_PREFIX}/{device}/{kind}"


def parse_topic(name: str) -> tuple[str, str]:
    """``(device, kind)`` of a topic.

    Raises:
        SchemaError: not an edgefleet topic.
    """
    parts = name.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != TOPIC_PREFIX or parts[3] not in KINDS \
            or not valid_device_id(parts[2]):
        raise SchemaError(f"topic {name[:200]!r} is not an edgefleet topic", field="topic")
    return parts[2], parts[3]


def _labels(f: Fields, key: str) -> dict[str, str]:
    labels = f.mapping(key)
    if len(labels) > 32:
        raise f.bad(key, "at most 32 labels")
    for k, v in labels.items():
        if not LABEL_RE.match(k) or not isinstance(v, str) or len(v) > 128:
            raise f.bad(key, f"label {k!r}: lower-case key and a string value up to 128")
    return labels


@dataclass(frozen=True)
class BundleRef:
    """Which bundle: name and version, and where to get it (desired state only)."""

    name: str
    version: str
    sha256: str = ""
    url: str = ""
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "url": self.url, "size": self.size}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> BundleRef:
        from edgefleet.contract.manifest import NAME_RE, SHA256_RE, parse_version

        f = Fields(obj, where)
        name, version = f.str("name", max_len=64), f.str("version", max_len=128)
        if not NAME_RE.match(name):
            raise f.bad("name", f"{name!r} is not a bundle name")
        try:
            parse_version(version)
        except SchemaError as exc:
            raise f.bad("version", str(exc)) from exc
        sha = f.str("sha256", "", max_len=64)
        if sha and not SHA256_RE.match(sha):
            raise f.bad("sha256", "must be 64 lower-case hex digits")
        out = cls(name, version, sha, f.str("url", "", max_len=2048), f.int("size", 0))
        f.done()
        return out

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def _opt_bundle(f: Fields, key: str) -> BundleRef | None:
    raw = f.raw(key, None)
    return None if raw is None else BundleRef.from_dict(raw, f"{f.where}.{key}")


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
                  f.int("agreed"), _counts(f, "latency_counts", fmt), f.int("errors", 0),
                  None if paired is None else Paired.from_dict(paired, f"{where}.paired"))
        f.done()
        if out.agreed > out.rows:
            raise f.bad("agreed", "more agreeing rows than rows")
        return out


def _counts(f: Fields, key: str, fmt: int) -> tuple[int, ...]:
    slots = len(_EDGES_BY_FORMAT[fmt]) + 1
    items = f.list(key, [], max_len=slots)
    if items and len(items) != slots:
        raise f.bad(key, f"expected {slots} counters (latency format {fmt})")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in items):
        raise f.bad(key, "must be non-negative integers")
    return tuple(items)


def latency_format(counts: Sequence[int]) -> int:
    """The latency format a histogram is in, by its number of counters (empty: current).

    Raises:
        SchemaError: a length no format has.
    """
    if not counts:
        return LATENCY_FORMAT
    try:
        return _FORMAT_BY_SLOTS[len(counts)]
    except KeyError:
        raise SchemaError(f"latency_counts: {len(counts)} counters match no latency format",
                          field="latency_counts") from None


def merge_latency(histograms: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """Sum latency histograms; empty ones are skipped.

    Histograms of one format add bucket by bucket. When format-1 histograms (old agents)
    are among them, every format-2 one is first coarsened onto the format-1 edges, which
    is exact (each format-1 edge is a format-2 edge): the sum then has format-1 resolution.

    Raises:
        SchemaError: a histogram whose length matches no format.
    """
    hists = [tuple(int(c) for c in h) for h in histograms if len(h)]
    if not hists:
        return ()
    formats = {latency_format(h) for h in hists}
    fmt = min(formats)
    if len(formats) > 1:
        hists = [h if latency_format(h) == fmt else _coarsen(h, fmt) for h in hists]
    out = [0] * len(hists[0])
    for h in hists:
        for i, c in enumerate(h):
            out[i] += c
    return tuple(out)


def _coarsen(counts: Sequence[int], fmt: int) -> tuple[int, ...]:
    src = _EDGES_BY_FORMAT[latency_format(counts)]
    dst = _EDGES_BY_FORMAT[fmt]
    out = [0] * (len(dst) + 1)
    for i, c in enumerate(counts):
        # bucket i of src is [src[i-1], src[i]); it lies inside the dst bucket of its low edge
        low = src[i - 1] if i else 0.0
        out[bisect.bisect_right(dst, low)] += c
    return tuple(out)


def latency_p95(counts: Sequence[int], q: float = 0.95) -> tuple[float, float] | None:
    """The bounds ``(low, high)`` in ms of the 95th-percentile latency of a histogram
    (or of the ``q`` quantile).

    The one reading of a p95 from a histogram (rollout gates, dashboard). A histogram
    only knows which bucket holds the p95, so both edges of that bucket are returned:
    ``low`` is 0 for the first bucket, ``high`` is ``inf`` for the overflow bucket. None
    for an empty histogram.

    Raises:
        SchemaError: a histogram whose length matches no format.
    """
    total = sum(counts)
    if total <= 0:
        return None
    edges = _EDGES_BY_FORMAT[latency_format(counts)]
    rank = max(1, min(total, math.ceil(q * total)))
    seen = i = 0
    for i, c in enumerate(counts):  # noqa: B007 (i is the bucket after the loop)
        seen += c
        if seen >= rank:
            break
    return (edges[i - 1] if i else 0.0, edges[i] if i < len(edges) else math.inf)


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


class Message:
    """Base: every message has a device and knows its kind."""

    kind: ClassVar[str]
    device: str

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_fields(cls, f: Fields) -> Message:
        raise NotImplementedError

    @property
    def topic(self) -> str:
        return topic(self.device, self.kind)


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
        if fmt not in _EDGES_BY_FORMAT:
            raise f.bad("latency_format", f"unknown latency format (this edgefleet reads "
                                          f"{', '.join(map(str, _EDGES_BY_FORMAT))})")
        from edgefleet.contract.performance import MAX_ENTRIES, PerformanceEntry

        entries = f.list("performance", [], max_len=MAX_ENTRIES)
        return cls(f.str("device", max_len=64), f.int("seq"),
                   BundleRef.from_dict(f.raw("bundle"), f"{f.where}.bundle"), start, end,
                   profile, _counts(f, "latency_counts", fmt), errors,
                   None if shadow is None else
                   ShadowStats.from_dict(shadow, f"{f.where}.shadow", fmt),
                   f.int("dropped", 0), _floor(f),
                   tuple(PerformanceEntry.from_dict(e, f"{f.where}.performance[{i}]")
                         for i, e in enumerate(entries)))


@dataclass(frozen=True)
class Report(Message):
    """The outcome of reconciling toward a desired state."""

    kind: ClassVar[str] = "report"
    OUTCOMES: ClassVar[tuple[str, ...]] = ("installed", "failed", "rolled_back",
                                           "shadow_started", "shadow_failed")
    device: str
    seq: int
    revision: int  # the desired-state revision this answers
    outcome: str
    bundle: BundleRef
    reason: str = ""
    time: float = 0.0
    floor: int = 0  # every report seq below it is stored or gone for good (see the top)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
                "seq": self.seq, "revision": self.revision, "outcome": self.outcome,
                "bundle": self.bundle.to_dict(), "reason": self.reason, "time": self.time,
                "floor": self.floor}

    @classmethod
    def from_fields(cls, f: Fields) -> Report:
        return cls(f.str("device", max_len=64), f.int("seq"), f.int("revision"),
                   f.choice("outcome", cls.OUTCOMES),
                   BundleRef.from_dict(f.raw("bundle"), f"{f.where}.bundle"),
                   f.str("reason", "", max_len=2048), f.float("time", 0.0), _floor(f))


@dataclass(frozen=True)
class Heartbeat(Message):
    kind: ClassVar[str] = "heartbeat"
    device: str
    time: float
    uptime_s: float
    rss_bytes: int
    predictions: int
    errors: int
    outbox_depth: int
    dropped: int = 0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
                "time": self.time, "uptime_s": self.uptime_s, "rss_bytes": self.rss_bytes,
                "predictions": self.predictions, "errors": self.errors,
                "outbox_depth": self.outbox_depth, "dropped": self.dropped,
                "latency_p50_ms": self.latency_p50_ms, "latency_p95_ms": self.latency_p95_ms}

    @classmethod
    def from_fields(cls, f: Fields) -> Heartbeat:
        return cls(f.str("device", max_len=64), f.float("time"), f.float("uptime_s"),
                   f.int("rss_bytes"), f.int("predictions"), f.int("errors"),
                   f.int("outbox_depth"), f.int("dropped", 0), f.opt_float("latency_p50_ms"),
                   f.opt_float("latency_p95_ms"))


@dataclass(frozen=True)
class Status(Message):
    """Retained presence: ``online`` on connect, ``offline`` as the last will."""

    kind: ClassVar[str] = "status"
    device: str
    state: str  # online | offline
    agent_version: str = ""
    bundle: BundleRef | None = None
    shadow: BundleRef | None = None
    labels: dict[str, str] = field(default_factory=dict)
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
                "state": self.state, "agent_version": self.agent_version,
                "bundle": None if self.bundle is None else self.bundle.to_dict(),
                "shadow": None if self.shadow is None else self.shadow.to_dict(),
                "labels": dict(sorted(self.labels.items())), "time": self.time}

    @classmethod
    def from_fields(cls, f: Fields) -> Status:
        return cls(f.str("device", max_len=64), f.choice("state", ("online", "offline")),
                   f.str("agent_version", "", max_len=64), _opt_bundle(f, "bundle"),
                   _opt_bundle(f, "shadow"), _labels(f, "labels") if f.has("labels") else {},
                   f.float("time", 0.0))


@dataclass(frozen=True)
class DesiredState(Message):
    """What a device should run; ``revision`` increases with every change."""

    kind: ClassVar[str] = "desired"
    device: str
    revision: int
    bundle: BundleRef | None  # None: no model assigned yet
    shadow: BundleRef | None = None
    allow_downgrade: bool = False
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
                "revision": self.revision,
                "bundle": None if self.bundle is None else self.bundle.to_dict(),
                "shadow": None if self.shadow is None else self.shadow.to_dict(),
                "allow_downgrade": self.allow_downgrade, "time": self.time}

    @classmethod
    def from_fields(cls, f: Fields) -> DesiredState:
        return cls(f.str("device", max_len=64), f.int("revision"), _opt_bundle(f, "bundle"),
                   _opt_bundle(f, "shadow"), f.bool("allow_downgrade", False),
                   f.float("time", 0.0))


@dataclass(frozen=True)
class Ack(Message):
    """What the server has committed for a device: per stream of :data:`ACK_STREAMS`, the
    highest sequence up to which everything is stored or settled (0: nothing yet).

    Published retained (QoS 1) after every ingest commit that held a message of the
    device, and again on every server (re)connect, so an agent that restarts reads it at
    subscribe time.
    """

    kind: ClassVar[str] = "ack"
    device: str
    acked: dict[str, int] = field(default_factory=dict)  # stream -> highest settled seq
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
                "acked": dict(sorted(self.acked.items())), "time": self.time}

    @classmethod
    def from_fields(cls, f: Fields) -> Ack:
        acked = f.mapping("acked")
        for stream, upto in acked.items():
            if stream not in ACK_STREAMS:
                raise f.bad("acked", f"unknown stream {stream!r}")
            if not isinstance(upto, int) or isinstance(upto, bool) or not 0 <= upto < 2**63:
                raise f.bad("acked", f"{stream}: a non-negative 64-bit integer")
        return cls(f.str("device", max_len=64), dict(acked), f.float("time", 0.0))


Label = str | int | float  # a class label (str or int), or a regressor's true value


@dataclass(frozen=True)
class Outcome:
    """The truth for one prediction: its id and the true label (a class, or a finite
    number for a regressor)."""

    id: str
    label: Label

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Outcome:
        f = Fields(obj, where)
        pid = f.str("id", max_len=64)
        if not ID_RE.match(pid):
            raise f.bad("id", "a prediction id: letters, digits, '_', '.', ':', '-' (max 64)")
        label = f.raw("label")
        if isinstance(label, bool) or not isinstance(label, (str, int, float)):
            raise f.bad("label", "a class label (string or integer) or a finite number")
        if isinstance(label, float) and not math.isfinite(label):
            raise f.bad("label", "must be finite")
        if isinstance(label, str) and len(label) > 256:
            raise f.bad("label", "longer than 256 characters")
        f.done()
        return cls(pid, label)


@dataclass(frozen=True)
class Outcomes(Message):
    """A numbered batch of outcomes for one device (see the top: applied exactly once)."""

    kind: ClassVar[str] = "outcomes"
    device: str
    batch: int  # 1, 2, ... per device
    outcomes: tuple[Outcome, ...]
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
                "batch": self.batch, "outcomes": [o.to_dict() for o in self.outcomes],
                "time": self.time}

    @classmethod
    def from_fields(cls, f: Fields) -> Outcomes:
        batch = f.int("batch", minimum=1)
        items = f.list("outcomes", max_len=MAX_OUTCOMES)
        return cls(f.str("device", max_len=64), batch,
                   tuple(Outcome.from_dict(o, f"{f.where}.outcomes[{i}]")
                         for i, o in enumerate(items)), f.float("time", 0.0))


@dataclass(frozen=True)
class Receipt(Message):
    """What a device has applied: every outcome batch up to ``outcomes`` (0: none)."""

    kind: ClassVar[str] = "receipt"
    device: str
    outcomes: int
    time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
                "outcomes": self.outcomes, "time": self.time}

    @classmethod
    def from_fields(cls, f: Fields) -> Receipt:
        return cls(f.str("device", max_len=64), f.int("outcomes"), f.float("time", 0.0))


def _floor(f: Fields) -> int:
    floor = f.int("floor", 0)
    seq = f.int("seq")
    if floor > seq:
        raise f.bad("floor", f"{floor} is above the message's own seq {seq}")
    return floor


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
