"""A staged rollout on PostgreSQL across the whole topology, its engine killed mid-rollout.

Over one PostgreSQL database and one Mosquitto: two engines as processes (``fleet serve
--role engine``: one leads, one stands by), two API replicas (``FleetServer(role="api")``
serving HTTP) and two ingest workers (``role="ingest"``, one shared subscription, a client
id each), each replica and worker with its own database connections and broker
connection, in the test process (four more interpreters starting would triple the test's
time on two shared cores; ``test_postgres_e2e`` runs ``fleet ingest`` and ``fleet serve`` as
processes); two real agents, each downloading bundles from a different API replica. An
operator starts a staged rollout through one replica; while its first stage soaks, the
leading engine is killed with SIGKILL. The standby must lead within 15 s, the rollout must
complete, every transition must be applied once (the rollout's history: create, start,
promote, promote; each device's desired state changed once), and every summary an agent
numbered must be stored exactly once.

About 30 s of wall time on two shared cores; marked slow.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import replace

import psycopg
import pytest

from edge_agent.config import load_config
from edge_agent.daemon import AgentDaemon
from fleet_server.cli.client import FleetClient
from fleet_server.config import ServerConfig
from fleet_server.server import FleetServer
from fleet_server.services import build_services
from tests.edge_agent.agent_helpers import wait_until, write_config
from tests.fleet_server.conftest import make_config
from tests.fleet_server.test_postgres_e2e import DEVICES, PgFleet

pytestmark = pytest.mark.slow
TAKEOVER_S = 15.0
GATES = {"min_canary_predictions": 100, "min_control_predictions": 100,
         "min_healthy_predictions": 20, "max_wait_s": 60, "max_latency_p95_ratio": 10.0}
STAGES = [{"fraction": 0.5, "min_devices": 1, "soak_s": 5.0},
          {"fraction": 1.0, "min_devices": 1, "soak_s": 1.0}]
ENGINES = ("engine-a", "engine-b")


class Topology(PgFleet):
    """PgFleet's database, broker and agents, with every role in a process of its own."""

    def __init__(self, tmp, url, keys, bundles) -> None:
        super().__init__(tmp, url, keys, bundles)
        s = build_services(ServerConfig(db=url, bundle_dir=self.bundle_dir,
                                        trust=tuple(keys.trust_specs())))
        now = time.time()
        s.bundles.upload(bundles.build("1.1.0").read_bytes(), "test", now)
        s.registry.create_group("all", {"site": "t"}, "test", now)
        s.close()
        self.trust = [a for spec in keys.trust_specs() for a in ("--trust", spec)]
        self.servers: dict[str, FleetServer] = {}
        self.urls: dict[str, str] = {}

    def url_of(self, api: str) -> str:
        return self.urls[api]

    def start_all(self) -> None:
        """The engines (processes; the first to lead, then its standby), the API replicas
        and the ingest workers (in this process)."""
        self.spawn(ENGINES[0], "serve", "--role", "engine", "--rollout-tick", "0.3",
                   *self.trust)
        base = replace(make_config(self.tmp, self.keys, broker=self.broker), db=self.url,
                       bundle_dir=self.bundle_dir)
        assert base.broker is not None
        for api in ("api-a", "api-b"):
            # one process: a client id each (by default it names the process)
            broker = replace(base.broker, client_id=f"fleet-{api}")
            server = self.servers[api] = FleetServer(replace(base, role="api", broker=broker))
            server.start()
            self.urls[api] = server.start_http()
        for n in (1, 2):
            broker = replace(base.broker, share="ingest", client_id=f"fleet-ingest-{n}")
            worker = self.servers[f"ingest-{n}"] = FleetServer(
                replace(base, role="ingest", broker=broker), publish_desired=False)
            worker.start()
        for name, server in self.servers.items():
            wait_until(lambda s=server: s.link is not None and s.link.connected, 30,
                       f"{name} to connect to the broker")
        wait_until(lambda: "engine: leading" in self.log(ENGINES[0]), 60,
                   f"{ENGINES[0]} to lead")
        self.spawn(ENGINES[1], "serve", "--role", "engine", "--rollout-tick", "0.3",
                   *self.trust)
        wait_until(lambda: "engine: standing by" in self.log(ENGINES[1]), 60,
                   f"{ENGINES[1]} to stand by")

    def close(self) -> None:
        for daemon in self.agents.values():
            daemon.stop(flush_timeout=0.5)
        self.agents.clear()
        for server in self.servers.values():
            server.stop_http()
            server.stop()
        super().close()

    def start_agent_on(self, device: str, api: str) -> None:
        path = write_config(self.tmp / device, device=device, broker=self.broker,
                            password=self.secrets[device], trust=self.keys.trust_specs(),
                            server_url=self.url_of(api), seconds=0.5, rows=20,
                            heartbeat_seconds=1, http_port=0)
        daemon = AgentDaemon(load_config(path))
        daemon.start()
        self.agents[device] = daemon

    def running(self, device: str) -> str | None:
        model = self.agents[device].agent.model
        return None if model is None else model.ref.version

    def desired_revisions(self) -> dict[str, int]:
        with psycopg.connect(self.url) as conn:
            return dict(conn.execute("SELECT device, revision FROM desired").fetchall())


