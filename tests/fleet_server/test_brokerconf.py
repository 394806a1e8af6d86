"""The broker configuration: the pure renderer, its refusals, the writer and CLI, and what a
real Mosquitto started from the written files allows and refuses.

The broker tests start ``mosquitto -c <written mosquitto.conf>`` exactly as an operator
would (only the port is a free loopback one) and talk MQTT 5 to it with paho, so a
refused publish is seen as the broker's PUBACK reason code (0x87 Not authorized), and a
refused read as nothing delivered (Mosquitto 2.0.11 grants the SUBACK, then filters).
Every refusal has a positive control, so no test passes because nothing was delivered at
all. The control goes over a second connection of the same account: Mosquitto 2.0.11
answers a refused QoS 1 publish with PUBACK 0x87 and then closes the connection (its log:
"Bad socket read/write"), and a clean-start session's subscriptions go with it.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgefleet.contract.messages import MAX_PAYLOAD
from fleet_server.cli import main
from fleet_server.errors import InvalidRequestError
from fleet_server.registry.accounts import is_service_name
from fleet_server.registry.auth import mosquitto_hash, verify_mosquitto_hash
from fleet_server.registry.devices import Registry
from fleet_server.store import Store
from fleet_server.telemetry.broker import (
    ACL_NAME,
    ACL_TEMPLATE,
    CONF_NAME,
    MAX_PACKET_BYTES,
    PASSWD_NAME,
    SERVER_PASSWORD_NAME,
    BrokerSetup,
    render,
    start_broker,
    stop_broker,
    write_broker_config,
)
from tests.broker import INSTALL_HINT, find_mosquitto, free_port

NOT_AUTHORIZED = 0x87
ACCEPTED = (0x00, 0x10)  # success, or success with no matching subscribers
HASH = mosquitto_hash("pw", salt=b"\0" * 12)
KEY_VALUE = re.compile(r"^[a-z0-9_]+ \S.*\Z")


def conf_pairs(text: str) -> list[tuple[str, str]]:
    """``(key, value)`` of every setting line; asserts every other line is blank or a
    comment (Mosquitto's own rule: ``#`` only as a line's first character)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        assert KEY_VALUE.match(line), f"not `key value`: {line!r}"
        key, value = line.split(" ", 1)
        out.append((key, value))
    return out


def conf_dict(text: str) -> dict[str, str]:
    pairs = conf_pairs(text)
    keys = [k for k, _ in pairs if k not in ("listener", "log_type")]
    assert len(keys) == len(set(keys)), f"a setting given twice: {keys}"
    return dict(pairs)


# --------------------------------------------------------------------------- renderer


def test_render_defaults(tmp_path):
    files = render(BrokerSetup(out=tmp_path, server_password="s3cret-pw", run_as_root=False),
                   [("dev-a", HASH), ("dev-b", HASH)])
    assert sorted(files) == [ACL_NAME, CONF_NAME, PASSWD_NAME]
    conf = conf_dict(files[CONF_NAME])
    assert conf == {
        "per_listener_settings": "false",
        "allow_anonymous": "false",
        "password_file": str(tmp_path.resolve() / "passwd"),
        "acl_file": str(tmp_path.resolve() / "acl"),
        "use_username_as_clientid": "true",
        "message_size_limit": str(MAX_PAYLOAD),
        "max_packet_size": str(MAX_PACKET_BYTES),
        "max_queued_messages": "0",
        "queue_qos0_messages": "false",
        "max_inflight_messages": "20",
        "retain_available": "true",
        "check_retain_source": "true",
        "max_keepalive": "120",
        "persistent_client_expiration": "14d",
        "log_dest": "stderr",
        "log_type": "information",
        "connection_messages": "true",
        "log_timestamp": "true",
        "persistence": "true",
        "persistence_location": f"{tmp_path.resolve() / 'data'}/",
        "autosave_interval": "60",
        "autosave_on_changes": "false",
        "listener": "1883 0.0.0.0",
    }
    assert [v for k, v in conf_pairs(files[CONF_NAME]) if k == "log_type"] == [
        "error", "warning", "notice", "information"]  # never debug: a line per publish
    # every setting has a comment saying why, right above it (or above its block)
    lines = files[CONF_NAME].splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#") and not line.startswith("listener"):
            block = lines[:i]
            while block and block[-1] and not block[-1].startswith("#"):
                block.pop()
            assert block and block[-1].startswith("#"), f"no comment above {line!r}"
    lines = files[PASSWD_NAME].splitlines()
    assert lines[:2] == [f"dev-a:{HASH}", f"dev-b:{HASH}"]
    user, hashed = lines[2].split(":", 1)
    assert user == "server" and len(lines) == 3
    assert verify_mosquitto_hash("s3cret-pw", hashed)
    assert "s3cret-pw" not in "".join(files.values())
    assert files[ACL_NAME] == ACL_TEMPLATE.format(server="server")


