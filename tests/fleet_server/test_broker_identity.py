"""The fleet's own programs under the broker configuration ``fleet broker-config`` writes
(client ids bound to accounts): the server's link, an ingest worker with its own account
and a device's agent link connect side by side, a device squatting on their client ids
moves nobody.

(One connection per account also means a second process on the server's account takes
the first one's place, and both reconnect in turn: Mosquitto 2.0.11 just closes the old
socket, so paho reports "Unspecified error", with nothing to tell it from a network
failure. Hence an account per process, ``fleet broker-config --ingest-workers N``.)

Real Mosquitto from the written files, real FleetServer threads, the agent's own
MqttLink and Outbox.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_agent.mqtt import LinkConfig, MqttLink
from edge_agent.outbox import Outbox
from edgefleet.contract.messages import Status, encode, topic
from fleet_server.config import BrokerConfig, ServerConfig
from fleet_server.registry.devices import Registry
from fleet_server.server import FleetServer
from fleet_server.store import Store
from fleet_server.telemetry.broker import (
    CONF_NAME,
    SERVER_PASSWORD_NAME,
    BrokerSetup,
    start_broker,
    stop_broker,
    write_broker_config,
)
from tests.broker import INSTALL_HINT, find_mosquitto, free_port
from tests.fleet_server.conftest import wait_until

pytestmark = pytest.mark.slow


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Fleet:
    port: int
    db: Path
    server_password: str = field(repr=False)
    ingest_password: str = field(repr=False)
    secrets: dict[str, str] = field(repr=False)
    links: list[MqttLink] = field(default_factory=list)
    outboxes: list[Outbox] = field(default_factory=list)

    def broker(self, user: str, password: str, **kw) -> BrokerConfig:
        return BrokerConfig(host="127.0.0.1", port=self.port, username=user, password=password,
                            reconnect_min_delay=0.05, reconnect_max_delay=0.3, **kw)

    def agent(self, tmp: Path, device: str, client_id: str, as_device: str | None = None
              ) -> MqttLink:
        """The agent's link as ``device`` (credentials of ``as_device``, default the same),
        under ``client_id``, with the agent's last will."""
        who = as_device or device
        outbox = Outbox(tmp / f"{client_id}-{time.monotonic_ns()}.db")
        link = MqttLink(LinkConfig("127.0.0.1", self.port, client_id, who, self.secrets[who],
                                   will_topic=topic(who, "status"),
                                   will_payload=encode(Status(who, "offline")),
                                   subscriptions=(topic(who, "desired"),),
                                   reconnect_min_delay=0.05, reconnect_max_delay=0.3),
                        outbox, on_message=lambda t, p: None)
        link.start()
        self.links.append(link)
        self.outboxes.append(outbox)
        return link


@pytest.fixture
def fleet(tmp_path) -> Iterator[Fleet]:
    if find_mosquitto() is None:
        pytest.skip(INSTALL_HINT)
    port = free_port()
    db = tmp_path / "fleet.db"
    with Store(db) as store:
        reg = Registry(store)
        secrets = {d: reg.add_device(d, {}, "test", time.time())[1].secret
                   for d in ("dev-a", "dev-b")}
        files = write_broker_config(BrokerSetup(out=tmp_path / "broker", port=port,
                                                bind="127.0.0.1", persistence=False,
                                                ingest_workers=1), store)
    proc = start_broker(files[CONF_NAME], port, tmp_path / "mosquitto.log",
                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    fleet = Fleet(port, db, files[SERVER_PASSWORD_NAME].read_text().strip(),
                  files["server-ingest-1-password"].read_text().strip(), secrets)
    try:
        yield fleet
    finally:
        for link in fleet.links:
            link.stop()
        for outbox in fleet.outboxes:
            outbox.close()
        stop_broker(proc)


def test_server_worker_and_agents_connect_and_squatters_move_nobody(fleet, tmp_path):
    serve = FleetServer(ServerConfig(db=fleet.db, evaluate=False,
                                     broker=fleet.broker("server", fleet.server_password)))
    worker = FleetServer(ServerConfig(db=fleet.db, evaluate=False, broker=fleet.broker(
        "server-ingest-1", fleet.ingest_password, share="ingest")), publish_desired=False)
    servers = [serve, worker]
    try:
        for s in servers:
            s.start()
        assert serve.link is not None and worker.link is not None
        for s in servers:
            assert s.link.wait_connected(10)  # type: ignore[union-attr]
        agent = fleet.agent(tmp_path, "dev-a", "dev-a-agent")  # the agent's own client id
        wait_until(lambda: agent.connected, 10, "dev-a's agent to connect")
        agent.publish_retained(topic("dev-a", "status"), encode(
            Status("dev-a", "online", "0.1.0", None, None, {}, time.time())))
        wait_until(lambda: serve.services.registry.get("dev-a").online, 10,
                   "the server to see dev-a online")
        # dev-b, with its own secret, under every client id the fleet's programs use
        for taken in ("dev-a-agent", "dev-a", "fleet-serve", "server",
                      "fleet-ingest-x-ingest", "server-ingest-1"):
            squatter = fleet.agent(tmp_path, "dev-b", taken, as_device="dev-b")
            wait_until(lambda s=squatter: s.connected, 10, f"dev-b as {taken!r} to connect")
            squatter.stop()
        # nobody was moved: one connection each, all along, and dev-a never went offline
        assert agent.connected and serve.link.connected and worker.link.connected
        assert serve.link.connects == 1 and worker.link.connects == 1
        assert serve.services.registry.get("dev-a").online
    finally:
        for s in reversed(servers):
            s.stop()

