"""Fixtures of the fleet-server tests: real bundles, real SQLite files, a real Mosquitto,
devices played with the device's own transport (Outbox + MqttLink), servers on real ports.

Every server, broker and device link a fixture starts is stopped by it. Devices publish
exactly what an agent would: ``edgefleet.contract.messages.encode`` of real messages, summaries
carrying profiles computed by ``edgefleet.contract.profile.Profile`` over the bins of a real
bundle's ``reference.json``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.mqtt import LinkConfig, MqttLink
from edge_agent.outbox import Outbox
from edgefleet.contract.bundle import read_unverified
from edgefleet.contract.messages import (
    BundleRef,
    Heartbeat,
    Report,
    Status,
    Summary,
    encode,
    topic,
)
from edgefleet.contract.profile import Profile, ProfileSpec, parse_reference, to_wire
from fleet_server.config import BrokerConfig, DriftConfig, IngestConfig, ServerConfig
from fleet_server.server import FleetServer
from fleet_server.services import Services, build_services
from tests.broker import SERVER_USER, Mosquitto
from tests.bundles import FEATURES, sensor_data
from tests.pg import Postgres

SERVER_PASSWORD = "server-pw-7Qx"
DEVICES = tuple(f"dev{i}" for i in range(1, 7))
PASSWORDS = {d: f"pw-{d}-Zr8" for d in DEVICES}


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def sensor_bundle(bundles) -> Path:
    return bundles.build("1.0.0")


@pytest.fixture(scope="session")
def sensor_ref(sensor_bundle) -> tuple[ProfileSpec, Profile]:
    """The bins and training profile of ``sensor@1.0.0``, read as the server reads them."""
    raw = read_unverified(sensor_bundle.read_bytes()).member("reference.json")
    return parse_reference(raw)


def profile_of(spec: ProfileSpec, rows: int, seed: int, shift: Mapping[str, float] | None = None,
               base: Profile | None = None) -> Profile:
    """What a device's profiler makes of ``rows`` sensor readings, outputs included.

    The outputs are drawn from ``base``'s output histograms when it is given (a model
    behaving as it did in training), else from a fixed made-up distribution.
    """
    frame = sensor_data(rows, seed=seed, shift=dict(shift or {}))
    rng = np.random.default_rng(seed)
    if base is None:
        classes = frame["fault"].astype(str).to_numpy()
        confidence = rng.uniform(0.5, 1.0, rows)
    else:
        doc = base.to_dict()["outputs"]
        vocab = spec.outputs[0].vocabulary  # type: ignore[union-attr]
        counts = np.asarray(doc["class"]["counts"][:len(vocab)], dtype=float)
        classes = rng.choice(np.array(vocab), rows, p=counts / counts.sum())
        edges = np.asarray(spec.outputs[1].edges)  # type: ignore[union-attr]
        slots = np.asarray(doc["confidence"]["counts"][1:-1], dtype=float)
        slot = rng.choice(len(slots), rows, p=slots / slots.sum())
        confidence = rng.uniform(edges[slot], edges[slot + 1])
    prof = Profile(spec)
    prof.update({f: frame[f].to_numpy() for f in FEATURES},
                {"class": classes, "confidence": confidence}, rows=rows)
    return prof


def summary_of(device: str, seq: int, profile: Profile, start: float, end: float,
               version: str = "1.0.0") -> Summary:
    return Summary(device, seq, BundleRef("sensor", version), start, end, to_wire(profile))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """The session's own PostgreSQL server (started on first use, stopped at the end)."""
    pg = Postgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.cleanup()  # also when it did not start: its directory goes


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> Path | str:
    """Where a fresh, empty store lives: a SQLite file, or a new database on the session's
    PostgreSQL. A test taking it runs once on each engine."""
    if request.param == "sqlite":
        return tmp_path / "fleet.db"
    return request.getfixturevalue("postgres").new_database()


def make_config(tmp_path: Path, keys, *, broker: Mosquitto | None = None,
                **overrides: Any) -> ServerConfig:
    broker_cfg = None
    if broker is not None:
        broker_cfg = BrokerConfig(host=broker.host, port=broker.port, username=SERVER_USER,
                                  password=SERVER_PASSWORD, reconnect_min_delay=0.05,
                                  reconnect_max_delay=0.3)
    config = ServerConfig(db=tmp_path / "fleet.db", bundle_dir=tmp_path / "fleet.db.bundles",
                          broker=broker_cfg,
                          trust=tuple(keys.trust_specs()),
                          ingest_config=IngestConfig(batch_wait_s=0.02),
                          drift=DriftConfig(window_s=60, lateness_s=0), evaluate=False)
    return replace(config, **overrides)