def test_render_acl_is_the_design_acl(tmp_path):
    acl = render(BrokerSetup(out=tmp_path, server_user="server-eu", server_password="p"),
                 [])[ACL_NAME]
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "pattern write edgefleet/v1/%u/summary",
        "pattern write edgefleet/v1/%u/report",
        "pattern write edgefleet/v1/%u/heartbeat",
        "pattern write edgefleet/v1/%u/status",
        "pattern write edgefleet/v1/%u/receipt",
        "pattern read edgefleet/v1/%u/desired",
        "pattern read edgefleet/v1/%u/ack",
        "pattern read edgefleet/v1/%u/outcomes",
        "user server-eu",
        "topic read edgefleet/v1/+/#",
        "topic write edgefleet/v1/+/desired",
        "topic write edgefleet/v1/+/ack",
        "topic write edgefleet/v1/+/outcomes",
    ]
    assert "%c" not in acl.replace("`%c`", "")  # keyed on the username only


def test_render_demo_shape_no_persistence(tmp_path):
    conf = conf_dict(render(BrokerSetup(out=tmp_path, port=12345, bind="127.0.0.1",
                                        server_user="server", server_password="x",
                                        persistence=False, run_as_root=False), [])[CONF_NAME])
    assert conf["persistence"] == "false" and "persistence_location" not in conf
    assert conf["listener"] == "12345 127.0.0.1"
    assert "user" not in conf


@pytest.mark.parametrize(("as_root", "want"), [(True, "root"), (False, None)],
                         ids=["root", "not-root"])
def test_render_user_root_only_as_root(tmp_path, as_root, want):
    conf = conf_dict(render(BrokerSetup(out=tmp_path, server_password="x",
                                        run_as_root=as_root), [])[CONF_NAME])
    assert conf.get("user") == want


def test_render_user_root_follows_this_process_by_default(tmp_path):
    conf = conf_dict(render(BrokerSetup(out=tmp_path, server_password="x"), [])[CONF_NAME])
    assert (conf.get("user") == "root") == (os.geteuid() == 0)


def test_render_tls_listener(tmp_path):
    setup = BrokerSetup(out=tmp_path, server_password="x", bind="10.0.0.1",
                        cafile=tmp_path / "ca.pem", certfile=tmp_path / "cert.pem",
                        keyfile=tmp_path / "key.pem", require_certificate=True, tls_port=9883)
    pairs = conf_pairs(render(setup, [])[CONF_NAME])
    listeners = [i for i, (k, _) in enumerate(pairs) if k == "listener"]
    assert [pairs[i][1] for i in listeners] == ["1883 10.0.0.1", "9883 10.0.0.1"]
    # listener options bind to the listener before them: the TLS lines come after it
    # identity binding is a listener option: on both listeners
    assert pairs[listeners[0] + 1] == ("use_username_as_clientid", "true")
    assert pairs[listeners[1] + 1:] == [
        ("use_username_as_clientid", "true"),
        ("cafile", str(tmp_path.resolve() / "ca.pem")),
        ("certfile", str(tmp_path.resolve() / "cert.pem")),
        ("keyfile", str(tmp_path.resolve() / "key.pem")),
        ("require_certificate", "true"),
    ]


def test_render_tls_default_port_and_no_client_certs(tmp_path):
    setup = BrokerSetup(out=tmp_path, server_password="x", certfile=tmp_path / "c.pem",
                        keyfile=tmp_path / "k.pem")
    pairs = conf_pairs(render(setup, [])[CONF_NAME])
    assert ("listener", "8883 0.0.0.0") in pairs
    assert ("require_certificate", "false") in pairs
    assert "cafile" not in dict(pairs)


BAD_SETUPS = [
    ("cert-without-key", {"certfile": Path("c.pem")}),
    ("key-without-cert", {"keyfile": Path("k.pem")}),
    ("tls-port-without-tls", {"tls_port": 8883}),
    ("client-certs-without-tls", {"require_certificate": True}),
    ("client-certs-without-ca", {"certfile": Path("c"), "keyfile": Path("k"),
                                 "require_certificate": True}),
    ("tls-port-is-plain-port", {"certfile": Path("c"), "keyfile": Path("k"),
                                "tls_port": 1883}),
    ("port-zero", {"port": 0}),
    ("port-too-big", {"port": 65536}),
    ("tls-port-too-big", {"certfile": Path("c"), "keyfile": Path("k"), "tls_port": 70000}),
    ("server-user-with-colon", {"server_user": "a:b"}),
    ("server-user-with-space", {"server_user": "a b"}),
    ("server-user-wildcard", {"server_user": "+"}),
    ("bind-with-space", {"bind": "0.0.0.0 1884"}),
    ("password-newline", {"server_password": "a\nb"}),
    ("password-empty", {"server_password": ""}),
    ("path-newline", {"certfile": Path("c\nlistener 1"), "keyfile": Path("k")}),
    ("inflight-negative", {"max_inflight_messages": -1}),
    ("server-user-outside-service-names", {"server_user": "srv"}),
    ("ingest-workers-negative", {"ingest_workers": -1}),
    ("ingest-workers-too-many", {"ingest_workers": 65}),
]


