"""Staged rollouts: the pure state machine (order, stages, gates, transitions, audit).

A rollout takes one bundle to one device group in stages. This module is its core:
values in, values out, ``now`` a parameter. The shell around it (store, MQTT desired
state, gate metrics from stored summaries, REST, CLI) calls exactly this::

    state = initial_state(plan, actor="operator:ana")   # pending_approval or ready
    # every tick, for each rollout not finished:
    devices = {device_id: DeviceObs(...)}                # the group's members now
    window = gate_window(plan, state, devices)          # canaries, controls, since (or None)
    metrics = GateMetrics(window_start=window.since, ...)  # computed over that window
    d = decide(plan, state, Observation(now, devices, metrics))
    # an operator action (roles from the token; bundle_approved from the signatures):
    d = act(plan, state, "approve", Observation(now, devices, metrics),
            actor="operator:bo", roles={"approver"}, bundle_approved=True)
    # then: store d.state (d.audit are the entries it appended to d.state.history);
    # publish d.desired[x] for every x with d.desired[x].managed that differs from what
    # x was last sent (allow_downgrade included); show d.gate_results.
    plan_preview(plan, device_ids)                      # `fleet rollout plan` (dry run)

A ``control`` assignment means "not this rollout's": publish nothing for that device.
``decide`` on a finished rollout changes nothing and returns its final assignments
(joiners of a completed rollout get the bundle), so the shell may keep or stop ticking it.

Status machine (``*``: every status but the two finished ones)::

    pending_approval --approve--> ready --start--> shadow --gates pass/promote--> running
    (requires_approval)                  (shadow_first)                   (else straight)
    running --gates pass/promote--> running (next stage) ... --last stage--> completed
    shadow|running --pause--> paused --resume--> shadow|running
    * --abort, or a gate fails--> aborted

Rules this core decides (and the tests hold it to):

- Order: devices sorted by ``sha256(f"{rollout_id}\\0{device_id}")``. Stage *i* holds the
  first ``size_i`` devices, ``size_i = min(N, max(ceil(fraction_i·N), min_devices_i))``,
  never smaller than an earlier stage's size; plus every device already touched that is
  still in the group (stages only grow: a device once given the bundle keeps it). A
  device joining mid-rollout takes the state of its place: inside the current stage it
  becomes a canary at the next tick; after completion it is assigned the bundle; after
  an abort nothing new happens. A device that leaves the group keeps what it runs and is
  no longer judged; it is still rolled back on abort.
- Canary phase, per device: *failed* (an install report ``failed``/``rolled_back``
  received after its assignment, or not installed ``install_timeout_s`` after it, online
  or not), *pending*, *installed*, or *healthy* (installed and at least
  ``min_healthy_predictions`` healthy predictions on the bundle). Only healthy devices
  count as succeeded.
- Gates (:class:`GateResult`, outcome pass | fail | wait | skip): ``soak``,
  ``install_failures`` (failures ≤ max(max_install_failures, ⌊rate·canaries⌋)),
  ``healthy_devices`` (share of non-failed canaries), ``sample`` / ``control_sample``
  (minimum predictions), ``error_rate``, ``error_rate_delta``, ``latency_p95_ratio``,
  ``prediction_psi``, ``prediction_js``, ``input_drift_share``, ``input_drift``; in the
  shadow phase ``install_failures``, ``shadow_sample``, ``shadow_agreement``,
  ``shadow_error_rate``, ``shadow_accuracy`` (paired with the live model on the same
  labelled rows, McNemar). A threshold of ``None`` disables a gate (skip). Comparative gates
  are skipped when the group has no control device left (the 100 % stage). A gate whose
  number is missing or whose sample is short *waits*; it never passes for lack of data.
- Judgement: install failures abort at once (they are counted, not sampled); the other
  gates are judged only once the soak is over: any fail → abort; any wait → keep
  waiting until ``soak + max_wait_s``, then "insufficient data" → abort (or pause, per
  ``GateThresholds.on_insufficient_data``); all pass → next stage, or completed.
  Metrics for another window (``window_start`` ≠ the stage's start) count as missing.
- Shadow phase (``shadow_first``): stage 0's devices that run a bundle get
  ``bundle = their current one, shadow = the candidate`` for ``shadow_soak_s``; fresh
  devices (no bundle) sit it out. Passing it starts stage 0 proper.
- Paused: nothing automatic happens (no new devices, no promotion, no abort); gate
  results are still computed for display. Resume restarts the current soak (and so the
  deadline); the metrics window keeps its start.
- Promote (operator) skips the rest of the soak and advances whatever the gates say; the
  gate values at that moment go into its audit entry.
- Abort: every touched device is assigned its previous bundle, shadow cleared,
  ``allow_downgrade`` when that version is lower. A device that had no bundle before
  (fresh) keeps the rollout's bundle (role ``kept``) and is listed in the audit entry:
  unassigning it would leave it without a runnable model, and nothing older exists.
  Hence no device that had a runnable bundle is ever left without one.
- Approval: a plan with ``requires_approval`` starts ``pending_approval``; ``approve``
  needs an ``operator:`` actor with the ``approver`` role and ``bundle_approved`` (the
  shell checked the bundle carries an approver's signature); ``start`` re-checks it.
- Forward assignments never set ``allow_downgrade``: a device that runs a higher version
  refuses the bundle and counts as an install failure, visibly.

Error tree (all raised before any state is produced)::

    RolloutError(FleetError)          names the rollout, its status and the action
    ├── PlanError                     a plan, stage or threshold is invalid (``field``)
    ├── ObservationError              the shell passed an impossible number
    ├── StateMismatchError            the state belongs to another rollout
    ├── InvalidTransitionError        the action is not allowed in this status
    │   ├── UnknownActionError        not an action at all
    │   └── RolloutFinishedError      anything on a completed or aborted rollout
    ├── ApprovalRequiredError         start before approval; bundle without approval
    └── ActorNotAllowedError          a malformed actor; approve without the approver role

``from_dict`` raises :class:`~edgefleet.contract.errors.SchemaError` naming the field (a
``PlanError`` inside a document is reported as one).

This module deliberately does not: read or write the store, publish MQTT, resolve
label selectors, verify bundle signatures, compute PSI/JS/p95 from summaries (the shell
does, with :mod:`fleet_server.profiles.drift`), check operator tokens, or keep two rollouts off
one device (the shell must refuse a second active rollout on a group's devices).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.manifest import parse_version
from edgefleet.contract.messages import BundleRef
from fleet_server.rollouts.errors import (
    ActorNotAllowedError,
    ApprovalRequiredError,
    InvalidTransitionError,
    ObservationError,
    PlanError,
    RolloutError,
    RolloutFinishedError,
    StateMismatchError,
    UnknownActionError,
)
from fleet_server.rollouts.gates import (
    classify,
    gate_window,
    judge,
    phase_status,
    share_of,
    window_verdict,
)
from fleet_server.rollouts.observations import (
    DeviceObs,
    GateMetrics,
    GateWindow,
    InstallObs,
    Observation,
)
from fleet_server.rollouts.values import (
    ACTIONS,
    ACTIVE,
    ACTOR_RE,
    CONTROL,
    DEFAULT_STAGES,
    FINISHED,
    MAX_LISTED,
    MAX_REASON,
    ROLES,
    STATUSES,
    AuditEntry,
    Decision,
    DesiredAssignment,
    GateResult,
    GateThresholds,
    RolloutPlan,
    RolloutState,
    Stage,
    TouchedDevice,
    _finite,
    _refuse,
)

__all__ = [
    "ACTIONS", "ACTIVE", "DEFAULT_STAGES", "FINISHED", "ROLES", "STATUSES",
    "ActorNotAllowedError", "ApprovalRequiredError", "AuditEntry", "Decision",
    "DesiredAssignment", "DeviceObs", "GateMetrics", "GateResult", "GateThresholds",
    "GateWindow", "InstallObs", "InvalidTransitionError", "Observation", "ObservationError",
    "PlanError", "RolloutError", "RolloutFinishedError", "RolloutPlan", "RolloutState",
    "Stage", "StateMismatchError", "TouchedDevice", "UnknownActionError",
    "act", "assignments", "canary_phase", "decide", "gate_window", "initial_state",
    "plan_order", "plan_preview", "stage_members", "stage_size",
]


# --------------------------------------------------------------------------- order


def plan_order(rollout_id: str, device_ids: Iterable[str]) -> list[str]:
    """The devices in rollout order: by ``sha256(f"{rollout_id}\\0{device_id}")``.

    The order of a device against another never depends on the rest of the group, so
    each stage contains the last and a joining device slots into its place.
    Duplicates are dropped.
    """
    seed = hashlib.sha256(f"{rollout_id}\0".encode())

    def key(device: str) -> bytes:
        h = seed.copy()
        h.update(device.encode())
        # raw digests sort as their hex does; the id after them settles a (theoretical) tie
        return h.digest() + device.encode()

    return sorted(set(device_ids), key=key)


def stage_size(plan: RolloutPlan, stage: int, n: int) -> int:
    """How many of ``n`` devices the first ``stage + 1`` stages cover.

    ``min(n, max(ceil(fraction·n), min_devices))``, and never fewer than an earlier
    stage's size (a smaller ``min_devices`` later on does not shrink a stage).

    Raises:
        PlanError: ``stage`` is not an index of ``plan.stages``.
    """
    if not 0 <= stage < len(plan.stages):
        raise PlanError(f"rollout {plan.id!r}: no stage {stage} (it has "
                        f"{len(plan.stages)})", field="stage")
    size = 0
    for s in plan.stages[: stage + 1]:
        size = max(size, min(n, max(math.ceil(share_of(s.fraction, n)), s.min_devices)))
    return size


def stage_members(plan: RolloutPlan, device_ids: Iterable[str], stage: int,
                  touched: Collection[str] = ()) -> list[str]:
    """The devices of ``device_ids`` in stage ``stage``, in rollout order.

    The first :func:`stage_size` devices of :func:`plan_order`, plus every device of
    ``touched`` still among ``device_ids`` (a touched device stays in).

    Raises:
        PlanError: ``stage`` is not an index of ``plan.stages``.
    """
    order = plan_order(plan.id, device_ids)
    size = stage_size(plan, stage, len(order))
    keep = set(touched)
    return [d for i, d in enumerate(order) if i < size or d in keep]


def plan_preview(plan: RolloutPlan,
                 device_ids: Iterable[str]) -> list[tuple[int, float, list[str]]]:
    """A dry run: ``(stage index, fraction, members)`` of every stage for these devices.

    A shadow phase, if asked for, runs on stage 0's members that have a bundle.
    """
    ids = list(device_ids)
    return [(i, s.fraction, stage_members(plan, ids, i)) for i, s in enumerate(plan.stages)]


# --------------------------------------------------------------------------- helpers


def _lower(a: BundleRef, b: BundleRef) -> bool:
    try:
        return parse_version(a.version) < parse_version(b.version)
    except SchemaError:
        return True  # cannot tell: a rollback must not be refused as a downgrade


def _check(plan: RolloutPlan, state: RolloutState, obs: Observation) -> None:
    if state.rollout_id != plan.id:
        raise StateMismatchError(f"state of rollout {state.rollout_id!r} passed with plan "
                                 f"{plan.id!r}", rollout_id=plan.id, rollout_status=state.status)
    if not _finite(obs.now):
        raise ObservationError(f"rollout {plan.id!r}: now {obs.now!r} is not a time",
                               rollout_id=plan.id, rollout_status=state.status)


def initial_state(plan: RolloutPlan, *, actor: str) -> RolloutState:
    """The state of a new rollout: ``pending_approval`` if the plan needs approval, else
    ``ready``; its history holds the ``create`` entry (at ``plan.created_at``).

    Raises:
        ActorNotAllowedError: ``actor`` is not ``system`` or ``operator:<name>``.
    """
    status = "pending_approval" if plan.requires_approval else "ready"
    if not isinstance(actor, str) or not ACTOR_RE.match(actor):
        raise ActorNotAllowedError(f"rollout {plan.id!r}: actor {actor!r} is not 'system' "
                                    "or 'operator:<name>'", rollout_id=plan.id,
                                    action="create")
    entry = AuditEntry(plan.created_at, actor, "create", None, status, 0,
                       {"bundle": plan.bundle.label, "group": plan.group,
                        "stages": [s.to_dict() for s in plan.stages]})
    return RolloutState(rollout_id=plan.id, status=status, history=(entry,))


# --------------------------------------------------------------------------- transitions


def _touch(plan: RolloutPlan, state: RolloutState, devices: Mapping[str, DeviceObs],
           now: float) -> RolloutState:
    """Give the current stage's members the bundle (or the shadow); record what they ran."""
    if state.status not in ACTIVE:
        return state
    mode = "shadow" if state.status == "shadow" else "canary"
    touched = dict(state.touched)
    for d in stage_members(plan, devices, state.stage, state.touched):
        t = touched.get(d)
        if t is None:
            previous = devices[d].running
            if mode == "shadow" and previous is None:
                continue  # nothing live to shadow: a fresh device waits for stage 0 proper
            touched[d] = TouchedDevice(previous, now, state.stage, mode)
        elif t.mode != mode and mode == "canary":
            touched[d] = replace(t, mode="canary", assigned_at=now)
    if len(touched) == len(state.touched) and all(
            touched[d] is state.touched[d] for d in touched):
        return state
    return replace(state, touched=touched)


