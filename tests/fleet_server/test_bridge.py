"""Mosquitto per site, bridged to a central one (``fleet_server.telemetry.bridge``).

The renderer: the site broker's bridge lines (each kind one way, kept session, retained
flags kept) and the central ACL's bridge accounts (only their own site's devices, by
name). Then the topology for real: two Mosquittos started from what
``write_broker_config`` wrote (a central one with a bridge account for site ``plant-a``,
and ``plant-a``'s broker bridged to it), a fleet server ingesting from the central broker
only, and devices connected to the site broker only. A device's summary reaches the
central ingest and is stored; the server's acknowledgement comes back through the bridge
(the device's outbox drains); a desired state assigned centrally reaches a device that
connects to its site afterwards (retained across the bridge); the bridge account cannot
speak for another site's device, and another site's device cannot log in at this site.
"""

from __future__ import annotations

import json
import stat
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from edgefleet.contract.messages import BundleRef, topic
from fleet_server.cli.main import main
from fleet_server.config import BrokerConfig
from fleet_server.errors import InvalidRequestError
from fleet_server.registry.auth import mosquitto_hash
from fleet_server.registry.devices import Registry
from fleet_server.server import FleetServer
from fleet_server.store import Store
from fleet_server.telemetry.bridge import SiteBridge
from fleet_server.telemetry.broker import (
    ACL_NAME,
    CONF_NAME,
    PASSWD_NAME,
    SERVER_PASSWORD_NAME,
    BrokerSetup,
    render,
    start_broker,
    stop_broker,
    write_broker_config,
)
from tests.broker import INSTALL_HINT, find_mosquitto, free_port
from tests.fleet_server.conftest import (
    FakeDevice,
    make_config,
    profile_of,
    summary_of,
    wait_until,
)
from tests.fleet_server.test_brokerconf import ACCEPTED, NOT_AUTHORIZED, Client, conf_pairs

HASH = mosquitto_hash("pw", salt=b"\0" * 12)


def test_a_site_broker_bridges_each_kind_one_way_with_a_kept_session(tmp_path):
    bridge = SiteBridge("plant-a", "central.example", 8883, "bridge-pw", tmp_path / "ca.pem")
    texts = render(BrokerSetup(out=tmp_path, bridge_to=bridge), [("dev-a1", HASH)])
    pairs = conf_pairs(texts[CONF_NAME])
    got = dict(p for p in pairs if p[0] != "topic")
    assert got["connection"] == got["remote_username"] == got["remote_clientid"] == \
        "server-bridge-plant-a"
    assert got["address"] == "central.example:8883" and got["remote_password"] == "bridge-pw"
    assert (got["cleansession"], got["try_private"]) == ("false", "true")
    assert got["bridge_cafile"] == str((tmp_path / "ca.pem").resolve())
    assert [v for k, v in pairs if k == "topic"] == [
        "edgefleet/v1/+/summary out 1", "edgefleet/v1/+/report out 1",
        "edgefleet/v1/+/status out 1", "edgefleet/v1/+/heartbeat out 0",
        "edgefleet/v1/+/desired in 1", "edgefleet/v1/+/ack in 1"]
    # no server account at a site: only its devices log in there
    assert [line.split(":")[0] for line in texts[PASSWD_NAME].splitlines()] == ["dev-a1"]


def test_the_central_acl_lets_a_bridge_speak_only_for_its_sites_devices(tmp_path):
    setup = BrokerSetup(out=tmp_path, server_password="pw", bridge_sites=("plant-a", "b"),
                        bridge_passwords=("pa", "pb"))
    texts = render(setup, [("dev-a1", HASH), ("dev-b1", HASH)],
                   {"plant-a": ["dev-a1"], "b": ["dev-b1"]})
    acl = texts[ACL_NAME]
    block = acl[acl.index("user server-bridge-plant-a"):acl.index("user server-bridge-b")]
    assert block.splitlines()[1:] == [
        "topic write edgefleet/v1/dev-a1/summary", "topic write edgefleet/v1/dev-a1/report",
        "topic write edgefleet/v1/dev-a1/status", "topic write edgefleet/v1/dev-a1/heartbeat",
        "topic read edgefleet/v1/dev-a1/desired", "topic read edgefleet/v1/dev-a1/ack", "",
        "# the bridge of a site (its broker's account): speaks for its own 1 device(s) only"]
    assert "+" not in block and "#" not in block.split("\n", 1)[1].replace("# the", "")
    users = [line.split(":")[0] for line in texts[PASSWD_NAME].splitlines()]
    assert users == ["dev-a1", "dev-b1", "server", "server-bridge-plant-a",
                     "server-bridge-b"]


