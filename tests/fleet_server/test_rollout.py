"""The rollout state machine: order, stage sizes, gates, transitions, approval, wire forms."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from itertools import pairwise

import pytest

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import BundleRef
from edgefleet.errors import EdgefleetError
from fleet_server.rollouts.machine import (
    ActorNotAllowedError,
    ApprovalRequiredError,
    DesiredAssignment,
    DeviceObs,
    GateMetrics,
    GateThresholds,
    InstallObs,
    InvalidTransitionError,
    Observation,
    ObservationError,
    PlanError,
    RolloutError,
    RolloutFinishedError,
    RolloutPlan,
    RolloutState,
    Stage,
    StateMismatchError,
    UnknownActionError,
    act,
    decide,
    gate_window,
    initial_state,
    plan_order,
    plan_preview,
    stage_members,
    stage_size,
)

OLD = BundleRef("sensor", "1.0.0")
NEW = BundleRef("sensor", "1.1.0", sha256="ab" * 32, url="https://fleet.example/b/1.1.0",
                size=1234)
GATES = GateThresholds(min_canary_predictions=100, min_control_predictions=100,
                       min_healthy_predictions=10, max_wait_s=1000.0)
STAGES = (Stage(0.1, 1, 100.0), Stage(0.5, 1, 100.0), Stage(1.0, 1, 100.0))
ANA = "operator:ana"


def make_plan(**kw) -> RolloutPlan:
    values = {"id": "r1", "bundle": NEW, "group": "site=lab", "stages": STAGES,
              "gates": GATES, "install_timeout_s": 50.0, "created_at": 0.0, **kw}
    return RolloutPlan(**values)


def fleet(n: int = 20, running: BundleRef | None = OLD) -> dict[str, DeviceObs]:
    return {f"d{i:02d}": DeviceObs(running=running) for i in range(n)}


def obs(now: float, devices, gates=None) -> Observation:
    return Observation(now, devices, gates)


def start(plan, devices, now: float = 10.0):
    state = initial_state(plan, actor=ANA)
    return act(plan, state, "start", obs(now, devices), actor=ANA)


def follow(devices, decision, *, healthy: int = 10):
    """Devices that apply every managed assignment at once and serve healthily."""
    out = dict(devices)
    for d, a in decision.desired.items():
        if a.managed:
            out[d] = DeviceObs(running=a.bundle, shadow=a.shadow,
                               healthy_predictions=healthy if a.bundle == NEW else 0)
    return out


def good(window, **over) -> GateMetrics:
    base = GateMetrics(window_start=window.since, canary_predictions=1000, canary_errors=1,
                       control_predictions=1000, control_errors=1, canary_p95_ms=5.0,
                       control_p95_ms=5.0, prediction_psi=0.01, prediction_js=0.01,
                       input_drift_share=0.0, input_drift=False, shadow_rows=1000,
                       shadow_agreed=990)
    return replace(base, **over)


def tick(plan, state, devices, now, **over):
    window = gate_window(plan, state, devices)
    metrics = None if window is None else good(window, **over)
    return decide(plan, state, obs(now, devices, metrics))


def canaries(decision) -> set[str]:
    return {d for d, a in decision.desired.items() if a.role == "canary"}


def gate(decision, name):
    return next(r for r in decision.gate_results if r.name == name)


# --------------------------------------------------------------------------- order, sizes


def test_plan_order_is_sha256_of_rollout_and_device():
    ids = [f"dev-{i}" for i in range(50)]
    expected = sorted(ids, key=lambda d: hashlib.sha256(f"r1\0{d}".encode()).hexdigest())
    assert plan_order("r1", ids) == expected
    assert plan_order("r1", reversed(ids + ids)) == expected  # input order, duplicates
    assert plan_order("r2", ids) != expected  # another rollout, another order


def test_plan_order_of_a_subset_keeps_relative_order():
    ids = [f"dev-{i}" for i in range(50)]
    full = plan_order("r1", ids)
    subset = set(ids[::3])
    assert plan_order("r1", subset) == [d for d in full if d in subset]


@pytest.mark.parametrize(("stages", "index", "n", "expected"), [
    pytest.param((Stage(0.01, 1), Stage(1.0)), 0, 200, 2, id="one-percent"),
    pytest.param((Stage(0.1, 1), Stage(1.0)), 0, 100, 10, id="no-float-rounding-up"),
    pytest.param((Stage(0.1, 1), Stage(1.0)), 0, 101, 11, id="ceil"),
    pytest.param((Stage(0.01, 5), Stage(1.0)), 0, 100, 5, id="min-devices"),
    pytest.param((Stage(0.5, 20), Stage(1.0)), 0, 10, 10, id="capped-at-n"),
    pytest.param((Stage(0.01, 1), Stage(1.0)), 0, 0, 0, id="empty-group"),
    pytest.param((Stage(0.1, 30), Stage(0.2, 1), Stage(1.0)), 1, 100, 30,
                 id="never-smaller-than-an-earlier-stage"),
    pytest.param((Stage(0.1, 1), Stage(1.0, 1)), 1, 7, 7, id="last-stage-all"),
])
def test_stage_size(stages, index, n, expected):
    assert stage_size(make_plan(stages=stages), index, n) == expected


def test_stage_size_refuses_a_stage_the_plan_does_not_have():
    with pytest.raises(PlanError, match="no stage 3"):
        stage_size(make_plan(), 3, 10)


def test_each_stage_contains_the_last_and_preview_lists_them():
    plan = make_plan(stages=(Stage(0.01, 1), Stage(0.1, 1), Stage(0.5, 1), Stage(1.0, 1)))
    ids = [f"d{i}" for i in range(300)]
    preview = plan_preview(plan, ids)
    assert [(i, f, len(m)) for i, f, m in preview] == [(0, 0.01, 3), (1, 0.1, 30),
                                                       (2, 0.5, 150), (3, 1.0, 300)]
    for (_, _, small), (_, _, big) in pairwise(preview):
        assert big[: len(small)] == small
    assert preview[-1][2] == plan_order("r1", ids)


def test_stage_members_keep_touched_devices_when_the_group_shrinks():
    plan = make_plan()
    ids = [f"d{i:02d}" for i in range(20)]
    first = stage_members(plan, ids, 0)
    assert len(first) == 2
    fewer = [d for d in ids if d not in plan_order("r1", ids)[2:12]]  # 10 left, canaries stay
    assert set(first) <= set(stage_members(plan, fewer, 0, touched=first))
    gone = [d for d in ids if d != first[0]]
    assert first[0] not in stage_members(plan, gone, 0, touched=first)  # only present ones


# --------------------------------------------------------------------------- start, soak, promote


def test_start_assigns_stage_zero_and_logs_it():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    assert d.state.status == "running" and d.state.stage == 0
    assert canaries(d) == set(stage_members(plan, devices, 0))
    assert len(canaries(d)) == 2
    for dev, a in d.desired.items():
        if dev in canaries(d):
            assert a == DesiredAssignment(NEW, None, False, "canary")
        else:
            assert a == DesiredAssignment(None) and not a.managed
    assert {t.previous for t in d.state.touched.values()} == {OLD}
    (entry,) = d.audit
    assert (entry.actor, entry.action, entry.from_status, entry.to_status, entry.time) == (
        ANA, "start", "ready", "running", 10.0)
    assert d.state.history == (*initial_state(plan, actor=ANA).history, entry)


def test_gates_passing_before_the_soak_ends_do_not_promote():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    early = tick(plan, d.state, devices, 109.0)
    assert early.state == d.state and early.audit == ()
    assert gate(early, "soak").outcome == "wait"
    assert all(r.outcome in ("pass", "skip") for r in early.gate_results if r.name != "soak")


def test_gates_passing_after_the_soak_promote_to_the_next_stage():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    d2 = tick(plan, d.state, devices, 110.0)
    assert d2.state.status == "running" and d2.state.stage == 1
    assert d2.state.stage_started_at == 110.0
    assert canaries(d2) == set(stage_members(plan, devices, 1)) and len(canaries(d2)) == 10
    assert canaries(d) < canaries(d2)
    (entry,) = d2.audit
    assert (entry.actor, entry.action, entry.stage, entry.numbers["to_stage"]) == (
        "system", "promote", 0, 1)
    psi = next(g for g in entry.numbers["gates"] if g["name"] == "prediction_psi")
    assert psi == {"name": "prediction_psi", "outcome": "pass", "value": 0.01,
                   "threshold": 0.25, "op": "<=", "reason": "prediction_psi 0.01 at most 0.25"}


def run_to_completion(plan, devices):
    d = start(plan, devices)
    now = 10.0
    while d.state.status == "running":
        devices = follow(devices, d)
        now += 100.0
        d = tick(plan, d.state, devices, now)
    return d, devices


def test_completion_assigns_every_member_and_joiners_the_bundle():
    plan = make_plan()
    d, devices = run_to_completion(plan, fleet())
    assert d.state.status == "completed" and d.state.finished_at == 310.0
    assert [e.action for e in d.state.history] == ["create", "start", "promote", "promote",
                                                    "promote"]
    assert d.state.history[-1].to_status == "completed"
    assert all(a == DesiredAssignment(NEW, None, False, "complete") for a in d.desired.values())
    # the last stage covers the group: comparative gates had no control to compare with
    final = {g["name"]: g for g in d.state.history[-1].numbers["gates"]}
    assert final["error_rate_delta"]["outcome"] == "skip"
    assert final["error_rate"]["outcome"] == "pass"
    later = decide(plan, d.state, obs(999.0, {**devices, "zz-new": DeviceObs(running=OLD)}))
    assert later.desired["zz-new"].bundle == NEW and later.state == d.state


def test_operator_promote_skips_the_soak_and_records_the_gates():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    w = gate_window(plan, d.state, devices)
    p = act(plan, d.state, "promote", obs(11.0, devices, good(w, prediction_psi=0.9)),
            actor=ANA, reason="looks fine")
    assert p.state.stage == 1 and p.state.status == "running"
    (entry,) = p.audit
    assert (entry.actor, entry.reason) == (ANA, "looks fine")
    psi = next(g for g in entry.numbers["gates"] if g["name"] == "prediction_psi")
    # the operator overrode a failing gate: the log says so
    assert (psi["value"], psi["outcome"]) == (0.9, "fail")
    state = p.state
    for now in (12.0, 13.0):
        state = act(plan, state, "promote", obs(now, follow(devices, p)), actor=ANA).state
    assert state.status == "completed"


# --------------------------------------------------------------------------- gates


@pytest.mark.parametrize(("over", "name", "value"), [
    pytest.param({"canary_errors": 100}, "error_rate", 100 / 1100, id="error-rate"),
    pytest.param({"canary_errors": 30, "control_errors": 0}, "error_rate_delta", 30 / 1030,
                 id="error-rate-delta"),
    pytest.param({"canary_p95_ms": 8.0}, "latency_p95_ratio", 1.6, id="latency"),
    pytest.param({"prediction_psi": 0.3}, "prediction_psi", 0.3, id="psi"),
    pytest.param({"prediction_js": 0.2}, "prediction_js", 0.2, id="js"),
    pytest.param({"input_drift_share": 0.6}, "input_drift_share", 0.6, id="input-share"),
    pytest.param({"input_drift": True}, "input_drift", 1.0, id="input-verdict"),
])
def test_a_failing_gate_after_the_soak_aborts_and_names_it(over, name, value):
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    d2 = tick(plan, d.state, devices, 110.0, **over)
    assert d2.state.status == "aborted"
    failing = [r.name for r in d2.gate_results if r.outcome == "fail"]
    assert name in failing
    assert gate(d2, name).value == pytest.approx(value)
    (entry,) = d2.audit
    assert (entry.actor, entry.action, entry.to_status) == ("system", "abort", "aborted")
    assert entry.reason.startswith("gate failed: ") and name in entry.reason
    assert {d for d, a in d2.desired.items() if a.role == "rollback"} == canaries(d)


@pytest.mark.parametrize("over", [
    pytest.param({"prediction_psi": 0.25}, id="psi"),
    pytest.param({"canary_p95_ms": 7.5}, id="latency"),
    pytest.param({"input_drift_share": 0.5}, id="input-share"),
    pytest.param({"canary_errors": 0, "canary_predictions": 100}, id="zero-errors"),
])
def test_a_value_at_its_threshold_passes(over):
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    assert tick(plan, d.state, devices, 110.0, **over).state.stage == 1


def test_a_disabled_gate_is_skipped_even_without_a_value():
    plan = make_plan(gates=replace(GATES, max_prediction_psi=None, block_on_input_drift=False))
    devices = fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    d2 = tick(plan, d.state, devices, 110.0, prediction_psi=None, input_drift=None)
    assert gate(d2, "prediction_psi").outcome == "skip"
    assert gate(d2, "input_drift").outcome == "skip"
    assert d2.state.stage == 1


@pytest.mark.parametrize(("over", "name"), [
    pytest.param({"prediction_psi": None}, "prediction_psi", id="psi-not-computed"),
    pytest.param({"canary_p95_ms": None}, "latency_p95_ratio", id="p95-not-computed"),
    pytest.param({"input_drift": None}, "input_drift", id="verdict-not-computed"),
    pytest.param({"canary_predictions": 99}, "sample", id="canary-sample"),
    pytest.param({"control_predictions": 10}, "control_sample", id="control-sample"),
])
def test_missing_data_waits_then_aborts_for_insufficient_data(over, name):
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    waiting = tick(plan, d.state, devices, 1109.0, **over)  # soak ends 110, deadline 1110
    assert waiting.state == d.state and gate(waiting, name).outcome == "wait"
    late = tick(plan, d.state, devices, 1110.0, **over)
    assert late.state.status == "aborted"
    assert late.audit[0].reason.startswith("insufficient data") and name in late.audit[0].reason


def test_a_short_sample_holds_every_metric_gate_even_a_bad_one():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    d2 = tick(plan, d.state, devices, 110.0, canary_predictions=50, prediction_psi=0.9)
    assert d2.state == d.state
    psi = gate(d2, "prediction_psi")
    assert (psi.outcome, psi.value, psi.reason) == ("wait", 0.9, "waiting for the sample")


def test_insufficient_data_can_pause_instead():
    plan = make_plan(gates=replace(GATES, on_insufficient_data="pause"))
    devices = fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    late = decide(plan, d.state, obs(1110.0, devices, None))
    assert late.state.status == "paused" and late.state.paused_from == "running"
    assert (late.audit[0].actor, late.audit[0].action) == ("system", "pause")
    assert canaries(late) == canaries(d)  # the canaries keep the bundle


def test_metrics_for_another_window_count_as_missing():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    stale = GateMetrics(window_start=0.0, canary_predictions=10**6, control_predictions=10**6)
    d2 = decide(plan, d.state, obs(110.0, devices, stale))
    assert d2.state == d.state
    assert gate(d2, "sample").reason == "gate metrics are for another window"


def test_no_control_devices_skips_comparative_gates_only():
    plan = make_plan(stages=(Stage(0.5, 1, 100.0), Stage(1.0, 1, 100.0)))
    devices = {"a": DeviceObs(running=OLD), "b": DeviceObs(running=None)}
    d = start(plan, devices)
    w = gate_window(plan, d.state, follow(devices, d))
    assert w.controls == ()  # the other member is fresh: it runs nothing to compare with
    d2 = tick(plan, d.state, follow(devices, d), 110.0, control_predictions=0)
    outcomes = {r.name: r.outcome for r in d2.gate_results}
    assert outcomes["control_sample"] == outcomes["prediction_psi"] == "skip"
    assert outcomes["error_rate"] == "pass"
    assert d2.state.stage == 1


# --------------------------------------------------------------------------- installs, health


def test_install_timeout_counts_as_failure_and_aborts_before_the_soak():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)  # nobody installs
    pending = tick(plan, d.state, devices, 59.0)
    assert pending.state == d.state and gate(pending, "install_failures").outcome == "pass"
    timed_out = tick(plan, d.state, devices, 60.0)  # assigned at 10, timeout 50
    assert timed_out.state.status == "aborted"
    g = gate(timed_out, "install_failures")
    assert (g.value, g.threshold, g.outcome) == (2, 0, "fail")
    assert "2 timed out" in g.reason
    assert timed_out.audit[0].numbers["timeout"] == 2


def test_a_failed_install_report_aborts_at_once():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    bad = sorted(canaries(d))[0]
    devices = follow(devices, d)
    devices[bad] = DeviceObs(running=OLD, install=InstallObs("failed", 20.0, "smoke test"))
    d2 = tick(plan, d.state, devices, 21.0)
    assert d2.state.status == "aborted" and d2.audit[0].numbers["failed"] == 1


def test_a_report_from_before_the_assignment_is_ignored():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    first = sorted(canaries(d))[0]
    devices = follow(devices, d)
    devices[first] = DeviceObs(running=OLD, install=InstallObs("failed", 9.0))
    assert tick(plan, d.state, devices, 21.0).state == d.state


@pytest.mark.parametrize(("max_failures", "rate", "n", "failed", "aborted"), [
    pytest.param(1, 0.0, 20, 1, False, id="count-tolerated"),
    pytest.param(1, 0.0, 20, 2, True, id="count-exceeded"),
    pytest.param(0, 0.2, 20, 2, False, id="rate-tolerated"),  # stage of 10: 20 % of 10
    pytest.param(0, 0.1, 20, 2, True, id="rate-exceeded"),
])
def test_install_failure_tolerance(max_failures, rate, n, failed, aborted):
    plan = make_plan(stages=(Stage(0.5, 1, 100.0), Stage(1.0)), gates=replace(
        GATES, max_install_failures=max_failures, max_install_failure_rate=rate,
        min_healthy_share=0.5))
    devices = fleet(n)
    d = start(plan, devices)
    devices = follow(devices, d)
    for dev in sorted(canaries(d))[:failed]:
        devices[dev] = DeviceObs(running=OLD, install=InstallObs("failed", 11.0))
    d2 = tick(plan, d.state, devices, 110.0)
    assert (d2.state.status == "aborted") is aborted


def test_installed_is_not_succeeded_until_enough_healthy_predictions():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    few = follow(devices, d, healthy=9)
    held = tick(plan, d.state, few, 110.0)
    h = gate(held, "healthy_devices")
    assert (held.state, h.outcome, h.value) == (d.state, "wait", 0.0)
    assert held.gate_results and gate(held, "install_failures").outcome == "pass"
    reported = {dev: DeviceObs(running=OLD, install=InstallObs("installed", 20.0),
                               healthy_predictions=10) for dev in canaries(d)}
    assert tick(plan, d.state, {**devices, **reported}, 110.0).state.stage == 1


def test_healthy_share_leaves_out_tolerated_install_failures():
    plan = make_plan(stages=(Stage(0.5, 1, 100.0), Stage(1.0)), gates=replace(
        GATES, max_install_failures=1, min_healthy_share=1.0))
    devices = fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    failed = sorted(canaries(d))[0]
    devices[failed] = DeviceObs(running=OLD, install=InstallObs("failed", 11.0))
    d2 = tick(plan, d.state, devices, 110.0)
    h = gate(d2, "healthy_devices")
    assert (h.value, h.outcome) == (1.0, "pass") and d2.state.stage == 1


def test_gate_window_names_canaries_and_controls():
    plan = make_plan(stages=(Stage(0.5, 1, 100.0), Stage(1.0)))
    devices = {**fleet(6), "fresh": DeviceObs(running=None), "there": DeviceObs(running=NEW)}
    assert gate_window(plan, initial_state(plan, actor=ANA), devices) is None
    d = start(plan, devices)
    w = gate_window(plan, d.state, devices)
    assert (w.phase, w.stage, w.since, w.bundle) == ("canary", 0, 10.0, NEW)
    assert set(w.canaries) == set(d.state.touched)
    assert set(w.controls) == set(devices) - set(d.state.touched) - {"fresh", "there"}
    paused = act(plan, d.state, "pause", obs(20.0, devices), actor=ANA).state
    assert gate_window(plan, paused, devices) == w
    aborted = act(plan, paused, "abort", obs(30.0, devices), actor=ANA).state
    assert gate_window(plan, aborted, devices) is None


# --------------------------------------------------------------------------- membership changes


def test_a_joiner_inside_the_current_stage_becomes_a_canary():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    names = [f"new{i}" for i in range(500)]
    # 22 members: stage 0 holds ceil(2.2) = 3; one joiner sorts first, the other last
    inside = next(x for x in names if plan_order("r1", [*devices, x])[0] == x)
    outside = next(x for x in names if plan_order("r1", [*devices, x])[-1] == x)
    assert stage_size(plan, 0, 22) == 3
    joined = {**devices, inside: DeviceObs(running=OLD), outside: DeviceObs(running=OLD)}
    d2 = tick(plan, d.state, joined, 50.0)
    assert d2.desired[inside].role == "canary" and d2.desired[outside].role == "control"
    assert d2.state.touched[inside].assigned_at == 50.0
    assert canaries(d) < canaries(d2)  # the earlier canaries keep the bundle


def test_a_canary_that_leaves_is_not_judged_but_rolled_back_on_abort():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    gone = sorted(canaries(d))[0]
    devices = follow(devices, d)
    del devices[gone]
    d2 = tick(plan, d.state, devices, 60.0)  # gone never installs: not a timeout
    assert d2.state.status == "running" and gone not in d2.desired
    assert gone in d2.state.touched
    d3 = act(plan, d2.state, "abort", obs(61.0, devices), actor=ANA)
    assert d3.desired[gone] == DesiredAssignment(OLD, None, True, "rollback")


def test_after_an_abort_a_joiner_gets_nothing_new():
    plan, devices = make_plan(), fleet()
    d = act(plan, start(plan, devices).state, "abort", obs(20.0, devices), actor=ANA)
    later = decide(plan, d.state, obs(30.0, {**devices, "zz": DeviceObs(running=OLD)}))
    assert later.desired["zz"] == DesiredAssignment(None) and later.state == d.state


def test_stages_only_grow_when_the_group_shrinks():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    d = tick(plan, d.state, follow(devices, d), 110.0)  # stage 1: 10 of 20
    stage1 = canaries(d)
    small = {k: v for k, v in follow(devices, d).items() if k in stage1 or k < "d05"}
    d2 = tick(plan, d.state, small, 150.0)
    assert canaries(d2) >= stage1 & set(small) and stage1 <= set(d2.state.touched)


# --------------------------------------------------------------------------- pause, resume, abort


def test_pause_stops_automatic_progression_and_abort():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    p = act(plan, d.state, "pause", obs(20.0, devices), actor=ANA)
    assert p.state.status == "paused" and canaries(p) == canaries(d)
    for over in ({}, {"prediction_psi": 0.9}):
        held = tick(plan, p.state, devices, 500.0, **over)
        assert held.state == p.state and held.audit == ()
        assert held.gate_results  # still judged for the dashboard
    joined = tick(plan, p.state, {**devices, "new": DeviceObs(running=OLD)}, 500.0)
    assert joined.state.touched.keys() == p.state.touched.keys()  # nobody new while paused


def test_resume_restarts_the_soak():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    p = act(plan, d.state, "pause", obs(20.0, devices), actor=ANA)
    r = act(plan, p.state, "resume", obs(500.0, devices), actor=ANA)
    assert r.state.status == "running" and r.state.soak_started_at == 500.0
    assert r.state.stage_started_at == 10.0  # the metrics window keeps its start
    assert tick(plan, r.state, devices, 599.0).state == r.state
    assert tick(plan, r.state, devices, 600.0).state.stage == 1


def test_abort_returns_every_touched_device_to_its_previous_bundle():
    plan = make_plan(stages=(Stage(0.3, 1, 100.0), Stage(1.0, 1, 100.0)))
    devices = fleet(10)
    fresh, newer = plan_order("r1", devices)[:2]
    devices[fresh] = DeviceObs(running=None)
    devices[newer] = DeviceObs(running=BundleRef("sensor", "2.0.0"))
    touched = set(stage_members(plan, devices, 0))
    assert len(touched) == 3 and {fresh, newer} <= touched
    d = start(plan, devices)
    state = d.state
    assert set(state.touched) == touched
    a = act(plan, state, "abort", obs(120.0, follow(devices, d)), actor=ANA, reason="pager")
    assert a.state.status == "aborted" and a.state.finished_at == 120.0
    for dev in touched:
        got = a.desired[dev]
        if dev == fresh:
            assert got == DesiredAssignment(NEW, None, False, "kept")
        elif dev == newer:  # going back to 2.0.0 from 1.1.0 is no downgrade
            assert got == DesiredAssignment(BundleRef("sensor", "2.0.0"), None, False,
                                            "rollback")
        else:
            assert got == DesiredAssignment(OLD, None, True, "rollback")
    assert all(a.desired[dev] == DesiredAssignment(None) for dev in set(devices) - touched)
    numbers = a.audit[0].numbers
    assert (numbers["kept_without_previous"], numbers["kept_devices"]) == (1, [fresh])
    assert numbers["rolled_back"] == len(touched) - 1
    assert (a.audit[0].actor, a.audit[0].reason) == (ANA, "pager")


def test_a_fresh_canary_is_given_the_bundle_and_keeps_it_on_abort():
    plan = make_plan(stages=(Stage(1.0, 1, 100.0),))
    devices = {"fresh": DeviceObs(running=None)}
    d = start(plan, devices)
    assert d.desired["fresh"] == DesiredAssignment(NEW, None, False, "canary")
    a = act(plan, d.state, "abort", obs(20.0, devices), actor=ANA)
    assert a.desired["fresh"].bundle == NEW and a.desired["fresh"].role == "kept"


# --------------------------------------------------------------------------- shadow


def test_shadow_phase_runs_the_candidate_beside_the_live_bundle_then_stages():
    plan = make_plan(shadow_first=True, shadow_soak_s=100.0)
    devices = fleet()
    members = stage_members(plan, devices, 0)
    devices[members[0]] = DeviceObs(running=None)  # a fresh one has nothing to shadow
    d = start(plan, devices)
    assert d.state.status == "shadow"
    assert d.desired[members[1]] == DesiredAssignment(OLD, NEW, False, "shadow")
    assert d.desired[members[0]].role == "control"
    devices = follow(devices, d)
    early = tick(plan, d.state, devices, 109.0)
    assert early.state == d.state
    assert {r.name for r in early.gate_results} >= {"shadow_sample", "shadow_agreement"}
    d2 = tick(plan, d.state, devices, 110.0)
    assert (d2.state.status, d2.state.stage, d2.state.stage_started_at) == ("running", 0, 110.0)
    assert d2.desired[members[1]] == DesiredAssignment(NEW, None, False, "canary")
    assert d2.desired[members[0]].role == "canary"  # fresh: joins at stage 0 proper
    assert d2.state.touched[members[1]].previous == OLD  # not the shadow's bundle
    assert d2.state.touched[members[1]].assigned_at == 110.0


def test_shadow_disagreement_aborts_and_clears_the_shadow():
    plan = make_plan(shadow_first=True, shadow_soak_s=100.0)
    devices = fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    d2 = tick(plan, d.state, devices, 110.0, shadow_agreed=900)
    assert d2.state.status == "aborted" and "shadow_agreement" in d2.audit[0].reason
    for dev in d.state.touched:
        assert d2.desired[dev] == DesiredAssignment(OLD, None, False, "rollback")


def test_shadow_start_failure_counts_as_install_failure():
    plan = make_plan(shadow_first=True)
    devices = fleet()
    d = start(plan, devices)
    dev = sorted(d.state.touched)[0]
    devices = {**devices, dev: DeviceObs(running=OLD, install=InstallObs("shadow_failed", 11.0))}
    assert tick(plan, d.state, devices, 12.0).state.status == "aborted"


# --------------------------------------------------------------------------- approval, errors


def approval_plan():
    return make_plan(requires_approval=True)


def test_a_group_requiring_approval_needs_an_approver_and_a_signed_bundle():
    plan, devices = approval_plan(), fleet()
    state = initial_state(plan, actor=ANA)
    assert state.status == "pending_approval"
    with pytest.raises(ApprovalRequiredError, match="not approved yet"):
        act(plan, state, "start", obs(1.0, devices), actor=ANA, bundle_approved=True)
    with pytest.raises(ActorNotAllowedError, match="approver role"):
        act(plan, state, "approve", obs(1.0, devices), actor=ANA, roles={"operator"},
            bundle_approved=True)
    with pytest.raises(ActorNotAllowedError):
        act(plan, state, "approve", obs(1.0, devices), actor="system", roles={"approver"},
            bundle_approved=True)
    with pytest.raises(ApprovalRequiredError, match="no approver's signature"):
        act(plan, state, "approve", obs(1.0, devices), actor="operator:bo",
            roles={"approver"})
    ok = act(plan, state, "approve", obs(2.0, devices), actor="operator:bo",
             roles={"approver"}, bundle_approved=True)
    assert (ok.state.status, ok.state.approved_by, ok.state.approved_at) == (
        "ready", "operator:bo", 2.0)
    assert (ok.audit[0].actor, ok.audit[0].action) == ("operator:bo", "approve")
    with pytest.raises(ApprovalRequiredError, match="no approver's signature"):
        act(plan, ok.state, "start", obs(3.0, devices), actor=ANA)
    started = act(plan, ok.state, "start", obs(3.0, devices), actor=ANA, bundle_approved=True)
    assert started.state.status == "running"


def state_in(status: str):
    """(plan, state) with the rollout in ``status``."""
    plan, devices = (approval_plan() if status == "pending_approval" else make_plan()), fleet()
    state = initial_state(plan, actor=ANA)
    steps = {"ready": [], "running": ["start"], "paused": ["start", "pause"],
             "aborted": ["start", "abort"], "completed": ["start", "promote", "promote",
                                                          "promote"],
             "pending_approval": []}[status]
    for i, action in enumerate(steps):
        state = act(plan, state, action, obs(10.0 + i, devices), actor=ANA).state
    assert state.status == status
    return plan, state


@pytest.mark.parametrize(("status", "action", "error"), [
    pytest.param("ready", "resume", InvalidTransitionError, id="resume-when-ready"),
    pytest.param("running", "resume", InvalidTransitionError, id="resume-when-running"),
    pytest.param("running", "start", InvalidTransitionError, id="start-twice"),
    pytest.param("paused", "pause", InvalidTransitionError, id="pause-twice"),
    pytest.param("paused", "promote", InvalidTransitionError, id="promote-when-paused"),
    pytest.param("ready", "promote", InvalidTransitionError, id="promote-before-start"),
    pytest.param("ready", "pause", InvalidTransitionError, id="pause-before-start"),
    pytest.param("ready", "approve", InvalidTransitionError, id="approve-unneeded"),
    pytest.param("pending_approval", "start", ApprovalRequiredError, id="start-unapproved"),
    pytest.param("aborted", "resume", RolloutFinishedError, id="resume-aborted"),
    pytest.param("aborted", "abort", RolloutFinishedError, id="abort-twice"),
    pytest.param("completed", "abort", RolloutFinishedError, id="abort-completed"),
    pytest.param("completed", "promote", RolloutFinishedError, id="promote-completed"),
    pytest.param("running", "rollback", UnknownActionError, id="unknown-action"),
])
def test_invalid_actions_raise_a_specific_error_naming_rollout_state_action(status, action,
                                                                            error):
    plan, state = state_in(status)
    with pytest.raises(error) as info:
        act(plan, state, action, obs(100.0, fleet()), actor="operator:bo",
            roles={"approver"}, bundle_approved=True)
    assert isinstance(info.value, RolloutError) and isinstance(info.value, EdgefleetError)
    assert (info.value.rollout_id, info.value.rollout_status, info.value.action) == (
        "r1", status, action)
    assert "'r1'" in str(info.value) and status in str(info.value) and action in str(info.value)


@pytest.mark.parametrize("actor", ["operator:", "root", "operator:a b", "", "Operator:x"])
def test_a_malformed_actor_is_refused(actor):
    plan, state = state_in("running")
    with pytest.raises(ActorNotAllowedError, match="actor"):
        act(plan, state, "pause", obs(100.0, fleet()), actor=actor)


def test_a_state_of_another_rollout_is_refused():
    _, state = state_in("running")
    with pytest.raises(StateMismatchError, match="'r2'"):
        decide(make_plan(id="r2"), state, obs(1.0, fleet()))


def test_the_core_does_not_touch_its_inputs_and_is_deterministic():
    plan, devices = make_plan(), fleet()
    d = start(plan, devices)
    before = json.dumps(d.state.to_dict(), sort_keys=True)
    devices = follow(devices, d)
    w = gate_window(plan, d.state, devices)
    o = obs(110.0, devices, good(w))
    assert decide(plan, d.state, o) == decide(plan, d.state, o)
    assert json.dumps(d.state.to_dict(), sort_keys=True) == before


# --------------------------------------------------------------------------- wire forms


def test_plan_and_state_round_trip_through_json():
    plan = make_plan(shadow_first=True, requires_approval=True,
                     gates=replace(GATES, max_prediction_js=None))
    assert RolloutPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    d, _ = run_to_completion(make_plan(), fleet())
    wire = json.loads(json.dumps(d.state.to_dict()))
    assert RolloutState.from_dict(wire) == d.state
    assert RolloutState.from_dict(wire).to_dict() == d.state.to_dict()


def test_plan_from_dict_takes_defaults_for_optional_fields():
    plan = RolloutPlan.from_dict({"schema": 1, "id": "r9", "bundle": NEW.to_dict(),
                                  "group": "tier=prod", "created_at": 5})
    assert plan.stages[0] == Stage(0.01, 1, 3600.0) and plan.gates == GateThresholds()
    assert (plan.install_timeout_s, plan.shadow_first, plan.requires_approval) == (
        1800.0, False, False)


def _plan_wire(**over):
    wire = make_plan().to_dict()
    for key, value in over.items():
        if "." in key:
            outer, inner = key.split(".")
            wire[outer] = {**wire[outer], inner: value}
        else:
            wire[key] = value
    return wire


@pytest.mark.parametrize(("over", "field"), [
    pytest.param({"schema": 2}, "plan.schema", id="schema-version"),
    pytest.param({"extra": 1}, "plan.extra", id="unknown-field"),
    pytest.param({"id": "bad id"}, "plan.id", id="bad-id"),
    pytest.param({"group": ""}, "plan.group", id="empty-group"),
    pytest.param({"stages": [{"fraction": 0.5}]}, "plan.stages", id="last-not-100"),
    pytest.param({"stages": [{"fraction": 0.5}, {"fraction": 0.2}, {"fraction": 1}]},
                 "plan.stages", id="decreasing"),
    pytest.param({"stages": []}, "plan.stages", id="no-stages"),
    pytest.param({"stages": [{"fraction": 0}, {"fraction": 1}]}, "plan.stages[0].fraction",
                 id="zero-fraction"),
    pytest.param({"stages": [{"fraction": 1, "soak_s": -1}]}, "plan.stages[0].soak_s",
                 id="negative-soak"),
    pytest.param({"stages": [{"fraction": 1, "oops": 1}]}, "plan.stages[0].oops",
                 id="unknown-stage-field"),
    pytest.param({"gates.max_error_rate": 1.5}, "plan.gates.max_error_rate",
                 id="rate-above-one"),
    pytest.param({"gates.on_insufficient_data": "ignore"}, "plan.gates.on_insufficient_data",
                 id="bad-choice"),
    pytest.param({"gates.min_canary_predictions": 1.5}, "plan.gates.min_canary_predictions",
                 id="float-count"),
    pytest.param({"gates.bogus": 1}, "plan.gates.bogus", id="unknown-gate"),
    pytest.param({"install_timeout_s": -5}, "plan.install_timeout_s", id="negative-timeout"),
    pytest.param({"bundle": {"name": "Bad Name", "version": "1.0.0"}}, "plan.bundle.name",
                 id="bad-bundle"),
])
def test_plan_from_dict_refuses(over, field):
    with pytest.raises(SchemaError) as info:
        RolloutPlan.from_dict(_plan_wire(**over))
    assert info.value.field == field


@pytest.mark.parametrize(("path", "value", "field"), [
    pytest.param(("status",), "exploded", "state.status", id="bad-status"),
    pytest.param(("schema",), 0, "state.schema", id="schema-version"),
    pytest.param(("paused_from",), "ready", "state.paused_from", id="bad-paused-from"),
    pytest.param(("history", 0, "actor"), "root", "state.history[0].actor", id="bad-actor"),
    pytest.param(("history", 0, "action"), "nuke", "state.history[0].action",
                 id="bad-action"),
    pytest.param(("touched", "d00", "mode"), "wild", "state.touched['d00'].mode",
                 id="bad-mode"),
])
def test_state_from_dict_refuses(path, value, field):
    wire = start(make_plan(), fleet(), 10.0).state.to_dict()
    wire = json.loads(json.dumps(wire))
    wire["touched"]["d00"] = {"previous": None, "assigned_at": 1.0, "stage": 0,
                              "mode": "canary"}
    target = wire
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SchemaError) as info:
        RolloutState.from_dict(wire)
    assert info.value.field == field


@pytest.mark.parametrize("over", [
    pytest.param({"canary_predictions": -1}, id="negative-count"),
    pytest.param({"canary_errors": True}, id="bool-count"),
    pytest.param({"prediction_psi": float("nan")}, id="nan"),
    pytest.param({"canary_p95_ms": -1.0}, id="negative-latency"),
    pytest.param({"shadow_rows": 5, "shadow_agreed": 6}, id="agreed-above-rows"),
])
def test_impossible_gate_metrics_are_refused(over):
    with pytest.raises(ObservationError):
        GateMetrics(window_start=0.0, **over)


def test_gate_metrics_round_trip_and_refuse_unknown_fields():
    m = GateMetrics(window_start=3.0, canary_predictions=5, prediction_psi=0.1,
                    input_drift=True, shadow_rows=4, shadow_agreed=4)
    assert GateMetrics.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(SchemaError, match="unknown"):
        GateMetrics.from_dict({**m.to_dict(), "extra": 1})
    with pytest.raises(SchemaError):
        GateMetrics.from_dict({**m.to_dict(), "shadow_agreed": 9})


@pytest.mark.parametrize(("kw", "field"), [
    pytest.param({"stages": (Stage(0.5),)}, "stages", id="last-not-100"),
    pytest.param({"id": ""}, "id", id="empty-id"),
    pytest.param({"gates": replace(GATES)}, None, id="ok"),
])
def test_plan_construction_checks(kw, field):
    if field is None:
        make_plan(**kw)
        return
    with pytest.raises(PlanError) as info:
        make_plan(**kw)
    assert info.value.field == field


def test_install_obs_refuses_unknown_outcomes():
    with pytest.raises(ObservationError):
        InstallObs("exploded", 1.0)