def _rollback(plan: RolloutPlan, t: TouchedDevice) -> DesiredAssignment:
    if t.previous is None:
        # the only runnable bundle this device ever had: unassigning it helps nobody
        return DesiredAssignment(plan.bundle, None, False, "kept")
    return DesiredAssignment(t.previous, None,
                             t.mode == "canary" and _lower(t.previous, plan.bundle),
                             "rollback")


def _desired(plan: RolloutPlan, state: RolloutState,
             devices: Mapping[str, DeviceObs]) -> dict[str, DesiredAssignment]:
    ids = sorted(devices)
    if state.status == "completed":
        done = DesiredAssignment(plan.bundle, None, False, "complete")
        return {d: done for d in ids}
    out = dict.fromkeys(ids, CONTROL)
    if state.status == "aborted":
        # every touched device, also one that left the group: it runs what we gave it
        out.update({d: _rollback(plan, t) for d, t in sorted(state.touched.items())})
        return out
    canary = DesiredAssignment(plan.bundle, None, False, "canary")
    for d in ids:
        t = state.touched.get(d)
        if t is not None:
            out[d] = canary if t.mode == "canary" else \
                DesiredAssignment(t.previous, plan.bundle, False, "shadow")
    return out


def _transition(state: RolloutState, now: float, actor: str, action: str, to: str,
                numbers: dict[str, Any], reason: str, **changes: Any) -> RolloutState:
    entry = AuditEntry(now, actor, action, state.status, to, state.stage, numbers,
                       reason[:MAX_REASON])
    return replace(state, status=to, history=(*state.history, entry), **changes)


