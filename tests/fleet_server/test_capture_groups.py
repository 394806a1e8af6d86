"""Data capture per group (issue 15): the policy's checks, the registry and desired states on
both engines, the API and the ``fleet group`` commands."""

from __future__ import annotations

import json
import time

import click.testing
import httpx
import pytest
from click.testing import CliRunner

from edgefleet.contract.messages import CapturePolicy, DesiredState, decode, topic
from fleet_server.cli.main import main
from fleet_server.errors import NotFoundError
from fleet_server.registry.capture_policy import (
    CaptureChange,
    CapturePolicyError,
    UnknownCaptureFeatureError,
    apply_change,
    combine,
)
from tests.bundles import FEATURES
from tests.fleet_server.conftest import wait_until

ON = CapturePolicy(True, 0.5, 100, ("temperature", "vibration"))


# -- the pure checks -------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    pytest.param(CaptureChange(rate=1.5), "capture.rate", id="rate-above-1"),
    pytest.param(CaptureChange(rate=-0.01), "capture.rate", id="rate-negative"),
    pytest.param(CaptureChange(rate=float("nan")), "capture.rate", id="rate-nan"),
    pytest.param(CaptureChange(max_rows=0), "capture.max_rows", id="cap-zero"),
    pytest.param(CaptureChange(max_rows=1_000_001), "capture.max_rows", id="cap-too-large"),
    pytest.param(CaptureChange(features=()), "capture.features", id="empty-allowlist"),
    pytest.param(CaptureChange(features=("a", "a")), "capture.features", id="feature-twice"),
    pytest.param(CaptureChange(features=("a\tb",)), "capture.features", id="control-char"),
    pytest.param(CaptureChange(features=("x" * 129,)), "capture.features", id="name-too-long"),
    pytest.param(CaptureChange(enabled=False, rate=0.1), "capture.rate", id="off-with-rate"),
    pytest.param(CaptureChange(reset=True, max_rows=3), "capture.max_rows",
                 id="reset-with-cap"),
    pytest.param(CaptureChange(reset=True, enabled=True), "capture.enabled",
                 id="reset-and-on"),
])
def test_bad_capture_settings_name_the_field(change, field):
    with pytest.raises(CapturePolicyError) as info:
        apply_change(ON, change)
    assert info.value.field == field and field in str(info.value)


def test_a_change_applies_over_the_current_policy():
    assert apply_change(None, CaptureChange(enabled=True)) == CapturePolicy(True, 0.01, 1000)
    assert apply_change(ON, CaptureChange(rate=0.2)) == CapturePolicy(True, 0.2, 100,
                                                                      ON.features)
    assert apply_change(ON, CaptureChange(enabled=False)) == CapturePolicy(False)
    assert apply_change(ON, CaptureChange(reset=True)) is None
    # on again after off: the defaults, not the values before the off
    assert apply_change(CapturePolicy(False), CaptureChange(max_rows=5)) == \
        CapturePolicy(True, 0.01, 5)


def test_a_device_in_several_groups_gets_the_stricter_policy():
    other = CapturePolicy(True, 0.1, 500, ("vibration", "humidity"))
    assert combine([None, None]) is None
    assert combine([ON, None]) == ON
    assert combine([ON, other]) == CapturePolicy(True, 0.1, 100, ("vibration",))
    assert combine([ON, CapturePolicy(True, 1.0, 10)]) == CapturePolicy(True, 0.5, 10,
                                                                       ON.features)
    assert combine([ON, CapturePolicy(False), other]) == CapturePolicy(False)
    disjoint = combine([ON, CapturePolicy(True, 1.0, 10, ("humidity",))])
    assert disjoint is not None and disjoint.features == ()


# -- the registry and the desired states, on SQLite and PostgreSQL ------------------------


