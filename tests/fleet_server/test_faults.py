"""Faults, counted end to end: a ledger of every summary a device produced against every row
the server stored, under each fault a fleet meets.

The ledger: an agent numbers its summaries 1, 2, 3, ... in the same transaction that stores
them in its outbox (:meth:`edge_agent.outbox.Outbox.put_numbered`), so "produced" is exactly
the numbers it gave out, and a summary it could not store (a full disk) takes none. After
each fault and a drain, for every device the server must hold every number from 1 to the
last exactly once: nothing lost, nothing stored twice. (A window still open in memory when
the process is killed was never produced: it has no number. Its rows up to the last
checkpoint come back as a summary after the restart, and the rows served after it are
reported lost: :func:`test_agent_sigkill_loses_at_most_a_checkpoint_interval_and_says_so`.)
Where the agents are fed over their HTTP API the ledger also counts rows: every row the API
acknowledged serving is in exactly one stored summary. And every device must end with a
runnable model.

Everything is real: Mosquitto with per-device accounts from the server's registry and the
ACL, the fleet server with SQLite and HTTP downloads, agents as the daemon in this process
or as ``edge-agent run`` processes killed with SIGKILL.
"""

from __future__ import annotations

import http.client
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.daemon import AgentDaemon
from edge_agent.outbox import Outbox, OutboxFullError
from fleet_server.server import FleetServer
from fleet_server.services import build_services
from tests.broker import SERVER_USER, Mosquitto, free_port
from tests.bundles import FEATURES, sensor_data
from tests.edge_agent.agent_helpers import wait_until, write_config
from tests.fleet_server.conftest import SERVER_PASSWORD, make_config

pytestmark = pytest.mark.slow
ROWS = sensor_data(400, seed=21)[list(FEATURES)].to_dict("records")