def _numbers(results: Iterable[GateResult], counts: Mapping[str, Any],
             **extra: Any) -> dict[str, Any]:
    return {"gates": [r.to_dict() for r in results], **counts, **extra}


def _promote(plan: RolloutPlan, state: RolloutState, now: float, actor: str,
             numbers: dict[str, Any], reason: str) -> RolloutState:
    if state.status == "shadow":
        to, stage = "running", 0
    elif state.stage + 1 < len(plan.stages):
        to, stage = "running", state.stage + 1
    else:
        return _transition(state, now, actor, "promote", "completed", numbers, reason,
                           finished_at=now)
    return _transition(state, now, actor, "promote", to, {**numbers, "to_stage": stage},
                       reason, stage=stage, stage_started_at=now, soak_started_at=now)


def _abort(plan: RolloutPlan, state: RolloutState, now: float, actor: str,
           numbers: dict[str, Any], reason: str) -> RolloutState:
    fresh = sorted(d for d, t in state.touched.items() if t.previous is None)
    numbers = {**numbers, "rolled_back": len(state.touched) - len(fresh),
               "kept_without_previous": len(fresh),
               "kept_devices": fresh[:MAX_LISTED]}
    return _transition(state, now, actor, "abort", "aborted", numbers, reason,
                       paused_from=None, finished_at=now)


