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

from fleet_server.cli import main
from fleet_server.errors import InvalidRequestError
from fleet_server.registry.auth import mosquitto_hash, verify_mosquitto_hash
from fleet_server.registry.devices import Registry
from fleet_server.store import Store
from fleet_server.telemetry.broker import (
    ACL_NAME,
    ACL_TEMPLATE,
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

NOT_AUTHORIZED = 0x87
ACCEPTED = (0x00, 0x10)  # success, or success with no matching subscribers
HASH = mosquitto_hash("pw", salt=b"\0" * 12)
KEY_VALUE = re.compile(r"^[a-z_]+ \S.*\Z")


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
    keys = [k for k, _ in pairs if k not in ("listener",)]
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
        "max_queued_messages": "0",
        "max_inflight_messages": "20",
        "persistence": "true",
        "persistence_location": f"{tmp_path.resolve() / 'data'}/",
        "autosave_interval": "60",
        "listener": "1883 0.0.0.0",
    }
    lines = files[PASSWD_NAME].splitlines()
    assert lines[:2] == [f"dev-a:{HASH}", f"dev-b:{HASH}"]
    user, hashed = lines[2].split(":", 1)
    assert user == "server" and len(lines) == 3
    assert verify_mosquitto_hash("s3cret-pw", hashed)
    assert "s3cret-pw" not in "".join(files.values())
    assert files[ACL_NAME] == ACL_TEMPLATE.format(server="server")


def test_render_acl_is_the_design_acl(tmp_path):
    acl = render(BrokerSetup(out=tmp_path, server_user="srv", server_password="p"),
                 [])[ACL_NAME]
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert rules == [
        "pattern write edgefleet/v1/%u/summary",
        "pattern write edgefleet/v1/%u/report",
        "pattern write edgefleet/v1/%u/heartbeat",
        "pattern write edgefleet/v1/%u/status",
        "pattern read edgefleet/v1/%u/desired",
        "user srv",
        "topic read edgefleet/v1/+/#",
        "topic write edgefleet/v1/+/desired",
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
    assert pairs[listeners[1] + 1:] == [
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
]


@pytest.mark.parametrize(("case", "kwargs"), BAD_SETUPS, ids=[c for c, _ in BAD_SETUPS])
def test_bad_setups_are_refused(tmp_path, case, kwargs):
    with pytest.raises(InvalidRequestError):
        BrokerSetup(out=tmp_path, **kwargs)


BAD_USERS = [
    ("device-named-as-server", [("server", HASH)]),
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
    ids = sorted(i for i in ids if i != "server")
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

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        c = self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                 client_id=f"t-{self.user}-{time.monotonic_ns()}",
                                 protocol=MQTTProtocolVersion.MQTTv5)
        c.username_pw_set(self.user, self.password)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message

    def _notify(self, fn) -> None:
        with self._cond:
            fn()
            self._cond.notify_all()

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

    def connect(self) -> int:
        self.c.connect(self.host, self.port, keepalive=30)
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

    def client(self, user: str, password: str | None = None) -> Client:
        if password is None:
            password = self.server_password if user == self.server_user else self.secrets[user]
        c = Client(self.host, self.port, user, password)
        self.clients.append(c)
        return c

    def connected(self, user: str) -> Client:
        c = self.client(user)
        assert c.connect() == 0, f"{user} refused"
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
@pytest.mark.parametrize("kind", ["summary", "report", "heartbeat", "status"])
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
@pytest.mark.parametrize("target", ["dev-a", "dev-b"], ids=["own", "other"])
def test_device_cannot_publish_desired_state(real_broker, target):
    desired = f"edgefleet/v1/{target}/desired"
    reader = real_broker.connected(target)
    reader.subscribe(desired)
    forger = real_broker.connected("dev-a")
    assert forger.publish(desired, b"forged", retain=True) == NOT_AUTHORIZED
    server = real_broker.connected("server")
    assert server.publish(desired, b"real", retain=True) in ACCEPTED  # the control
    assert reader.wait(lambda: b"real" in reader.got(desired))
    assert b"forged" not in reader.got(desired)  # (an earlier test's retained one may lead)
    # and the retained message a device gets on connect is the server's, not the forgery
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
@pytest.mark.parametrize(("args", "message"), [
    (["--tls-port", "8883"], "need certfile"),
    (["--port", "0"], "port must be"),
    (["--server-user", "a:b"], "server_user"),
], ids=["tls-port-alone", "bad-port", "bad-user"])
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
