"""The agent's TOML config: defaults, resolution of paths, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ConfigError, load_config, parse_config


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret"
    path.write_text("efd_device-secret\n")
    path.chmod(0o600)
    return path


def base(secret: Path) -> dict:
    return {"device": {"id": "press-017", "labels": {"site": "a"}},
            "broker": {"host": "broker.local", "password_file": str(secret)},
            "trust": {"keys": ["build=keys/build.pub"]},
            "server": {"url": "https://fleet.local/"}}


def test_a_minimal_config_and_its_defaults(tmp_path, secret):
    config = parse_config(base(secret), base=tmp_path)
    assert config.device_id == "press-017" and config.username == "press-017"
    assert config.broker_port == 1883 and config.window_s == 60.0 and config.http_port == 8750
    assert config.trust_keys == (f"build={tmp_path / 'keys/build.pub'}",)
    assert config.server_url == "https://fleet.local"
    assert config.broker_password == "efd_device-secret"
    assert config.token == "efd_device-secret"  # the device secret doubles as the token
    assert "efd_device-secret" not in repr(config)


def test_load_from_a_file(tmp_path, secret):
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[device]
id = "d1"
[broker]
host = "127.0.0.1"
port = 1884
password_file = "{secret.name}"
[trust]
keys = ["build.pub"]
threshold = 1
[window]
seconds = 5
rows = 1000
[agent]
data_dir = "data"
http_port = 0
""")
    config = load_config(path)
    assert config.broker_port == 1884 and config.window_rows == 1000 and config.http_port == 0
    assert config.data_dir == (tmp_path / "data").resolve()


@pytest.mark.parametrize(("change", "key", "text"), [
    pytest.param({"device": {"id": "a/b"}}, "device.id", "letters", id="bad-device-id"),
    pytest.param({"device": {"id": "d", "colour": "red"}}, "device.colour", "unknown key",
                 id="unknown-key"),
    pytest.param({"extras": {"a": 1}}, "extras.a", "unknown section", id="unknown-section"),
    pytest.param({"broker": {"host": "h", "port": 70000}}, "broker.port", "between",
                 id="port-range"),
    pytest.param({"broker": {"host": "h", "port": "1883"}}, "broker.port", "integer",
                 id="port-type"),
    pytest.param({"window": {"seconds": 0}}, "window.seconds", "positive", id="zero-window"),
    pytest.param({"window": {"seconds": True}}, "window.seconds", "number", id="bool-window"),
    pytest.param({"trust": {"keys": []}}, "trust.keys", "at least one", id="no-trust"),
    pytest.param({"trust": {"keys": ["k"], "threshold": 2}}, "trust.threshold", "exceeds",
                 id="threshold-above-keys"),
    pytest.param({"server": {"url": "ftp://x"}}, "server.url", "http", id="bad-url"),
    pytest.param({"device": {"id": "d", "labels": {"Bad Key": "x"}}}, "device.labels",
                 "label", id="bad-label"),
    pytest.param({"broker": {"host": "h", "password_file": "/nonexistent/secret"}},
                 "broker.password_file", "cannot read", id="missing-secret"),
])
def test_bad_configs_name_the_key(tmp_path, secret, change, key, text):
    doc = base(secret)
    for section, body in change.items():
        doc[section] = {**doc.get(section, {}), **body} if section in doc else body
    with pytest.raises(ConfigError, match=text) as info:
        parse_config(doc, base=tmp_path, source="agent.toml")
    assert info.value.key == key
    assert "agent.toml" in str(info.value)


@pytest.mark.parametrize("missing", ["device", "broker", "trust"])
def test_required_sections(tmp_path, secret, missing):
    doc = base(secret)
    del doc[missing]
    with pytest.raises(ConfigError, match="required"):
        parse_config(doc, base=tmp_path)


def test_a_secret_others_can_read_is_refused(tmp_path, secret):
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        parse_config(base(secret), base=tmp_path)


def test_a_server_url_needs_a_token(tmp_path):
    doc = {"device": {"id": "d"}, "broker": {"host": "h"}, "trust": {"keys": ["k"]},
           "server": {"url": "http://s"}}
    with pytest.raises(ConfigError, match="token"):
        parse_config(doc, base=tmp_path)


@pytest.mark.parametrize("body", [b"[device\nid=", b"\xff\xfe", b"x" * 70_000],
                         ids=["not-toml", "not-utf8", "too-large"])
def test_unreadable_files(tmp_path, body):
    path = tmp_path / "agent.toml"
    path.write_bytes(body)
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)


def test_the_shipped_example_config_is_valid(tmp_path):
    example = Path(__file__).resolve().parents[2] / "deploy" / "agent.example.toml"
    copy = tmp_path / "agent.toml"
    copy.write_text(example.read_text())
    (tmp_path / "secret").write_text("efd_x\n")
    (tmp_path / "secret").chmod(0o600)
    config = load_config(copy)
    assert config.device_id == "press-017" and config.broker_port == 8883
    assert config.tls_ca == (tmp_path / "ca.pem").resolve()