def _reasons(results: Iterable[GateResult], outcome: str) -> str:
    return "; ".join(f"{r.name}: {r.reason}" for r in results if r.outcome == outcome)


def decide(plan: RolloutPlan, state: RolloutState, obs: Observation) -> Decision:
    """The automatic step, called every tick: assign, judge, promote or abort.

    In the shadow phase or running: the current stage's members (joiners included) are
    assigned; the gates are judged; the verdict applies (see the module docstring).
    Paused: gates are judged for display, nothing changes. Otherwise the state is
    returned as it is, with the desired state its status implies.

    Raises:
        StateMismatchError: ``state`` is another rollout's.
        ObservationError: ``obs.now`` is not a finite time.
    """
    _check(plan, state, obs)
    now, before = obs.now, state
    results: list[GateResult] = []
    if state.status in ACTIVE:
        state = _touch(plan, state, obs.devices, now)
        results, counts, deadline = judge(plan, state, obs)
        verdict = window_verdict(results, now, deadline)
        if verdict == "abort":
            state = _abort(plan, state, now, "system", _numbers(results, counts),
                           "gate failed: " + _reasons(results, "fail"))
        elif verdict == "promote":
            state = _promote(plan, state, now, "system", _numbers(results, counts),
                             "gates passed")
            state = _touch(plan, state, obs.devices, now)
        elif verdict == "insufficient":
            why = (f"insufficient data {plan.gates.max_wait_s:.0f} s after the soak: "
                   + _reasons(results, "wait"))
            if plan.gates.on_insufficient_data == "pause":
                state = _transition(state, now, "system", "pause", "paused",
                                    _numbers(results, counts), why, paused_from=state.status)
            else:
                state = _abort(plan, state, now, "system", _numbers(results, counts), why)
    elif state.status == "paused" and state.paused_from in ACTIVE:
        results, _, _ = judge(plan, state, obs)
    return Decision(state, _desired(plan, state, obs.devices),
                    state.history[len(before.history):], tuple(results))