class Fleet:
    """A broker, a server and agents; the ledger is :meth:`check`."""

    def __init__(self, tmp_path: Path, keys, bundles, devices: int = 2) -> None:
        self.tmp = tmp_path
        self.keys = keys
        self.config = make_config(tmp_path, keys)  # the broker comes below
        s = build_services(self.config)
        now = time.time()
        self.secrets: dict[str, str] = {}
        for i in range(devices):
            _, issued = s.registry.add_device(f"dev{i}", {"site": "t"}, "test", now)
            self.secrets[f"dev{i}"] = issued.secret
        for version in ("1.0.0", "1.1.0"):
            s.bundles.upload(bundles.build(version).read_bytes(), "test", now)
        users = s.store.mosquitto_users()
        s.close()
        # persistence on, as `fleet broker-config` writes it: a broker restart then keeps
        # the server's session, its subscriptions and what is queued for it. Without it,
        # agents that reconnect before the server has subscribed again publish into the
        # void (measured: 120 of 120 summaries of an hour offline lost here).
        self.broker = Mosquitto(persistence=True)
        self.broker.add_user(SERVER_USER, SERVER_PASSWORD)
        for device, hashed in users:
            self.broker.add_hashed_user(device, hashed)
        self.broker.start()
        self.server: FleetServer | None = None
        self.start_server()
        self.agents: dict[str, AgentDaemon] = {}
        self.processes: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}

    # -- parts ---------------------------------------------------------------------------

    def start_server(self) -> None:
        from dataclasses import replace

        from tests.fleet_server.conftest import make_config as mk

        self.config = mk(self.tmp, self.keys, broker=self.broker)
        self.config = replace(self.config, port=0)
        self.server = FleetServer(self.config)
        self.server.start()
        self.url = self.server.start_http()
        wait_until(lambda: self.server.link.connected, 10, "the server to connect")

    def stop_server(self) -> None:
        assert self.server is not None
        self.server.stop()
        self.server = None

    def agent_config(self, device: str, **agent) -> Path:
        agent.setdefault("seconds", 0.5)
        agent.setdefault("rows", 20)
        agent.setdefault("heartbeat_seconds", 1)
        agent.setdefault("http_port", 0)
        return write_config(self.tmp / device, device=device, broker=self.broker,
                            password=self.secrets[device], trust=self.keys.trust_specs(),
                            server_url=self.url, **agent)

    def start_agent(self, device: str, **agent) -> AgentDaemon:
        daemon = AgentDaemon(load_config(self.agent_config(device, **agent)))
        daemon.start()
        self.agents[device] = daemon
        return daemon

    def start_process(self, device: str, **agent) -> None:
        port = self.ports.setdefault(device, free_port())
        config = self.agent_config(device, http_port=port, **agent)
        self.processes[device] = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(config),
             "--log-level", "error"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    def kill(self, device: str) -> None:
        proc = self.processes.pop(device)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def assign(self, device: str, version: str) -> None:
        assert self.server is not None
        self.server.services.desired.assign(device, f"sensor@{version}", actor="test")

    def running(self, device: str) -> str | None:
        if device in self.agents:
            model = self.agents[device].agent.model
            return None if model is None else model.ref.version
        health = self.health(device) or {}
        bundle = health.get("bundle")
        return None if bundle is None else bundle.split("@")[1]

    def health(self, device: str) -> dict | None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.ports[device], timeout=2)
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        except (OSError, ValueError):
            return None

    def predict(self, device: str, n: int, offset: int = 0) -> int:
        """Serve ``n`` rows on ``device``; how many were served."""
        rows = [ROWS[(offset + i) % len(ROWS)] for i in range(n)]
        if device in self.agents:
            for row in rows:
                self.agents[device].agent.predict([row])
            return n
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[device], timeout=5)
        conn.request("POST", "/predict", body=json.dumps({"rows": rows}))
        response = conn.getresponse()
        response.read()
        return n if response.status == 200 else 0

    # -- the ledger ------------------------------------------------------------------------

    def produced(self, device: str) -> int:
        if device in self.agents:
            return self.agents[device].outbox.last_sequence("summary")
        with Outbox(self.tmp / device / "data" / "outbox.db") as box:
            return box.last_sequence("summary")

    def stored(self, device: str) -> list[int]:
        with sqlite3.connect(f"file:{self.tmp / 'fleet.db'}?mode=ro", uri=True) as db:
            return [r[0] for r in db.execute(
                "SELECT seq FROM summaries WHERE device = ? ORDER BY seq", (device,))]

    def drained(self, device: str) -> bool:
        if device in self.agents:
            daemon = self.agents[device]
            daemon._close_window()
            return daemon.outbox.depth == 0
        return (self.health(device) or {}).get("outbox_depth") == 0

    def check(self, devices: list[str], *, dropped: dict[str, int] | None = None,
              timeout: float = 30.0) -> None:
        """Every produced summary stored exactly once; with ``dropped``, at most that many
        missing, and only the oldest (the outbox bound drops the oldest first)."""
        for device in devices:
            wait_until(lambda d=device: self.drained(d), 30, f"{device}'s outbox to drain")
            last = self.produced(device)
            assert last > 0, f"{device} produced nothing"
            want = set(range(1, last + 1))
            allowed = (dropped or {}).get(device, 0)
            deadline = time.monotonic() + timeout
            while len(want - set(self.stored(device))) > allowed and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
            seqs = self.stored(device)
            assert len(seqs) == len(set(seqs)), f"{device}: a summary stored twice"
            missing = sorted(want - set(seqs))
            assert len(missing) <= allowed, f"{device}: lost {missing[:10]}"
            if missing:  # dropped by the bound: a run of the oldest waiting, nothing later
                assert missing == list(range(missing[0], missing[0] + len(missing))), \
                    f"{device}: lost {missing[:10]} is not one run of the oldest"
            assert self.running(device) is not None, f"{device} has no runnable model"

    def close(self) -> None:
        for device in list(self.processes):
            proc = self.processes.pop(device)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for daemon in self.agents.values():
            daemon.stop(flush_timeout=0.5)
        if self.server is not None:
            self.server.stop()
        self.broker.cleanup()


@pytest.fixture
def fleet(tmp_path, signing_keys, bundles):
    f = Fleet(tmp_path, signing_keys, bundles)
    yield f
    f.close()


@pytest.fixture
def big_fleet(tmp_path, signing_keys, bundles):
    f = Fleet(tmp_path, signing_keys, bundles, devices=4)
    yield f
    f.close()


def feed(fleet: Fleet, devices: list[str], seconds: float, stop: threading.Event | None = None
         ) -> int:
    served, deadline, k = 0, time.monotonic() + seconds, 0
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        for device in devices:
            served += fleet.predict(device, 5, k)
        k += 5
        time.sleep(0.02)
    return served