@pytest.fixture
def topology(tmp_path, postgres, signing_keys, bundles):
    t = Topology(tmp_path, postgres.new_database(), signing_keys, bundles)
    yield t
    t.close()


def test_a_staged_rollout_completes_once_across_an_engine_killed_mid_rollout(topology):
    t = topology
    t.start_all()
    for device, api in zip(DEVICES, ("api-a", "api-b"), strict=True):
        t.start_agent_on(device, api)
    with FleetClient(t.url_of("api-a"), t.token) as a, \
            FleetClient(t.url_of("api-b"), t.token) as b:
        for device in DEVICES:
            a.put(f"/api/v1/devices/{device}/desired", {"bundle": "sensor@1.0.0"})
        wait_until(lambda: all(t.running(d) == "1.0.0" for d in DEVICES), 30,
                   "every agent to run 1.0.0")
        before = t.desired_revisions()
        stop = threading.Event()
        traffic = threading.Thread(target=t.feed, args=(120, stop), daemon=True)
        traffic.start()
        try:
            detail = b.post("/api/v1/rollouts", {
                "id": "failover", "bundle": "sensor@1.1.0", "group": "all",
                "stages": STAGES, "gates": GATES, "install_timeout_s": 30, "start": True})
            [canary] = [d["device"] for d in detail["devices"] if d["role"] == "canary"]
            wait_until(lambda: t.running(canary) == "1.1.0", 30, "the canary to install")
            mid = a.get("/api/v1/rollouts/failover")
            assert (mid["status"], mid["stage"]) == ("running", 0)  # soaking: mid-rollout
            killed = time.monotonic()
            t.stop(ENGINES[0], signal.SIGKILL)
            wait_until(lambda: "engine: leading" in t.log(ENGINES[1]), TAKEOVER_S,
                       "the standby to take the engine over")
            took = time.monotonic() - killed
            found: dict = {}

            def finished() -> bool:
                found.update(a.get("/api/v1/rollouts/failover"))
                return found["status"] in ("completed", "aborted")

            wait_until(finished, 60, "the rollout to finish under the new engine")
            assert found["status"] == "completed", found["audit"][-1]
            assert [e["action"] for e in found["audit"]] == ["create", "start", "promote",
                                                             "promote"]
            assert [e["stage"] for e in found["audit"]] == [0, 0, 0, 1]
            wait_until(lambda: all(t.running(d) == "1.1.0" for d in DEVICES), 30,
                       "every agent to run 1.1.0")
            t.produced_more(2, "after the rollout")
        finally:
            stop.set()
            traffic.join(10)
    # each device's desired state changed once for the rollout: no transition sent twice
    assert t.desired_revisions() == {d: before[d] + 1 for d in DEVICES}
    t.check()  # every summary acknowledged to the agents is stored, once
    with psycopg.connect(t.url) as conn:
        leads = [r[0] for r in conn.execute(
            "SELECT actor FROM audit WHERE action = 'engine.lead' ORDER BY id").fetchall()]
    assert len(leads) == 2 and leads[0] != leads[1]
    assert took < TAKEOVER_S
    assert t.stop(ENGINES[1]) == 0, t.log(ENGINES[1])[-2000:]  # SIGTERM: a clean exit
