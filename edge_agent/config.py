"""The agent's configuration: one TOML file, read into a typed, frozen :class:`AgentConfig`.

Example (every key but ``device.id``, ``broker.host`` and a trust key has a default)::

    [device]
    id = "press-017"                     # also the MQTT username, unless broker.username
    labels = { site = "plant-a", line = "3" }

    [broker]
    host = "fleet.example.com"
    port = 8883
    password_file = "/etc/edge-agent/secret"   # the device secret, one line, mode 0600
    tls_ca = "/etc/edge-agent/ca.pem"          # set: TLS on; unset: plain TCP

    [server]
    url = "https://fleet.example.com"   # bundle downloads; the token is the device secret
                                        # unless server.token_file says otherwise
    [trust]
    keys = ["build=/etc/edge-agent/keys/build.pub", "approver=/etc/edge-agent/keys/approver.pub"]
    threshold = 1

    [window]
    seconds = 60                          # a window closes after this long ...
    rows = 0                              # ... or after this many rows (0: no row bound)
    checkpoint_seconds = 5                # the open window is saved this often

    [agent]
    data_dir = "/var/lib/edge-agent"
    http_port = 8750                      # local endpoint on 127.0.0.1; 0 turns it off

    [predictions]                         # the store outcomes join with (predictions.db)
    horizon_days = 30                     # an outcome later than this counts as expired
    max_rows = 1000000                    # the oldest predictions go first past either
    max_bytes = 268435456                 # bound (256 MiB: ids, probabilities, overhead)

    [capture]                             # served rows uploaded for retraining: OFF unless
    enabled = false                       # enabled (edge_agent.capture; needs server.url)
    features = ["temp", "vibration"]      # the allowlist: no other feature leaves the device
    rate = 0.01                           # the share of served rows sampled ...
    max_rows = 1000                       # ... at most this many a window (reservoir)
    window_seconds = 3600
    upload_seconds = 60                   # how often queued rows are uploaded
    batch_rows = 500                      # one upload: at most this many rows ...
    batch_bytes = 524288                  # ... and bytes
    queue_max_rows = 100000               # the durable queue (capture.db): past either
    queue_max_bytes = 67108864            # bound the oldest rows are dropped (counted)

Relative paths are relative to the config file's directory. Unknown sections and keys are
refused (a misspelt key must not silently fall back to a default), and every refusal is a
:class:`ConfigError` naming the file and the key.

Secrets are read from files, never logged, and hidden from ``repr``. A secret file that
others can read is refused, as ``ssh`` refuses an open private key.

This module reads the file; it does not connect, load bundles or create directories.
"""

from __future__ import annotations

import math
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edge_agent.capture import CaptureConfig
from edge_agent.errors import ConfigError
from edgefleet.contract.messages import LABEL_RE, valid_device_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["AgentConfig", "ConfigError", "load_config", "parse_config"]

MAX_CONFIG_BYTES = 64 * 1024
_CAPTURE = {f.name: f.default for f in fields(CaptureConfig) if f.name != "features"}


