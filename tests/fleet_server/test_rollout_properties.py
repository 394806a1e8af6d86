"""Random event sequences against the rollout core: the invariants hold after every step.

A simulated fleet follows the desired state (installs, fails, or ignores it), devices
join and leave, gate metrics are random (good, bad, missing, for the wrong window), and
operators act at random; after each step the invariants of the module docstring hold.
"""

from __future__ import annotations

import json
from itertools import pairwise

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from edgefleet.contract.messages import BundleRef
from fleet_server.rollouts.machine import (
    FINISHED,
    DesiredAssignment,
    DeviceObs,
    GateMetrics,
    GateThresholds,
    InstallObs,
    Observation,
    RolloutError,
    RolloutPlan,
    RolloutState,
    Stage,
    act,
    decide,
    gate_window,
    initial_state,
    stage_members,
)

OLDER = BundleRef("sensor", "0.9.0")
OLD = BundleRef("sensor", "1.0.0")
NEW = BundleRef("sensor", "1.1.0", sha256="cd" * 32)
POOL = [f"dev-{i:02d}" for i in range(14)]
STAGE_SETS = [
    (Stage(0.1, 1, 100.0), Stage(0.5, 2, 100.0), Stage(1.0, 1, 100.0)),
    (Stage(0.3, 3, 50.0), Stage(1.0, 1, 0.0)),
    (Stage(1.0, 1, 100.0),),
]
GATES = GateThresholds(min_canary_predictions=100, min_control_predictions=100,
                       min_healthy_predictions=5, max_wait_s=600.0,
                       max_install_failures=1)

GOOD = {"canary_predictions": 1000, "canary_errors": 0, "control_predictions": 1000,
        "control_errors": 0, "canary_p95_ms": 4.0, "control_p95_ms": 4.0,
        "prediction_psi": 0.01, "prediction_js": 0.01, "input_drift_share": 0.0,
        "input_drift": False, "shadow_rows": 1000, "shadow_agreed": 990}
random_metrics = st.fixed_dictionaries({
    "canary_predictions": st.sampled_from([0, 50, 1000]),
    "canary_errors": st.sampled_from([0, 1, 300]),
    "control_predictions": st.sampled_from([0, 1000]),
    "control_errors": st.sampled_from([0, 1]),
    "canary_p95_ms": st.sampled_from([None, 4.0, 20.0]),
    "control_p95_ms": st.sampled_from([None, 4.0]),
    "prediction_psi": st.sampled_from([None, 0.01, 0.6]),
    "prediction_js": st.sampled_from([None, 0.01]),
    "input_drift_share": st.sampled_from([None, 0.0, 0.9]),
    "input_drift": st.sampled_from([None, False, True]),
    "shadow_rows": st.sampled_from([0, 1000]),
    "shadow_agreed": st.sampled_from([0, 990]),
})
# mostly good numbers, so that rollouts get through their stages as well as fail
metrics = st.one_of(st.just(GOOD), st.just(GOOD), random_metrics)
# operators mostly move rollouts forward; the rest are there to be refused or to stop it
actions = st.sampled_from(["approve", "approve", "start", "start", "start", "promote",
                           "pause", "resume", "resume", "abort", "explode"])


def assigned(plan: RolloutPlan, state: RolloutState, dev: str) -> DesiredAssignment:
    t = state.touched[dev]
    return DesiredAssignment(NEW if t.previous is None else t.previous, None,
                             t.mode == "canary" and t.previous is not None
                             and t.previous in (OLD, OLDER),
                             "kept" if t.previous is None else "rollback")