def install(fleet: Fleet, device: str, version: str = "1.0.0") -> None:
    fleet.assign(device, version)
    wait_until(lambda: fleet.running(device) == version, 30, f"{device} to run {version}")


def test_a_broker_restart_during_traffic_loses_nothing(fleet):
    devices = ["dev0", "dev1"]
    for d in devices:
        fleet.start_agent(d)
        install(fleet, d)
    feed(fleet, devices, 1.0)
    fleet.broker.stop()
    feed(fleet, devices, 1.5)  # windows close into the outboxes while the broker is gone
    assert all(fleet.agents[d].outbox.depth > 0 for d in devices)
    fleet.broker.start()
    feed(fleet, devices, 1.0)
    fleet.check(devices)


def test_a_server_restart_during_traffic_loses_nothing(fleet):
    devices = ["dev0", "dev1"]
    for d in devices:
        fleet.start_agent(d)
        install(fleet, d)
    stop = threading.Event()
    traffic = threading.Thread(target=feed, args=(fleet, devices, 30, stop))
    traffic.start()
    try:
        time.sleep(1.0)
        # while the server is away the broker queues for its kept session what the agents
        # publish (with a clean session, 11 of 38 summaries were lost here)
        fleet.stop_server()
        time.sleep(1.0)
        fleet.start_server()
        time.sleep(1.0)
    finally:
        stop.set()
        traffic.join()
    fleet.check(devices)


def test_sigkill_mid_window_loses_no_numbered_summary(fleet):
    fleet.start_process("dev0")
    install(fleet, "dev0")
    feed(fleet, ["dev0"], 1.5)
    fleet.broker.stop()  # numbered summaries pile up in the outbox ...
    feed(fleet, ["dev0"], 1.5)
    fleet.predict("dev0", 7)  # ... and a window is half full
    fleet.kill("dev0")
    produced = fleet.produced("dev0")
    assert produced >= 2
    fleet.broker.start()
    fleet.start_process("dev0")
    wait_until(lambda: fleet.health("dev0"), 20, "the agent to come back")
    feed(fleet, ["dev0"], 1.0)
    fleet.check(["dev0"])
    assert fleet.produced("dev0") > produced  # it went on numbering from the file


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
def test_sigkill_mid_install_leaves_a_runnable_model(fleet, delay):
    fleet.start_process("dev0")
    install(fleet, "dev0", "1.0.0")
    feed(fleet, ["dev0"], 0.8)
    fleet.assign("dev0", "1.1.0")
    time.sleep(delay)
    fleet.kill("dev0")
    fleet.start_process("dev0")
    wait_until(lambda: fleet.running("dev0") in ("1.0.0", "1.1.0"), 20,
               "the restarted agent to serve the old or the new model")
    wait_until(lambda: fleet.running("dev0") == "1.1.0", 30, "the install to complete")
    feed(fleet, ["dev0"], 0.8)
    fleet.check(["dev0"])


def test_a_full_disk_is_survived_and_said(fleet):
    daemon = fleet.start_agent("dev0")
    install(fleet, "dev0")
    feed(fleet, ["dev0"], 0.8)
    conn = daemon.outbox._conn  # SQLite refuses past max_page_count as on a full disk
    used = conn.execute("PRAGMA page_count").fetchone()[0]
    fleet.broker.stop()  # nothing drains: the file fills
    conn.execute(f"PRAGMA max_page_count = {used + 1}")
    feed(fleet, ["dev0"], 1.5)
    assert daemon.lost_windows > 0, "the disk never filled"
    with pytest.raises(OutboxFullError):
        daemon.outbox.put("edgefleet/v1/dev0/summary", bytes(8000))
    assert daemon.agent.predict(ROWS[:3]).bundle == "sensor@1.0.0"  # still serving
    lost = daemon.lost_windows
    conn.execute("PRAGMA max_page_count = 1000000")
    fleet.broker.start()
    feed(fleet, ["dev0"], 1.0)
    fleet.check(["dev0"])  # no gap: lost windows took no number
    with sqlite3.connect(f"file:{fleet.tmp / 'fleet.db'}?mode=ro", uri=True) as db:
        said = [json.loads(r[0]).get("lost_windows", 0) for r in db.execute(
            "SELECT errors FROM summaries WHERE device = 'dev0'")]
    assert sum(said) >= lost