@pytest.mark.parametrize(("case", "kwargs"), BAD_SETUPS, ids=[c for c, _ in BAD_SETUPS])
def test_bad_setups_are_refused(tmp_path, case, kwargs):
    with pytest.raises(InvalidRequestError):
        BrokerSetup(out=tmp_path, **kwargs)


BAD_USERS = [
    ("device-named-as-server", [("server", HASH)]),
    ("device-named-as-ingest-worker", [("server-ingest-1", HASH)]),
    ("device-named-as-server-other-case", [("Server", HASH)]),
    ("device-twice", [("dev-a", HASH), ("dev-a", HASH)]),
    ("device-id-with-colon", [("dev:a", HASH)]),
    ("device-id-with-newline", [("dev-a\nserver", HASH)]),
    ("device-id-wildcard", [("#", HASH)]),
    ("plaintext-not-hash", [("dev-a", "hunter2")]),
    ("hash-with-newline", [("dev-a", HASH + "\nx:" + HASH)]),
]


@pytest.mark.parametrize(("case", "users"), BAD_USERS, ids=[c for c, _ in BAD_USERS])
def test_bad_users_are_refused(tmp_path, case, users):
    with pytest.raises(InvalidRequestError):
        render(BrokerSetup(out=tmp_path, server_password="x"), users)


def test_render_ingest_worker_accounts(tmp_path):
    files = render(BrokerSetup(out=tmp_path, server_password="x", ingest_workers=2,
                               ingest_passwords=("p1", "p2")), [("dev-a", HASH)])
    users = dict(line.split(":", 1) for line in files[PASSWD_NAME].splitlines())
    assert sorted(users) == ["dev-a", "server", "server-ingest-1", "server-ingest-2"]
    assert verify_mosquitto_hash("p2", users["server-ingest-2"])
    acl = files[ACL_NAME]
    assert acl.startswith(ACL_TEMPLATE.format(server="server"))
    block = acl.split("user server-ingest-1\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == [f"topic read edgefleet/v1/+/{k}"
                     for k in ("summary", "report", "heartbeat", "status", "receipt")] + [
        "topic write edgefleet/v1/+/ack"]  # it acknowledges what it stored, nothing else
    with pytest.raises(InvalidRequestError, match="passwords"):
        render(BrokerSetup(out=tmp_path, server_password="x", ingest_workers=2), [])


def test_render_needs_a_server_password(tmp_path):
    with pytest.raises(InvalidRequestError, match="password"):
        render(BrokerSetup(out=tmp_path), [])


def test_setup_repr_hides_the_password(tmp_path):
    assert "s3cret" not in repr(BrokerSetup(out=tmp_path, server_password="s3cret"))


DEVICE_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(ids=st.sets(DEVICE_IDS, max_size=30), port=st.integers(1, 65535),
       persistence=st.booleans(), as_root=st.booleans())
def test_render_property(tmp_path, ids, port, persistence, as_root):
    ids = sorted(i for i in ids if not is_service_name(i))
    files = render(BrokerSetup(out=tmp_path, port=port, server_password="pw",
                               persistence=persistence, run_as_root=as_root),
                   [(i, HASH) for i in ids])
    names = [line.split(":", 1)[0] for line in files[PASSWD_NAME].splitlines()]
    assert sorted(names) == sorted([*ids, "server"])  # each once, nothing else
    conf = conf_dict(files[CONF_NAME])
    assert conf["listener"] == f"{port} 0.0.0.0"
    assert conf["persistence"] == ("true" if persistence else "false")
    assert conf["allow_anonymous"] == "false" and conf["max_queued_messages"] == "0"


# --------------------------------------------------------------------------- writer


def test_write_modes_and_atomicity(tmp_path):
    out = tmp_path / "new" / "broker"
    with Store(tmp_path / "fleet.db") as store:
        _, issued = Registry(store).add_device("dev-a", {}, "test", time.time())
        written = write_broker_config(BrokerSetup(out=out, port=1884, bind="127.0.0.1",
                                                  server_user="server", server_password="pw1",
                                                  persistence=False), store)
    assert set(written) == {CONF_NAME, PASSWD_NAME, ACL_NAME}  # a given password: no file
    modes = {name: stat.S_IMODE(p.stat().st_mode) for name, p in written.items()}
    assert modes == {CONF_NAME: 0o644, PASSWD_NAME: 0o600, ACL_NAME: 0o644}
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temp files left
    passwd = written[PASSWD_NAME].read_text()
    assert issued.secret not in passwd and "pw1" not in passwd
    device_hash = dict(line.split(":", 1) for line in passwd.splitlines())["dev-a"]
    assert verify_mosquitto_hash(issued.secret, device_hash)