@pytest.fixture
def services(tmp_path, signing_keys) -> Iterator[Services]:
    """Every service over a fresh database; no broker, no threads."""
    s = build_services(make_config(tmp_path, signing_keys))
    yield s
    s.close()


@pytest.fixture
def services_on(tmp_path, signing_keys, db) -> Iterator[Services]:
    """Every service over a fresh database on each engine (SQLite, then PostgreSQL): a
    test taking it runs once per engine."""
    s = build_services(make_config(tmp_path, signing_keys, db=db))
    yield s
    s.close()


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    m = Mosquitto()
    m.add_user(SERVER_USER, SERVER_PASSWORD)
    for device, password in PASSWORDS.items():
        m.add_user(device, password)
    m.start()
    yield m
    m.cleanup()


class FakeDevice:
    """A device as the broker and server see it: the agent's own outbox and MQTT link."""

    def __init__(self, broker: Mosquitto, directory: Path, device: str,
                 password: str | None = None) -> None:
        self.id = device
        self.outbox = Outbox(directory / f"{device}-outbox.db")
        self.received: list[tuple[str, bytes]] = []
        will = encode(Status(device, "offline"))
        self.link = MqttLink(
            LinkConfig(broker.host, broker.port, device, device,
                       PASSWORDS.get(device, "") if password is None else password,
                       will_topic=topic(device, "status"), will_payload=will,
                       subscriptions=(topic(device, "desired"),), reconnect_min_delay=0.05,
                       reconnect_max_delay=0.3),
            self.outbox, on_message=lambda t, p: self.received.append((t, p)))
        self.link.start()

    def online(self, labels: Mapping[str, str] | None = None, bundle: BundleRef | None = None
               ) -> None:
        wait_until(lambda: self.link.connected, 10, f"{self.id} to connect")
        self.link.publish_retained(topic(self.id, "status"), encode(
            Status(self.id, "online", "0.1.0", bundle, None, dict(labels or {}), time.time())))

    def send(self, message: Any) -> None:
        self.outbox.put(message.topic, encode(message), qos=0 if isinstance(
            message, Heartbeat) else 1)

    def send_raw(self, kind: str, payload: bytes) -> None:
        self.outbox.put(topic(self.id, kind), payload)

    def heartbeat(self, **fields: Any) -> None:
        self.send(Heartbeat(self.id, time.time(), fields.get("uptime_s", 12.5),
                            fields.get("rss_bytes", 50_000_000), fields.get("predictions", 42),
                            fields.get("errors", 1), fields.get("outbox_depth", 0),
                            latency_p50_ms=1.5, latency_p95_ms=4.0))

    def report(self, seq: int, revision: int, outcome: str, version: str = "1.0.0") -> None:
        self.send(Report(self.id, seq, revision, outcome, BundleRef("sensor", version),
                         "" if outcome == "installed" else "smoke test failed", time.time()))

    def flush(self, timeout: float = 10.0) -> None:
        assert self.link.flush(timeout), f"{self.id}: outbox did not drain"

    def stop(self) -> None:
        self.link.stop()
        self.outbox.close()

    def crash(self) -> None:
        """Cut the TCP connection without a DISCONNECT (a power cut, as the broker sees it):
        the broker publishes the last will."""
        sock = self.link._client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def devices(broker, tmp_path) -> Iterator[Callable[[str], FakeDevice]]:
    made: list[FakeDevice] = []

    def make(device: str, password: str | None = None) -> FakeDevice:
        d = FakeDevice(broker, tmp_path, device, password)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


@pytest.fixture
def server_factory(tmp_path, signing_keys) -> Iterator[Callable[..., FleetServer]]:
    """Start a FleetServer (stopped at teardown); ``broker=`` connects it to MQTT."""
    started: list[FleetServer] = []

    def make(broker: Mosquitto | None = None, *, http: bool = False, **overrides: Any
             ) -> FleetServer:
        server = FleetServer(make_config(tmp_path, signing_keys, broker=broker, **overrides))
        started.append(server)
        server.start()
        if server.link is not None:
            link = server.link
            wait_until(lambda: link.connected, 10, "the server to connect")
        if http:
            server.base_url = server.start_http()  # type: ignore[attr-defined]
        return server

    yield make
    for server in reversed(started):
        server.stop()
