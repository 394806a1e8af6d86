"""A fleet over PostgreSQL end to end, as the topology of several processes runs it: the
real ``fleet serve`` and ``fleet ingest`` commands over the session's PostgreSQL, a real
Mosquitto with per-device accounts from the registry, two real agents installing a bundle
over HTTP and sending summaries.

Processes: ``serve`` (``--role all --share ingest``: the API, an ingest worker, the
engine, first so it leads), ``standby`` (``--role engine``), ``worker`` (``fleet ingest
--share ingest``, the second ingest worker). The leading ``serve`` is SIGKILLed mid-traffic:
the standby takes the engine over, the other worker goes on ingesting, and after
``serve`` restarts the ledger of :mod:`tests.fleet_server.test_faults` holds in
PostgreSQL: every summary an agent numbered is stored exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from edge_agent.config import load_config
from edge_agent.daemon import AgentDaemon
from fleet_server.cli.client import FleetClient
from fleet_server.config import ServerConfig
from fleet_server.services import build_services
from tests.broker import SERVER_USER, Mosquitto, free_port
from tests.bundles import FEATURES, sensor_data
from tests.edge_agent.agent_helpers import wait_until, write_config
from tests.fleet_server.conftest import SERVER_PASSWORD

pytestmark = pytest.mark.slow
DEVICES = ("dev0", "dev1")
ROWS = sensor_data(400, seed=21)[list(FEATURES)].to_dict("records")
REPO = Path(__file__).resolve().parents[2]


class PgFleet:
    def __init__(self, tmp: Path, url: str, keys, bundles) -> None:
        self.tmp, self.url, self.keys = tmp, url, keys
        self.bundle_dir = tmp / "bundles"
        s = build_services(ServerConfig(db=url, bundle_dir=self.bundle_dir,
                                        trust=tuple(keys.trust_specs())))
        now = time.time()
        self.secrets = {d: s.registry.add_device(d, {"site": "t"}, "test", now)[1].secret
                        for d in DEVICES}
        s.bundles.upload(bundles.build("1.0.0").read_bytes(), "test", now)
        self.token = s.auth.create_token("ops", "operator", "test", now).secret
        users = s.store.mosquitto_users()
        s.close()
        self.broker = Mosquitto(persistence=True)
        self.broker.add_user(SERVER_USER, SERVER_PASSWORD)
        for device, hashed in users:
            self.broker.add_hashed_user(device, hashed)
        self.broker.start()
        self.port = free_port()
        self.http = f"http://127.0.0.1:{self.port}"
        (tmp / "broker-pw").write_text(SERVER_PASSWORD)
        self.procs: dict[str, subprocess.Popen] = {}
        self.agents: dict[str, AgentDaemon] = {}

    def spawn(self, name: str, *args: str) -> None:
        """Start ``fleet <args>`` as the process ``name`` (its stderr in ``name.log``)."""
        common = ["--db", self.url, "--bundle-dir", str(self.bundle_dir),
                  "--broker", f"{self.broker.host}:{self.broker.port}",
                  "--broker-password-file", str(self.tmp / "broker-pw")]
        with open(self.tmp / f"{name}.log", "ab") as err:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fleet_server.cli", *args, *common],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env={**os.environ, "PYTHONPATH": str(REPO)})

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def start_serve(self) -> None:
        trust = [a for spec in self.keys.trust_specs() for a in ("--trust", spec)]
        self.spawn("serve", "serve", "--role", "all", "--share", "ingest", "--port",
                   str(self.port), *trust)

        def up() -> bool:
            assert self.procs["serve"].poll() is None, self.log("serve")[-3000:]
            try:
                return httpx.get(f"{self.http}/health", timeout=2).json()["mqtt"] == "connected"
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        wait_until(up, 60, "fleet serve on PostgreSQL to answer and connect")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        proc = self.procs.pop(name)
        proc.send_signal(sig)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)

    def start_agent(self, device: str) -> None:
        path = write_config(self.tmp / device, device=device, broker=self.broker,
                            password=self.secrets[device], trust=self.keys.trust_specs(),
                            server_url=self.http, seconds=0.5, rows=20, heartbeat_seconds=1,
                            http_port=0)
        daemon = AgentDaemon(load_config(path))
        daemon.start()
        self.agents[device] = daemon

    def feed(self, seconds: float, stop: threading.Event | None = None) -> None:
        deadline, k = time.monotonic() + seconds, 0
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            for daemon in self.agents.values():
                daemon.agent.predict([ROWS[(k + i) % len(ROWS)] for i in range(5)])
            k += 5
            time.sleep(0.02)

    def produced_more(self, n: int, when: str) -> None:
        """Wait until every agent has numbered ``n`` more summaries."""
        last = {d: a.outbox.last_sequence("summary") for d, a in self.agents.items()}
        wait_until(lambda: all(a.outbox.last_sequence("summary") >= last[d] + n
                               for d, a in self.agents.items()), 30,
                   f"{n} more summaries from every agent {when}")

    def stored(self, device: str) -> list[int]:
        with psycopg.connect(self.url) as conn:
            return [r[0] for r in conn.execute(
                "SELECT seq FROM summaries WHERE device = %s ORDER BY seq", [device])]

    def check(self, timeout: float = 30.0) -> None:
        """Every summary each agent numbered is stored exactly once."""
        for device, daemon in self.agents.items():
            def drained(d: AgentDaemon = daemon) -> bool:
                d._close_window()
                return d.outbox.depth == 0

            wait_until(drained, 30, f"{device}'s outbox to drain")
            want = set(range(1, daemon.outbox.last_sequence("summary") + 1))
            assert want, f"{device} produced nothing"
            wait_until(lambda d=device, w=want: w <= set(self.stored(d)), timeout,
                       f"{device}'s summaries in PostgreSQL")
            seqs = self.stored(device)
            assert sorted(seqs) == sorted(set(seqs)) == sorted(want), device

    def close(self) -> None:
        for daemon in self.agents.values():
            daemon.stop(flush_timeout=0.5)
        for name in list(self.procs):
            self.stop(name, signal.SIGKILL)
        self.broker.cleanup()


@pytest.fixture
def pg_fleet(tmp_path, postgres, signing_keys, bundles):
    f = PgFleet(tmp_path, postgres.new_database(), signing_keys, bundles)
    yield f
    f.close()


def test_a_fleet_on_postgresql_survives_the_leading_server_killed(pg_fleet):
    f = pg_fleet
    f.start_serve()
    wait_until(lambda: "engine: leading" in f.log("serve"), 30, "serve to lead the engine")
    f.spawn("standby", "serve", "--role", "engine")
    f.spawn("worker", "ingest", "--share", "ingest")
    wait_until(lambda: "engine: standing by" in f.log("standby"), 60, "the standby")
    for device in DEVICES:
        f.start_agent(device)
    with FleetClient(f.http, f.token) as api:
        for device in DEVICES:
            api.put(f"/api/v1/devices/{device}/desired", {"bundle": "sensor@1.0.0"})
    for device, daemon in f.agents.items():
        wait_until(lambda d=daemon: d.agent.model is not None and
                   d.agent.model.ref.version == "1.0.0", 30, f"{device} to run 1.0.0")
    stop = threading.Event()
    traffic = threading.Thread(target=f.feed, args=(60, stop))
    traffic.start()
    try:
        wait_until(lambda: all(f.stored(d) for d in DEVICES), 30, "summaries in PostgreSQL")
        f.stop("serve", signal.SIGKILL)  # the API, an ingest worker and the engine, at once
        wait_until(lambda: "engine: leading" in f.log("standby"), 15,
                   "the standby to take the engine over")
        stored = {d: len(f.stored(d)) for d in DEVICES}
        f.produced_more(2, "while serve is down")
        # the other worker goes on: its share of what the agents send is stored meanwhile
        wait_until(lambda: any(len(f.stored(d)) > stored[d] for d in DEVICES), 30,
                   "the second ingest worker to store summaries")
        f.start_serve()
        f.produced_more(2, "after the restart")
    finally:
        stop.set()
        traffic.join(10)
    f.check()
    with FleetClient(f.http, f.token) as api:
        listed = {d["id"]: d for d in api.get("/api/v1/devices")}
        assert {d: listed[d]["summaries"] > 0 for d in DEVICES} == dict.fromkeys(DEVICES, True)
    with psycopg.connect(f.url) as conn:
        actors = [r[0] for r in conn.execute(
            "SELECT actor FROM audit WHERE action = 'engine.lead' ORDER BY id").fetchall()]
    assert len(actors) == 2 and actors[0] != actors[1]  # serve led, then the standby
    for name in ("serve", "standby", "worker"):
        assert f.stop(name) == 0, f.log(name)[-2000:]  # SIGTERM: clean exits