def test_write_makes_a_server_password_once_and_keeps_it(tmp_path, caplog):
    caplog.set_level("DEBUG")
    with Store(tmp_path / "fleet.db") as store:
        first = write_broker_config(BrokerSetup(out=tmp_path / "b"), store)
        password = first[SERVER_PASSWORD_NAME].read_text().strip()
        assert len(password) >= 40
        assert stat.S_IMODE(first[SERVER_PASSWORD_NAME].stat().st_mode) == 0o600
        Registry(store).add_device("dev-a", {}, "test", time.time())
        second = write_broker_config(BrokerSetup(out=tmp_path / "b"), store)
    assert second[SERVER_PASSWORD_NAME].read_text().strip() == password
    lines = dict(line.split(":", 1) for line in second[PASSWD_NAME].read_text().splitlines())
    assert sorted(lines) == ["dev-a", "server"]
    assert verify_mosquitto_hash(password, lines["server"])
    assert password not in caplog.text


# --------------------------------------------------------------------------- a real broker


@dataclass
class Client:
    """One paho MQTT 5 client, with its callbacks turned into waits on results."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    received: list[tuple[str, bytes, bool]] = field(default_factory=list)
    connack: object = None
    pubacks: dict[int, int] = field(default_factory=dict)
    subacks: dict[int, list[int]] = field(default_factory=dict)
    client_id: str = ""
    disconnects: int = 0

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        c = self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                 client_id=self.client_id or f"t-{self.user}-{time.monotonic_ns()}",
                                 protocol=MQTTProtocolVersion.MQTTv5)
        c.username_pw_set(self.user, self.password)
        c.on_disconnect = self._on_disconnect
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message

    def _notify(self, fn) -> None:
        with self._cond:
            fn()
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason, props) -> None:
        self._notify(lambda: setattr(self, "disconnects", self.disconnects + 1))

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        self._notify(lambda: setattr(self, "connack", reason))

    def _on_publish(self, client, userdata, mid, reason, props) -> None:
        self._notify(lambda: self.pubacks.__setitem__(mid, reason.value))

    def _on_subscribe(self, client, userdata, mid, reasons, props) -> None:
        self._notify(lambda: self.subacks.__setitem__(mid, [r.value for r in reasons]))

    def _on_message(self, client, userdata, msg) -> None:
        self._notify(lambda: self.received.append((msg.topic, msg.payload, msg.retain)))

    def wait(self, predicate, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def connect(self, **kwargs) -> int:
        self.c.connect(self.host, self.port, keepalive=30, **kwargs)
        self.c.loop_start()
        assert self.wait(lambda: self.connack is not None), f"{self.user}: no CONNACK"
        return self.connack.value  # type: ignore[attr-defined]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """The PUBACK reason code of a QoS 1 publish."""
        mid = self.c.publish(topic, payload, qos=1, retain=retain).mid
        assert self.wait(lambda: mid in self.pubacks), f"{self.user}: no PUBACK for {topic}"
        return self.pubacks[mid]

    def subscribe(self, topic: str) -> list[int]:
        _, mid = self.c.subscribe(topic, qos=1)
        assert self.wait(lambda: mid in self.subacks), f"{self.user}: no SUBACK for {topic}"
        return self.subacks[mid]

    def got(self, topic: str) -> list[bytes]:
        with self._cond:
            return [p for t, p, _ in self.received if t == topic]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@dataclass
class RealBroker:
    host: str
    port: int
    server_user: str
    server_password: str = field(repr=False)
    secrets: dict[str, str] = field(repr=False)
    files: dict[str, Path]
    proc: subprocess.Popen[bytes]
    clients: list[Client] = field(default_factory=list)

    def client(self, user: str, password: str | None = None, client_id: str = "") -> Client:
        if password is None:
            password = self.server_password if user == self.server_user else self.secrets[user]
        # one connection per account (use_username_as_clientid): an earlier client of
        # this account would reconnect on its own and take the connection back, forever
        for old in self.clients:
            if old.user == user:
                old.close()
        self.clients = [old for old in self.clients if old.user != user]
        c = Client(self.host, self.port, user, password, client_id=client_id)
        self.clients.append(c)
        return c

    def connected(self, user: str, client_id: str = "", **kwargs) -> Client:
        c = self.client(user, client_id=client_id)
        assert c.connect(**kwargs) == 0, f"{user} refused"
        return c


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_mosquitto(conf: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    if find_mosquitto() is None:
        pytest.skip(INSTALL_HINT)
    return start_broker(conf, port, log,
                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)


@pytest.fixture(scope="module")
def real_broker(tmp_path_factory) -> Iterator[RealBroker]:
    """Mosquitto started from what write_broker_config wrote, persistence on, the server
    password made by the writer (as ``fleet broker-config`` without a password file)."""
    work = tmp_path_factory.mktemp("brokerconf")
    port = free_port()
    with Store(work / "fleet.db") as store:
        reg = Registry(store)
        secrets = {d: reg.add_device(d, {}, "test", time.time())[1].secret
                   for d in ("dev-a", "dev-b")}
        files = write_broker_config(BrokerSetup(out=work / "broker", port=port,
                                                bind="127.0.0.1"), store)
    password = files[SERVER_PASSWORD_NAME].read_text().strip()
    proc = start_mosquitto(files[CONF_NAME], port, work / "mosquitto.log")
    broker = RealBroker("127.0.0.1", port, "server", password, secrets, files, proc)
    yield broker
    for c in broker.clients:
        c.close()
    stop_broker(proc)


@pytest.mark.slow
def test_device_publishes_its_summary_and_the_server_receives_it(real_broker):
    server = real_broker.connected("server")
    assert server.subscribe("edgefleet/v1/+/summary") == [1]
    dev = real_broker.connected("dev-a")
    assert dev.publish("edgefleet/v1/dev-a/summary", b"s1") in ACCEPTED
    assert server.wait(lambda: server.got("edgefleet/v1/dev-a/summary") == [b"s1"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["summary", "report", "heartbeat", "status", "receipt"])
def test_device_cannot_publish_as_another_device(real_broker, kind):
    server = real_broker.connected("server")
    server.subscribe(f"edgefleet/v1/+/{kind}")
    forger = real_broker.connected("dev-a")
    assert forger.publish(f"edgefleet/v1/dev-b/{kind}", b"forged") == NOT_AUTHORIZED
    honest = real_broker.connected("dev-a")
    assert honest.publish(f"edgefleet/v1/dev-a/{kind}", b"mine") in ACCEPTED  # the control
    assert server.wait(lambda: server.got(f"edgefleet/v1/dev-a/{kind}") == [b"mine"])
    assert server.got(f"edgefleet/v1/dev-b/{kind}") == []


@pytest.mark.slow
def test_device_cannot_read_another_devices_desired_state(real_broker):
    server = real_broker.connected("server")
    assert server.publish("edgefleet/v1/dev-b/desired", b"for-b", retain=True) in ACCEPTED
    spy = real_broker.connected("dev-a")
    granted = spy.subscribe("edgefleet/v1/dev-b/desired") + spy.subscribe("edgefleet/v1/+/desired")
    owner = real_broker.connected("dev-b")
    owner.subscribe("edgefleet/v1/dev-b/desired")
    assert owner.wait(lambda: owner.got("edgefleet/v1/dev-b/desired") == [b"for-b"])
    # either refused at SUBACK (>= 0x80) or granted and then filtered: never delivered
    assert all(code in (0, 1, NOT_AUTHORIZED) for code in granted)
    spy.subscribe("edgefleet/v1/dev-a/desired")  # a round trip after the retained sends
    time.sleep(0.3)
    assert spy.got("edgefleet/v1/dev-b/desired") == []


@pytest.mark.slow
def test_only_the_device_reads_its_outcomes(real_broker):
    """The server writes a device's outcomes; that device reads them, another never does
    (by name or by wildcard), and no device can write outcomes, its own or another's."""
    spy = real_broker.connected("dev-a")
    granted = spy.subscribe("edgefleet/v1/dev-b/outcomes") + spy.subscribe(
        "edgefleet/v1/+/outcomes")
    assert all(code in (0, 1, NOT_AUTHORIZED) for code in granted)
    owner = real_broker.connected("dev-b")
    assert owner.subscribe("edgefleet/v1/dev-b/outcomes") == [1]
    server = real_broker.connected("server")
    assert server.publish("edgefleet/v1/dev-b/outcomes", b"labels-for-b") in ACCEPTED
    assert owner.wait(lambda: owner.got("edgefleet/v1/dev-b/outcomes") == [b"labels-for-b"])
    assert server.publish("edgefleet/v1/dev-a/outcomes", b"labels-for-a") in ACCEPTED
    # dev-a's own batch is a round trip after dev-b's: had dev-b's reached it, it would be in
    assert spy.wait(lambda: spy.got("edgefleet/v1/dev-a/outcomes") == [b"labels-for-a"])
    assert spy.got("edgefleet/v1/dev-b/outcomes") == []
    assert spy.publish("edgefleet/v1/dev-b/outcomes", b"forged") == NOT_AUTHORIZED
    owner2 = real_broker.connected("dev-b")
    owner2.subscribe("edgefleet/v1/dev-b/outcomes")
    assert owner2.publish("edgefleet/v1/dev-b/outcomes", b"self-made") == NOT_AUTHORIZED