def act(plan: RolloutPlan, state: RolloutState, action: str, obs: Observation, *,
        actor: str, roles: Collection[str] = (), bundle_approved: bool = False,
        reason: str = "") -> Decision:
    """An operator action (or the shell's, as ``system``): approve, start, pause, resume,
    promote, abort. ``obs`` gives the time, the devices to assign and the gate values
    recorded with the action.

    ``bundle_approved``: the shell found an approver's signature on the bundle (needed by
    approve and start when the plan requires approval). ``roles``: the actor's roles.

    Raises:
        StateMismatchError: ``state`` is another rollout's.
        ObservationError: ``obs.now`` is not a finite time.
        ActorNotAllowedError: a malformed actor; approve by anyone but an
            ``operator:`` with the ``approver`` role.
        UnknownActionError: ``action`` is none of :data:`ACTIONS`.
        RolloutFinishedError: the rollout is completed or aborted.
        ApprovalRequiredError: start before approval; approve or start without
            ``bundle_approved`` on a plan that requires approval.
        InvalidTransitionError: the action does not apply in the current status.
    """
    _check(plan, state, obs)
    if action not in ACTIONS:
        raise _refuse(UnknownActionError, plan, state, str(action)[:64],
                      f"not one of {', '.join(ACTIONS)}")
    if not isinstance(actor, str) or not ACTOR_RE.match(actor):
        raise _refuse(ActorNotAllowedError, plan, state, action,
                      f"actor {str(actor)[:64]!r} is not 'system' or 'operator:<name>'")
    if state.status in FINISHED:
        raise _refuse(RolloutFinishedError, plan, state, action,
                      f"the rollout is {state.status}")
    results: list[GateResult] = []
    counts: dict[str, Any] = {}
    if phase_status(state) in ACTIVE:
        results, counts, _ = judge(plan, state, obs)
    step = _Act(plan, state, obs.now, actor, frozenset(roles), bundle_approved, reason,
                _numbers(results, counts, devices=len(obs.devices)))
    new = _ACTIONS[action](step)
    new = _touch(plan, new, obs.devices, obs.now)
    return Decision(new, _desired(plan, new, obs.devices), new.history[len(state.history):],
                    tuple(results))


