"""The rollout core's values: plans, state and decisions.

Frozen dataclasses with strict ``to_dict``/``from_dict`` (schema-versioned), so a plan
and its state persist in the store and cross the REST API unchanged. The rules that turn
them into decisions live in :mod:`fleet_server.rollouts.machine`, which re-exports every name here;
import from there. What the shell observes (devices, install reports, gate metrics and
their window) is :mod:`fleet_server.rollouts.observations`, which machine re-exports too.

This module holds no rules beyond each value's own validity checks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import BundleRef
from edgefleet.contract.wire import Fields
from fleet_server.models import ROLLOUT_ACTIONS, ROLLOUT_ACTIVE, ROLLOUT_FINISHED, ROLLOUT_STATUSES
from fleet_server.rollouts.errors import (
    PlanError,
    RolloutError,
)
from fleet_server.rollouts.observations import _finite

ROLLOUT_SCHEMA = 1
STATUSES = ROLLOUT_STATUSES
ACTIVE = ROLLOUT_ACTIVE
FINISHED = ROLLOUT_FINISHED
ACTIONS = ROLLOUT_ACTIONS
AUDIT_ACTIONS = ("create", *ACTIONS)
ROLES = ("control", "shadow", "canary", "complete", "rollback", "kept")
MODES = ("shadow", "canary")
MAX_STAGES = 20
MAX_DEVICES = 1_000_000
MAX_HISTORY = 100_000
MAX_LISTED = 100  # device ids named in one audit entry
MAX_REASON = 4096
LATENCY_FLOOR_MS = 0.1  # a p95 below it reads as this (ratios of tens of µs are noise)
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
ACTOR_RE = re.compile(r"^(system|operator:[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127})\Z")


def _refuse(kind: type[RolloutError], plan: RolloutPlan, state: RolloutState, action: str,
            why: str) -> RolloutError:
    return kind(f"rollout {plan.id!r} ({state.status}): cannot {action}: {why}",
                rollout_id=plan.id, rollout_status=state.status, action=action)


def _need(ok: bool, what: str, why: str) -> None:
    if not ok:
        raise PlanError(f"{what}: {why}", field=what)


def _schema(where: str, exc: PlanError) -> SchemaError:
    return SchemaError(f"{where}.{exc.field}: {exc}", field=f"{where}.{exc.field}")


def _opt_bundle(f: Fields, key: str) -> BundleRef | None:
    raw = f.raw(key, None)
    return None if raw is None else BundleRef.from_dict(raw, f"{f.where}.{key}")


def _opt_dict(bundle: BundleRef | None) -> dict[str, Any] | None:
    return None if bundle is None else bundle.to_dict()


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Stage:
    """One stage: the share of the group it covers, a floor in devices, its soak time."""

    fraction: float
    min_devices: int = 1
    soak_s: float = 3600.0

    def __post_init__(self) -> None:
        _need(_finite(self.fraction) and 0 < self.fraction <= 1, "fraction", "in (0, 1]")
        _need(isinstance(self.min_devices, int) and not isinstance(self.min_devices, bool)
              and self.min_devices >= 0, "min_devices", "an integer >= 0")
        _need(_finite(self.soak_s) and self.soak_s >= 0, "soak_s", "a number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "min_devices": self.min_devices,
                "soak_s": self.soak_s}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "stage") -> Stage:
        f = Fields(obj, where)
        try:
            out = cls(f.float("fraction"), f.int("min_devices", 1), f.float("soak_s", 3600.0))
        except PlanError as exc:
            raise _schema(where, exc) from exc
        f.done()
        return out


DEFAULT_STAGES = (Stage(0.01, 1, 3600.0), Stage(0.10, 3, 3600.0), Stage(0.50, 10, 3600.0),
                  Stage(1.0, 1, 3600.0))


@dataclass(frozen=True, kw_only=True)
class GateThresholds:
    """The bounds the gates judge against; ``None`` disables a gate.

    Rates are fractions of requests, ``error rate = errors / (predictions + errors)``.
    The sample floors keep PSI's small-sample bias (≈ (B−1)/n per side) well under the
    PSI bound with 10 bins.
    """

    min_canary_predictions: int = 200  # before any metric gate is judged
    min_control_predictions: int = 200
    min_healthy_predictions: int = 20  # per device, on the new bundle, to count as healthy
    min_healthy_share: float = 0.9  # of the canaries that did not fail to install
    max_install_failures: int = 0  # tolerated whatever the stage size ...
    max_install_failure_rate: float = 0.02  # ... or this share of the canaries if larger
    max_error_rate: float | None = 0.05  # canary error rate, absolute
    max_error_rate_delta: float | None = 0.01  # canary − control error rate
    max_latency_p95_ratio: float | None = 1.5  # canary p95 / control p95
    max_prediction_psi: float | None = 0.25  # canary vs control predictions
    max_prediction_js: float | None = 0.1
    max_input_drift_share: float | None = 0.5  # share of input features drifting (canaries)
    block_on_input_drift: bool = True  # the drift monitor's verdict on canary inputs fails
    min_shadow_rows: int = 200
    min_shadow_agreement: float | None = 0.95
    # accuracy (or MAE) of the canaries against the controls: realized once both sides have
    # min_labels labelled rows, else the label-free estimate. A classifier's canary accuracy
    # may be at most max_accuracy_drop (absolute) below the controls', a regressor's MAE at
    # most max_mae_rise (relative) above; it fails only when the canary's interval also
    # excludes the controls' value (sampling noise cannot fail it). In a shadow phase the
    # same tolerance and min_labels judge the shadow's accuracy against the live model's on
    # the same labelled rows (paired; fails only when McNemar's exact test rules out chance)
    max_accuracy_drop: float | None = 0.02
    max_mae_rise: float | None = 0.1
    min_labels: int = 200
    max_wait_s: float = 86400.0  # after the soak, how long gates may wait for data
    on_insufficient_data: str = "abort"  # or "pause"

    def __post_init__(self) -> None:
        for fd in dataclasses.fields(self):
            value, kind = getattr(self, fd.name), fd.type
            if kind == "int":
                _need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                      fd.name, "an integer >= 0")
            elif kind == "bool":
                _need(isinstance(value, bool), fd.name, "true or false")
            elif kind == "str":
                _need(value in ("abort", "pause"), fd.name, "'abort' or 'pause'")
            elif value is not None or kind == "float":
                _need(_finite(value) and value >= 0, fd.name, "a number >= 0")
        for name in ("min_healthy_share", "max_install_failure_rate", "max_error_rate",
                     "max_input_drift_share", "min_shadow_agreement", "max_accuracy_drop"):
            value = getattr(self, name)
            _need(value is None or value <= 1, name, "a share in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {fd.name: getattr(self, fd.name) for fd in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "gates") -> GateThresholds:
        """Read thresholds; a missing field takes its default, an unknown one is refused.

        Raises:
            SchemaError: a wrongly typed, out-of-range or unknown field (named).
        """
        f = Fields(obj, where)
        values: dict[str, Any] = {}
        for fd in dataclasses.fields(cls):
            if not f.has(fd.name):
                continue
            if fd.type == "int":
                values[fd.name] = f.int(fd.name)
            elif fd.type == "bool":
                values[fd.name] = f.bool(fd.name)
            elif fd.type == "str":
                values[fd.name] = f.choice(fd.name, ("abort", "pause"))
            elif fd.type == "float":
                values[fd.name] = f.float(fd.name)
            else:
                values[fd.name] = f.opt_float(fd.name)
        f.done()
        try:
            return cls(**values)
        except PlanError as exc:
            raise _schema(where, exc) from exc


@dataclass(frozen=True, kw_only=True)
class RolloutPlan:
    """What to roll out where, how: fixed when the rollout is created."""

    id: str
    bundle: BundleRef
    group: str  # the label selector; the shell resolves it to device ids
    stages: tuple[Stage, ...] = DEFAULT_STAGES
    gates: GateThresholds = field(default_factory=GateThresholds)
    shadow_first: bool = False
    shadow_soak_s: float = 3600.0
    install_timeout_s: float = 1800.0
    requires_approval: bool = False
    created_at: float

    def __post_init__(self) -> None:
        _need(isinstance(self.id, str) and bool(ID_RE.match(self.id)), "id",
              "letters, digits, '.', '_', '-' (max 64)")
        _need(isinstance(self.bundle, BundleRef), "bundle", "a BundleRef")
        _need(isinstance(self.group, str) and 0 < len(self.group) <= 1024, "group",
              "a label selector of 1-1024 characters")
        _need(isinstance(self.stages, tuple) and 0 < len(self.stages) <= MAX_STAGES
              and all(isinstance(s, Stage) for s in self.stages), "stages",
              f"1-{MAX_STAGES} stages")
        _need(all(a.fraction <= b.fraction for a, b in pairwise(self.stages)),
              "stages", "fractions must not decrease")
        _need(self.stages[-1].fraction == 1, "stages", "the last stage must cover 100 %")
        _need(isinstance(self.gates, GateThresholds), "gates", "GateThresholds")
        for name in ("shadow_soak_s", "install_timeout_s", "created_at"):
            _need(_finite(getattr(self, name)) and getattr(self, name) >= 0, name,
                  "a number >= 0")
        for name in ("shadow_first", "requires_approval"):
            _need(isinstance(getattr(self, name), bool), name, "true or false")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": ROLLOUT_SCHEMA, "id": self.id, "bundle": self.bundle.to_dict(),
                "group": self.group, "stages": [s.to_dict() for s in self.stages],
                "gates": self.gates.to_dict(), "shadow_first": self.shadow_first,
                "shadow_soak_s": self.shadow_soak_s,
                "install_timeout_s": self.install_timeout_s,
                "requires_approval": self.requires_approval, "created_at": self.created_at}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "plan") -> RolloutPlan:
        """Read a plan; ``stages``, ``gates`` and the flags may be left to their defaults.

        Raises:
            SchemaError: wrong schema version, a bad or unknown field (named).
        """
        f = Fields(obj, where)
        if f.int("schema") != ROLLOUT_SCHEMA:
            raise f.bad("schema", f"unsupported rollout schema (expected {ROLLOUT_SCHEMA})")
        stages = f.list("stages", max_len=MAX_STAGES) if f.has("stages") else None
        values: dict[str, Any] = {
            "id": f.str("id", max_len=64),
            "bundle": BundleRef.from_dict(f.raw("bundle"), f"{where}.bundle"),
            "group": f.str("group", max_len=1024),
            "gates": GateThresholds.from_dict(f.raw("gates", {}), f"{where}.gates"),
            "shadow_first": f.bool("shadow_first", False),
            "shadow_soak_s": f.float("shadow_soak_s", 3600.0),
            "install_timeout_s": f.float("install_timeout_s", 1800.0),
            "requires_approval": f.bool("requires_approval", False),
            "created_at": f.float("created_at"),
        }
        if stages is not None:
            values["stages"] = tuple(Stage.from_dict(s, f"{where}.stages[{i}]")
                                     for i, s in enumerate(stages))
        f.done()
        try:
            return cls(**values)
        except PlanError as exc:
            raise _schema(where, exc) from exc


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class TouchedDevice:
    """A device this rollout changed: what it ran before, since when, how."""

    previous: BundleRef | None  # None: it had no bundle (a fresh device)
    assigned_at: float  # the install timeout counts from here
    stage: int  # the stage that first touched it
    mode: str = "canary"  # shadow | canary

    def to_dict(self) -> dict[str, Any]:
        return {"previous": _opt_dict(self.previous), "assigned_at": self.assigned_at,
                "stage": self.stage, "mode": self.mode}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> TouchedDevice:
        f = Fields(obj, where)
        out = cls(_opt_bundle(f, "previous"), f.float("assigned_at"), f.int("stage"),
                  f.choice("mode", MODES))
        f.done()
        return out


@dataclass(frozen=True)
class AuditEntry:
    """One transition: when, who (``operator:<name>`` | ``system``), what, and why."""

    time: float
    actor: str
    action: str  # create | approve | start | pause | resume | promote | abort
    from_status: str | None
    to_status: str
    stage: int
    numbers: dict[str, Any] = field(default_factory=dict)  # JSON values: gates, counts
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "actor": self.actor, "action": self.action,
                "from_status": self.from_status, "to_status": self.to_status,
                "stage": self.stage, "numbers": self.numbers, "reason": self.reason}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> AuditEntry:
        f = Fields(obj, where)
        actor = f.str("actor", max_len=137)
        if not ACTOR_RE.match(actor):
            raise f.bad("actor", "'system' or 'operator:<name>'")
        start = f.raw("from_status", None)
        out = cls(f.float("time"), actor, f.choice("action", AUDIT_ACTIONS),
                  None if start is None else f.choice("from_status", STATUSES),
                  f.choice("to_status", STATUSES), f.int("stage"), f.mapping("numbers"),
                  f.str("reason", "", max_len=MAX_REASON))
        f.done()
        return out


@dataclass(frozen=True, kw_only=True)
class RolloutState:
    """Where a rollout is. Never mutate ``touched``: transitions build new states."""

    rollout_id: str
    status: str
    stage: int = 0
    stage_started_at: float | None = None  # start of the metrics window
    soak_started_at: float | None = None  # reset by resume
    paused_from: str | None = None
    approved_by: str | None = None
    approved_at: float | None = None
    finished_at: float | None = None
    touched: Mapping[str, TouchedDevice] = field(default_factory=dict)
    history: tuple[AuditEntry, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"schema": ROLLOUT_SCHEMA, "rollout_id": self.rollout_id,
                "status": self.status, "stage": self.stage,
                "stage_started_at": self.stage_started_at,
                "soak_started_at": self.soak_started_at, "paused_from": self.paused_from,
                "approved_by": self.approved_by, "approved_at": self.approved_at,
                "finished_at": self.finished_at,
                "touched": {d: t.to_dict() for d, t in sorted(self.touched.items())},
                "history": [e.to_dict() for e in self.history]}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "state") -> RolloutState:
        """Read a stored state.

        Raises:
            SchemaError: wrong schema version, a bad or unknown field (named).
        """
        f = Fields(obj, where)
        if f.int("schema") != ROLLOUT_SCHEMA:
            raise f.bad("schema", f"unsupported rollout schema (expected {ROLLOUT_SCHEMA})")
        touched = f.mapping("touched")
        if len(touched) > MAX_DEVICES:
            raise f.bad("touched", f"more than {MAX_DEVICES} devices")
        paused_from = f.raw("paused_from", None)
        approved_by = f.raw("approved_by", None)
        out = cls(
            rollout_id=f.str("rollout_id", max_len=64), status=f.choice("status", STATUSES),
            stage=f.int("stage"), stage_started_at=f.opt_float("stage_started_at"),
            soak_started_at=f.opt_float("soak_started_at"),
            paused_from=None if paused_from is None else f.choice("paused_from", ACTIVE),
            approved_by=None if approved_by is None else f.str("approved_by", max_len=137),
            approved_at=f.opt_float("approved_at"), finished_at=f.opt_float("finished_at"),
            touched={d: TouchedDevice.from_dict(t, f"{where}.touched[{d!r}]")
                     for d, t in touched.items()},
            history=tuple(AuditEntry.from_dict(e, f"{where}.history[{i}]") for i, e in
                          enumerate(f.list("history", max_len=MAX_HISTORY))))
        f.done()
        return out


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class GateResult:
    """One gate's value against its threshold, for the audit log and the dashboard."""

    name: str
    outcome: str  # pass | fail | wait | skip
    value: float | None
    threshold: float | None
    op: str  # "<=" or ">=": value op threshold passes
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome in ("pass", "skip")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "outcome": self.outcome, "value": self.value,
                "threshold": self.threshold, "op": self.op, "reason": self.reason}


@dataclass(frozen=True)
class DesiredAssignment:
    """What one group member should run, as far as this rollout is concerned.

    ``role == "control"``: not this rollout's to change (``bundle`` is None; publish
    nothing). Any other role is authoritative: ``bundle`` and ``shadow`` (None = no
    shadow) are the desired state.
    """

    bundle: BundleRef | None
    shadow: BundleRef | None = None
    allow_downgrade: bool = False
    role: str = "control"  # control | shadow | canary | complete | rollback | kept

    @property
    def managed(self) -> bool:
        return self.role != "control"

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": _opt_dict(self.bundle), "shadow": _opt_dict(self.shadow),
                "allow_downgrade": self.allow_downgrade, "role": self.role}


CONTROL = DesiredAssignment(None)


@dataclass(frozen=True)
class Decision:
    """The new state, the desired state of every device, what was logged and judged."""

    state: RolloutState
    desired: dict[str, DesiredAssignment]
    audit: tuple[AuditEntry, ...]  # the entries appended to ``state.history``
    gate_results: tuple[GateResult, ...]