@pytest.mark.slow
def test_the_server_reads_receipts(real_broker):
    server = real_broker.connected("server")
    assert server.subscribe("edgefleet/v1/+/receipt") == [1]
    dev = real_broker.connected("dev-a")
    assert dev.publish("edgefleet/v1/dev-a/receipt", b"r1") in ACCEPTED
    assert server.wait(lambda: server.got("edgefleet/v1/dev-a/receipt") == [b"r1"])


@pytest.mark.slow
@pytest.mark.parametrize("target", ["dev-a", "dev-b"], ids=["own", "other"])
def test_device_cannot_publish_desired_state(real_broker, target):
    desired = f"edgefleet/v1/{target}/desired"
    # one connection per account (use_username_as_clientid): the forger goes first, and
    # its refused publish closes its connection before the reader of dev-a connects
    forger = real_broker.connected("dev-a")
    assert forger.publish(desired, b"forged", retain=True) == NOT_AUTHORIZED
    reader = real_broker.connected(target)
    reader.subscribe(desired)
    server = real_broker.connected("server")
    assert server.publish(desired, b"real", retain=True) in ACCEPTED  # the control
    assert reader.wait(lambda: b"real" in reader.got(desired))
    assert b"forged" not in reader.got(desired)  # (an earlier test's retained one may lead)
    # and the retained message a device gets on connect is the server's, not the forgery
    reader.close()
    late = real_broker.connected(target)
    late.subscribe(desired)
    assert late.wait(lambda: late.got(desired) == [b"real"])


