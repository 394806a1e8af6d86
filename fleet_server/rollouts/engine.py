"""Rollouts on the server: the shell around the pure core of :mod:`fleet_server.rollouts.machine`.

:class:`Rollouts` turns a REST body into a :class:`~fleet_server.rollouts.machine.RolloutPlan`,
keeps plans and states in the store, and on every tick (:meth:`Rollouts.tick`, called by
:class:`RolloutEngine` every ``rollout_tick_s`` and right after an operator action):

1. observes the group's members (:class:`~fleet_server.rollouts.machine.DeviceObs`): the bundle
   and shadow each last reported running, its last install report for the rollout's
   bundle (with the *server's* receive time), the rows it served on that bundle, online;
2. reads the :class:`~fleet_server.rollouts.machine.GateMetrics` of the core's gate window
   (:class:`~fleet_server.rollouts.metrics.GateMetricsReader`) from
   the stored summaries whose window ends after the window's start: counts and error
   counters summed, p95 bounds from the summed latency histograms (the canaries' lower
   bound against the controls' upper bound), the canaries' merged profile
   against the controls' (prediction PSI and JS of the outputs, :func:`drift.compare`)
   and against the bundle's reference (input drift share and verdict);
3. calls :func:`~fleet_server.rollouts.machine.decide`, stores the new state, and publishes the
   managed desired states that differ from what each device was last sent.

A failure in one rollout's tick is logged and does not stop the others. Operator actions
(:meth:`Rollouts.act`) observe the same way, call :func:`~fleet_server.rollouts.machine.act`
(``bundle_approved``: the bundle carries a verified signature or approval statement of a
key with the ``approver`` role) and publish at once. One rollout at a time may be unfinished
on a group, and none may share a device with another unfinished rollout. Creating a rollout,
and the actions that send its bundle further (approve, start, resume, promote), first check
the bundle's governance (:func:`~fleet_server.registry.governance.check_assignment`): its
review date, and what the group requires.

Deliberately not here: the rules (the core decides every transition), HTTP, MQTT (the
desired-state service publishes), and the drift statistics (:mod:`fleet_server.profiles.drift`).
Prediction PSI/JS compare the outputs only, so controls on a bundle trained on other data
(other input bins) count as long as their output bins are the same (a classifier's
class vocabulary, the fixed confidence edges); controls whose output bins differ are left
out, and with none left those gates wait.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgefleet.contract.messages import BundleRef
from edgefleet.errors import EdgefleetError
from fleet_server.config import ServerConfig
from fleet_server.errors import ConflictError, InvalidRequestError, NotFoundError
from fleet_server.models import BundleRecord, Device, Group
from fleet_server.monitoring.drift import DriftService
from fleet_server.registry.bundles import Bundles
from fleet_server.registry.desired import Assignment, DesiredStates
from fleet_server.registry.devices import Registry
from fleet_server.registry.governance import check_assignment
from fleet_server.rollouts.machine import (
    ACTIVE,
    DEFAULT_STAGES,
    FINISHED,
    STATUSES,
    DesiredAssignment,
    DeviceObs,
    GateThresholds,
    InstallObs,
    Observation,
    RolloutPlan,
    RolloutState,
    Stage,
    act,
    assignments,
    canary_phase,
    decide,
    gate_window,
    initial_state,
    plan_preview,
    stage_size,
)
from fleet_server.rollouts.metrics import GateMetricsReader
from fleet_server.store import RolloutRow, Store

__all__ = ["SPEC_FIELDS", "RolloutEngine", "Rollouts"]

log = logging.getLogger(__name__)

SPEC_FIELDS = ("bundle", "group", "stages", "gates", "shadow_first", "shadow_soak_s",
               "install_timeout_s", "requires_approval", "id", "start")
# actions that take the bundle to more devices: governance is checked again (a review date
# may have passed since the rollout was created)
_SENDS = ("approve", "start", "resume", "promote")
_SETTLED = ""  # a key of ``sent`` no device id can be: every final assignment went out
MAX_DEVICES_LISTED = 10_000  # devices a rollout's detail lists


def _same(a: BundleRef | None, name: str, version: str) -> bool:
    return a is not None and a.name == name and a.version == version


def _key(a: DesiredAssignment) -> dict[str, Any]:
    # what the device receives; the role is ours (a canary that completes gets nothing new)
    return {"bundle": None if a.bundle is None else a.bundle.label,
            "shadow": None if a.shadow is None else a.shadow.label,
            "allow_downgrade": a.allow_downgrade}


class Rollouts:
    """The rollout service (see the module docstring).

    Args:
        store, registry, bundles, desired, drift: the collaborating services.
        config: ``max_gate_summaries`` bounds the summaries one gate window reads.
        clock: the time source when ``now`` is not given.
    """

    def __init__(self, store: Store, registry: Registry, bundles: Bundles,
                 desired: DesiredStates, drift: DriftService, config: ServerConfig,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = registry
        self.bundles = bundles
        self.desired = desired
        self.drift = drift
        self.clock = clock
        self.wake: Callable[[], None] = lambda: None  # the engine ticks soon after an action
        self._lock = threading.RLock()
        self.gates = GateMetricsReader(store, registry, bundles, drift,
                                       config.max_gate_summaries)

    # -- specs ---------------------------------------------------------------------------

    def _plan(self, spec: Any, now: float, *, rollout_id: str | None = None
              ) -> tuple[RolloutPlan, Group, BundleRecord]:
        if not isinstance(spec, Mapping):
            raise InvalidRequestError("a rollout spec must be a JSON object", field="spec")
        unknown = sorted(str(k) for k in spec if k not in SPEC_FIELDS)
        if unknown:
            raise InvalidRequestError(f"unknown field {unknown[0][:64]!r} (a rollout takes: "
                                      f"{', '.join(SPEC_FIELDS)})", field=unknown[0][:64])
        label = spec.get("bundle")
        if not isinstance(label, str):
            raise InvalidRequestError("bundle: required, name@version", field="bundle")
        record = self.bundles.by_label(label)
        group_name = spec.get("group")
        if not isinstance(group_name, str):
            raise InvalidRequestError("group: required, a group name", field="group")
        group = self.registry.group(group_name)
        stages: tuple[Stage, ...] = DEFAULT_STAGES
        if spec.get("stages") is not None:
            raw = spec["stages"]
            if not isinstance(raw, list) or not raw:
                raise InvalidRequestError("stages: a non-empty list of stages",
                                          field="stages")
            stages = tuple(Stage.from_dict(s, f"stages[{i}]") for i, s in enumerate(raw))
        gates = GateThresholds.from_dict(spec.get("gates") or {}, "gates")
        flags: dict[str, Any] = {}
        for name in ("shadow_first", "requires_approval", "start"):
            value = spec.get(name, False)
            if not isinstance(value, bool):
                raise InvalidRequestError(f"{name}: true or false", field=name)
            flags[name] = value
        for name, default in (("shadow_soak_s", 3600.0), ("install_timeout_s", 1800.0)):
            value = spec.get(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise InvalidRequestError(f"{name}: a number of seconds >= 0", field=name)
            flags[name] = float(value)
        rid = spec.get("id", rollout_id)
        if rid is None:
            rid = f"{record.name}-{record.version}-{secrets.token_hex(3)}"[-64:].lstrip("-._")
        if not isinstance(rid, str):
            raise InvalidRequestError("id: letters, digits, '.', '_', '-' (max 64)",
                                      field="id")
        plan = RolloutPlan(
            id=rid, bundle=record.ref, group=group.name, stages=stages, gates=gates,
            shadow_first=flags["shadow_first"], shadow_soak_s=flags["shadow_soak_s"],
            install_timeout_s=flags["install_timeout_s"],
            requires_approval=flags["requires_approval"] or group.requires_approval,
            created_at=now)
        return plan, group, record

    # -- reads ---------------------------------------------------------------------------

    def _row(self, rollout_id: str) -> RolloutRow:
        row = self.store.get_rollout(rollout_id) if isinstance(rollout_id, str) else None
        if row is None:
            raise NotFoundError("rollout", str(rollout_id)[:64])
        return row

    @staticmethod
    def _load(row: RolloutRow) -> tuple[RolloutPlan, RolloutState]:
        return RolloutPlan.from_dict(row.plan), RolloutState.from_dict(row.state)

    def list(self, *, status: str | None = None) -> list[dict[str, Any]]:
        """Summary rows, newest first.

        Raises:
            InvalidRequestError: ``status`` is not a rollout status.
        """
        if status is not None and status not in STATUSES:
            raise InvalidRequestError(f"status {status[:32]!r}: one of {', '.join(STATUSES)}",
                                      field="status")
        out = []
        for row in self.store.list_rollouts(status=status):
            state = row.state
            out.append({"id": row.id, "bundle": row.bundle, "group": row.group,
                        "status": row.status, "stage": state.get("stage", 0),
                        "created_at": row.created_at,
                        "finished_at": state.get("finished_at")})
        return out

    def get(self, rollout_id: str, now: float | None = None) -> dict[str, Any]:
        """One rollout in full: plan, audit, last gate results, devices, stages.

        Raises:
            NotFoundError: no such rollout.
        """
        now = self.clock() if now is None else now
        row = self._row(rollout_id)
        plan, state = self._load(row)
        members = self._members(plan)
        devices = self._observe(plan, state, members)
        wanted = assignments(plan, state, devices)
        active = state.status in ACTIVE or state.status == "paused"
        listed = sorted(set(devices) | set(state.touched))[:MAX_DEVICES_LISTED]
        rows = []
        for d in listed:
            obs = devices.get(d)
            t = state.touched.get(d)
            a = wanted.get(d)
            role = a.role if a is not None else "left"
            if t is not None and active and obs is not None:
                phase = canary_phase(plan, t, obs, now)
            elif t is not None:
                phase = {"completed": "done", "aborted": role}.get(state.status, t.mode)
            else:
                phase = "untouched"
            running = members[d].bundle if d in members else None
            rows.append({"device": d, "role": role, "stage": None if t is None else t.stage,
                         "phase": phase,
                         "running": None if running is None else running.label,
                         "online": bool(d in members and members[d].online)})
        n = len(devices)
        stages = []
        for i, s in enumerate(plan.stages):
            if state.status == "completed":
                where = "done"
            elif state.status in ("ready", "pending_approval"):
                where = "pending"
            elif state.status == "aborted":  # the stage it stopped in, never "current"
                where = "done" if i < state.stage else \
                    "aborted" if i == state.stage else "skipped"
            else:
                where = "done" if i < state.stage else \
                    "current" if i == state.stage else "pending"
            stages.append({"index": i, "fraction": s.fraction, "min_devices": s.min_devices,
                           "soak_s": s.soak_s, "size": stage_size(plan, i, n) if n else 0,
                           "state": where})
        return {"id": plan.id, "bundle": plan.bundle.label, "group": plan.group,
                "status": state.status, "stage": state.stage, "created_at": plan.created_at,
                "finished_at": state.finished_at, "plan": plan.to_dict(),
                "audit": [e.to_dict() for e in state.history],
                "gate_results": list(row.gate_results), "devices": rows, "stages": stages}

    def preview(self, spec: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
        """A dry run: the devices of each stage, for the id given (or generated: the
        order depends on it, so create with that ``id`` to get this order).

        Raises:
            NotFoundError: no such bundle or group. InvalidRequestError, SchemaError,
                PlanError: a bad field (named).
        """
        now = self.clock() if now is None else now
        spec = {k: v for k, v in spec.items() if k != "start"} if isinstance(spec, Mapping) \
            else spec
        plan, group, _ = self._plan(spec, now)
        members = self.registry.members(group)
        stages = []
        for (i, fraction, ids), s in zip(plan_preview(plan, members), plan.stages,
                                         strict=True):
            stages.append({"index": i, "fraction": fraction, "min_devices": s.min_devices,
                           "soak_s": s.soak_s, "size": len(ids), "devices": ids})
        return {"id": plan.id, "bundle": plan.bundle.label, "group": plan.group,
                "devices": len(members), "shadow_first": plan.shadow_first,
                "requires_approval": plan.requires_approval, "stages": stages}

    # -- writes --------------------------------------------------------------------------

    def _check_free(self, plan: RolloutPlan, group: Group) -> None:
        mine = set(self.registry.members(group))
        for other in self.store.list_rollouts(active=True):
            if other.id == plan.id:
                continue
            if other.group == group.name:
                raise ConflictError(f"group {group.name!r} has an unfinished rollout "
                                    f"{other.id!r} ({other.status}); finish or abort it first")
            try:
                theirs = set(self.registry.members(self.registry.group(other.group)))
            except NotFoundError:
                continue
            shared = sorted(mine & theirs)
            if shared:
                raise ConflictError(f"device {shared[0]!r} of group {group.name!r} is in "
                                    f"unfinished rollout {other.id!r} (group "
                                    f"{other.group!r}); finish or abort it first")

    def create(self, spec: Mapping[str, Any], *, actor: str, roles: set[str] | frozenset[str],
               now: float | None = None) -> dict[str, Any]:
        """Create a rollout from a REST body; with ``"start": true`` start it when it
        needs no approval (one that does stays ``pending_approval``).

        Raises:
            NotFoundError: no such bundle or group (named).
            InvalidRequestError, SchemaError, PlanError: a bad field (named).
            ConflictError: the id exists, or the group (or one of its devices) has an
                unfinished rollout.
            ReviewOverdueError, RequirementsMissingError (409): the bundle is past its
                review date, or lacks what the group requires.
            ActorNotAllowedError: a malformed actor.
        """
        now = self.clock() if now is None else now
        plan, group, record = self._plan(spec, now)
        start = bool(spec.get("start", False))
        check_assignment(record, self.bundles.approvals(record), [group], now)
        with self._lock:
            self._check_free(plan, group)
            state = initial_state(plan, actor=actor)
            self.store.add_rollout(plan.id, plan.group, plan.bundle.label, state.status,
                                   plan.to_dict(), state.to_dict(), now)
            self.store.audit(actor, "rollout.create", f"rollout:{plan.id}",
                             {"bundle": plan.bundle.label, "group": plan.group,
                              "status": state.status}, now)
            log.info("rollout %s created by %s: %s to group %s (%s)", plan.id, actor,
                     plan.bundle.label, plan.group, state.status)
            if start and state.status == "ready":
                self.act(plan.id, "start", actor=actor, roles=roles, now=now)
        self.wake()
        return self.get(plan.id, now)

    def act(self, rollout_id: str, action: str, *, actor: str,
            roles: set[str] | frozenset[str], reason: str = "",
            now: float | None = None) -> dict[str, Any]:
        """An operator action: approve, start, pause, resume, promote, abort.

        Raises:
            NotFoundError: no such rollout.
            InvalidTransitionError (RolloutFinishedError, UnknownActionError): not in
                this status. ApprovalRequiredError, ActorNotAllowedError: not allowed.
            ConflictError: start while another unfinished rollout shares devices.
            ReviewOverdueError, RequirementsMissingError (409): approve, start, resume or
                promote a bundle past its review date or lacking what the group requires.
        """
        now = self.clock() if now is None else now
        if not isinstance(reason, str):
            raise InvalidRequestError("reason: a string", field="reason")
        with self._lock:
            row = self._row(rollout_id)
            plan, state = self._load(row)
            try:
                group: Group | None = self.registry.group(plan.group)
            except NotFoundError:
                group = None
            if action == "start" and group is not None:
                self._check_free(plan, group)
            members = self._members(plan)
            devices = self._observe(plan, state, members)
            window = gate_window(plan, state, devices)
            metrics = self.gates.read(plan, window) if window is not None else None
            record = self.bundles.get(plan.bundle.name, plan.bundle.version)
            approvals = self.bundles.approvals(record)
            if action in _SENDS and state.status not in FINISHED:
                check_assignment(record, approvals, [] if group is None else [group], now)
            approved = any(s.get("role") == "approver" for s in record.signers) or any(
                a.role_confirmed and a.statement.role == "approver" for a in approvals)
            d = act(plan, state, action, Observation(now, devices, metrics), actor=actor,
                    roles=set(roles), bundle_approved=approved, reason=reason)
            with self.store.transaction():  # applied only to the state it was decided on
                if not self.store.rollout_unchanged(plan.id, row.state):
                    raise ConflictError(f"rollout {plan.id} changed while {action!r} was "
                                        "being decided (another process acted on it); "
                                        "try again")
                sent = self._publish(plan, d.desired, row.sent, d.state.status, now)
                self.store.save_rollout(
                    plan.id, status=d.state.status, state=d.state.to_dict(),
                    gate_results=[g.to_dict() for g in d.gate_results]
                    or list(row.gate_results), now=now, sent=sent)
                self.store.audit(actor, f"rollout.{action}", f"rollout:{plan.id}",
                                 {"from": state.status, "to": d.state.status,
                                  "reason": reason[:200]}, now)
            log.info("rollout %s: %s by %s (%s -> %s)", plan.id, action, actor, state.status,
                     d.state.status)
        self.wake()
        return self.get(rollout_id, now)

    # -- the tick ------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """One step of every unfinished rollout (and of finished ones whose final desired
        states have not all gone out); then, for each group with nothing unfinished whose
        latest rollout completed, its bundle for fresh members (:meth:`_follow`). Errors
        are logged per rollout, never raised."""
        now = self.clock() if now is None else now
        try:
            active = self.store.list_rollouts(active=True)
            finished = self.store.list_rollouts(active=False)  # newest first
        except Exception:
            log.exception("rollout tick: cannot list rollouts")
            return
        rows = active + [r for r in finished if not r.sent.get(_SETTLED)]
        for row in rows:
            try:
                with self._lock:
                    self._step(row.id, now)
            except Exception:
                log.exception("rollout %s: tick failed", row.id)
        busy = {r.group for r in active}
        latest: dict[str, RolloutRow] = {}
        for r in finished:
            latest.setdefault(r.group, r)
        for row in latest.values():
            if row.group not in busy and row.status == "completed" and row.sent.get(_SETTLED):
                try:
                    with self._lock:
                        self._follow(row.id, now)
                except Exception:
                    log.exception("rollout %s: assigning new members failed", row.id)
        with self._lock:
            self.gates.forget_all_but({r.id for r in rows if r.status not in FINISHED})

    def _step(self, rollout_id: str, now: float) -> None:
        row = self._row(rollout_id)  # re-read under the lock: an action may have run
        plan, state = self._load(row)
        members = self._members(plan)
        devices = self._observe(plan, state, members)
        window = gate_window(plan, state, devices)
        metrics = self.gates.read(plan, window) if window is not None else None
        d = decide(plan, state, Observation(now, devices, metrics))
        # a transition applies once: only to the state it was decided on, checked under the
        # store's write lock (an API replica's action, or an engine deposed mid-tick, may
        # have applied one since this was read; the next tick decides again)
        with self.store.transaction():
            if not self.store.rollout_unchanged(plan.id, row.state):
                log.info("rollout %s: changed since this tick read it; left to the next",
                         plan.id)
                return
            sent = self._publish(plan, d.desired, row.sent, d.state.status, now)
            results = [g.to_dict() for g in d.gate_results] or list(row.gate_results)
            if d.state != state or results != row.gate_results or sent != row.sent:
                self.store.save_rollout(plan.id, status=d.state.status,
                                        state=d.state.to_dict(), gate_results=results,
                                        now=now, sent=sent)
        for entry in d.audit:
            log.info("rollout %s: %s %s -> %s: %s", plan.id, entry.action, entry.from_status,
                     entry.to_status, entry.reason)

    def _follow(self, rollout_id: str, now: float) -> None:
        """A group's latest rollout, once completed, gives its bundle to fresh members.

        A device that joins the group later and has never been assigned anything (a
        newly provisioned one) gets the bundle the group runs. A device that already has a
        desired state keeps it: an operator's or another group's assignment is never
        overridden; the group's next rollout takes it along.
        """
        row = self._row(rollout_id)
        plan, state = self._load(row)
        fresh = [d for d in sorted(self._members(plan)) if d not in row.sent
                 and d not in state.touched and self.desired.record(d) is None]
        if not fresh:
            return
        self.desired.assign_many([Assignment(d, plan.bundle, None, False) for d in fresh],
                                 actor=f"rollout:{plan.id}", now=now)
        key = _key(DesiredAssignment(plan.bundle, role="complete"))
        self.store.save_rollout_sent(plan.id, {**row.sent, **{d: key for d in fresh}})
        log.info("rollout %s: %s joined %s after completion and get %s", plan.id,
                 ", ".join(fresh), plan.group, plan.bundle.label)

    def _publish(self, plan: RolloutPlan, desired: Mapping[str, DesiredAssignment],
                 sent: Mapping[str, Any], status: str, now: float) -> dict[str, Any]:
        """Assign what differs from what was last sent; returns the new ``sent`` map."""
        out = {k: v for k, v in sent.items() if k != _SETTLED}
        todo = [(d, a) for d, a in sorted(desired.items())
                if a.managed and out.get(d) != _key(a)]
        actor = f"rollout:{plan.id}"
        if todo:
            batch = [Assignment(d, a.bundle, a.shadow, a.allow_downgrade) for d, a in todo]
            try:
                self.desired.assign_many(batch, actor=actor, now=now)
                out.update({d: _key(a) for d, a in todo})
            except EdgefleetError as exc:
                # one bad device (deleted, or its old bundle not on this server) must not
                # hold back the rest: assign one by one, retry the failures next tick
                log.warning("rollout %s: batch assignment failed (%s); one by one", plan.id,
                            exc)
                for (d, a), one in zip(todo, batch, strict=True):
                    try:
                        self.desired.assign_many([one], actor=actor, now=now)
                        out[d] = _key(a)
                    except EdgefleetError as err:
                        log.warning("rollout %s: cannot assign %s to %s: %s", plan.id,
                                    a.bundle.label if a.bundle else None, d, err)
        if status in FINISHED and all(out.get(d) == _key(a) for d, a in desired.items()
                                      if a.managed):
            out[_SETTLED] = True
        return out

    # -- observation ---------------------------------------------------------------------

    def _members(self, plan: RolloutPlan) -> dict[str, Device]:
        try:
            group = self.registry.group(plan.group)
        except NotFoundError:
            return {}  # a deleted group has no members; touched devices are still known
        return {d.id: d for d in self.store.list_devices(group.selector or {},
                                                         limit=1_000_000)}

    def _observe(self, plan: RolloutPlan, state: RolloutState, members: Mapping[str, Device]
                 ) -> dict[str, DeviceObs]:
        name, version = plan.bundle.name, plan.bundle.version
        touched = [d for d in state.touched if d in members]
        installs: dict[str, InstallObs] = {}
        served: dict[str, int] = {}
        if touched:
            since = min(state.touched[d].assigned_at for d in touched)
            for r in self.store.reports_since(touched, since):
                b = r["bundle"] or {}
                if r["device"] in installs or b.get("name") != name or \
                        b.get("version") != version:
                    continue
                if r["received"] >= state.touched[r["device"]].assigned_at:
                    installs[r["device"]] = InstallObs(r["outcome"], float(r["received"]),
                                                       r["reason"][:200])
            served = self.store.rows_served(touched, name, version, since)
        return {d: DeviceObs(running=dev.bundle, shadow=dev.shadow, install=installs.get(d),
                             healthy_predictions=served.get(d, 0), online=dev.online)
                for d, dev in sorted(members.items())}

class RolloutEngine:
    """The thread that ticks :class:`Rollouts` every ``interval_s`` (and soon after
    :meth:`wake`). Its errors are logged; it stops by :meth:`stop`."""

    def __init__(self, rollouts: Rollouts, interval_s: float) -> None:
        self.rollouts = rollouts
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.rollouts.wake = self.wake
        self._thread = threading.Thread(target=self._main, name="fleet-rollouts",
                                        daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _main(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.rollouts.tick()
            except Exception:  # tick logs its own; this is the last line of defence
                log.exception("rollout engine: tick failed")
            self._wake.wait(self.interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.rollouts.wake = lambda: None

