"""Device ids the service accounts own, decommissioning a device, and which bundles a
device may download: over real HTTP, a real Mosquitto and real SQLite."""

from __future__ import annotations

import threading
import time

import httpx
import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgefleet.contract.messages import topic
from edgefleet.contract.messages_base import download_path
from fleet_server.cli import main
from fleet_server.errors import NotFoundError, ReservedNameError
from tests.broker import SERVER_USER
from tests.fleet_server.conftest import SERVER_PASSWORD, wait_until

pytestmark = pytest.mark.slow

RESERVED = ["server", "Server", "server-ingest-1", "SERVER-eu"]


@pytest.mark.parametrize("device", RESERVED)
def test_reserved_device_ids_are_refused(services, device):
    with pytest.raises(ReservedNameError, match="reserved"):
        services.registry.add_device(device, {}, "test", time.time())
    assert services.store.get_device(device) is None


@pytest.mark.parametrize("device", ["servers", "my-server", "serverless-1", "srv"])
def test_names_near_the_service_namespace_are_devices(services, device):
    services.registry.add_device(device, {}, "test", time.time())  # the control


def test_download_authorisation_follows_desired_shadow_and_rollback(services_on, bundles):
    services = services_on
    now = time.time()
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        services.bundles.upload(bundles.build(version).read_bytes(), "test", now)
    reg, desired = services.registry, services.desired
    reg.add_device("dev1", {}, "test", now)
    reg.add_device("dev2", {}, "test", now)

    def allowed(device: str) -> set[str]:
        return {v for v in ("1.0.0", "1.1.0", "1.2.0")
                if desired.may_download(device, "sensor", v)}

    assert allowed("dev1") == set()  # nothing assigned: nothing
    desired.assign("dev1", "sensor@1.0.0", actor="test")
    assert allowed("dev1") == {"1.0.0"} and allowed("dev2") == set()
    desired.assign("dev1", "sensor@1.1.0", shadow="sensor@1.2.0", actor="test")
    assert allowed("dev1") == {"1.0.0", "1.1.0", "1.2.0"}  # rollback slot, desired, shadow
    desired.assign("dev1", "sensor@1.1.0", actor="test")  # the shadow goes; rollback stays
    assert allowed("dev1") == {"1.0.0", "1.1.0"}
    desired.assign("dev1", "sensor@1.2.0", actor="test")  # the slot moves on
    assert allowed("dev1") == {"1.1.0", "1.2.0"}
    assert allowed("dev2") == set()


class Watcher:
    """A second connection of the server account that reads desired-state topics."""

    def __init__(self, host: str, port: int) -> None:
        self._cond = threading.Condition()
        self.got: list[tuple[str, bytes]] = []
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"watcher-{time.monotonic_ns()}",
                             protocol=MQTTProtocolVersion.MQTTv5)
        self.c.username_pw_set(SERVER_USER, SERVER_PASSWORD)
        self.c.on_message = self._message
        self.c.connect(host, port)
        self.c.loop_start()

    def _message(self, client, userdata, msg) -> None:
        with self._cond:
            self.got.append((msg.topic, msg.payload))
            self._cond.notify_all()

    def retained(self, device: str, marker_device: str) -> list[bytes]:
        """The retained desired state of ``device``: subscribe to it, then to a topic
        with a known retained message; once that arrives, the first one has too."""
        self.c.subscribe(topic(device, "desired"), qos=1)
        self.c.subscribe(topic(marker_device, "desired"), qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: any(t == topic(marker_device, "desired")
                                                   for t, _ in self.got), 10)
            return [p for t, p in self.got if t == topic(device, "desired")]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def fleet(broker, server_factory, sensor_bundle):
    server = server_factory(broker, http=True)
    s = server.services
    now = time.time()
    s.bundles.upload(sensor_bundle.read_bytes(), "test", now)
    operator = s.auth.create_token("op", "operator", "test", now).secret
    secrets = {d: s.registry.add_device(d, {"site": "a"}, "test", now)[1].secret
               for d in ("dev1", "dev2")}
    for d in ("dev1", "dev2"):
        s.desired.assign(d, "sensor@1.0.0", actor="test")
    client = httpx.Client(base_url=server.base_url, timeout=10,
                          headers={"Authorization": f"Bearer {operator}"})
    yield server, client, secrets, operator
    client.close()