@pytest.mark.slow
@pytest.mark.parametrize(("user", "password"), [
    ("dev-a", "efd_wrong"), ("server", "wrong"), ("nobody", "x"), ("dev-a", ""),
], ids=["device-wrong", "server-wrong", "unknown-user", "empty"])
def test_wrong_credentials_are_refused(real_broker, user, password):
    c = real_broker.client(user, password)
    assert c.connect() in (0x86, 0x87)  # bad user name or password / not authorized


@pytest.mark.slow
def test_anonymous_is_refused(real_broker):
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                    protocol=MQTTProtocolVersion.MQTTv5)
    codes: list[int] = []
    c.on_connect = lambda cl, u, f, reason, p: codes.append(reason.value)
    c.connect(real_broker.host, real_broker.port)
    c.loop_start()
    try:
        deadline = time.monotonic() + 5
        while not codes and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        c.disconnect()
        c.loop_stop()
    assert codes and codes[0] in (0x86, 0x87)


@pytest.mark.slow
def test_server_publishes_desired_and_reads_every_kind(real_broker):
    server = real_broker.connected("server")
    server.subscribe("edgefleet/v1/+/+")
    dev = real_broker.connected("dev-b")
    dev.subscribe("edgefleet/v1/dev-b/desired")
    assert server.publish("edgefleet/v1/dev-b/desired", b"want-1.0", retain=True) in ACCEPTED
    assert dev.wait(lambda: b"want-1.0" in dev.got("edgefleet/v1/dev-b/desired"))
    for kind in ("summary", "report", "heartbeat", "status"):
        assert dev.publish(f"edgefleet/v1/dev-b/{kind}", kind.encode()) in ACCEPTED
    assert server.wait(lambda: all(server.got(f"edgefleet/v1/dev-b/{k}") for k in
                                   ("summary", "report", "heartbeat", "status")))
    # the server may not publish as a device: telemetry comes from devices only
    assert server.publish("edgefleet/v1/dev-b/summary", b"x") == NOT_AUTHORIZED


# --------------------------------------------------------------------------- identity and size


def _session_props(expiry: int):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    return props


@pytest.mark.slow
@pytest.mark.parametrize("taken", ["dev-b-agent", "dev-b", "fleet-serve", "server"],
                         ids=["device-agent-id", "device-username", "server-id",
                              "server-username"])
def test_a_client_id_takeover_kicks_nobody_off(real_broker, taken):
    """Device A connecting with B's or the server's client id (with its own, valid
    credentials) leaves B and the server connected: the broker renames A to `dev-a`."""
    server = real_broker.connected("server", client_id="fleet-serve")
    server.subscribe("edgefleet/v1/+/status")
    server.subscribe("edgefleet/v1/+/summary")
    victim = real_broker.client("dev-b", client_id="dev-b-agent")
    victim.c.will_set("edgefleet/v1/dev-b/status", b"offline", qos=1, retain=True)
    assert victim.connect() == 0
    assert victim.publish("edgefleet/v1/dev-b/status", b"online", retain=True) in ACCEPTED
    assert server.wait(lambda: server.got("edgefleet/v1/dev-b/status")[-1:] == [b"online"])
    for _ in range(3):  # looping used to keep B flapping
        attacker = real_broker.connected("dev-a", client_id=taken)
        attacker.close()
    # still connected, both: each publishes, and the other end receives it
    assert victim.publish("edgefleet/v1/dev-b/summary", b"after") in ACCEPTED
    assert server.wait(lambda: server.got("edgefleet/v1/dev-b/summary")[-1:] == [b"after"])
    assert victim.disconnects == 0 and server.disconnects == 0
    assert b"offline" not in server.got("edgefleet/v1/dev-b/status")  # no last will
    victim.close()  # a clean disconnect: no will, and the next case's B starts afresh
    late = real_broker.connected("server", client_id="t-late-reader")  # kicks `server`:
    late.subscribe("edgefleet/v1/dev-b/status")  # one connection per account, its own
    assert late.wait(lambda: late.got("edgefleet/v1/dev-b/status") == [b"online"])