@dataclass(frozen=True)
class AgentConfig:
    """Everything the daemon needs. Defaults suit a Raspberry Pi class device."""

    device_id: str
    broker_host: str
    trust_keys: tuple[str, ...]  # ROLE=PATH specs for TrustStore.from_files
    labels: dict[str, str] = field(default_factory=dict)
    broker_port: int = 1883
    broker_username: str = ""  # "" → device_id
    broker_password: str = field(default="", repr=False)
    tls_ca: Path | None = None
    keepalive_s: int = 30
    server_url: str = ""
    server_token: str = field(default="", repr=False)  # "" → the broker password
    server_ca: Path | None = None
    threshold: int = 1
    required_roles: tuple[str, ...] = ()
    window_s: float = 60.0
    window_rows: int = 0
    # the open window is saved this often, so a SIGKILL or power cut loses at most this
    # many seconds of rows (counted and reported after restart)
    checkpoint_s: float = 5.0
    data_dir: Path = Path("/var/lib/edge-agent")
    http_host: str = "127.0.0.1"
    http_port: int = 8750
    http_max_body: int = 1024 * 1024
    heartbeat_s: float = 30.0
    outbox_max_messages: int = 10_000
    outbox_max_bytes: int = 64 * 1024 * 1024
    download_max_bytes: int = 256 * 1024 * 1024
    download_timeout_s: float = 60.0
    intra_op_threads: int = 1
    max_rows_per_call: int = 10_000
    shadow_queue_rows: int = 10_000
    reconnect_max_delay_s: float = 60.0
    # a summary or report the broker took but the server has not confirmed is sent again
    # after this long (backing off while the server stays silent): see edge_agent.mqtt
    confirm_timeout_s: float = 60.0
    # the prediction store (edge_agent.predictions): how long predictions wait for their
    # outcome, and how many rows and bytes they may take on the device's disk
    predictions_horizon_days: float = 30.0
    predictions_max_rows: int = 1_000_000
    predictions_max_bytes: int = 256 * 1024 * 1024
    # data capture (edge_agent.capture): off unless enabled, and then only the allowlisted
    # features of a bounded, reservoir-sampled share of served rows leave the device
    # (the defaults are CaptureConfig's: one owner)
    capture_enabled: bool = False
    capture_features: tuple[str, ...] = ()
    capture_rate: float = _CAPTURE["rate"]
    capture_max_rows: int = _CAPTURE["max_rows"]
    capture_window_s: float = _CAPTURE["window_s"]
    capture_upload_s: float = _CAPTURE["upload_s"]
    capture_batch_rows: int = _CAPTURE["batch_rows"]
    capture_batch_bytes: int = _CAPTURE["batch_bytes"]
    capture_queue_max_rows: int = _CAPTURE["queue_max_rows"]
    capture_queue_max_bytes: int = _CAPTURE["queue_max_bytes"]

    @property
    def username(self) -> str:
        return self.broker_username or self.device_id

    @property
    def token(self) -> str:
        return self.server_token or self.broker_password

    def capture_config(self) -> CaptureConfig:
        """The ``[capture]`` section as data capture takes it (``capture_X`` → ``X``).

        Raises:
            CaptureError: the allowlist is empty or a bound is out of range.
        """
        return CaptureConfig(**{f.name: getattr(self, f"capture_{f.name}")
                                for f in fields(CaptureConfig)
                                if hasattr(self, f"capture_{f.name}")})