def test_an_hour_offline_within_the_bound_then_beyond_it(fleet):
    """Windows by rows compress the clock: 5 rows a window, 600 rows offline = 120
    windows (an hour of 30-second windows). The second device's outbox holds only 40: the
    oldest are dropped, counted and reported; everything the bound kept arrives."""
    fleet.start_agent("dev0", rows=5)
    fleet.start_agent("dev1", rows=5, outbox_max_messages=40)
    for d in ("dev0", "dev1"):
        install(fleet, d)
    fleet.broker.stop()
    for d in ("dev0", "dev1"):
        for k in range(120):  # each window closed as the ticker would, at its row bound
            fleet.predict(d, 5, 5 * k)
            fleet.agents[d]._close_window()
    assert fleet.agents["dev0"].outbox.depth >= 120
    dropped = fleet.agents["dev1"].outbox.dropped
    assert dropped > 0 and fleet.agents["dev1"].outbox.depth <= 40
    fleet.broker.start()
    # the outbox drains as acks come; a window closed while it is still full would drop
    # one more message, which the counts read above would not include
    wait_until(lambda: fleet.agents["dev1"].outbox.depth < 40, 60, "dev1's outbox to drain")
    assert fleet.agents["dev1"].outbox.dropped == dropped
    for d in ("dev0", "dev1"):  # one more window: a summary reports the drops before it
        fleet.predict(d, 5)
        fleet.agents[d]._close_window()
    fleet.check(["dev0"])
    # dev1: what the bound dropped is missing, and said; nothing else is
    # (a dropped message may have been in flight already and stored: at most `dropped`)
    fleet.check(["dev1"], dropped={"dev1": dropped})
    stored = len(fleet.stored("dev1"))
    assert stored >= fleet.produced("dev1") - dropped
    with sqlite3.connect(f"file:{fleet.tmp / 'fleet.db'}?mode=ro", uri=True) as db:
        told = max(r[0] for r in db.execute(
            "SELECT dropped FROM summaries WHERE device = 'dev1'"))
    assert told == dropped


def test_the_ledger_sees_a_loss(fleet):
    """The check itself can fail: one stored summary deleted is caught."""
    fleet.start_agent("dev0")
    install(fleet, "dev0")
    feed(fleet, ["dev0"], 1.0)
    fleet.check(["dev0"])
    with sqlite3.connect(fleet.tmp / "fleet.db") as db:
        db.execute("DELETE FROM summaries WHERE device = 'dev0' AND seq = 1")
    with pytest.raises(AssertionError, match="lost"):
        fleet.check(["dev0"], timeout=1.0)


def stored_rows(fleet: Fleet, device: str) -> int:
    with sqlite3.connect(f"file:{fleet.tmp / 'fleet.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT COALESCE(SUM(rows), 0) FROM summaries WHERE device = ?",
                          (device,)).fetchone()[0]


def test_server_down_then_broker_sigkill_loses_no_acknowledged_row(big_fleet):
    """Issue 12, item 1: the server away, the broker queueing for it in memory, then the
    broker killed (no autosave since): before end-to-end acknowledgement every summary the
    broker had PUBACKed was gone from the outboxes and never stored. Counted from what the
    agents' HTTP API acknowledged serving: every row stored once, no summary twice."""
    fleet = big_fleet
    devices = [f"dev{i}" for i in range(4)]
    for d in devices:  # re-sends after 2 s: the test need not wait a production minute
        fleet.start_process(d, confirm_timeout=2.0)
    for d in devices:
        wait_until(lambda d=d: fleet.health(d), 30, f"{d} to listen")
        install(fleet, d)
    served = dict.fromkeys(devices, 0)

    def traffic(seconds: float) -> None:
        deadline, k = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            for d in devices:
                served[d] += fleet.predict(d, 5, k)
            k += 5
            time.sleep(0.02)

    traffic(1.0)
    fleet.stop_server()
    traffic(2.0)  # the broker PUBACKs and queues these for the server's kept session
    assert all((fleet.health(d) or {}).get("outbox_unconfirmed", 0) > 0 for d in devices), \
        "nothing waited for the server's confirmation"
    fleet.broker.kill()
    traffic(1.0)  # windows close into the outboxes while nothing runs
    fleet.broker.start()
    fleet.start_server()
    traffic(1.0)
    for d in devices:
        wait_until(lambda d=d: stored_rows(fleet, d) >= served[d], 90,
                   f"{d}: every served row stored ({served[d]} served)")
    time.sleep(0.5)  # a re-send still in flight must not be counted twice
    for d in devices:
        assert stored_rows(fleet, d) == served[d], f"{d}: stored rows != served rows"
        seqs = fleet.stored(d)
        assert seqs == list(range(1, len(seqs) + 1)), f"{d}: a sequence missing"
        wait_until(lambda d=d: (fleet.health(d) or {}).get("outbox_depth") == 0, 60,
                   f"{d}: the server to confirm everything")