def test_a_groups_capture_reaches_its_devices_desired_states(services_on, sensor_bundle):
    s = services_on
    t0 = time.time()
    s.bundles.upload(sensor_bundle.read_bytes(), "test", t0)
    for device, site in (("dev1", "a"), ("dev2", "a"), ("dev3", "b")):
        s.registry.add_device(device, {"site": site}, "test", t0)
    s.desired.assign("dev1", "sensor@1.0.0", actor="test")
    group = s.registry.create_group("plant-a", {"site": "a"}, "ana", t0, capture=CaptureChange(
        rate=0.5, max_rows=100, features=("temperature", "vibration")))
    assert group.capture == ON and s.registry.group("plant-a").capture == ON
    one, two = s.desired.get("dev1"), s.desired.get("dev2")
    assert one.capture == ON and one.revision == 2 and one.bundle.label == "sensor@1.0.0"
    assert two.capture == ON and two.revision == 1 and two.bundle is None  # no bundle yet
    assert s.desired.get("dev3") is None  # not a member: nothing
    # a new bundle assignment keeps the capture
    assert s.desired.assign("dev2", "sensor@1.0.0", actor="test").capture == ON
    # off: a new revision, off at once
    s.registry.update_group("plant-a", "ana", t0 + 1, capture=CaptureChange(enabled=False))
    assert s.desired.get("dev1").capture == CapturePolicy(False)
    assert s.desired.get("dev1").revision == 3
    # a device added (or relabelled) into the group gets the group's policy
    s.registry.add_device("dev4", {"site": "a"}, "test", t0 + 2)
    assert s.desired.get("dev4").capture == CapturePolicy(False)
    s.registry.set_labels("dev3", {"site": "a"}, "test", t0 + 2)
    assert s.desired.get("dev3").capture == CapturePolicy(False)
    # reset: none set, the devices' own configs stand (the field leaves the message)
    s.registry.update_group("plant-a", "ana", t0 + 3, capture=CaptureChange(reset=True))
    assert s.registry.group("plant-a").capture is None
    assert s.desired.get("dev1").capture is None
    assert "capture" not in s.desired.get("dev1").to_dict()
    # every change is audited: the group's and each device's
    actions = [(e.action, e.target) for e in s.store.list_audit(limit=1000)]
    assert ("group.create", "group:plant-a") in actions
    assert actions.count(("group.update", "group:plant-a")) == 2
    assert ("desired.capture", "device:dev1") in actions
    s.registry.update_group("plant-a", "ana", t0 + 4, capture=CaptureChange(rate=0.3))
    s.registry.delete_group("plant-a", "ana", t0 + 5)  # leaving every group: none again
    assert all(s.desired.get(d).capture is None for d in ("dev1", "dev2", "dev3", "dev4"))


def test_capture_features_must_be_inputs_of_the_groups_bundle(services_on, sensor_bundle):
    s = services_on
    t0 = time.time()
    s.bundles.upload(sensor_bundle.read_bytes(), "test", t0)
    s.registry.add_device("dev1", {"site": "a"}, "test", t0)
    # no bundle assigned yet: the names are checked for form only
    s.registry.create_group("early", {"site": "a"}, "ana", t0,
                            capture=CaptureChange(features=("anything",)))
    s.registry.delete_group("early", "ana", t0)
    s.desired.assign("dev1", "sensor@1.0.0", actor="test")
    with pytest.raises(UnknownCaptureFeatureError, match=r"'temprature' is not an input of "
                                                         r"sensor@1\.0\.0"):
        s.registry.create_group("plant-a", {"site": "a"}, "ana", t0,
                                capture=CaptureChange(features=("temprature",)))
    with pytest.raises(NotFoundError):  # refused whole: the group was not created
        s.registry.group("plant-a")
    s.registry.create_group("plant-a", {"site": "a"}, "ana", t0)
    with pytest.raises(UnknownCaptureFeatureError, match="'nope'"):
        s.registry.update_group("plant-a", "ana", t0, capture=CaptureChange(
            features=(FEATURES[0], "nope")))
    assert s.registry.group("plant-a").capture is None
    # revisions: the early group on, its delete, the assignment; the refusals none
    assert s.desired.get("dev1").capture is None and s.desired.get("dev1").revision == 3


def _latest(device) -> DesiredState | None:
    states = [decode(t, p) for t, p in device.received if t == topic(device.id, "desired")]
    return states[-1] if states else None  # type: ignore[return-value]


def test_the_capture_is_published_to_the_device_retained(broker, devices, server_factory):
    server = server_factory(broker)
    s = server.services
    t0 = time.time()
    s.registry.add_device("dev1", {"site": "a"}, "test", t0)
    s.registry.create_group("plant-a", {"site": "a"}, "ana", t0,
                            capture=CaptureChange(rate=0.25, max_rows=7))
    dev = devices("dev1")  # connects after: the retained state is waiting for it
    wait_until(lambda: _latest(dev) is not None
               and _latest(dev).capture == CapturePolicy(True, 0.25, 7), 10,
               "the retained desired state with the group's capture")
    s.registry.update_group("plant-a", "ana", t0, capture=CaptureChange(enabled=False))
    wait_until(lambda: _latest(dev).capture == CapturePolicy(False), 10, "capture off")
    assert _latest(dev).revision == 2


# -- the API and the CLI ----------------------------------------------------------------