def test_remove_decommissions_a_device_and_nothing_else(fleet, broker):
    server, client, secrets, _ = fleet
    url = download_path("sensor", "1.0.0")

    def as_device(d: str, path: str) -> int:
        return httpx.get(server.base_url + path, timeout=10,
                         headers={"Authorization": f"Bearer {secrets[d]}"}).status_code

    assert as_device("dev1", url) == 200 and as_device("dev2", url) == 200
    watcher = Watcher(broker.host, broker.port)
    try:
        assert len(watcher.retained("dev1", "dev2")) == 1  # the desired state is retained
        r = client.delete("/api/v1/devices/dev1")
        assert r.status_code == 200, r.text
        assert r.json()["retained_cleared"] is True
        assert "broker-config" in r.json()["broker_account"]
        # its secret opens nothing any more; its desired state and record are gone
        assert as_device("dev1", url) == 401
        assert as_device("dev1", "/api/v1/devices/dev1/desired") == 401
        assert client.get("/api/v1/devices/dev1").status_code == 404
        assert [d["id"] for d in client.get("/api/v1/devices").json()] == ["dev2"]
        assert server.services.desired.record("dev1") is None
        assert "dev1" not in dict(server.services.registry.store.mosquitto_users())
        late = Watcher(broker.host, broker.port)  # the retained message is gone
        try:
            assert late.retained("dev1", "dev2") == []
        finally:
            late.close()
        # nothing about the other device changed
        assert as_device("dev2", url) == 200
        assert server.services.desired.record("dev2").bundle.version == "1.0.0"
        actions = [e.action for e in server.services.store.list_audit(target="device:dev1")]
        assert actions[0] == "device.remove"
        assert client.delete("/api/v1/devices/dev1").status_code == 404
    finally:
        watcher.close()


def test_a_removal_while_the_broker_is_away_is_cleared_on_reconnect(fleet, broker):
    server, client, _, _ = fleet
    broker.stop()
    wait_until(lambda: not server.link.connected, 10, "the server to notice")
    r = client.delete("/api/v1/devices/dev1")
    assert r.status_code == 200 and r.json()["retained_cleared"] is False
    assert server.services.store.retained_to_clear() == ["dev1"]
    broker.start()  # no persistence in the test broker: desired states are republished
    wait_until(lambda: server.services.store.retained_to_clear() == [], 10,
               "the pending clear to be sent")
    watcher = Watcher(broker.host, broker.port)
    try:
        assert watcher.retained("dev1", "dev2") == []
    finally:
        watcher.close()


def test_a_device_registered_again_is_a_new_device(services_on):
    services = services_on
    now = time.time()
    services.registry.add_device("dev1", {"site": "a"}, "test", now)
    services.registry.remove_device("dev1", "test", now)
    assert services.store.retained_to_clear() == ["dev1"]
    with pytest.raises(NotFoundError):
        services.registry.remove_device("dev1", "test", now)
    device, _ = services.registry.add_device("dev1", {}, "test", now)
    assert device.labels == {} and services.store.retained_to_clear() == []


def test_cli_device_remove(fleet):
    server, _, _, operator = fleet
    runner = CliRunner()
    args = ["--server", server.base_url, "--token", operator]
    result = runner.invoke(main, ["device", "remove", "dev1", *args])
    assert result.exit_code == 0, result.output
    assert "device 'dev1' removed" in result.output and "broker-config" in result.output
    again = runner.invoke(main, ["device", "remove", "dev1", *args])
    assert again.exit_code == 3 and again.output.startswith("fleet: error: ")
    assert "dev1" in again.output and again.output.count("\n") == 1
    refused = runner.invoke(main, ["device", "add", "server", *args])
    assert refused.exit_code == 1 and "reserved" in refused.output


def test_the_broker_account_goes_with_the_next_broker_config(tmp_path):
    """Remove, write the broker config again, SIGHUP: the device's login is refused and
    its open connection dropped; the other device's stays."""
    import signal
    import sys

    from fleet_server.registry.devices import Registry
    from fleet_server.store import Store
    from fleet_server.telemetry.broker import (
        CONF_NAME,
        BrokerSetup,
        start_broker,
        stop_broker,
        write_broker_config,
    )
    from tests.broker import free_port
    from tests.fleet_server.test_brokerconf import Client, _die_with_parent

    port = free_port()
    setup = BrokerSetup(out=tmp_path / "broker", port=port, bind="127.0.0.1",
                        persistence=False)
    with Store(tmp_path / "fleet.db") as store:
        reg = Registry(store)
        secrets = {d: reg.add_device(d, {}, "t", time.time())[1].secret for d in ("d1", "d2")}
        files = write_broker_config(setup, store)
        proc = start_broker(files[CONF_NAME], port, tmp_path / "mosquitto.log",
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        clients = []
        try:
            for d in ("d1", "d2"):
                clients.append(Client("127.0.0.1", port, d, secrets[d]))
                assert clients[-1].connect() == 0
            reg.remove_device("d1", "test", time.time())
            write_broker_config(setup, store)
            proc.send_signal(signal.SIGHUP)
            d1, d2 = clients
            assert d1.wait(lambda: d1.disconnects > 0, 10), "d1 still connected"
            again = Client("127.0.0.1", port, "d1", secrets["d1"])
            clients.append(again)
            assert again.connect() in (0x86, 0x87)  # bad user name or password / refused
            assert d2.disconnects == 0
            assert d2.publish("edgefleet/v1/d2/summary", b"x") in (0x00, 0x10)
        finally:
            for c in clients:
                c.close()
            stop_broker(proc)