@pytest.mark.slow
def test_a_device_cannot_drain_the_servers_kept_session(real_broker):
    """The server's kept session queues while it is away; a device connecting under the
    server's client id (no clean start) gets none of it, and the server gets it all."""
    server = real_broker.connected("server", client_id="fleet-serve", clean_start=False,
                                   properties=_session_props(600))
    assert server.subscribe("edgefleet/v1/+/report") == [1]
    server.close()
    dev = real_broker.connected("dev-b")
    for i in range(3):
        assert dev.publish("edgefleet/v1/dev-b/report", b"q%d" % i) in ACCEPTED
    for taken in ("fleet-serve", "server"):
        thief = real_broker.connected("dev-a", client_id=taken, clean_start=False,
                                      properties=_session_props(600))
        thief.subscribe("edgefleet/v1/dev-a/desired")  # a round trip: queued ones came first
        assert thief.got("edgefleet/v1/dev-b/report") == []
        thief.close()
    back = real_broker.connected("server", client_id="fleet-serve", clean_start=False,
                                 properties=_session_props(600))
    assert back.wait(lambda: back.got("edgefleet/v1/dev-b/report") == [b"q0", b"q1", b"q2"])


@pytest.mark.slow
def test_an_oversized_publish_is_refused_and_not_forwarded(real_broker):
    server = real_broker.connected("server")
    server.subscribe("edgefleet/v1/+/summary")
    dev = real_broker.connected("dev-a")
    # Mosquitto 2.0.11 refuses it (PUBACK with an error reason under MQTT 5) and closes
    # the connection, as after any refused publish; either way it is not forwarded
    mid = dev.c.publish("edgefleet/v1/dev-a/summary", b"x" * (MAX_PAYLOAD + 1), qos=1).mid
    assert dev.wait(lambda: dev.pubacks.get(mid, 0) >= 0x80 or dev.disconnects > 0)
    assert dev.pubacks.get(mid, 0x80) >= 0x80  # never accepted
    control = real_broker.connected("dev-a")  # the limit itself passes: the control
    assert control.publish("edgefleet/v1/dev-a/summary", b"y" * MAX_PAYLOAD) in ACCEPTED
    assert server.wait(lambda: len(server.got("edgefleet/v1/dev-a/summary")) == 1)
    assert server.got("edgefleet/v1/dev-a/summary") == [b"y" * MAX_PAYLOAD]


