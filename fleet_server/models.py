"""The server's records: frozen values that the store returns and the services pass around.

The API's response schemas read them as they are (``from_attributes``,
:mod:`fleet_server.api.schemas`); a record keeps a ``to_dict()`` only where something else
stores or sends it as JSON (an alert to the webhook, a group to the audit log, a token to
the CLI's ``--json``).
Nothing secret is ever in a record: tokens and device secrets exist in plaintext only in
the one response that creates them (:class:`Issued`), and hashes stay inside the store.

This module does not read or write anything; :mod:`fleet_server.store` builds these from
rows, the services decide what they mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from edgefleet.contract.messages import BundleRef, CapturePolicy
from edgefleet.contract.messages_base import download_path
from edgefleet.contract.wire import canonical_json, sha256_hex

__all__ = [
    "AUDIT_GENESIS",
    "FLEET_SCOPE",
    "POSTGRESQL",
    "ROLES",
    "ROLLOUT_ACTIONS",
    "ROLLOUT_ACTIVE",
    "ROLLOUT_FINISHED",
    "ROLLOUT_STATUSES",
    "SQLITE",
    "Alert",
    "AuditEntry",
    "AuditLink",
    "BundleRecord",
    "Database",
    "DeadLetter",
    "DesiredRecord",
    "Device",
    "DriftWindow",
    "Group",
    "Issued",
    "ReportRecord",
    "RolloutAction",
    "RolloutStatus",
    "SummaryRecord",
    "Token",
    "audit_digest",
]

# ordered: each role may do everything the ones before it may
ROLES = ("viewer", "operator", "approver")
# The scope name of the whole fleet, in rollups, drift windows and alerts (a device id or a
# group name can never be "*"): one owner for the store, the evaluator, the API and the pages.
FLEET_SCOPE = "*"


class RolloutStatus(str, Enum):
    """Where a rollout is. A ``str`` enum: it compares equal to its value, is stored and sent
    as that value, and FastAPI takes it as a query parameter. The one owner of the rollout
    vocabulary: the state machine, the store, the API and the dashboard import it."""

    PENDING_APPROVAL = "pending_approval"
    READY = "ready"
    SHADOW = "shadow"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"


class RolloutAction(str, Enum):
    """What an operator can do to a rollout."""

    APPROVE = "approve"
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    ABORT = "abort"


ROLLOUT_STATUSES = tuple(s.value for s in RolloutStatus)
ROLLOUT_ACTIVE = (RolloutStatus.SHADOW.value, RolloutStatus.RUNNING.value)
ROLLOUT_FINISHED = (RolloutStatus.COMPLETED.value, RolloutStatus.ABORTED.value)
ROLLOUT_ACTIONS = tuple(a.value for a in RolloutAction)


@dataclass(frozen=True)
class Token:
    id: int
    name: str
    role: str
    created: float
    created_by: str
    last_used: float | None = None
    revoked: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "created": self.created,
                "created_by": self.created_by, "last_used": self.last_used,
                "revoked": self.revoked}


@dataclass(frozen=True)
class Issued:
    """A credential just created: the only time its plaintext exists outside its owner."""

    name: str
    secret: str = field(repr=False)
    role: str


@dataclass(frozen=True)
class Device:
    id: str
    labels: dict[str, str]  # effective: reported by the device, overridden by the operator's
    set_labels: dict[str, str]
    reported_labels: dict[str, str]
    created: float
    has_secret: bool = False
    online: bool = False
    status_time: float | None = None
    last_seen: float | None = None
    agent_version: str = ""
    bundle: BundleRef | None = None
    shadow: BundleRef | None = None
    health: dict[str, Any] | None = None  # the last heartbeat's body
    heartbeat_time: float | None = None
    last_summary: float | None = None
    summaries: int = 0
    dropped: int = 0



@dataclass(frozen=True)
class Group:
    """A named label selector: a device is a member when every selector label matches."""

    name: str
    selector: dict[str, str]
    requires_approval: bool = False
    important_features: tuple[str, ...] = ()
    created: float = 0.0
    created_by: str = ""
    requires: tuple[str, ...] = ()  # card, approval, fairness, champion (registry.governance)
    # the group's own drift settings over the server's (fleet_server.config.DRIFT_KEYS)
    drift: dict[str, float | int] = field(default_factory=dict)
    # its own performance alert tolerances (fleet_server.config.PERFORMANCE_KEYS)
    performance: dict[str, float | int] = field(default_factory=dict)
    # the group's data capture (None: none set; its devices' own configs stand)
    capture: CapturePolicy | None = None

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.selector.items())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "selector": dict(self.selector),
                "requires_approval": self.requires_approval,
                "important_features": list(self.important_features),
                "created": self.created, "created_by": self.created_by,
                "requires": list(self.requires), "drift": dict(self.drift),
                "performance": dict(self.performance),
                "capture": None if self.capture is None else self.capture.to_dict()}


@dataclass(frozen=True)
class BundleRecord:
    id: int
    name: str
    version: str
    sha256: str
    size: int
    reference_hash: str
    uploaded: float
    uploaded_by: str
    signers: tuple[dict[str, str], ...] = ()  # {"keyid", "role", "name"} of verified signers
    manifest: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def url(self) -> str:
        return download_path(self.name, self.version)  # relative: the agent joins its server

    @property
    def ref(self) -> BundleRef:
        return BundleRef(self.name, self.version, self.sha256, self.url, self.size)



@dataclass(frozen=True)
class DesiredRecord:
    device: str
    revision: int
    bundle: BundleRef | None
    shadow: BundleRef | None
    allow_downgrade: bool
    updated: float
    updated_by: str
    capture: CapturePolicy | None = None  # the stricter of the device's groups' policies



@dataclass(frozen=True)
class ReportRecord:
    device: str
    seq: int
    revision: int
    outcome: str
    bundle: BundleRef
    reason: str
    time: float
    received: float



@dataclass(frozen=True)
class SummaryRecord:
    """A stored window summary's header (the profile itself stays in the store)."""

    device: str
    seq: int
    bundle: str  # name@version as the device declared it
    reference_hash: str
    window_start: float
    window_end: float
    rows: int
    received: float
    folded: bool
    errors: dict[str, int] = field(default_factory=dict)
    latency_counts: tuple[int, ...] = ()
    shadow: dict[str, Any] | None = None
    dropped: int = 0