@pytest.fixture
def api_cli(server_factory, sensor_bundle):
    server = server_factory(http=True)
    s = server.services
    token = s.auth.create_token("cli", "operator", "test", time.time()).secret
    viewer = s.auth.create_token("v", "viewer", "test", time.time()).secret
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    s.registry.add_device("dev1", {"site": "a"}, "test", time.time())
    s.desired.assign("dev1", "sensor@1.0.0", actor="test")
    runner = CliRunner()

    def run(*args: str, ok: bool = True) -> click.testing.Result:
        result = runner.invoke(main, list(args), env={"FLEET_SERVER": server.base_url,
                                                      "FLEET_TOKEN": token},
                               catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    client = httpx.Client(base_url=server.base_url, timeout=10)
    yield run, client, {"operator": token, "viewer": viewer}, s
    client.close()


def test_the_api_sets_shows_and_refuses_a_groups_capture(api_cli):
    _, client, tokens, s = api_cli
    op = {"Authorization": f"Bearer {tokens['operator']}"}
    r = client.post("/api/v1/groups", headers=op, json={
        "name": "plant-a", "selector": {"site": "a"},
        "capture": {"rate": 0.5, "max_rows": 100, "features": ["temperature"]}})
    assert r.status_code == 201, r.text
    assert r.json()["capture"] == {"enabled": True, "rate": 0.5, "max_rows": 100,
                                   "features": ["temperature"]}
    shown = client.get("/api/v1/groups/plant-a",
                       headers={"Authorization": f"Bearer {tokens['viewer']}"}).json()
    assert shown["capture"]["features"] == ["temperature"]
    for body, status, kind, field in (
            ({"capture": {"rate": 2.0}}, 422, "CapturePolicyError", "capture.rate"),
            ({"capture": {"max_rows": 0}}, 422, "CapturePolicyError", "capture.max_rows"),
            ({"capture": {"features": ["humdity"]}}, 422, "UnknownCaptureFeatureError",
             "'humdity'"),
            ({"capture": {"spy": True}}, 422, None, "spy")):
        r = client.patch("/api/v1/groups/plant-a", headers=op, json=body)
        assert r.status_code == status, r.text
        if kind is not None:
            assert r.json()["error"]["type"] == kind
        assert field in r.text
    # a viewer cannot change it
    r = client.patch("/api/v1/groups/plant-a", json={"capture": {"enabled": False}},
                     headers={"Authorization": f"Bearer {tokens['viewer']}"})
    assert r.status_code == 403
    r = client.patch("/api/v1/groups/plant-a", headers=op, json={"capture": {"enabled": False}})
    assert r.json()["capture"] == {"enabled": False, "rate": 0.0, "max_rows": 0,
                                   "features": None}
    assert s.desired.get("dev1").capture == CapturePolicy(False)
    r = client.patch("/api/v1/groups/plant-a", headers=op, json={"capture": {"reset": True}})
    assert r.json()["capture"] is None


def test_fleet_group_capture_options(api_cli):
    run, _, _, s = api_cli
    out = run("group", "create", "plant-a", "--selector", "site=a", "--capture-rate", "0.5",
              "--capture-cap", "200", "--capture-features", "temperature,vibration").output
    assert "capture rate 0.5, at most 200 rows a window, features temperature,vibration" in out
    assert s.desired.get("dev1").capture == CapturePolicy(True, 0.5, 200,
                                                          ("temperature", "vibration"))
    shown = run("group", "show", "plant-a").output
    assert "capture    rate 0.5, at most 200 rows a window" in shown
    assert "members    1" in shown
    doc = json.loads(run("group", "show", "plant-a", "--json").output)
    assert doc["capture"]["max_rows"] == 200
    assert "capture off" in run("group", "update", "plant-a", "--capture", "off").output
    assert s.desired.get("dev1").capture == CapturePolicy(False)
    assert "off" in run("group", "list").output.splitlines()[1]
    out = run("group", "update", "plant-a", "--capture", "on").output
    assert "capture rate 0.01, at most 1000 rows a window, the devices' own features" in out
    bad = run("group", "update", "plant-a", "--capture-rate", "1.5", ok=False)
    assert bad.exit_code != 0 and "capture.rate" in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    bad = run("group", "update", "plant-a", "--capture-features", "temprature", ok=False)
    assert bad.exit_code != 0 and "'temprature' is not an input of sensor@1.0.0" in bad.output
    run("group", "update", "plant-a", "--capture", "reset")
    assert "each device's own config" in run("group", "show", "plant-a").output
    assert s.desired.get("dev1").capture is None