def _raw_mqtt_string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _raw_packet(first: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


@pytest.mark.slow
def test_an_8_mib_packet_disconnects_its_sender_unread(real_broker):
    """A client that ignores the announced maximum packet size (a raw MQTT 3.1.1 client:
    paho would refuse to send it) is cut off; nothing reaches the server."""
    import socket

    server = real_broker.connected("server")
    server.subscribe("edgefleet/v1/+/summary")
    with socket.create_connection((real_broker.host, real_broker.port), timeout=10) as sock:
        body = (_raw_mqtt_string("MQTT") + bytes([4, 0xC2, 0, 60]) + _raw_mqtt_string("raw-a")
                + _raw_mqtt_string("dev-a") + _raw_mqtt_string(real_broker.secrets["dev-a"]))
        sock.sendall(_raw_packet(0x10, body))
        assert sock.recv(4) == bytes([0x20, 2, 0, 0])  # CONNACK, accepted
        publish = _raw_packet(0x32, _raw_mqtt_string("edgefleet/v1/dev-a/summary") + b"\0\1"
                              + b"z" * (8 * 1024 * 1024))
        try:
            sock.sendall(publish)
            answer = sock.recv(16)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
        assert answer == b""  # closed: no PUBACK
    control = real_broker.connected("dev-a")
    assert control.publish("edgefleet/v1/dev-a/summary", b"small") in ACCEPTED
    assert server.wait(lambda: server.got("edgefleet/v1/dev-a/summary") == [b"small"])


@pytest.mark.slow
def test_ingest_worker_accounts_read_and_never_write(tmp_path):
    port = free_port()
    with Store(tmp_path / "fleet.db") as store:
        secret = Registry(store).add_device("dev-a", {}, "t", time.time())[1].secret
        files = write_broker_config(BrokerSetup(out=tmp_path / "broker", port=port,
                                                bind="127.0.0.1", persistence=False,
                                                ingest_workers=2), store)
    passwords = {u: files[f"{u}-password"].read_text().strip()
                 for u in ("server-ingest-1", "server-ingest-2")}
    assert len(set(passwords.values())) == 2
    proc = start_mosquitto(files[CONF_NAME], port, tmp_path / "mosquitto.log")
    clients = []
    try:
        workers = [Client("127.0.0.1", port, u, p) for u, p in passwords.items()]
        clients += workers
        for w in workers:
            assert w.connect() == 0
            w.subscribe("$share/ingest/edgefleet/v1/+/summary")
        dev = Client("127.0.0.1", port, "dev-a", secret)
        clients.append(dev)
        assert dev.connect() == 0
        for i in range(6):
            assert dev.publish("edgefleet/v1/dev-a/summary", b"s%d" % i) in ACCEPTED
        assert workers[0].wait(lambda: sum(len(w.got("edgefleet/v1/dev-a/summary"))
                                           for w in workers) == 6)
        assert all(w.disconnects == 0 for w in workers)  # both connected side by side
        assert workers[0].publish("edgefleet/v1/dev-a/desired", b"x") == NOT_AUTHORIZED
        # outcomes are the engine's to publish (the server account), never a worker's
        assert workers[1].publish("edgefleet/v1/dev-a/outcomes", b"x") == NOT_AUTHORIZED
    finally:
        for c in clients:
            c.close()
        stop_broker(proc)


# --------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_writes_the_files_without_printing_secrets(tmp_path):
    db = tmp_path / "fleet.db"
    with Store(db) as store:
        device_secret = Registry(store).add_device("dev-a", {}, "t", time.time())[1].secret
    pw_file = tmp_path / "server.pw"
    pw_file.write_text("cli-server-pw-9Zq\n")
    out = tmp_path / "broker"
    runner = CliRunner()
    result = runner.invoke(main, ["broker-config", "--db", str(db), "--out", str(out),
                                  "--port", "18830", "--bind", "127.0.0.1",
                                  "--server-user", "server", "--server-password-file",
                                  str(pw_file), "--no-persistence"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((out / "passwd").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "mosquitto.conf").stat().st_mode) == 0o644
    assert not (out / SERVER_PASSWORD_NAME).exists()
    conf = conf_dict((out / "mosquitto.conf").read_text())
    assert conf["listener"] == "18830 127.0.0.1" and conf["persistence"] == "false"
    text = result.output
    assert f"mosquitto -c {(out / 'mosquitto.conf').resolve()}" in text
    assert "--broker 127.0.0.1:18830 --broker-user server" in text
    assert "1 device account(s)" in text
    files = "".join(p.read_text() for p in out.iterdir())
    for secret in (device_secret, "cli-server-pw-9Zq"):
        assert secret not in text and secret not in files


@pytest.mark.slow
def test_cli_made_password_is_not_printed(tmp_path):
    db = tmp_path / "fleet.db"
    Store(db).close()
    result = CliRunner().invoke(main, ["broker-config", "--db", str(db), "--out",
                                       str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    password = (tmp_path / "b" / SERVER_PASSWORD_NAME).read_text().strip()
    assert password and password not in result.output
    assert '"server-password"' in result.output


@pytest.mark.slow
def test_cli_ingest_worker_accounts(tmp_path):
    db = tmp_path / "fleet.db"
    Store(db).close()
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["broker-config", "--db", str(db), "--out", str(out),
                                       "--ingest-workers", "2"])
    assert result.exit_code == 0, result.output
    assert "0 device account(s) and the server account 'server', 2 ingest worker" \
        in result.output
    for n in (1, 2):
        path = out / f"server-ingest-{n}-password"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() not in result.output
        assert (f"fleet ingest --db {db} --broker 127.0.0.1:1883 --broker-user "
                f"server-ingest-{n} --broker-password-file {path}") in result.output
    users = [line.split(":", 1)[0] for line in (out / "passwd").read_text().splitlines()]
    assert users == ["server", "server-ingest-1", "server-ingest-2"]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["--tls-port", "8883"], "need certfile"),
    (["--port", "0"], "port must be"),
    (["--server-user", "a:b"], "server_user"),
    (["--server-user", "srv"], "must be 'server' or start with 'server-'"),
], ids=["tls-port-alone", "bad-port", "bad-user", "user-outside-service-names"])
def test_cli_refusals_are_one_line(tmp_path, args, message):
    db = tmp_path / "fleet.db"
    Store(db).close()
    result = CliRunner().invoke(main, ["broker-config", "--db", str(db), "--out",
                                       str(tmp_path / "b"), *args])
    assert result.exit_code == 1
    assert result.output.startswith("fleet: error: ") and message in result.output
    assert result.output.count("\n") == 1


def test_cli_needs_an_existing_database(tmp_path):
    result = CliRunner().invoke(main, ["broker-config", "--db", str(tmp_path / "none.db"),
                                       "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "no database" in result.output
    assert not (tmp_path / "none.db").exists()


# --------------------------------------------------------------------------- TLS


def _self_signed(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test ca")).issuer_name(name("test ca"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.mark.slow
def test_a_real_broker_serves_the_tls_listener(tmp_path):
    ca, cert, key = _self_signed(tmp_path)
    port, tls_port = free_port(), free_port()
    with Store(tmp_path / "fleet.db") as store:
        secret = Registry(store).add_device("dev-a", {}, "t", time.time())[1].secret
        files = write_broker_config(BrokerSetup(
            out=tmp_path / "broker", port=port, bind="127.0.0.1", server_password="pw",
            persistence=False, certfile=cert, keyfile=key, tls_port=tls_port), store)
    proc = start_mosquitto(files[CONF_NAME], port, tmp_path / "mosquitto.log")
    try:
        c = Client("127.0.0.1", tls_port, "dev-a", secret)
        c.c.tls_set(ca_certs=str(ca))
        assert c.connect() == 0  # a verified TLS session, then the password
        assert c.publish("edgefleet/v1/dev-b/summary", b"x") == NOT_AUTHORIZED  # same ACL
        c.close()
        wrong = Client("127.0.0.1", tls_port, "dev-a", "efd_wrong")
        wrong.c.tls_set(ca_certs=str(ca))
        assert wrong.connect() in (0x86, 0x87)
        wrong.close()
    finally:
        stop_broker(proc)
