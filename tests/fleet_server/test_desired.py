"""Desired state: stored, published retained, republished when the server reconnects."""

from __future__ import annotations

import time

import pytest

from edgefleet.contract.messages import DesiredState, decode, topic
from edgefleet.contract.messages_base import download_path
from fleet_server.errors import InvalidRequestError, NotFoundError
from fleet_server.registry.desired import Assignment
from tests.fleet_server.conftest import wait_until

pytestmark = pytest.mark.slow


def latest(device) -> DesiredState | None:
    states = [decode(t, p) for t, p in device.received if t == topic(device.id, "desired")]
    return states[-1] if states else None  # type: ignore[return-value]


def test_an_assignment_reaches_the_device_retained(broker, devices, server_factory, bundles):
    server = server_factory(broker)
    s = server.services
    v1 = bundles.build("1.0.0")
    s.bundles.upload(v1.read_bytes(), "test", time.time())
    s.bundles.upload(bundles.build("1.1.0").read_bytes(), "test", time.time())
    s.registry.add_device("dev1", {}, "test", time.time())
    dev = devices("dev1")
    wait_until(lambda: dev.link.connected)
    state = s.desired.assign("dev1", "sensor@1.0.0", actor="operator:ana")
    assert state.revision == 1
    wait_until(lambda: latest(dev) is not None, 10, "the desired state on the device")
    got = latest(dev)
    assert got == state
    record = s.bundles.get("sensor", "1.0.0")
    assert got.bundle.sha256 == record.sha256 and got.bundle.size == v1.stat().st_size
    assert got.bundle.url == download_path("sensor", "1.0.0")
    # the same again changes nothing
    assert s.desired.assign("dev1", "sensor@1.0.0", actor="operator:ana").revision == 1
    # a shadow is a change
    state = s.desired.assign("dev1", "sensor@1.0.0", "sensor@1.1.0", actor="operator:ana")
    assert state.revision == 2 and state.shadow.version == "1.1.0"
    wait_until(lambda: latest(dev).revision == 2, 10, "revision 2")
    assert [e.action for e in s.store.list_audit(target="device:dev1")][:2] == \
        ["desired.set", "desired.set"]
    # a device that connects later gets it from the broker
    late = devices("dev2")
    s.registry.add_device("dev2", {}, "test", time.time())
    s.desired.assign("dev2", "sensor@1.1.0", allow_downgrade=True, actor="operator:ana")
    wait_until(lambda: late.link.connected)
    wait_until(lambda: latest(late) is not None and latest(late).allow_downgrade, 10, "dev2")


def test_the_server_republishes_when_the_broker_lost_its_retained_messages(
        broker, devices, server_factory, sensor_bundle):
    server = server_factory(broker)
    s = server.services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    for d in ("dev1", "dev2"):
        s.registry.add_device(d, {}, "test", time.time())
    s.desired.assign_many([Assignment("dev1", "sensor@1.0.0"), Assignment("dev2", None)],
                          actor="rollout:r1")
    assert server.link is not None
    connects = server.link.connects
    broker.restart()  # no persistence: every retained message is gone
    wait_until(lambda: server.link.connects > connects and server.link.connected, 15,
               "the server to reconnect")
    dev = devices("dev1")  # connects after the restart
    wait_until(lambda: latest(dev) is not None, 10, "the republished state")
    assert latest(dev).revision == 1 and latest(dev).bundle.name == "sensor"


def test_bad_assignments_change_nothing(services, sensor_bundle):
    s = services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    s.registry.add_device("dev1", {}, "test", time.time())
    with pytest.raises(NotFoundError, match="device 'ghost'"):
        s.desired.assign_many([Assignment("dev1", "sensor@1.0.0"),
                               Assignment("ghost", "sensor@1.0.0")], actor="t")
    assert s.desired.get("dev1") is None  # one transaction: dev1 was not changed either
    with pytest.raises(NotFoundError, match=r"sensor@9\.9\.9"):
        s.desired.assign("dev1", "sensor@9.9.9", actor="t")
    with pytest.raises(InvalidRequestError, match="name@version"):
        s.desired.assign("dev1", "sensor", actor="t")
    assert s.desired.assign("dev1", None, actor="t").revision == 1  # "no model" is a state