def test_agent_sigkill_loses_at_most_a_checkpoint_interval_and_says_so(fleet):
    """The open window is checkpointed; after SIGKILL it is sent, and the rows served
    after the checkpoint are reported as lost: stored + reported lost == served, and the
    loss is at most what was served after the last checkpoint."""
    # no window closes by time or rows: only the checkpoint can save these rows
    fleet.start_process("dev0", seconds=3600, rows=0, checkpoint_seconds=1)
    wait_until(lambda: fleet.health("dev0"), 30, "dev0 to listen")
    install(fleet, "dev0")
    db = fleet.tmp / "dev0" / "data" / "outbox.db"

    def state(name: str):
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def checkpointed() -> int:
        from edgefleet.contract.messages import decode

        blob = state("window")
        return 0 if blob is None else decode("edgefleet/v1/dev0/summary", blob).rows

    first = fleet.predict("dev0", 60)
    wait_until(lambda: checkpointed() == first, 30, "a checkpoint of the first rows")
    late = fleet.predict("dev0", 25, 60)  # served after that checkpoint
    served = first + late
    wait_until(lambda: json.loads(state("served") or b"{}").get("rows") == served, 30,
               "the served-rows counter")
    fleet.kill("dev0")
    assert stored_rows(fleet, "dev0") == 0, "a window closed that should not have"
    fleet.start_process("dev0", seconds=3600, rows=0, checkpoint_seconds=1)
    wait_until(lambda: stored_rows(fleet, "dev0") > 0, 60, "the restored window")
    with sqlite3.connect(f"file:{fleet.tmp / 'fleet.db'}?mode=ro", uri=True) as conn:
        rows, errors = conn.execute(
            "SELECT rows, errors FROM summaries WHERE device = 'dev0'").fetchone()
    lost = json.loads(errors).get("lost_rows", 0)
    assert rows >= first, "the checkpointed rows were lost"
    assert rows + lost == served, "every served row is stored or reported lost"
    assert lost <= late, "lost more than was served after the last checkpoint"


def test_sigstop_sigcont_of_the_broker_and_of_an_agent_lose_no_served_row(fleet):
    """Frozen, not dead: the broker stops answering (PUBACKs and acks wait), an agent stops
    serving and sending; both continue. Every row the HTTP API acknowledged is stored once."""
    devices = ["dev0", "dev1"]
    for d in devices:
        fleet.start_process(d, confirm_timeout=2.0)
    for d in devices:
        wait_until(lambda d=d: fleet.health(d), 30, f"{d} to listen")
        install(fleet, d)
    served = dict.fromkeys(devices, 0)

    def traffic(seconds: float, on: list[str]) -> None:
        deadline, k = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            for d in on:
                served[d] += fleet.predict(d, 5, k)
            k += 5
            time.sleep(0.02)

    traffic(1.0, devices)
    assert fleet.broker.proc is not None
    fleet.broker.proc.send_signal(signal.SIGSTOP)
    try:
        traffic(3.0, devices)  # served and summarised locally; nothing reaches the server
    finally:
        fleet.broker.proc.send_signal(signal.SIGCONT)
    frozen = fleet.processes["dev1"]
    frozen.send_signal(signal.SIGSTOP)
    try:
        traffic(2.0, ["dev0"])
    finally:
        frozen.send_signal(signal.SIGCONT)
    traffic(1.0, devices)
    for d in devices:
        wait_until(lambda d=d: stored_rows(fleet, d) >= served[d], 90,
                   f"{d}: every served row stored ({served[d]} served)")
    for d in devices:
        assert stored_rows(fleet, d) == served[d], f"{d}: stored rows != served rows"
        seqs = fleet.stored(d)
        assert seqs == list(range(1, len(seqs) + 1)), f"{d}: a sequence missing"
