"""The rollout shell over real components: a real SQLite store fed through the real ingest
path, real bundles, the REST API over real HTTP, the CLI against it.

The clock is a parameter (``now``) everywhere the service takes one, so the soak and the
install timeout are crossed by passing a later ``now``, not by sleeping.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from click.testing import CliRunner

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import LATENCY_EDGES_MS, LATENCY_EDGES_V1_MS
from fleet_server.cli import main
from fleet_server.errors import ConflictError, InvalidRequestError, NotFoundError
from fleet_server.rollouts.machine import (
    ActorNotAllowedError,
    ApprovalRequiredError,
    PlanError,
    RolloutFinishedError,
    RolloutPlan,
    RolloutState,
    gate_window,
    plan_order,
)
from fleet_server.rollouts.metrics import p95_bounds_ms, p95_gate_inputs
from fleet_server.rollouts.values import LATENCY_FLOOR_MS
from fleet_server.services import build_services
from tests.bundles import BundleFactory, sensor_data
from tests.fleet_server.conftest import make_config
from tests.fleet_server.rollout_helpers import Recorder, Seeder, approved_bundle, devices_named

OPERATOR = {"viewer", "operator"}
APPROVER = {"viewer", "operator", "approver"}
GATES = {"min_canary_predictions": 300, "min_control_predictions": 300,
         "min_healthy_predictions": 50, "max_wait_s": 100}
STAGES = [{"fraction": 0.34, "min_devices": 2, "soak_s": 10},
          {"fraction": 1.0, "min_devices": 1, "soak_s": 10}]


@pytest.fixture
def fleet(tmp_path, signing_keys, bundles):
    """Services with a recording publisher, sensor@1.0.0 and 1.1.0 uploaded, six devices
    in group ``plant-a`` running 1.0.0, and a group ``secure`` that needs approval."""
    rec = Recorder()
    s = build_services(make_config(tmp_path, signing_keys), publisher=rec)
    t0 = time.time()
    for version in ("1.0.0", "1.1.0"):
        s.bundles.upload(bundles.build(version).read_bytes(), "test", t0)
    seed = Seeder(s)
    for d in devices_named(6):
        s.registry.add_device(d, {"site": "a"}, "test", t0)
        seed.online(d, "1.0.0", t0)
    s.registry.create_group("plant-a", {"site": "a"}, "test", t0)
    s.registry.create_group("secure", {"site": "a"}, "test", t0, requires_approval=True)
    yield s, rec, seed, t0
    s.close()


def _create(s, t0, **extra):
    spec = {"bundle": "sensor@1.1.0", "group": "plant-a", "stages": STAGES, "gates": GATES,
            "install_timeout_s": 60, "id": "r1", **extra}
    return s.rollouts.create(spec, actor="operator:ana", roles=OPERATOR, now=t0)


def _metrics(s, close=False):
    """The gate metrics the service computes now for rollout r1."""
    try:
        row = s.store.get_rollout("r1")
        plan, state = RolloutPlan.from_dict(row.plan), RolloutState.from_dict(row.state)
        r = s.rollouts
        window = gate_window(plan, state, r._observe(plan, state, r._members(plan)))
        return r.gates.read(plan, window)
    finally:
        if close:
            s.close()


def _gates(detail):
    return {g["name"]: g for g in detail["gate_results"]}


# --------------------------------------------------------------------------- create


BAD_SPECS = [
    ("unknown-bundle", {"bundle": "sensor@9.9.9"}, NotFoundError, "sensor@9.9.9"),
    ("unknown-group", {"group": "nope"}, NotFoundError, "nope"),
    ("bad-label", {"bundle": "sensor"}, InvalidRequestError, "bundle"),
    ("unknown-field", {"colour": "red"}, InvalidRequestError, "colour"),
    ("zero-fraction", {"stages": [{"fraction": 0, "soak_s": 1}]}, SchemaError,
     "stages[0].fraction"),
    ("last-not-all", {"stages": [{"fraction": 0.5}]}, PlanError, "stages"),
    ("stage-extra", {"stages": [{"fraction": 1, "speed": 2}]}, SchemaError, "speed"),
    ("gate-unknown", {"gates": {"max_bogus": 1}}, SchemaError, "max_bogus"),
    ("gate-range", {"gates": {"max_error_rate": 2.0}}, SchemaError, "gates.max_error_rate"),
    ("bad-flag", {"shadow_first": "yes"}, InvalidRequestError, "shadow_first"),
    ("bad-timeout", {"install_timeout_s": -1}, InvalidRequestError, "install_timeout_s"),
    ("bad-id", {"id": "-x"}, PlanError, "id"),
]


@pytest.mark.parametrize(("extra", "kind", "named"), [c[1:] for c in BAD_SPECS],
                         ids=[c[0] for c in BAD_SPECS])
def test_create_refuses_a_bad_spec_naming_the_field(fleet, extra, kind, named):
    s, _, _, t0 = fleet
    with pytest.raises(kind) as err:
        _create(s, t0, **extra)
    assert named in str(err.value)
    assert s.rollouts.list() == []


def test_one_unfinished_rollout_per_group_and_per_device(fleet):
    s, _, _, t0 = fleet
    first = _create(s, t0)
    assert first["status"] == "ready" and first["stage"] == 0
    with pytest.raises(ConflictError, match="plant-a"):
        _create(s, t0, id="r2")
    # another group over the same devices
    with pytest.raises(ConflictError, match="unfinished rollout 'r1'"):
        _create(s, t0, id="r3", group="secure")
    s.rollouts.act("r1", "abort", actor="operator:ana", roles=OPERATOR, now=t0 + 1)
    with pytest.raises(ConflictError, match="exists"):
        _create(s, t0, id="r1")
    second = _create(s, t0 + 2, id="r2")
    assert second["status"] == "ready"
    assert [r["id"] for r in s.rollouts.list(status="aborted")] == ["r1"]
    with pytest.raises(NotFoundError, match="'nope'"):
        s.rollouts.get("nope")
    with pytest.raises(InvalidRequestError, match="status"):
        s.rollouts.list(status="bogus")


# --------------------------------------------------------------------------- ticks


def test_a_rollout_is_judged_on_stored_telemetry_and_completes(fleet):
    s, rec, seed, t0 = fleet
    devs = devices_named(6)
    preview = s.rollouts.preview({"bundle": "sensor@1.1.0", "group": "plant-a",
                                  "stages": STAGES, "id": "r1"})
    order = plan_order("r1", devs)
    assert [st["devices"] for st in preview["stages"]] == [order[:3], order]
    canaries, rest = order[:3], order[3:]  # ceil(0.34 * 6) = 3

    detail = _create(s, t0, start=True)
    assert detail["status"] == "running"
    assert rec.versions() == dict.fromkeys(canaries, "1.1.0")
    roles = {d["device"]: d["role"] for d in detail["devices"]}
    assert roles == {**dict.fromkeys(canaries, "canary"), **dict.fromkeys(rest, "control")}
    assert [st["state"] for st in detail["stages"]] == ["current", "pending"]
    assert [st["size"] for st in detail["stages"]] == [3, 6]

    published = len(rec.sent)
    s.rollouts.tick(t0 + 1)
    assert len(rec.sent) == published  # nothing changed: nothing sent again
    g = _gates(s.rollouts.get("r1"))
    assert g["soak"]["outcome"] == "wait" and g["install_failures"]["outcome"] == "pass"

    for d in canaries:
        seed.report(d, "1.1.0", "installed", t0 + 2)
        seed.online(d, "1.1.0", t0 + 2)
        seed.summary(d, "1.1.0", t0 + 2, t0 + 5, rows=400, errors=1)
    for d in rest:
        seed.summary(d, "1.0.0", t0 + 2, t0 + 5, rows=400, errors=1)
    s.rollouts.tick(t0 + 5)  # still soaking: the numbers are there, nothing moves
    g = _gates(s.rollouts.get("r1"))
    assert g["sample"]["value"] == 1200 and g["control_sample"]["value"] == 1200
    assert g["healthy_devices"]["value"] == 1.0
    assert g["error_rate"]["value"] == pytest.approx(3 / 1203)
    assert g["latency_p95_ratio"]["value"] == 1.0
    assert g["prediction_psi"]["value"] is not None and g["prediction_js"]["value"] < 0.1
    assert s.rollouts.get("r1")["stage"] == 0
    # the merged profiles grow tick by tick: the same numbers as merging afresh
    for d in devs:
        seed.summary(d, "1.1.0" if d in canaries else "1.0.0", t0 + 5, t0 + 8, rows=100)
    assert _metrics(s) == _metrics(build_services(s.config), close=True)
    assert _metrics(s).canary_predictions == 1500

    s.rollouts.tick(t0 + 11)
    detail = s.rollouts.get("r1")
    assert detail["status"] == "running" and detail["stage"] == 1, detail["gate_results"]
    assert detail["audit"][-1]["action"] == "promote"
    assert detail["audit"][-1]["actor"] == "system"
    assert rec.versions() == dict.fromkeys(devs, "1.1.0")

    for d in rest:
        seed.report(d, "1.1.0", "installed", t0 + 12)
        seed.online(d, "1.1.0", t0 + 12)
        seed.summary(d, "1.1.0", t0 + 12, t0 + 15, rows=400)
    s.rollouts.tick(t0 + 22)
    detail = s.rollouts.get("r1")
    assert detail["status"] == "completed", detail["gate_results"]
    g = _gates(detail)
    assert g["control_sample"]["outcome"] == "skip"  # the last stage has no controls
    assert g["prediction_psi"]["outcome"] == "skip"
    assert detail["finished_at"] == t0 + 22
    assert [st["state"] for st in detail["stages"]] == ["done", "done"]
    published = len(rec.sent)
    s.rollouts.tick(t0 + 30)
    s.rollouts.tick(t0 + 31)
    assert len(rec.sent) == published  # completion sends nothing the devices have
    # joiners after completion: a fresh device gets the group's bundle, once; a device
    # that already has a desired state (an operator's) keeps it
    s.registry.add_device("dev-new", {"site": "a"}, "test", t0 + 32)
    s.registry.add_device("dev-pinned", {"site": "a"}, "test", t0 + 32)
    s.desired.assign("dev-pinned", "sensor@1.0.0", actor="operator:x", now=t0 + 32)
    s.rollouts.tick(t0 + 33)
    s.rollouts.tick(t0 + 34)
    assert rec.versions()["dev-new"] == "1.1.0"
    assert rec.versions()["dev-pinned"] == "1.0.0"
    assert len([m for m in rec.sent if m[0] == "dev-new"]) == 1  # once, not every tick
    assert s.desired.record("dev-new").updated_by == "rollout:r1"
    # persisted: another service over the same file sees the same
    other = build_services(s.config)
    try:
        assert other.rollouts.get("r1")["status"] == "completed"
        assert other.store.get_rollout("r1").status == "completed"
    finally:
        other.close()


def test_shadow_first_runs_the_candidate_beside_the_live_bundle(fleet):
    s, _, seed, t0 = fleet
    detail = _create(s, t0, start=True, shadow_first=True, shadow_soak_s=5,
                     gates={**GATES, "min_shadow_rows": 500})
    assert detail["status"] == "shadow"
    shadows = sorted(d["device"] for d in detail["devices"] if d["role"] == "shadow")
    assert len(shadows) == 3
    for d in shadows:
        desired = s.desired.get(d)
        assert (desired.bundle.version, desired.shadow.version) == ("1.0.0", "1.1.0")
        seed.report(d, "1.1.0", "shadow_started", t0 + 1)
        seed.summary(d, "1.0.0", t0 + 1, t0 + 4, rows=200, shadow=("1.1.0", 200, 196))
    s.rollouts.tick(t0 + 6)
    g = _gates(s.rollouts.get("r1"))
    assert g["shadow_sample"]["value"] == 600
    assert g["shadow_agreement"]["value"] == pytest.approx(588 / 600)
    detail = s.rollouts.get("r1")
    assert (detail["status"], detail["stage"]) == ("running", 0), detail["gate_results"]
    assert detail["audit"][-1]["to_status"] == "running"
    for d in shadows:  # stage 0 proper: the candidate goes live, the shadow is cleared
        desired = s.desired.get(d)
        assert desired.bundle.version == "1.1.0" and desired.shadow is None


def test_an_install_failure_aborts_and_rolls_back(fleet):
    s, rec, seed, t0 = fleet
    detail = _create(s, t0, start=True)
    canaries = [d["device"] for d in detail["devices"] if d["role"] == "canary"]
    seed.report(canaries[0], "1.1.0", "failed", t0 + 1)
    s.rollouts.tick(t0 + 2)  # no need to wait for the soak: failures are counted
    detail = s.rollouts.get("r1")
    assert detail["status"] == "aborted"
    # the stage it stopped in says so; the later ones were skipped, none is "current"
    assert [st["state"] for st in detail["stages"]] == ["aborted", "skipped"]
    assert _gates(detail)["install_failures"]["value"] == 1
    assert "install_failures" in detail["audit"][-1]["reason"]
    for d in canaries:
        desired = s.desired.get(d)
        assert desired.bundle.version == "1.0.0" and desired.allow_downgrade
    assert rec.versions() == dict.fromkeys(canaries, "1.0.0")
    with pytest.raises(RolloutFinishedError):
        s.rollouts.act("r1", "resume", actor="operator:ana", roles=OPERATOR, now=t0 + 3)


def test_predictions_that_disagree_with_the_controls_abort(fleet):
    s, _, seed, t0 = fleet
    detail = _create(s, t0, start=True)
    canaries = [d["device"] for d in detail["devices"] if d["role"] == "canary"]
    for d in detail["devices"]:
        if d["role"] == "canary":
            seed.report(d["device"], "1.1.0", "installed", t0 + 1)
            seed.summary(d["device"], "1.1.0", t0 + 1, t0 + 5, as_trained=False)
        else:
            seed.summary(d["device"], "1.0.0", t0 + 1, t0 + 5)
    s.rollouts.tick(t0 + 11)
    detail = s.rollouts.get("r1")
    assert detail["status"] == "aborted", detail["gate_results"]
    g = _gates(detail)
    assert g["prediction_psi"]["outcome"] == "fail" or g["prediction_js"]["outcome"] == "fail"
    assert all(s.desired.get(d).bundle.version == "1.0.0" for d in canaries)


def test_controls_on_a_bundle_trained_on_other_data_are_compared(fleet, tmp_path,
                                                                 signing_keys):
    s, _, seed, t0 = fleet
    retrained = BundleFactory(tmp_path / "retrained", signing_keys)
    sensor_data(800, seed=7, shift={"temperature": 3.0}).to_csv(retrained.train, index=False)
    s.bundles.upload(retrained.build("1.2.0").read_bytes(), "test", t0)
    old, new = (s.bundles.reference(s.bundles.get("sensor", v).id) for v in ("1.0.0", "1.2.0"))
    assert old.spec.reference_hash != new.spec.reference_hash  # other input bins
    assert old.spec.outputs == new.spec.outputs
    detail = _create(s, t0, start=True, bundle="sensor@1.2.0")
    for d in detail["devices"]:
        if d["role"] == "canary":
            seed.report(d["device"], "1.2.0", "installed", t0 + 1)
            seed.summary(d["device"], "1.2.0", t0 + 1, t0 + 5)
        else:
            seed.summary(d["device"], "1.0.0", t0 + 1, t0 + 5)
    s.rollouts.tick(t0 + 6)
    g = _gates(s.rollouts.get("r1"))
    assert g["prediction_psi"]["value"] is not None
    assert g["prediction_js"]["value"] is not None and g["prediction_js"]["value"] < 0.1


def test_the_first_rollout_to_fresh_devices_has_no_controls(tmp_path, signing_keys, bundles):
    s = build_services(make_config(tmp_path, signing_keys))
    try:
        t0 = time.time()
        s.bundles.upload(bundles.build("1.0.0").read_bytes(), "test", t0)
        seed = Seeder(s)
        for d in devices_named(4):
            s.registry.add_device(d, {"site": "a"}, "test", t0)
            seed.online(d, None, t0)
        s.registry.create_group("plant-a", {"site": "a"}, "test", t0)
        detail = s.rollouts.create(
            {"bundle": "sensor@1.0.0", "group": "plant-a", "id": "fresh", "start": True,
             "stages": [{"fraction": 0.5, "soak_s": 5}, {"fraction": 1.0, "soak_s": 5}],
             "gates": GATES}, actor="operator:ana", roles=OPERATOR, now=t0)
        first = [d["device"] for d in detail["devices"] if d["role"] == "canary"]
        assert len(first) == 2
        for d in first:
            seed.report(d, "1.0.0", "installed", t0 + 1)
            seed.summary(d, "1.0.0", t0 + 1, t0 + 4)
        s.rollouts.tick(t0 + 6)
        detail = s.rollouts.get("fresh")
        g = _gates(detail)
        assert g["control_sample"]["outcome"] == "skip", detail["gate_results"]
        assert detail["stage"] == 1
        for d in devices_named(4):
            seed.report(d, "1.0.0", "installed", t0 + 7)
            seed.summary(d, "1.0.0", t0 + 7, t0 + 10)
        s.rollouts.tick(t0 + 12)
        assert s.rollouts.get("fresh")["status"] == "completed"
        assert {s.desired.get(d).bundle.version for d in devices_named(4)} == {"1.0.0"}
    finally:
        s.close()


def test_one_broken_rollout_does_not_stop_the_others(fleet):
    s, _, _, t0 = fleet
    _create(s, t0, start=True)
    s.store.add_rollout("broken", "other", "sensor@1.1.0", "running", {"schema": 99},
                        {"schema": 99}, t0)
    s.rollouts.tick(t0 + 1)  # logs the broken one, ticks r1
    assert s.store.get_rollout("r1").updated_at == t0 + 1


# --------------------------------------------------------------------------- approval


def test_a_group_that_requires_approval_needs_an_approver_and_a_signed_bundle(
        fleet, bundles, signing_keys, tmp_path):
    s, _, _, t0 = fleet
    spec = {"bundle": "sensor@1.1.0", "group": "secure", "id": "sec", "start": True,
            "stages": STAGES}
    detail = s.rollouts.create(spec, actor="operator:ana", roles=OPERATOR, now=t0)
    assert detail["status"] == "pending_approval"  # start asked, approval first
    assert detail["plan"]["requires_approval"] is True
    with pytest.raises(ApprovalRequiredError, match="not approved"):
        s.rollouts.act("sec", "start", actor="operator:ana", roles=OPERATOR, now=t0)
    with pytest.raises(ActorNotAllowedError, match="approver role"):
        s.rollouts.act("sec", "approve", actor="operator:ana", roles=OPERATOR, now=t0)
    with pytest.raises(ApprovalRequiredError, match="approver's signature"):
        s.rollouts.act("sec", "approve", actor="operator:bo", roles=APPROVER, now=t0)
    s.rollouts.act("sec", "abort", actor="operator:ana", roles=OPERATOR, now=t0 + 1)

    path = approved_bundle(bundles, signing_keys, "2.0.0", tmp_path)
    record, _ = s.bundles.upload(path.read_bytes(), "test", t0)
    assert {x["role"] for x in record.signers} == {"build", "approver"}
    spec = {**spec, "bundle": "sensor@2.0.0", "id": "sec2"}
    s.rollouts.create(spec, actor="operator:ana", roles=OPERATOR, now=t0 + 2)
    with pytest.raises(ActorNotAllowedError):
        s.rollouts.act("sec2", "approve", actor="operator:ana", roles=OPERATOR, now=t0 + 2)
    detail = s.rollouts.act("sec2", "approve", actor="operator:bo", roles=APPROVER,
                            now=t0 + 3)
    assert detail["status"] == "ready"
    detail = s.rollouts.act("sec2", "start", actor="operator:ana", roles=OPERATOR,
                            now=t0 + 4)
    assert detail["status"] == "running"
    assert [e["action"] for e in detail["audit"]] == ["create", "approve", "start"]
    assert detail["audit"][1]["actor"] == "operator:bo"


def _hist(bucket: int, n: int = 100, edges=LATENCY_EDGES_MS) -> list[int]:
    out = [0] * (len(edges) + 1)
    out[bucket] = n
    return out


def _ratio(canary: int, control: int) -> float:
    low, high = p95_gate_inputs(p95_bounds_ms([_hist(canary)]), p95_bounds_ms([_hist(control)]))
    return max(low, LATENCY_FLOOR_MS) / max(high, LATENCY_FLOOR_MS)


def test_p95_bounds_of_merged_latency_histograms():
    assert p95_bounds_ms([]) is None and p95_bounds_ms([[0] * 55]) is None
    k = LATENCY_EDGES_MS.index(1.0)
    assert p95_bounds_ms([_hist(k + 1)]) == (1.0, 1.25)  # bucket k+1 is [1, 1.25)
    assert p95_bounds_ms([_hist(0, 94), _hist(k + 1, 6)]) == (1.0, 1.25)
    assert p95_bounds_ms([_hist(len(LATENCY_EDGES_MS))]) == (10_000.0, float("inf"))
    # an old agent's format-1 histogram merges with format 2 at format-1 resolution
    old = _hist(LATENCY_EDGES_V1_MS.index(1.0) + 1, edges=LATENCY_EDGES_V1_MS)  # [1, 2)
    assert p95_bounds_ms([old, _hist(k + 2)]) == (1.0, 2.0)  # [1.25, 1.6) lies in [1, 2)


def _mix(slow: int, n: int, fast_bucket: int, slow_bucket: int) -> list[int]:
    out = [0] * (len(LATENCY_EDGES_MS) + 1)
    out[fast_bucket], out[slow_bucket] = n - slow, slow
    return out


def test_a_small_canarys_p95_is_read_at_its_confidence_bound():
    """322 canary calls with 6 % slow ones (as a loaded demo's first stage served): the
    sample's p95 is slow, but 92.6 % of calls are fast, so at its lower confidence bound the
    canary is not proven slower than 3,000 control calls with 4 % slow ones."""
    # buckets [0.1, 0.125) and [1, 1.25)
    fast, slow = LATENCY_EDGES_MS.index(0.1) + 1, LATENCY_EDGES_MS.index(1.0) + 1
    canary, control = _mix(19, 322, fast, slow), _mix(120, 3000, fast, slow)
    assert p95_bounds_ms([canary]) == (1.0, 1.25)  # the sample's p95 is slow
    assert p95_bounds_ms([canary], "low")[0] == 0.1  # its lower bound is not
    low, high = p95_gate_inputs(p95_bounds_ms([canary], "low"),
                                p95_bounds_ms([control], "high"))
    assert low / high <= 1.0
    # many calls narrow the bound to the p95 itself: a real slowdown still fails
    canary = _mix(3000, 30_000, fast, slow)
    low, high = p95_gate_inputs(p95_bounds_ms([canary], "low"),
                                p95_bounds_ms([control], "high"))
    assert low / high >= 5.0


@pytest.mark.parametrize("control", range(LATENCY_EDGES_MS.index(0.1), len(LATENCY_EDGES_MS)))
def test_a_one_or_two_bucket_wobble_cannot_fail_a_1_5_latency_gate(control):
    for wobble in (-2, -1, 0, 1, 2):
        if 0 <= control + wobble <= len(LATENCY_EDGES_MS):
            assert _ratio(control + wobble, control) <= 1.28, wobble


def test_a_real_latency_regression_fails_the_gate():
    k = LATENCY_EDGES_MS.index(1.0)
    assert _ratio(LATENCY_EDGES_MS.index(4.0) + 1, k + 1) == pytest.approx(3.2)  # ~4x
    assert _ratio(LATENCY_EDGES_MS.index(2.5) + 1, k + 1) == 2.0  # ~2.5x
    # the gate fails only on evidence: the canary's least p95 over the control's most


# --------------------------------------------------------------------------- REST + CLI


@pytest.fixture
def live(server_factory, bundles):
    server = server_factory(http=True)
    s = server.services
    now = time.time()
    for version in ("1.0.0", "1.1.0"):
        s.bundles.upload(bundles.build(version).read_bytes(), "test", now)
    for d in devices_named(4):
        s.registry.add_device(d, {"site": "a"}, "test", now)
    s.registry.create_group("plant-a", {"site": "a"}, "test", now)
    s.registry.create_group("secure", {"site": "b"}, "test", now, requires_approval=True)
    tokens = {role: s.auth.create_token(role, role, "test", now).secret
              for role in ("viewer", "operator", "approver")}
    return server, tokens


def test_rest_status_codes(live):
    server, tokens = live
    url = server.base_url + "/api/v1/rollouts"

    def call(method, path="", role="operator", **kw):
        headers = {"Authorization": f"Bearer {tokens[role]}"}
        return httpx.request(method, url + path, headers=headers, timeout=10, **kw)

    body = {"bundle": "sensor@1.1.0", "group": "plant-a", "id": "web",
            "stages": [{"fraction": 0.5, "soak_s": 3600}, {"fraction": 1.0}]}
    assert call("POST", json=body, role="viewer").status_code == 403
    created = call("POST", json=body)
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "ready" and created.json()["id"] == "web"
    again = call("POST", json={**body, "id": "web2"})
    assert again.status_code == 409 and again.json()["error"]["type"] == "ConflictError"
    missing = call("POST", json={**body, "bundle": "sensor@9.9.9"})
    assert missing.status_code == 404 and "sensor@9.9.9" in missing.json()["error"]["message"]
    bad = call("POST", json={**body, "stages": [{"fraction": 0.5}]})
    assert bad.status_code == 422 and "stages" in bad.json()["error"]["message"]
    bad = call("POST", json={**body, "gates": {"max_wait_s": -1}})
    assert bad.status_code == 422 and "max_wait_s" in bad.json()["error"]["message"]
    assert call("GET", role="viewer").json()[0]["id"] == "web"
    assert call("GET", "?status=aborted", role="viewer").json() == []
    assert call("GET", "/nope", role="viewer").status_code == 404
    assert call("GET", "/web", role="viewer").json()["stages"][0]["size"] == 2
    preview = call("POST", "/preview", json={**body, "id": "other"}, role="viewer")
    assert preview.status_code == 200 and preview.json()["devices"] == 4
    assert call("POST", "/web/start", role="viewer").status_code == 403
    started = call("POST", "/web/start", json={"reason": "go"})
    assert started.status_code == 200 and started.json()["status"] == "running"
    assert call("POST", "/web/pause", json={"reason": "lunch"}).json()["status"] == "paused"
    assert call("POST", "/web/pause").status_code == 409
    assert call("POST", "/web/resume").json()["status"] == "running"
    promoted = call("POST", "/web/promote").json()
    assert (promoted["status"], promoted["stage"]) == ("running", 1)
    assert [e["action"] for e in promoted["audit"]][-4:] == ["start", "pause", "resume",
                                                              "promote"]
    assert promoted["audit"][-3]["reason"] == "lunch"
    assert call("POST", "/web/approve").status_code == 409  # not pending approval
    assert call("POST", "/web/start").status_code == 409
    assert call("POST", "/web/launch").status_code == 422  # not an action
    assert call("POST", "/nope/abort").status_code == 404
    assert call("POST", "/web/abort").json()["status"] == "aborted"
    finished = call("POST", "/web/abort")
    assert finished.status_code == 409
    assert finished.json()["error"]["type"] == "RolloutFinishedError"

    secure = call("POST", json={**body, "group": "secure", "id": "sec"})
    assert secure.status_code == 201 and secure.json()["status"] == "pending_approval"
    assert call("POST", "/sec/approve").status_code == 403  # an operator: no approver role
    unsigned = call("POST", "/sec/approve", role="approver")
    assert unsigned.status_code == 403
    assert unsigned.json()["error"]["type"] == "ApprovalRequiredError"
    assert call("POST", "/sec/start").status_code == 403


def test_cli_create_status_plan_abort(live):
    server, tokens = live
    runner = CliRunner()
    env = {"FLEET_SERVER": server.base_url, "FLEET_TOKEN": tokens["operator"]}

    def run(*args, ok=True):
        result = runner.invoke(main, ["rollout", *args], env=env, catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    out = run("plan", "sensor@1.1.0", "--group", "plant-a", "--stages", "50%,100%",
              "--id", "cli1").output
    assert "plan cli1: sensor@1.1.0 to group plant-a (4 devices)" in out
    plan = json.loads(run("plan", "sensor@1.1.0", "--group", "plant-a", "--stages",
                          "50%,100%", "--id", "cli1", "--json").output)
    assert [s["size"] for s in plan["stages"]] == [2, 4]
    out = run("create", "sensor@1.1.0", "--group", "plant-a", "--stages", "50%,100%",
              "--soak", "30m", "--min-devices", "1", "--gate", "max_error_rate=0.02",
              "--gate", "max_prediction_js=none", "--id", "cli1").output
    assert out.strip() == "rollout cli1 created: sensor@1.1.0 to group plant-a (ready, " \
                          "2 stages)"
    detail = json.loads(run("status", "cli1", "--json").output)
    assert detail["plan"]["gates"]["max_error_rate"] == 0.02
    assert detail["plan"]["gates"]["max_prediction_js"] is None
    assert [s["soak_s"] for s in detail["stages"]] == [1800.0, 1800.0]
    assert sorted(d["device"] for d in detail["devices"]) == list(devices_named(4))
    # the first stage is exactly what the plan said for this id
    run("start", "cli1")
    detail = json.loads(run("status", "cli1", "--json").output)
    canaries = sorted(d["device"] for d in detail["devices"] if d["role"] == "canary")
    assert canaries == sorted(plan["stages"][0]["devices"])
    table = run("status", "cli1").output
    assert table.startswith("rollout cli1: sensor@1.1.0 to group plant-a, running, stage 0")
    assert "soak" in table and "install_failures" in table and canaries[0] in table
    listing = run("status").output.splitlines()
    assert listing[0].split()[:4] == ["id", "bundle", "group", "status"]
    assert listing[1].split()[:4] == ["cli1", "sensor@1.1.0", "plant-a", "running"]
    assert json.loads(run("status", "--json").output)[0]["id"] == "cli1"
    out = run("abort", "cli1", "--reason", "testing").output
    assert out.strip() == "rollout cli1: abort done, now aborted (stage 0)"
    assert json.loads(run("status", "cli1", "--json").output)["audit"][-1]["reason"] == \
        "testing"

    # exit statuses by kind (edgefleet.cli): 3 not found, 4 conflict, 1 refused
    for args, words, code in ((("status", "nope"), "rollout 'nope' not found", 3),
                              (("abort", "cli1"), "RolloutFinishedError", 4),
                              (("create", "sensor@9.9.9", "--group", "plant-a"),
                               "sensor@9.9.9", 3),
                              (("create", "sensor@1.1.0", "--group", "plant-a", "--stages",
                                "50%"), "stages", 1),
                              (("approve", "cli1", "--json"), "HTTP 409", 4)):
        result = run(*args, ok=False)
        assert result.exit_code == code, result.output
        assert result.output.count("\n") == 1 and result.output.startswith("fleet: error:")
        assert words in result.output
    result = runner.invoke(main, ["rollout", "create", "sensor@1.1.0", "--group", "plant-a",
                                  "--stages", "half"], env=env)
    assert result.exit_code == 2 and "half" in result.output
    # a misspelt gate is refused before any request, naming the closest and listing all
    result = runner.invoke(main, ["rollout", "create", "sensor@1.1.0", "--group", "plant-a",
                                  "--gate", "max_eror_rate=0.02"], env=env)
    assert result.exit_code == 2
    assert "did you mean 'max_error_rate'?" in result.output
    assert "max_latency_p95_ratio" in result.output
    assert "max_latency_p95_ratio=1.5" in runner.invoke(main, ["rollout", "create", "-h"]).output
    # stages that collapse on a small group are said, and when each stage may start
    out = run("plan", "sensor@1.1.0", "--group", "plant-a", "--stages", "10%,20%,100%",
              "--soak", "90m").output
    assert "warning: stage 1 (20%) adds no device to stage 0's 1" in out
    starts = [line.split()[4] for line in out.splitlines()[2:5]]
    assert starts == ["at", "+1h30m", "+3h"], out