class RolloutMachine(RuleBasedStateMachine):
    @initialize(stages=st.sampled_from(STAGE_SETS), shadow=st.booleans(),
                approval=st.sampled_from([False, False, True]),
                start=st.dictionaries(st.sampled_from(POOL),
                                      st.sampled_from([OLD, OLD, OLDER, None]), max_size=14))
    def setup(self, stages, shadow, approval, start):
        self.plan = RolloutPlan(id="prop", bundle=NEW, group="tier=test", stages=stages,
                                gates=GATES, shadow_first=shadow, shadow_soak_s=60.0,
                                install_timeout_s=50.0, requires_approval=approval,
                                created_at=0.0)
        self.state = initial_state(self.plan, actor="operator:ana")
        self.now = 0.0
        self.actual = {d: DeviceObs(running=b) for d, b in start.items()}  # present or not
        self.present = set(start)
        # what each device is told to run: the starting bundle until the rollout says more
        self.told = {d: b for d, b in start.items()}
        self.had_bundle = {d for d, b in start.items() if b is not None}

    def devices(self) -> dict[str, DeviceObs]:
        return {d: self.actual[d] for d in sorted(self.present)}

    # ------------------------------------------------------------------ rules

    @rule(dt=st.sampled_from([0.0, 1.0, 30.0, 60.0, 120.0, 700.0]), m=metrics,
          aligned=st.booleans(), missing=st.booleans(),
          behaviour=st.sampled_from(["install", "install", "fail", "ignore"]))
    def tick(self, dt, m, aligned, missing, behaviour):
        self.now += dt
        window = gate_window(self.plan, self.state, self.devices())
        gates = None
        if window is not None and not missing:
            m = {**m, "shadow_agreed": min(m["shadow_agreed"], m["shadow_rows"])}
            gates = GateMetrics(window_start=window.since if aligned else window.since + 1,
                                **m)
        obs = Observation(self.now, self.devices(), gates)
        decision = decide(self.plan, self.state, obs)
        assert decision == decide(self.plan, self.state, obs), "decide is not deterministic"
        assert json.dumps([a.to_dict() for a in decision.desired.values()]) == json.dumps(
            [a.to_dict() for a in decide(self.plan, self.state, obs).desired.values()])
        self.apply(decision, behaviour)

    @rule(action=actions, approver=st.sampled_from([True, True, False]),
          signed=st.sampled_from([True, True, False]),
          who=st.sampled_from(["operator:bo", "operator:bo", "system"]))
    def operator(self, action, approver, signed, who):
        obs = Observation(self.now, self.devices(), None)
        try:
            decision = act(self.plan, self.state, action, obs, actor=who,
                           roles={"approver"} if approver else {"operator"},
                           bundle_approved=signed)
        except RolloutError as exc:
            assert exc.rollout_id == "prop" and exc.rollout_status == self.state.status
            return
        assert decision.audit and decision.audit[-1].actor == who
        self.apply(decision, "install")

    @rule(dev=st.sampled_from(POOL), bundle=st.sampled_from([OLD, OLDER, None]))
    def join(self, dev, bundle):
        if dev in self.present:
            return
        if dev not in self.actual:
            self.actual[dev] = DeviceObs(running=bundle)
            self.told[dev] = bundle
            if bundle is not None:
                self.had_bundle.add(dev)
        self.present.add(dev)

    @rule(dev=st.sampled_from(POOL))
    def leave(self, dev):
        self.present.discard(dev)

    # ------------------------------------------------------------------ the world

    def apply(self, decision, behaviour):
        before, after = self.state, decision.state
        self.check_transition(before, decision)
        for dev, a in decision.desired.items():
            assert (a.bundle is None) == (a.role == "control"), f"{dev}: {a}"
            if not a.managed:
                continue
            self.told[dev] = a.bundle
            current = self.actual.get(dev, DeviceObs())
            if behaviour == "install" or a.bundle != NEW:
                self.actual[dev] = DeviceObs(
                    running=a.bundle, shadow=a.shadow,
                    install=InstallObs("installed", self.now) if a.bundle == NEW else None,
                    healthy_predictions=10 if a.bundle == NEW else 0)
                self.had_bundle.add(dev)
            elif behaviour == "fail" and current.running != NEW:
                self.actual[dev] = DeviceObs(running=current.running,
                                             install=InstallObs("failed", self.now, "boom"))
        self.state = after

    def check_transition(self, before: RolloutState, decision):
        after = decision.state
        assert after.history[: len(before.history)] == before.history, "audit rewritten"
        assert after.history[len(before.history):] == decision.audit
        if after.status != before.status:
            assert decision.audit, "a status change without an audit entry"
            assert decision.audit[0].from_status == before.status
            assert decision.audit[-1].to_status == after.status
        for a, b in pairwise(decision.audit):
            assert a.to_status == b.from_status
        if before.status in FINISHED:
            assert after == before, "a finished rollout changed"
        assert set(before.touched) <= set(after.touched), "a touched device was forgotten"
        for dev, t in before.touched.items():
            assert after.touched[dev].previous == t.previous, "previous bundle rewritten"
        assert after.stage >= before.stage
        if after.status == "aborted":
            for dev in after.touched:
                assert decision.desired[dev] == assigned(self.plan, after, dev)
        if after.status == "completed":
            assert all(a.bundle == NEW for a in decision.desired.values())
        if after.status == "running":
            members = stage_members(self.plan, self.present, after.stage, after.touched)
            for dev in members:
                assert decision.desired[dev].role == "canary", f"{dev} in stage, not canary"

    # ------------------------------------------------------------------ invariants

    @invariant()
    def nobody_loses_a_runnable_bundle(self):
        for dev in self.had_bundle:
            assert self.told.get(dev) is not None, f"{dev} was left without a bundle"

    @invariant()
    def state_round_trips(self):
        wire = json.loads(json.dumps(self.state.to_dict()))
        assert RolloutState.from_dict(wire) == self.state
        assert RolloutPlan.from_dict(json.loads(json.dumps(self.plan.to_dict()))) == self.plan

    @invariant()
    def shadow_devices_keep_their_live_bundle(self):
        for t in self.state.touched.values():
            if t.mode == "shadow":
                assert t.previous is not None, "a fresh device was given a shadow"


TestRolloutMachine = RolloutMachine.TestCase
TestRolloutMachine.settings = settings(max_examples=120, stateful_step_count=40,
                                       deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