@dataclass(frozen=True)
class _Act:
    """One operator action being applied: what each ``_do_*`` step reads."""

    plan: RolloutPlan
    state: RolloutState
    now: float
    actor: str
    roles: frozenset[str]
    bundle_approved: bool
    reason: str
    numbers: Mapping[str, Any]

    def refuse(self, kind: type[RolloutError], why: str, action: str) -> RolloutError:
        return _refuse(kind, self.plan, self.state, action, why)

    def to(self, action: str, status: str, reason: str | None = None,
           **changes: Any) -> RolloutState:
        return _transition(self.state, self.now, self.actor, action, status, self.numbers,
                           self.reason if reason is None else reason, **changes)


def _do_approve(a: _Act) -> RolloutState:
    if a.state.status != "pending_approval":
        raise a.refuse(InvalidTransitionError,
                       "only a rollout pending approval can be approved", "approve")
    if not a.actor.startswith("operator:") or "approver" not in a.roles:
        raise a.refuse(ActorNotAllowedError, f"{a.actor} lacks the approver role", "approve")
    if not a.bundle_approved:
        raise a.refuse(ApprovalRequiredError,
                       f"bundle {a.plan.bundle.label} carries no approver's signature",
                       "approve")
    return a.to("approve", "ready", approved_by=a.actor, approved_at=a.now)


def _do_start(a: _Act) -> RolloutState:
    if a.state.status == "pending_approval":
        raise a.refuse(ApprovalRequiredError, "the rollout is not approved yet", "start")
    if a.state.status != "ready":
        raise a.refuse(InvalidTransitionError, "it has started", "start")
    if a.plan.requires_approval and not a.bundle_approved:
        raise a.refuse(ApprovalRequiredError,
                       f"bundle {a.plan.bundle.label} carries no approver's signature", "start")
    return a.to("start", "shadow" if a.plan.shadow_first else "running",
                stage=0, stage_started_at=a.now, soak_started_at=a.now)


def _do_pause(a: _Act) -> RolloutState:
    if a.state.status not in ACTIVE:
        raise a.refuse(InvalidTransitionError,
                       "only a rollout in its shadow phase or running can be paused", "pause")
    return a.to("pause", "paused", paused_from=a.state.status)


def _do_resume(a: _Act) -> RolloutState:
    if a.state.status != "paused" or a.state.paused_from not in ACTIVE:
        raise a.refuse(InvalidTransitionError, "it is not paused", "resume")
    return a.to("resume", a.state.paused_from, paused_from=None, soak_started_at=a.now)


def _do_promote(a: _Act) -> RolloutState:
    if a.state.status not in ACTIVE:
        raise a.refuse(InvalidTransitionError,
                       "only a rollout in its shadow phase or running can be promoted",
                       "promote")
    return _promote(a.plan, a.state, a.now, a.actor, a.numbers,
                    a.reason or "promoted by operator")


def _do_abort(a: _Act) -> RolloutState:
    return _abort(a.plan, a.state, a.now, a.actor, a.numbers, a.reason or "aborted by operator")


# one step per action, as python-tuf's Updater has one method per trust step
_ACTIONS: dict[str, Callable[[_Act], RolloutState]] = {
    "approve": _do_approve, "start": _do_start, "pause": _do_pause, "resume": _do_resume,
    "promote": _do_promote, "abort": _do_abort,
}


# --------------------------------------------------------------------------- views


def assignments(plan: RolloutPlan, state: RolloutState,
                devices: Mapping[str, DeviceObs]) -> dict[str, DesiredAssignment]:
    """The desired state ``state`` implies for ``devices`` (and every touched device once
    aborted), without deciding anything: what :func:`decide` would publish, for display."""
    return _desired(plan, state, devices)


def canary_phase(plan: RolloutPlan, touched: TouchedDevice, obs: DeviceObs,
                 now: float) -> str:
    """pending | installed | healthy | failed | timeout: how the gates see one touched
    device, for display."""
    return classify(plan, touched, obs, now)
