"""The control messages: install reports, heartbeats, presence, desired state, acks.

The device publishes :class:`Report`, :class:`Heartbeat` and :class:`Status`; the server
:class:`DesiredState` (with its group's :class:`CapturePolicy`) and :class:`Ack`. Their
topics and delivery (reports and summaries leave the device's outbox only on an ack) are in
:mod:`edgefleet.contract.messages` (read its docstring; import them from there).

This module does not encode or decode payloads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgefleet.contract.messages_base import (
    ACK_STREAMS,
    LABEL_RE,
    MESSAGE_SCHEMA,
    BundleRef,
    Message,
    opt_bundle,
    seq_floor,
)
from edgefleet.contract.wire import Fields

__all__ = ["MAX_CAPTURE_FEATURES", "MAX_CAPTURE_ROWS", "Ack", "CapturePolicy", "DesiredState",
           "Heartbeat", "Report", "Status"]

MAX_CAPTURE_ROWS = 1_000_000  # a group's per-window cap on captured rows, per device
MAX_CAPTURE_FEATURES = 1024  # names in a group's allowlist (the capture batch's own bound)
CAPTURE_FEATURE_RE = re.compile(r"^[^\x00-\x1f]{1,128}\Z")  # as a capture batch reads them


def _labels(f: Fields, key: str) -> dict[str, str]:
    labels = f.mapping(key)
    if len(labels) > 32:
        raise f.bad(key, "at most 32 labels")
    for k, v in labels.items():
        if not LABEL_RE.match(k) or not isinstance(v, str) or len(v) > 128:
            raise f.bad(key, f"label {k!r}: lower-case key and a string value up to 128")
    return labels


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
                   f.str("reason", "", max_len=2048), f.float("time", 0.0), seq_floor(f))


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
                   f.str("agent_version", "", max_len=64), opt_bundle(f, "bundle"),
                   opt_bundle(f, "shadow"), _labels(f, "labels") if f.has("labels") else {},
                   f.float("time", 0.0))


@dataclass(frozen=True)
class CapturePolicy:
    """A group's data capture, carried in its devices' desired states (issue 15).

    ``enabled`` false: capture stops at once. Otherwise at most ``rate`` of the served rows,
    at most ``max_rows`` a window, only the ``features`` named (``None``: no list of the
    group's own). The device's own ``[capture]`` config is an upper bound: the agent takes
    the stricter rate, the smaller cap and the intersection of the allowlists, and a device
    whose config does not enable capture never captures (``edge_agent.capture``).
    """

    enabled: bool
    rate: float = 0.0
    max_rows: int = 0
    features: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        if not self.enabled:
            return {"enabled": False}
        doc: dict[str, Any] = {"enabled": True, "rate": self.rate, "max_rows": self.max_rows}
        if self.features is not None:
            doc["features"] = list(self.features)
        return doc

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> CapturePolicy:
        """Raises: SchemaError: a field missing, out of range or unknown (named)."""
        f = Fields(obj, where)
        if not f.bool("enabled"):
            f.done()
            return cls(False)
        rate = f.float("rate")
        if not 0 <= rate <= 1:
            raise f.bad("rate", f"must be in [0, 1], got {rate}")
        max_rows = f.int("max_rows", minimum=1, maximum=MAX_CAPTURE_ROWS)
        features = None
        if f.has("features"):
            names = f.list("features", max_len=MAX_CAPTURE_FEATURES)
            for name in names:
                if not isinstance(name, str) or not CAPTURE_FEATURE_RE.match(name):
                    raise f.bad("features", f"feature name {str(name)[:40]!r} refused")
            if len(set(names)) < len(names):
                raise f.bad("features", "a feature named twice")
            features = tuple(names)
        f.done()
        return cls(True, rate, max_rows, features)


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
    # the device's group's data capture; None: the group sets none, the device's own
    # config stands. Written only when set, so a state without it has the bytes it had
    # before capture per group: an agent older than this field refuses a state that
    # carries it (unknown field) and keeps running what it runs
    capture: CapturePolicy | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = {"schema": MESSAGE_SCHEMA, "type": self.kind, "device": self.device,
               "revision": self.revision,
               "bundle": None if self.bundle is None else self.bundle.to_dict(),
               "shadow": None if self.shadow is None else self.shadow.to_dict(),
               "allow_downgrade": self.allow_downgrade, "time": self.time}
        if self.capture is not None:
            doc["capture"] = self.capture.to_dict()
        return doc

    @classmethod
    def from_fields(cls, f: Fields) -> DesiredState:
        capture = f.raw("capture", None)
        return cls(f.str("device", max_len=64), f.int("revision"), opt_bundle(f, "bundle"),
                   opt_bundle(f, "shadow"), f.bool("allow_downgrade", False),
                   f.float("time", 0.0),
                   None if capture is None else CapturePolicy.from_dict(
                       capture, f"{f.where}.capture"))


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
