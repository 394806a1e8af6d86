"""``edge-agent run`` as a real process, killed with SIGKILL at the worst moments.

- mid-window, with summaries waiting in the outbox: after a restart every one of them is
  delivered (the open window's rows in memory die with the process; the outbox does not);
- mid-install, with the download half done: after a restart the old model is active and
  the install completes from the retained desired state.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edge_agent.outbox import Outbox
from edge_agent.slots import Slots
from edgefleet.contract.messages import Report, Status, Summary, decode
from tests.broker import SERVER_USER, Mosquitto, free_port
from tests.bundles import FEATURES, sensor_data
from tests.edge_agent.agent_helpers import BundleServer, Recorder, wait_until, write_config

pytestmark = pytest.mark.slow

PASSWORDS = {"dev1": "pw-dev1-Kq", SERVER_USER: "pw-server-Vn"}


class AgentProcess:
    def __init__(self, config) -> None:
        self.config = config
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "run", "--config", str(self.config),
             "--log-level", "warning"], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.stderr()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def stderr(self) -> str:
        if self.proc is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read().decode(errors="replace")


@pytest.fixture
def setup(request, tmp_path, signing_keys):
    broker = Mosquitto()
    request.addfinalizer(broker.cleanup)
    for user, password in PASSWORDS.items():
        broker.add_user(user, password)
    broker.start()
    fleet = Recorder(broker, PASSWORDS[SERVER_USER])
    request.addfinalizer(fleet.stop)
    downloads = BundleServer(PASSWORDS["dev1"])
    request.addfinalizer(downloads.stop)
    port = free_port()
    config = write_config(tmp_path / "dev1", device="dev1", broker=broker,
                          password=PASSWORDS["dev1"], trust=signing_keys.trust_specs(),
                          server_url=downloads.url, seconds=0.5, http_port=port,
                          heartbeat_seconds=0.5)
    agent = AgentProcess(config)
    request.addfinalizer(agent.stop)
    return broker, fleet, downloads, agent, port, tmp_path / "dev1" / "data"


def predict(port: int, rows: list[dict]) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/predict", body=json.dumps({"rows": rows}))
        response = conn.getresponse()
        return json.loads(response.read())
    finally:
        conn.close()


def health(port: int) -> dict | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    except OSError:
        return None


def online(fleet: Recorder) -> bool:
    statuses = fleet.of(Status)
    return bool(statuses) and statuses[-1].state == "online"


def test_kill_mid_window_loses_nothing_from_the_outbox(setup, bundles):
    broker, fleet, downloads, agent, port, data_dir = setup
    ref = downloads.add(bundles.build("1.0.0"))
    fleet.desire("dev1", 1, ref)
    agent.start()
    wait_until(lambda: (health(port) or {}).get("bundle") == "sensor@1.0.0", 20,
               f"the agent to install {agent.stderr()}")
    rows = sensor_data(50, seed=4)[list(FEATURES)].to_dict("records")
    broker.stop()  # summaries pile up in the outbox from here on
    for _ in range(6):
        assert predict(port, rows)["bundle"] == "sensor@1.0.0"
        time.sleep(0.4)  # about a window each
    wait_until(lambda: (health(port) or {}).get("outbox_depth", 0) >= 3, 10,
               "summaries waiting in the outbox")
    agent.kill()  # SIGKILL: no clean stop, no last words
    with Outbox(data_dir / "outbox.db") as box:
        waiting = [decode(i.topic, i.payload) for i in box.pending(1000)]
    pending = {m.seq for m in waiting if isinstance(m, Summary)}
    assert len(pending) >= 3
    broker.start()
    agent.start()
    wait_until(lambda: pending <= {s.seq for s in fleet.of(Summary)}, 20,
               "every summary from the outbox")
    wait_until(lambda: (health(port) or {}).get("outbox_depth") == 0, 10, "the outbox to drain")
    seqs = sorted({s.seq for s in fleet.of(Summary)})
    assert seqs == list(range(1, seqs[-1] + 1)), "no sequence number lost"


def test_kill_mid_install_keeps_the_old_model(setup, bundles):
    _broker, fleet, downloads, agent, port, data_dir = setup
    v1 = downloads.add(bundles.build("1.0.0"))
    v2 = downloads.add(bundles.build("1.1.0"))
    fleet.desire("dev1", 1, v1)
    agent.start()
    wait_until(lambda: (health(port) or {}).get("bundle") == "sensor@1.0.0", 20,
               "the first install")
    downloads.stall.set()  # the next download stops half way
    fleet.desire("dev1", 2, v2)
    wait_until(lambda: any(p.endswith("1.1.0/download") for p in downloads.requests), 10,
               "the download to start")
    wait_until(lambda: list((data_dir / "bundles").glob(".tmp-*")), 10, "a half-written file")
    agent.kill()
    state = Slots(data_dir).state  # what a restart sees (and removes the half file)
    assert state.active.version == "1.0.0" and state.revision == 1
    assert not list((data_dir / "bundles").glob(".tmp-*"))
    downloads.stall.clear()
    downloads.release.set()
    agent.start()
    wait_until(lambda: (health(port) or {}).get("bundle") in ("sensor@1.0.0", "sensor@1.1.0"),
               20, "the restarted agent to serve")
    wait_until(lambda: (health(port) or {}).get("bundle") == "sensor@1.1.0", 20,
               "the install to complete from the retained desired state")
    wait_until(lambda: any(r.outcome == "installed" and r.revision == 2
                           for r in fleet.of(Report)), 10, "the installed report")
    assert online(fleet)


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(body))
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_kill_after_outcomes_reports_each_joined_outcome_exactly_once(setup, bundles):
    from edgefleet.contract.bundle import read_unverified
    from edgefleet.contract.performance import PerformanceSpec, Realized

    _broker, fleet, downloads, agent, port, _data_dir = setup
    path = bundles.build("1.0.0")
    spec = PerformanceSpec.from_manifest(read_unverified(path.read_bytes()).manifest)
    fleet.desire("dev1", 1, downloads.add(path))

    def reported() -> int:
        unique = {s.seq: s for s in fleet.of(Summary)}.values()  # a resend counts once
        return sum(Realized.from_wire(spec, e.realized).n for s in unique
                   for e in s.performance if e.realized is not None)

    data = sensor_data(60, seed=6)
    joined = 0
    for round_ in range(4):
        agent.start()
        wait_until(lambda: (health(port) or {}).get("bundle") == "sensor@1.0.0", 20,
                   f"the agent to serve {agent.stderr()}")
        ids = [f"r{round_}-{i}" for i in range(60)]
        status, body = post(port, "/predict", {"rows": data[list(FEATURES)]
                                               .to_dict("records"), "ids": ids})
        assert status == 200 and [p["id"] for p in body["predictions"]] == ids
        outcomes = [{"id": i, "label": int(t)} for i, t in zip(ids[:40], data["fault"],
                                                               strict=False)]
        status, body = post(port, "/outcomes", {"outcomes": outcomes})
        assert status == 200, body
        joined += body["counts"]["joined"]
        if round_ % 2:  # at a window's close or soon before it, whatever the machine's speed
            wait_until(lambda upto=joined - 40: reported() >= upto, 10, "earlier rounds reported")
        agent.kill()  # SIGKILL: joined outcomes may be claimed, stored, or neither
    assert joined == 160
    agent.start()
    wait_until(lambda: reported() >= joined, 20, "every joined outcome in a summary")
    wait_until(lambda: (health(port) or {}).get("outbox_depth") == 0, 10, "the outbox to drain")
    assert reported() == joined, "a joined outcome was reported twice"