# key -> (section, name, kind, extra); the table is the documentation of the file format
_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("device", "id"): ("device_id", "device"),
    ("device", "labels"): ("labels", "labels"),
    ("broker", "host"): ("broker_host", "str"),
    ("broker", "port"): ("broker_port", "port"),
    ("broker", "username"): ("broker_username", "str"),
    ("broker", "password_file"): ("broker_password", "secret"),
    ("broker", "tls_ca"): ("tls_ca", "path"),
    ("broker", "keepalive"): ("keepalive_s", "pos_int"),
    ("broker", "reconnect_max_delay"): ("reconnect_max_delay_s", "pos_float"),
    ("server", "url"): ("server_url", "url"),
    ("server", "token_file"): ("server_token", "secret"),
    ("server", "ca"): ("server_ca", "path"),
    ("trust", "keys"): ("trust_keys", "keys"),
    ("trust", "threshold"): ("threshold", "pos_int"),
    ("trust", "required_roles"): ("required_roles", "str_list"),
    ("window", "seconds"): ("window_s", "pos_float"),
    ("window", "rows"): ("window_rows", "nonneg_int"),
    ("window", "checkpoint_seconds"): ("checkpoint_s", "pos_float"),
    ("agent", "data_dir"): ("data_dir", "path"),
    ("agent", "http_host"): ("http_host", "str"),
    ("agent", "http_port"): ("http_port", "port0"),
    ("agent", "http_max_body"): ("http_max_body", "pos_int"),
    ("agent", "heartbeat_seconds"): ("heartbeat_s", "pos_float"),
    ("agent", "outbox_max_messages"): ("outbox_max_messages", "pos_int"),
    ("agent", "outbox_max_bytes"): ("outbox_max_bytes", "pos_int"),
    ("agent", "download_max_bytes"): ("download_max_bytes", "pos_int"),
    ("agent", "download_timeout"): ("download_timeout_s", "pos_float"),
    ("agent", "intra_op_threads"): ("intra_op_threads", "pos_int"),
    ("agent", "max_rows_per_call"): ("max_rows_per_call", "pos_int"),
    ("agent", "shadow_queue_rows"): ("shadow_queue_rows", "pos_int"),
    ("agent", "confirm_timeout"): ("confirm_timeout_s", "pos_float"),
    ("predictions", "horizon_days"): ("predictions_horizon_days", "pos_float"),
    ("predictions", "max_rows"): ("predictions_max_rows", "pos_int"),
    ("predictions", "max_bytes"): ("predictions_max_bytes", "pos_int"),
    ("capture", "enabled"): ("capture_enabled", "bool"),
    ("capture", "features"): ("capture_features", "str_list"),
    ("capture", "rate"): ("capture_rate", "share"),
    ("capture", "max_rows"): ("capture_max_rows", "pos_int"),
    ("capture", "window_seconds"): ("capture_window_s", "pos_float"),
    ("capture", "upload_seconds"): ("capture_upload_s", "pos_float"),
    ("capture", "batch_rows"): ("capture_batch_rows", "pos_int"),
    ("capture", "batch_bytes"): ("capture_batch_bytes", "pos_int"),
    ("capture", "queue_max_rows"): ("capture_queue_max_rows", "pos_int"),
    ("capture", "queue_max_bytes"): ("capture_queue_max_bytes", "pos_int"),
}
_REQUIRED = (("device", "id"), ("broker", "host"), ("trust", "keys"))


def load_config(path: Path) -> AgentConfig:
    """Read and check a TOML config file.

    Raises:
        ConfigError: unreadable, not TOML, an unknown or missing key, a bad value, or a
            secret file that others can read; the message names the file and key.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    return parse_config(doc, base=path.parent, source=str(path))


def parse_config(doc: dict[str, Any], *, base: Path = Path("."),
                 source: str = "config") -> AgentConfig:
    """Check a parsed config document (sections of keys) and build the config.

    Raises:
        ConfigError: naming ``source`` and the key at fault.
    """
    values: dict[str, Any] = {}
    for section, body in doc.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{section}] must be a table", key=section)
        for name, value in body.items():
            spec = _KEYS.get((section, name))
            key = f"{section}.{name}"
            if spec is None:
                known = sorted(n for s, n in _KEYS if s == section)
                hint = f" (known: {', '.join(known)})" if known else " (unknown section)"
                raise ConfigError(f"{source}: unknown key {key}{hint}", key=key)
            attr, kind = spec
            values[attr] = _convert(value, kind, key, base, source)
    for section, name in _REQUIRED:
        if _KEYS[(section, name)][0] not in values:
            raise ConfigError(f"{source}: {section}.{name} is required", key=f"{section}.{name}")
    config = AgentConfig(**values)
    if config.threshold > len(config.trust_keys):
        raise ConfigError(f"{source}: trust.threshold {config.threshold} exceeds the "
                          f"{len(config.trust_keys)} trusted key(s)", key="trust.threshold")
    if config.server_url and not config.token:
        raise ConfigError(f"{source}: server.url needs a token: set broker.password_file or "
                          "server.token_file", key="server.token_file")
    if config.capture_enabled and not config.capture_features:
        raise ConfigError(f"{source}: capture.features must name the features that may "
                          "leave the device (the allowlist)", key="capture.features")
    if config.capture_enabled and not config.server_url:
        raise ConfigError(f"{source}: capture uploads to the server: set server.url",
                          key="server.url")
    if config.capture_batch_bytes > 4 * 1024 * 1024:
        raise ConfigError(f"{source}: capture.batch_bytes must be at most 4194304 (the "
                          "server's batch limit)", key="capture.batch_bytes")
    return config


def _convert(value: Any, kind: str, key: str, base: Path, source: str) -> Any:
    """``value`` of ``key`` checked and converted as its ``kind`` (see :data:`_KEYS`).

    Raises:
        ConfigError: the value is not of its kind (names the key).
    """
    converter = _CONVERTERS.get(kind)
    if converter is None:  # pragma: no cover - the table of keys is closed
        raise AssertionError(kind)
    return converter(value, kind, _Field(key, base, source))


@dataclass(frozen=True)
class _Field:
    """Where a value comes from: its key, and the config file's folder and name."""

    key: str
    base: Path
    source: str

    def bad(self, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key} {why}", key=self.key)