@pytest.mark.parametrize("kwargs, field", [
    ({"bridge_sites": ("bad site",)}, "site"),
    ({"bridge_sites": ("a", "a")}, "bridge_sites"),
    ({"bridge_sites": ("a",), "bridge_to": SiteBridge("b", "h", 1883, "pw")}, "bridge_to"),
], ids=["bad-site-name", "site-twice", "central-and-site"])
def test_bad_bridge_setups_are_refused(tmp_path, kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        BrokerSetup(out=tmp_path, **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize("kwargs, field", [
    ({"site": "a/b"}, "site"),
    ({"host": "h st"}, "host"),
    ({"port": 0}, "port"),
    ({"password": ""}, "password"),
    ({"password": "pw with space"}, "password"),
], ids=["site-slash", "host-space", "port-0", "no-password", "password-space"])
def test_bad_bridges_are_refused(kwargs, field):
    args = {"site": "a", "host": "central", "port": 1883, "password": "pw", **kwargs}
    with pytest.raises(InvalidRequestError) as err:
        SiteBridge(**args)
    assert err.value.field == field


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.mark.slow
def test_a_devices_summary_crosses_the_bridge_to_the_central_ingest(tmp_path, signing_keys,
                                                                     sensor_bundle, sensor_ref):
    if find_mosquitto() is None:
        pytest.skip(INSTALL_HINT)
    config = make_config(tmp_path, signing_keys)
    with Store(config.db) as store:
        reg = Registry(store)
        now = time.time()
        secrets = {d: reg.add_device(d, {"site": site}, "test", now)[1].secret
                   for d, site in (("dev-a1", "plant-a"), ("dev-a2", "plant-a"),
                                   ("dev-b1", "plant-b"))}
        central_port, site_port = free_port(), free_port()
        central = write_broker_config(BrokerSetup(
            out=tmp_path / "central", port=central_port, bind="127.0.0.1", persistence=False,
            bridge_sites=("plant-a",)), store)
        bridge_pw = central["server-bridge-plant-a-password"].read_text().strip()
        site = write_broker_config(BrokerSetup(
            out=tmp_path / "site-a", port=site_port, bind="127.0.0.1", persistence=False,
            bridge_to=SiteBridge("plant-a", "127.0.0.1", central_port, bridge_pw)), store)
    assert stat.S_IMODE(site[CONF_NAME].stat().st_mode) == 0o600  # it holds a password
    procs, clients, fakes = [], [], []
    server = None
    preexec = _die_with_parent if sys.platform == "linux" else None
    try:
        procs.append(start_broker(central[CONF_NAME], central_port,
                                  tmp_path / "central.log", preexec_fn=preexec))
        procs.append(start_broker(site[CONF_NAME], site_port, tmp_path / "site.log",
                                  preexec_fn=preexec))
        server_pw = central[SERVER_PASSWORD_NAME].read_text().strip()
        server = FleetServer(replace(config, broker=BrokerConfig(
            host="127.0.0.1", port=central_port, username="server", password=server_pw,
            reconnect_min_delay=0.05, reconnect_max_delay=0.3)))
        server.start()
        link = server.link
        assert link is not None
        wait_until(lambda: link.connected, 10, "the server to connect to the central broker")
        s = server.services
        s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
        wait_until(lambda: "New bridge connected" in (tmp_path / "central.log").read_text(),
                   15, "the site's bridge to connect to the central broker")
        at_site = SimpleNamespace(host="127.0.0.1", port=site_port)
        dev = FakeDevice(at_site, tmp_path, "dev-a1", secrets["dev-a1"])  # type: ignore[arg-type]
        fakes.append(dev)
        dev.online({"site": "plant-a"}, bundle=BundleRef("sensor", "1.0.0"))
        spec, base = sensor_ref
        end = int(time.time() // 60) * 60
        dev.send(summary_of("dev-a1", 1, profile_of(spec, 50, 1, base=base), end - 60, end))
        dev.flush(30)  # the site broker has it
        wait_until(lambda: s.registry.get("dev-a1").summaries == 1, 30,
                   "dev-a1's summary stored by the central ingest")
        # a numbered message leaves the outbox only on the server's acknowledgement, which
        # came back down through the bridge
        wait_until(lambda: dev.outbox.depth == 0, 30, "the acknowledgement at dev-a1")
        wait_until(lambda: s.registry.get("dev-a1").online, 10,
                   "dev-a1's retained status at the centre")
        # desired state assigned centrally, before dev-a2 ever connects: retained at its site
        s.desired.assign("dev-a2", "sensor@1.0.0", actor="test")
        late = FakeDevice(at_site, tmp_path, "dev-a2", secrets["dev-a2"])  # type: ignore[arg-type]
        fakes.append(late)
        wait_until(lambda: any(t == topic("dev-a2", "desired") for t, _ in late.received), 15,
                   "dev-a2 to get its desired state at its site")
        # another site's device has no account here
        stranger = Client("127.0.0.1", site_port, "dev-b1", secrets["dev-b1"])
        clients.append(stranger)
        assert stranger.connect() != 0
        # and the bridge's account cannot speak for it at the centre (this takes the
        # bridge's connection over: the last check)
        forger = Client("127.0.0.1", central_port, "server-bridge-plant-a", bridge_pw)
        clients.append(forger)
        assert forger.connect() == 0
        assert forger.publish("edgefleet/v1/dev-b1/summary", b"{}") == NOT_AUTHORIZED
        assert forger.publish("edgefleet/v1/dev-a1/heartbeat", b"{}") in ACCEPTED  # control
    finally:
        for c in clients:
            c.close()
        for f in fakes:
            f.stop()
        if server is not None:
            server.stop()
        for proc in reversed(procs):
            stop_broker(proc)


@pytest.mark.slow
def test_cli_writes_a_central_broker_and_a_bridged_site_broker(tmp_path):
    db = tmp_path / "fleet.db"
    with Store(db) as store:
        reg = Registry(store)
        for device, site in (("dev-a1", "plant-a"), ("dev-b1", "plant-b")):
            reg.add_device(device, {"site": site}, "t", time.time())
    runner = CliRunner()
    central = runner.invoke(main, ["broker-config", "--db", str(db), "--out",
                                   str(tmp_path / "central"), "--bridge-site", "plant-a"])
    assert central.exit_code == 0, central.output
    assert "1 site bridge account(s)" in central.output
    pw_file = tmp_path / "central" / "server-bridge-plant-a-password"
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
    password = pw_file.read_text().strip()
    site = runner.invoke(main, ["broker-config", "--db", str(db), "--out",
                                str(tmp_path / "site"), "--bridge-to", "central.example:8883",
                                "--site", "plant-a", "--bridge-password-file", str(pw_file)])
    assert site.exit_code == 0, site.output
    assert "1 device account(s) of site 'plant-a', bridged to central.example:8883" \
        in site.output
    assert password not in central.output + site.output
    conf = tmp_path / "site" / CONF_NAME
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert ("remote_password", password) in conf_pairs(conf.read_text())
    as_json = runner.invoke(main, ["broker-config", "--db", str(db), "--out",
                                   str(tmp_path / "site2"), "--bridge-to", "central.example:8883",
                                   "--site", "plant-a", "--bridge-password-file", str(pw_file),
                                   "--json"])
    assert as_json.exit_code == 0, as_json.output
    answer = json.loads(as_json.output)
    assert answer["serve"] is None and answer["ingest"] == []  # no fleet server on a site
    assert answer["start"].startswith("mosquitto -c ")
    missing = runner.invoke(main, ["broker-config", "--db", str(db), "--out",
                                   str(tmp_path / "x"), "--bridge-to", "central"])
    assert missing.exit_code != 0 and "--site and --bridge-password-file" in missing.output
