"""What every MQTT message shares: the topics, the device id, the bundle reference, the base.

The topic scheme and the delivery rules are in :mod:`edgefleet.contract.messages` (read
its docstring); this module holds the pieces every message kind is built from, so the
device's and the server's messages (``messages_device``, ``messages_server``) share one
copy. Import the messages from :mod:`edgefleet.contract.messages`.

This module does not encode or decode payloads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.wire import Fields

__all__ = ["ACK_STREAMS", "DEVICE_RE", "ID_RE", "KINDS", "LABEL_RE", "MAX_INFLATED",
           "MAX_OUTCOMES", "MAX_PAYLOAD", "MESSAGE_SCHEMA", "TOPIC_PREFIX", "BundleRef",
           "Message", "download_path", "opt_bundle", "parse_topic", "seq_floor", "topic",
           "valid_device_id"]

TOPIC_PREFIX = "edgefleet/v1"
MESSAGE_SCHEMA = 1
MAX_PAYLOAD = 128 * 1024  # AWS IoT Core's limit; Mosquitto's is far larger
MAX_INFLATED = 1024 * 1024
DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # \Z: "$" takes "x\n"
LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z")
KINDS = ("summary", "report", "heartbeat", "status", "desired", "ack", "outcomes",
         "receipt")
MAX_OUTCOMES = 1000  # per Outcomes batch: about 100 KB at most, within MAX_PAYLOAD
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}\Z")  # a prediction id
# the numbered streams an Ack acknowledges; each is also the name of the device's counter
ACK_STREAMS = ("summary", "report")


def download_path(name: str, version: str) -> str:
    """Where the fleet server serves a bundle's bytes (relative to its base URL): the
    default of a desired state's ``url``, and what ``edgepack retrain`` fetches."""
    return f"/api/v1/bundles/{name}/{version}/download"


def valid_device_id(device: str) -> bool:
    return bool(DEVICE_RE.match(device))


def topic(device: str, kind: str) -> str:
    """The topic of a message kind for a device.

    Raises:
        SchemaError: an invalid device id (no ``/``, ``+``, ``#``) or unknown kind.
    """
    if not valid_device_id(device):
        raise SchemaError(f"device id {device!r}: letters, digits, '.', '_', '-' (max 64)",
                          field="device")
    if kind not in KINDS:
        raise SchemaError(f"unknown message kind {kind!r}", field="type")
    return f"{TOPIC_PREFIX}/{device}/{kind}"


def parse_topic(name: str) -> tuple[str, str]:
    """``(device, kind)`` of a topic.

    Raises:
        SchemaError: not an edgefleet topic.
    """
    parts = name.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != TOPIC_PREFIX or parts[3] not in KINDS \
            or not valid_device_id(parts[2]):
        raise SchemaError(f"topic {name[:200]!r} is not an edgefleet topic", field="topic")
    return parts[2], parts[3]


@dataclass(frozen=True)
class BundleRef:
    """Which bundle: name and version, and where to get it (desired state only)."""

    name: str
    version: str
    sha256: str = ""
    url: str = ""
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                "url": self.url, "size": self.size}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> BundleRef:
        from edgefleet.contract.manifest import NAME_RE, SHA256_RE, parse_version

        f = Fields(obj, where)
        name, version = f.str("name", max_len=64), f.str("version", max_len=128)
        if not NAME_RE.match(name):
            raise f.bad("name", f"{name!r} is not a bundle name")
        try:
            parse_version(version)
        except SchemaError as exc:
            raise f.bad("version", str(exc)) from exc
        sha = f.str("sha256", "", max_len=64)
        if sha and not SHA256_RE.match(sha):
            raise f.bad("sha256", "must be 64 lower-case hex digits")
        out = cls(name, version, sha, f.str("url", "", max_len=2048), f.int("size", 0))
        f.done()
        return out

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def download_url(self) -> str:
        """``url``, or the fleet server's path for the bundle when the state names none."""
        return self.url or download_path(self.name, self.version)


def opt_bundle(f: Fields, key: str) -> BundleRef | None:
    raw = f.raw(key, None)
    return None if raw is None else BundleRef.from_dict(raw, f"{f.where}.{key}")


class Message:
    """Base: every message has a device and knows its kind."""

    kind: ClassVar[str]
    device: str

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_fields(cls, f: Fields) -> Message:
        raise NotImplementedError

    @property
    def topic(self) -> str:
        return topic(self.device, self.kind)


def seq_floor(f: Fields) -> int:
    floor = f.int("floor", 0)
    seq = f.int("seq")
    if floor > seq:
        raise f.bad("floor", f"{floor} is above the message's own seq {seq}")
    return floor