def _text(value: Any, kind: str, f: _Field) -> str:
    if not isinstance(value, str) or not value.strip():
        raise f.bad("must be a non-empty string")
    if kind == "device" and not valid_device_id(value):
        raise f.bad(f"{value!r}: letters, digits, '.', '_', '-' (at most 64)")
    if kind == "url" and not value.startswith(("http://", "https://")):
        raise f.bad(f"{value!r} must start with http:// or https://")
    return value.rstrip("/") if kind == "url" else value


def _integer(value: Any, kind: str, f: _Field) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise f.bad("must be an integer")
    low = {"pos_int": 1, "nonneg_int": 0, "port": 1, "port0": 0}[kind]
    high = 65535 if kind.startswith("port") else sys.maxsize
    if not low <= value <= high:
        raise f.bad(f"must be between {low} and {high}")
    return value


def _boolean(value: Any, kind: str, f: _Field) -> bool:
    if not isinstance(value, bool):
        raise f.bad("must be true or false")
    return value


def _share(value: Any, kind: str, f: _Field) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 < value <= 1:
        raise f.bad("must be a number > 0 and <= 1")
    return float(value)


def _pos_float(value: Any, kind: str, f: _Field) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise f.bad("must be a number")
    if not math.isfinite(value) or value <= 0:
        raise f.bad("must be a positive number")
    return float(value)


def _path(value: Any, kind: str, f: _Field) -> Path:
    if not isinstance(value, str) or not value:
        raise f.bad("must be a path")
    return (f.base / value).resolve() if not os.path.isabs(value) else Path(value)


def _secret(value: Any, kind: str, f: _Field) -> str:
    return _read_secret(_path(value, "path", f), f.key, f.source)


def _labels(value: Any, kind: str, f: _Field) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > 32:
        raise f.bad("must be a table of at most 32 labels")
    for k, v in value.items():
        if not LABEL_RE.match(k) or not isinstance(v, str) or len(v) > 128:
            raise f.bad(f"label {k!r}: lower-case key and a string value up to 128")
    return dict(value)


def _strings(value: Any, kind: str, f: _Field) -> tuple[str, ...]:
    """A list of strings; for ``keys``, ``[ROLE=]PATH`` specs with the paths resolved."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise f.bad("must be a list of strings")
    if kind != "keys":
        return tuple(value)
    if not value:
        raise f.bad("must name at least one trusted public key")
    out = []
    for spec in value:
        role, sep, rest = spec.partition("=")
        where = rest if sep else role
        resolved = where if os.path.isabs(where) else str((f.base / where).resolve())
        out.append(f"{role}={resolved}" if sep else resolved)
    return tuple(out)


_CONVERTERS: dict[str, Callable[[Any, str, _Field], Any]] = {
    "str": _text, "url": _text, "device": _text,
    "pos_int": _integer, "nonneg_int": _integer, "port": _integer, "port0": _integer,
    "bool": _boolean, "share": _share, "pos_float": _pos_float, "path": _path,
    "secret": _secret, "labels": _labels, "keys": _strings, "str_list": _strings,
}


def _read_secret(path: Path, key: str, source: str) -> str:
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{source}: {key}: {path} is readable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it", key=key)
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: {key}: cannot read {path} ({exc.strerror})",
                          key=key) from exc
    secret = text.strip()
    if not secret or "\n" in secret or len(secret) > 1024:
        raise ConfigError(f"{source}: {key}: {path} must hold one line (the secret)", key=key)
    return secret
