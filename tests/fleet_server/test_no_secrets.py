"""No secret leaks: a real server, broker and devices run a whole flow with every logger at
DEBUG (paho's packet logs included), and no device secret, operator token or broker
password may appear in any log record, in the output of the CLI commands that do not
exist to show one, in the HTTP responses that do not issue one, or in the database file.

The devices log in to Mosquitto with the secrets the registry issued (the broker checks
the stored ``$7$`` hashes, as in production), and use the same secrets as HTTP tokens.
"""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from click.testing import CliRunner

from edgefleet.contract.messages import BundleRef, Status, encode, topic
from fleet_server.cli import main
from fleet_server.registry.devices import Registry
from fleet_server.store import Store
from tests.broker import SERVER_USER, Mosquitto
from tests.fleet_server.conftest import (
    SERVER_PASSWORD,
    FakeDevice,
    profile_of,
    summary_of,
    wait_until,
)

pytestmark = pytest.mark.slow

DEVICES = ("sec-1", "sec-2")


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    """The names of the secrets found in ``text`` (also their second halves: a secret cut
    to fit a line, or a URL-quoted one, still leaks what it keeps)."""
    return [name for name, s in secrets.items() if s in text or s[len(s) // 2:] in text]


def record_texts(records: list[logging.LogRecord]) -> str:
    parts = []
    for r in records:
        parts.append(r.getMessage())
        parts.append(repr(r.args))
        if r.exc_text:
            parts.append(r.exc_text)
        if r.exc_info and r.exc_info[1] is not None:
            parts.append(repr(r.exc_info[1]))
    return "\n".join(parts)


def test_no_secret_in_logs_output_or_database(tmp_path, caplog, server_factory, sensor_bundle,
                                              sensor_ref):
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "fleet.db"  # the path server_factory's config uses
    with Store(db) as store:
        reg = Registry(store)
        device_secrets = {d: reg.add_device(d, {"site": "a"}, "test", time.time())[1].secret
                          for d in DEVICES}
        users = store.mosquitto_users()
    broker = Mosquitto()
    broker.add_user(SERVER_USER, SERVER_PASSWORD)
    for device, hashed in users:
        broker.add_hashed_user(device, hashed)
    broker.start()
    made: list[FakeDevice] = []
    server = None
    try:
        server = server_factory(broker, http=True)
        s = server.services
        operator = s.auth.create_token("ops", "operator", "test", time.time()).secret
        viewer = s.auth.create_token("look", "viewer", "test", time.time()).secret
        secrets = {f"device:{d}": v for d, v in device_secrets.items()}
        secrets |= {"operator": operator, "viewer": viewer, "broker": SERVER_PASSWORD}
        wrong = "efo_" + "W" * 43  # a guessed token: refused, and not echoed either
        http = httpx.Client(base_url=server.base_url, timeout=10)
        bodies: list[str] = []

        def call(method: str, path: str, token: str, **kw) -> httpx.Response:
            r = http.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kw)
            bodies.append(r.text)
            return r

        # operators: upload, register a device (its secret is issued in that one body)
        assert call("POST", "/api/v1/bundles", operator,
                    content=sensor_bundle.read_bytes()).status_code == 201
        created = http.post("/api/v1/devices", json={"id": "sec-3", "labels": {}},
                            headers={"Authorization": f"Bearer {operator}"})
        assert created.status_code == 201
        secrets["device:sec-3"] = created.json()["secret"]
        assert call("PUT", "/api/v1/devices/sec-1/desired", operator,
                    json={"bundle": "sensor@1.0.0"}).status_code == 200
        for path in ("/api/v1/devices", "/api/v1/devices/sec-1", "/api/v1/bundles",
                     "/api/v1/summaries", "/metrics", "/health"):
            assert call("GET", path, viewer).status_code == 200, path
        # refusals: a wrong token, a device token where an operator one is needed
        assert call("GET", "/api/v1/devices", wrong).status_code == 401
        assert call("GET", "/api/v1/devices", device_secrets["sec-2"]).status_code == 403
        assert call("GET", "/api/v1/devices/sec-1/desired",
                    device_secrets["sec-2"]).status_code == 403
        # a device reads its own desired state with its secret
        assert call("GET", "/api/v1/devices/sec-1/desired",
                    device_secrets["sec-1"]).json()["revision"] == 1

        # devices over MQTT, logged in with the issued secrets
        spec, _ = sensor_ref
        for n, device in enumerate(DEVICES):
            dev = FakeDevice(broker, tmp_path, device, device_secrets[device])
            made.append(dev)
            dev.online({"site": "a"}, BundleRef("sensor", "1.0.0"))
            now = time.time()
            dev.send(summary_of(device, 1, profile_of(spec, 200, seed=n), now - 60, now))
            dev.heartbeat()
            dev.report(1, 1, "installed")
            dev.flush()
        # a device with a wrong password is refused by the broker
        intruder = FakeDevice(broker, tmp_path, "sec-2", "efd_" + "X" * 43)
        made.append(intruder)
        intruder.outbox.put(topic("sec-2", "status"), encode(Status("sec-2", "online")))
        time.sleep(0.5)
        assert not intruder.link.connected
        wait_until(lambda: len(s.store.list_summaries(limit=10)) == len(DEVICES), 10,
                   "the summaries to be stored")
        http.close()

        # the CLI commands that do not exist to show a secret
        runner = CliRunner()
        outputs = []
        for args in (["token", "list", "--db", str(db)],
                     ["token", "list", "--db", str(db), "--json"],
                     ["device", "passwd-file", "--db", str(db), "--out",
                      str(tmp_path / "passwd")],
                     ["broker-config", "--db", str(db), "--out", str(tmp_path / "broker"),
                      "--server-user", SERVER_USER, "--server-password-file",
                      str(_password_file(tmp_path))],
                     ["broker-config", "--db", str(db), "--out", str(tmp_path / "broker2"),
                      "--json"],
                     ["--log-level", "DEBUG", "broker-config", "--db", str(db), "--out",
                      str(tmp_path / "broker3")]):
            result = runner.invoke(main, args)
            assert result.exit_code == 0, (args, result.output)
            outputs.append(result.output)
    finally:
        for dev in made:
            dev.stop()
        if server is not None:
            server.stop()  # before the broker, so it does not log a lost connection
        broker.cleanup()

    assert caplog.records, "nothing was logged: the check would be empty"
    assert any(r.name.startswith("fleet_server.telemetry.link.paho") for r in caplog.records), \
        "paho's DEBUG packet log was not captured"
    assert leaks(record_texts(caplog.records), secrets) == []
    assert leaks(caplog.text, secrets) == []
    assert leaks("\n".join(outputs), secrets) == []
    assert leaks("\n".join(bodies), secrets) == []
    for path in (p for p in tmp_path.glob("fleet.db*") if p.is_file()):  # and WAL, shm
        assert leaks(path.read_bytes().decode("latin-1"), secrets) == [], path.name
    for path in (tmp_path / "broker").iterdir():
        if path.is_file():
            assert leaks(path.read_text(), secrets) == [], path.name


def _password_file(tmp_path):
    path = tmp_path / "server.pw"
    path.write_text(SERVER_PASSWORD + "\n")
    return path