@dataclass(frozen=True)
class DeadLetter:
    id: int
    received: float
    topic: str
    device: str
    error: str  # the exception's class name
    reason: str
    size: int  # of the whole payload; ``payload`` holds at most the configured prefix
    payload: bytes = field(repr=False)

    @property
    def payload_prefix(self) -> str:
        """The payload's first 256 bytes, hex: what the API shows of a refused message."""
        return self.payload[:256].hex()


@dataclass(frozen=True)
class DriftWindow:
    """One evaluated window of one bundle and scope (a group name, or ``*`` for the fleet)."""

    bundle: str
    scope: str
    window_start: int
    window_end: int
    verdict: str
    share_drifted: float
    rows: int
    devices: int
    features: dict[str, Any]  # name -> {"verdict", "role", "psi", "ks", ...}
    evaluated: float



@dataclass(frozen=True)
class Alert:
    id: int
    kind: str  # fleet_server.monitoring.alerts.KINDS
    bundle: str
    group: str
    device: str
    state: str  # open | resolved
    opened: float
    resolved: float | None
    message: str
    details: dict[str, Any]
    webhook: str  # none | pending | delivered | failed
    attempts: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "bundle": self.bundle, "group": self.group,
                "device": self.device, "state": self.state, "opened": self.opened,
                "resolved": self.resolved, "message": self.message, "details": self.details,
                "webhook": self.webhook, "attempts": self.attempts}


RETRAIN_STATUSES = ("requested", "running", "promoted", "rejected", "failed")
RETRAIN_FINISHED = frozenset({"promoted", "rejected", "failed"})


