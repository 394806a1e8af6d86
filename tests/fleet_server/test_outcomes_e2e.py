"""Outcomes uploaded centrally reach their devices through a real Mosquitto, each applied once.

The devices are stand-ins that follow the protocol of
:class:`edgefleet.contract.messages.Outcomes` exactly as the agent must: a real paho client
under the device's own account, a retained ``online`` status with an ``offline`` last will,
batch ``n`` applied only after ``n - 1``, a :class:`Receipt` of the highest applied batch
after every delivery. They count every delivery of every batch and every application of
every outcome id, so the tests count end to end: uploaded = applied, each exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgefleet.contract.messages import Outcomes, Receipt, Status, decode, encode, topic
from fleet_server.cli.main import main
from fleet_server.config import OutcomeConfig, ServerConfig
from fleet_server.services import build_services
from fleet_server.telemetry.outcomes import parse_json_body
from tests.broker import SERVER_USER, Mosquitto, free_port
from tests.fleet_server.conftest import PASSWORDS, SERVER_PASSWORD, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


class StandIn:
    """A device's side of the outcomes protocol (see the module docstring).

    ``deaf``: receive and count, apply nothing, receipt nothing. ``lose``: batch numbers
    whose next delivery is dropped as if it never arrived.
    """

    def __init__(self, broker: Mosquitto, device: str) -> None:
        self.device = device
        self.lock = threading.Lock()
        self.applied_batch = 0
        self.applied: Counter[str] = Counter()  # outcome id -> times applied
        self.labels: dict[str, object] = {}
        self.deliveries: Counter[int] = Counter()  # batch -> times received
        self.deaf = False
        self.lose: set[int] = set()
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=device,
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.username_pw_set(device, PASSWORDS[device])
        c.will_set(topic(device, "status"), encode(Status(device, "offline")), qos=1,
                   retain=True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self.client = c
        self.broker = broker

    def connect(self) -> StandIn:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        return self

    def offline(self) -> None:
        """Say offline (as the will would) and disconnect."""
        self.client.publish(topic(self.device, "status"),
                            encode(Status(self.device, "offline", time=time.time())), qos=1,
                            retain=True).wait_for_publish(10)
        self.client.disconnect()
        self.client.loop_stop()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            return
        client.subscribe(topic(self.device, "outcomes"), qos=1)
        client.publish(topic(self.device, "status"),
                       encode(Status(self.device, "online", "0.0.1", time=time.time())),
                       qos=1, retain=True)

    def _on_message(self, client, userdata, msg) -> None:
        batch = decode(msg.topic, msg.payload)
        assert isinstance(batch, Outcomes)
        with self.lock:
            self.deliveries[batch.batch] += 1
            if self.deaf:
                return
            if batch.batch in self.lose:
                self.lose.discard(batch.batch)
                return
            if batch.batch == self.applied_batch + 1:  # the next one: apply it
                for o in batch.outcomes:
                    self.applied[o.id] += 1
                    self.labels[o.id] = o.label
                self.applied_batch = batch.batch
            upto = self.applied_batch
        client.publish(topic(self.device, "receipt"),
                       encode(Receipt(self.device, upto, time.time())), qos=1)


@pytest.fixture
def stand_ins(broker):
    made: list[StandIn] = []

    def make(device: str) -> StandIn:
        s = StandIn(broker, device)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _fleet(server, devices) -> str:
    s = server.services
    for d in devices:
        s.registry.add_device(d, {}, "test", time.time())
    return s.auth.create_token("ops", "operator", "test", time.time()).secret


def _online(server, device: str) -> None:
    wait_until(lambda: server.services.registry.get(device).online, 20, f"{device} online")


def _receipted(server, device: str) -> int:
    rows = server.services.outcomes.status(device)
    return rows[0].receipted if rows else 0


def test_100k_outcomes_reach_their_devices_each_once(broker, server_factory, stand_ins,
                                                      tmp_path):
    devices = ("dev1", "dev2", "dev3", "dev4")
    per_device = 25_000
    # resends only when a device comes online: none happens here, so each batch goes once
    server = server_factory(broker, http=True, outcomes=OutcomeConfig(resend_s=600))
    token = _fleet(server, devices)
    subs = {d: stand_ins(d).connect() for d in devices}
    for d in devices:
        _online(server, d)
    csv_file = tmp_path / "outcomes.csv"
    with csv_file.open("w") as fh:
        fh.write("device,id,label\n")
        for i in range(per_device):
            fh.writelines(f"{d},p-{i:06d},{i % 3}\n" for d in devices)
    started = time.monotonic()
    done = CliRunner().invoke(main, ["outcomes", "upload", str(csv_file), "--server",
                                     server.base_url, "--token", token])
    assert done.exit_code == 0, done.output
    assert f"{per_device * len(devices)} outcome(s) queued for 4 device(s)" in done.output
    uploaded = time.monotonic()
    wait_until(lambda: all(_receipted(server, d) == per_device for d in devices), 120,
               "every outcome to be receipted")
    took = time.monotonic() - started
    total = per_device * len(devices)
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    print(f"\noutcomes: {total} uploaded -> receipted in {took:.2f} s "
          f"(upload {uploaded - started:.2f} s), {total / took:,.0f} outcomes/s; "
          f"load {' '.join(load)}")
    for d, s in subs.items():
        with s.lock:
            assert len(s.applied) == per_device and set(s.applied.values()) == {1}, d
            assert s.labels["p-000004"] == 1 and isinstance(s.labels["p-000004"], int)
            batches = per_device // 1000
            assert s.applied_batch == batches
            assert s.deliveries == Counter({b: 1 for b in range(1, batches + 1)}), d
    for row in server.services.outcomes.status():
        assert (row.queued, row.sent, row.receipted, row.receipt) == (0, 0, per_device, 25)


def test_an_offline_device_gets_its_outcomes_when_it_comes_online(broker, server_factory,
                                                                  stand_ins):
    server = server_factory(broker, http=False)
    token = _fleet(server, ("dev5",))
    assert token
    early = stand_ins("dev5").connect()
    _online(server, "dev5")
    early.offline()
    wait_until(lambda: not server.services.registry.get("dev5").online, 20, "dev5 offline")
    rows = [{"device": "dev5", "id": f"late-{i}", "label": "ok"} for i in range(2500)]
    server.services.outcomes.upload(parse_json_body(json.dumps({"outcomes": rows}).encode()),
                                    "ops")
    router = server.outcome_router
    assert router is not None and router.run_once() == 0  # nothing goes to an offline device
    status = server.services.outcomes.status("dev5")[0]
    assert (status.queued, status.sent, status.receipted) == (2500, 0, 0)
    late = stand_ins("dev5").connect()
    wait_until(lambda: _receipted(server, "dev5") == 2500, 60, "dev5's outcomes")
    with late.lock:
        assert len(late.applied) == 2500 and set(late.applied.values()) == {1}
    assert early.deliveries == Counter()


def test_a_lost_batch_is_sent_again_and_applied_once(broker, server_factory, stand_ins):
    server = server_factory(broker, outcomes=OutcomeConfig(resend_s=0.5, window=4,
                                                           tick_s=0.2))
    _fleet(server, ("dev6",))
    dev = stand_ins("dev6")
    dev.lose = {2}  # batch 2's first delivery never arrives; 3 and 4 come too early
    dev.connect()
    _online(server, "dev6")
    rows = [{"device": "dev6", "id": f"x{i}", "label": i} for i in range(5500)]
    server.services.outcomes.upload(parse_json_body(json.dumps({"outcomes": rows}).encode()),
                                    "ops")
    wait_until(lambda: _receipted(server, "dev6") == 5500, 60, "every outcome receipted")
    with dev.lock:
        assert len(dev.applied) == 5500 and set(dev.applied.values()) == {1}
        assert dev.deliveries[1] == 1 and dev.deliveries[2] >= 2 and dev.deliveries[3] >= 2
        assert dev.applied_batch == 6


# --------------------------------------------------------------------------- a real crash


def _spawn_serve(tmp: Path, broker: Mosquitto, port: int, keys) -> subprocess.Popen:
    trust = [a for spec in keys.trust_specs() for a in ("--trust", spec)]
    with open(tmp / "serve.log", "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "fleet_server.cli", "serve", "--db", str(tmp / "fleet.db"),
             "--broker", f"{broker.host}:{broker.port}", "--broker-password-file",
             str(tmp / "broker-pw"), "--port", str(port), "--outcome-resend", "600", *trust],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_sigkilled_server_resends_what_was_not_receipted(broker, stand_ins, tmp_path,
                                                           signing_keys):
    s = build_services(ServerConfig(db=tmp_path / "fleet.db"))
    s.registry.add_device("dev1", {}, "test", time.time())
    token = s.auth.create_token("ops", "operator", "test", time.time()).secret
    s.close()
    (tmp_path / "broker-pw").write_text(SERVER_PASSWORD)
    assert SERVER_USER == "server"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {token}"}
    dev = stand_ins("dev1")
    dev.deaf = True  # receives the first sends and applies nothing: all is unreceipted
    dev.connect()
    procs: list[subprocess.Popen] = []

    def up() -> bool:
        assert procs[-1].poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        try:
            return httpx.get(f"{base}/health", timeout=2).json()["mqtt"] == "connected"
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def status() -> dict:
        rows = httpx.get(f"{base}/api/v1/outcomes", params={"device": "dev1"}, headers=auth,
                         timeout=10).json()
        return rows[0] if rows else {}

    try:
        procs.append(_spawn_serve(tmp_path, broker, port, signing_keys))
        wait_until(up, 60, "fleet serve to answer and connect")
        body = "device,id,label\n" + "".join(f"dev1,k{i},{i % 2}\n" for i in range(3000))
        r = httpx.post(f"{base}/api/v1/outcomes", content=body.encode(),
                       headers={**auth, "Content-Type": "text/csv"}, timeout=30)
        assert r.status_code == 201, r.text
        wait_until(lambda: all(dev.deliveries[b] >= 1 for b in (1, 2, 3)), 60,
                   "the first sends")
        wait_until(lambda: status().get("sent") == 3000, 30, "the sends to be recorded")
        procs[-1].send_signal(signal.SIGKILL)
        assert procs[-1].wait(20) == -signal.SIGKILL
        with dev.lock:
            dev.deaf = False
        procs.append(_spawn_serve(tmp_path, broker, port, signing_keys))
        wait_until(up, 60, "fleet serve to come back")
        # its resend timer is 600 s: what resends is the device's online status, replayed
        # to the restarted server's subscription
        wait_until(lambda: status().get("receipted") == 3000, 60, "the resent outcomes")
        with dev.lock:
            assert len(dev.applied) == 3000 and set(dev.applied.values()) == {1}
            assert all(dev.deliveries[b] >= 2 for b in (1, 2, 3))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
