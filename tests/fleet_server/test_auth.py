"""Credentials: operator tokens, device secrets, and Mosquitto's own password hash."""

from __future__ import annotations

import subprocess
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleet_server.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    PermissionDeniedError,
)
from fleet_server.registry.auth import (
    Auth,
    Principal,
    mosquitto_hash,
    secret_hash,
    verify_mosquitto_hash,
)
from fleet_server.registry.devices import Registry
from fleet_server.store import Store
from tests.broker import Mosquitto, find_mosquitto


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "fleet.db")
    yield s
    s.close()


def test_a_token_is_shown_once_and_stored_only_as_its_hash(store, tmp_path):
    issued = Auth(store).create_token("ci", "operator", "cli:root", 1.0)
    assert issued.secret.startswith("efo_") and len(issued.secret) >= 4 + 43
    raw = (tmp_path / "fleet.db").read_bytes() + (tmp_path / "fleet.db-wal").read_bytes()
    assert issued.secret.encode() not in raw
    assert secret_hash(issued.secret).encode() in raw
    who = Auth(store).authenticate(f"Bearer {issued.secret}", 2.0)
    assert who == Principal("operator", "ci", "operator")
    assert store.list_audit(target="token:ci")[0].action == "token.create"


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer efo_nope",
                                    "Bearer efd_nope", "Bearer " + "x" * 200, "efo_x"],
                         ids=["none", "empty", "basic", "no-token", "unknown-operator",
                              "unknown-device", "oversized", "no-scheme"])
def test_bad_credentials_are_refused(store, header):
    with pytest.raises(AuthenticationError):
        Auth(store).authenticate(header, 1.0)


def test_a_revoked_token_stops_working(store):
    auth = Auth(store)
    issued = auth.create_token("old", "viewer", "t", 1.0)
    auth.revoke_token("old", "t", 2.0)
    with pytest.raises(AuthenticationError, match="revoked"):
        auth.authenticate(f"Bearer {issued.secret}", 3.0)


@pytest.mark.parametrize(("name", "role"), [("bad name", "viewer"), ("ok", "admin"),
                                            ("", "viewer")], ids=["space", "role", "empty"])
def test_bad_token_requests_are_refused(store, name, role):
    with pytest.raises(InvalidRequestError):
        Auth(store).create_token(name, role, "t", 1.0)


def test_roles_include_the_ones_below():
    approver, viewer = Principal("operator", "a", "approver"), Principal("operator", "v", "viewer")
    assert approver.has_role("viewer") and approver.has_role("operator")
    assert not viewer.has_role("operator")
    Auth.require(approver, "approver")
    with pytest.raises(PermissionDeniedError, match="needs 'operator'"):
        Auth.require(viewer, "operator")
    with pytest.raises(PermissionDeniedError, match="only download"):
        Auth.require(Principal("device", "dev1"), "viewer")


def test_a_device_secret_authenticates_the_device_until_rotated(store):
    reg, auth = Registry(store), Auth(store)
    _, first = reg.add_device("dev1", {"site": "a"}, "t", 1.0)
    assert first.secret.startswith("efd_")
    assert auth.authenticate(f"Bearer {first.secret}", 2.0) == Principal("device", "dev1")
    with pytest.raises(ConflictError, match="rotate"):
        reg.add_device("dev1", {}, "t", 3.0)
    _, second = reg.add_device("dev1", {}, "t", 3.0, rotate=True)
    with pytest.raises(AuthenticationError):
        auth.authenticate(f"Bearer {first.secret}", 4.0)
    assert auth.authenticate(f"Bearer {second.secret}", 4.0).name == "dev1"


# -- Mosquitto's password hash ----------------------------------------------------------------


def test_our_verifier_accepts_what_mosquitto_passwd_writes(tmp_path):
    found = find_mosquitto()
    if found is None:
        pytest.skip("mosquitto_passwd is not installed")
    path = tmp_path / "passwd"
    subprocess.run([str(found[1]), "-c", "-b", str(path), "dev1", "s3cret-Pw"], check=True,
                   capture_output=True, timeout=30)
    user, _, stored = path.read_text().strip().partition(":")
    assert user == "dev1" and stored.startswith("$7$101$")
    assert verify_mosquitto_hash("s3cret-Pw", stored)
    assert not verify_mosquitto_hash("s3cret-pw", stored)


def test_same_salt_same_hash_as_mosquitto(tmp_path):
    """Byte for byte: take mosquitto_passwd's salt and recompute its hash."""
    found = find_mosquitto()
    if found is None:
        pytest.skip("mosquitto_passwd is not installed")
    import base64

    path = tmp_path / "passwd"
    subprocess.run([str(found[1]), "-c", "-b", str(path), "d", "pw"], check=True,
                   capture_output=True, timeout=30)
    stored = path.read_text().strip().partition(":")[2]
    salt = base64.b64decode(stored.split("$")[3])
    assert mosquitto_hash("pw", salt=salt) == stored


def _login(broker: Mosquitto, user: str, password: str) -> bool:
    result: dict[str, bool] = {}
    done = threading.Event()
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=user,
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set(user, password)

    def on_connect(c, userdata, flags, reason, props):
        result["ok"] = not reason.is_failure
        done.set()

    client.on_connect = on_connect
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return result["ok"]


@pytest.mark.slow
def test_a_real_broker_accepts_the_device_secret_against_the_stored_hash(store):
    reg = Registry(store)
    _, issued = reg.add_device("press-017", {}, "t", 1.0)
    broker = Mosquitto()
    for line in reg.mosquitto_password_file().splitlines():
        user, _, hashed = line.partition(":")
        broker.add_hashed_user(user, hashed)
    with broker:
        assert _login(broker, "press-017", issued.secret)
        assert not _login(broker, "press-017", issued.secret + "x")
    broker.cleanup()