@dataclass(frozen=True)
class RetrainRun:
    """One run of the retraining loop (``edgepack retrain``), its lineage in ids: the alert
    that triggered it, the champion it was judged against, the challenger it built and
    the rollout that took it to the devices.

    ``requested`` (``fleet retrain start``, waiting for a runner) → ``running`` → one of
    ``promoted`` (the challenger won; uploaded and rolled out), ``rejected`` (it did not
    win: nothing deployed, ``reason`` says why) or ``failed`` (an error, in ``reason``).
    """

    id: int
    recipe: str
    recipe_hash: str
    revision: str  # the code revision the recipe ran at (git), "" if unknown
    trigger: str  # manual | schedule | alert:<id>
    alert_id: int | None
    status: str
    group: str
    bundle: str  # the bundle name the recipe builds
    champion: str | None  # name@version it was judged against
    challenger: str | None  # name@version it built
    rollout: str | None  # the rollout id that took the challenger to the devices
    created: float
    started: float | None
    finished: float | None
    actor: str
    data: dict[str, Any]  # rows, time range, sha256 of the training and held-out data
    metrics: dict[str, Any]  # the comparison: both models' metrics, deltas, the test, rules
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "recipe": self.recipe, "recipe_hash": self.recipe_hash,
                "revision": self.revision, "trigger": self.trigger, "alert_id": self.alert_id,
                "status": self.status, "group": self.group, "bundle": self.bundle,
                "champion": self.champion, "challenger": self.challenger,
                "rollout": self.rollout, "created": self.created, "started": self.started,
                "finished": self.finished, "actor": self.actor, "data": self.data,
                "metrics": self.metrics, "reason": self.reason}


@dataclass(frozen=True)
class AuditEntry:
    id: int
    time: float
    actor: str
    action: str
    target: str
    details: dict[str, Any]
    prev: str | None = None  # the hash of the entry before (None: written before the chain)
    hash: str | None = None


# The hash-chained audit log: each entry stores the sha256 of the one before it (the first
# the genesis value) and its own, over the exact text stored. One owner for the digest: the
# store computes it on insert, :mod:`fleet_server.registry.audit` on verification.
AUDIT_GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditLink:
    """An audit entry as stored, details as the exact stored text: what its hash covers."""

    id: int
    time: float
    actor: str
    action: str
    target: str
    details: str
    prev: str | None
    hash: str | None

    def digest(self) -> str:
        """The sha256 this entry must carry, from its content and its ``prev``."""
        return audit_digest(self.prev or "", self.time, self.actor, self.action, self.target,
                            self.details)


def audit_digest(prev: str, time: float, actor: str, action: str, target: str,
                 details: str) -> str:
    # a JSON list: unambiguous field boundaries; repr-exact floats (canonical JSON)
    return sha256_hex(canonical_json([prev, time, actor, action, target, details]))


SQLITE, POSTGRESQL = "sqlite", "postgresql"


@dataclass(frozen=True)
class Database:
    """Where the fleet's store lives, as ``--db`` names it: a SQLite file (a path, or
    ``sqlite:///relative.db`` / ``sqlite:////absolute.db`` as SQLAlchemy spells them) or a
    PostgreSQL server (``postgresql://user@host:port/dbname``, any libpq URL).

    One parser for the store (which opens it) and the configuration (which refuses an
    unknown scheme and places bundle files). ``kind`` is ``"unknown"`` for another
    ``scheme://``: this module raises nothing, the caller names the refusal.
    """

    kind: str  # sqlite | postgresql | unknown
    target: str  # the file path, or the URL as given

    @classmethod
    def parse(cls, db: str | Path | Database) -> Database:
        if isinstance(db, Database):
            return db
        if isinstance(db, Path):
            return cls(SQLITE, str(db))
        if db.startswith(("postgresql://", "postgres://")):
            return cls(POSTGRESQL, db)
        if db.startswith("sqlite:///"):
            return cls(SQLITE, db[len("sqlite:///"):])
        if "://" in db:
            return cls("unknown", db)
        return cls(SQLITE, db)

    @property
    def path(self) -> Path | None:
        """The SQLite file (None for a server database)."""
        return Path(self.target) if self.kind == SQLITE else None

    @property
    def label(self) -> str:
        """What messages and logs show: the path, or the URL without its password."""
        if self.kind != POSTGRESQL:
            return self.target
        text = re.sub(r"password=[^&]*", "password=***", self.target)
        if "@" not in text:
            return text
        scheme, rest = text.split("://", 1)
        auth, host = rest.split("@", 1)
        return f"{scheme}://{auth.split(':', 1)[0]}@{host}"

    def __str__(self) -> str:
        return self.label
