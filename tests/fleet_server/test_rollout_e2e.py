"""Rollouts end to end: real Mosquitto (per-device accounts), a real FleetServer with its
rollout engine ticking every 0.3 s, five real AgentDaemons downloading, verifying,
smoke-testing and serving real bundles, their summaries judged by the real gates.

One fleet serves the whole module, and the tests run in file order, each starting from
what the previous left (every agent on one bundle): the first rollout to fresh devices,
a passing upgrade, a bundle whose smoke test fails, a bundle whose predictions disagree
with the control, a device offline during a rollout, the approval rule, a restart, and
two ``--shadow-first`` rollouts judged by the shadow's accuracy paired with the live
model's on labelled rows (one worse, stopped; one as good, passed). What runs is checked
on the agents themselves, not only in the server's view.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.daemon import AgentDaemon
from fleet_server.cli.client import ClientError, FleetClient
from fleet_server.server import FleetServer
from fleet_server.services import build_services
from tests.broker import SERVER_USER, Mosquitto
from tests.bundles import FEATURES, sensor_data
from tests.edge_agent.agent_helpers import wait_until, write_config
from tests.fleet_server.conftest import SERVER_PASSWORD, make_config
from tests.fleet_server.rollout_helpers import approved_bundle

pytestmark = pytest.mark.slow
DEVICES = tuple(f"dev{i}" for i in range(5))
# distinct rows, more than a stage window serves: a cycled handful would repeat rows inside
# one window, and duplicates are not the independent sample the drift statistics assume
DATA = sensor_data(4000, seed=21)
ROWS = DATA[list(FEATURES)].to_dict("records")
LABELS = DATA["fault"].astype(int).tolist()
# The input-drift gates are on with their defaults: a canary stage of a few hundred rows
# used to trip the one-feature importance rule on noise (one run in two to ten); the drift
# statistics now judge each feature against its no-drift bound at the stage's size
# (test_gate_noise.py measures the rate)
GATES = {"min_canary_predictions": 150, "min_control_predictions": 150,
         "min_healthy_predictions": 20, "max_wait_s": 20, "max_latency_p95_ratio": 10.0}
STAGES = [{"fraction": 0.4, "min_devices": 2, "soak_s": 1.5},
          {"fraction": 1.0, "min_devices": 1, "soak_s": 1.0}]


class Fleet:
    def __init__(self, tmp: Path, keys, bundles) -> None:
        self.tmp = tmp
        self.keys = keys
        config = make_config(tmp, keys)
        s = build_services(config)
        now = time.time()
        self.secrets = {d: s.registry.add_device(d, {"site": "test"}, "test", now)[1].secret
                        for d in DEVICES}
        paths = [bundles.build("1.0.0"), bundles.build("1.1.0"), bundles.broken_smoke("1.2.0"),
                 bundles.build("1.3.0", model="inverted"), bundles.build("1.4.0"),
                 bundles.build("1.5.0"), approved_bundle(bundles, keys, "2.0.0", tmp),
                 bundles.build("2.1.0"), bundles.build("2.2.0")]
        for path in paths:
            s.bundles.upload(path.read_bytes(), "test", now)
        s.registry.create_group("all", {"site": "test"}, "test", now)
        s.registry.create_group("secure", {"line": "1"}, "test", now, requires_approval=True)
        self.operator = s.auth.create_token("ops", "operator", "test", now).secret
        self.approver = s.auth.create_token("boss", "approver", "test", now).secret
        users = s.store.mosquitto_users()
        s.close()
        self.broker = Mosquitto()
        self.broker.add_user(SERVER_USER, SERVER_PASSWORD)
        for device, hashed in users:
            self.broker.add_hashed_user(device, hashed)
        self.broker.start()
        self.server = FleetServer(replace(make_config(tmp, keys, broker=self.broker),
                                          rollout_tick_s=0.3))
        self.server.start()
        self.url = self.server.start_http()
        wait_until(lambda: self.server.link.connected, 10, "the server to connect")
        self.ops = FleetClient(self.url, self.operator)
        self.boss = FleetClient(self.url, self.approver)
        self.agents: dict[str, AgentDaemon] = {}
        for d in DEVICES:
            self.start_agent(d)
        self._stop = threading.Event()
        self._feeder = threading.Thread(target=self._feed, name="feed", daemon=True)
        self._feeder.start()

    def start_agent(self, device: str) -> None:
        path = write_config(self.tmp / device, device=device, broker=self.broker,
                            password=self.secrets[device], trust=self.keys.trust_specs(),
                            server_url=self.url, seconds=0.5, rows=500, heartbeat_seconds=1,
                            http_port=0)
        daemon = AgentDaemon(load_config(path))
        daemon.start()
        self.agents[device] = daemon

    def restart_server(self) -> None:
        """Stop the server (engine, ingest, HTTP) and start a new one on the same database,
        broker and HTTP port: what an operator's restart or a crash and its restart do."""
        port = int(self.url.rsplit(":", 1)[1])
        self.server.stop()
        self.server = FleetServer(replace(make_config(self.tmp, self.keys, broker=self.broker),
                                          rollout_tick_s=0.3))
        self.server.start()
        assert self.server.start_http(port=port) == self.url
        wait_until(lambda: self.server.link.connected, 10, "the new server to connect")

    def stop_agent(self, device: str) -> None:
        self.agents.pop(device).stop(flush_timeout=1.0)

    def _feed(self) -> None:
        """The local apps: every running agent serves 5 rows every 20 ms, each its own rows
        (the same rows on every device would repeat each row in a stage's merged sample,
        which the drift statistics read as a sample twice as large as it is)."""
        k = 0
        while not self._stop.wait(0.02):
            for j, daemon in enumerate(list(self.agents.values())):
                with contextlib.suppress(Exception):  # no model yet, or stopping
                    daemon.agent.predict([ROWS[(k + i + 797 * j) % len(ROWS)]
                                          for i in range(5)])
            k += 5

    def running(self, device: str) -> str | None:
        model = self.agents[device].agent.model
        return None if model is None else model.ref.version

    def versions(self) -> dict[str, str | None]:
        return {d: self.running(d) for d in sorted(self.agents)}

    def rollout(self, version: str, *, client: FleetClient | None = None, **extra) -> dict:
        body = {"bundle": f"sensor@{version}", "group": "all", "stages": STAGES,
                "gates": GATES, "install_timeout_s": 20, "start": True, **extra}
        return (client or self.ops).post("/api/v1/rollouts", body)

    def finished(self, rollout_id: str, timeout: float = 30.0) -> dict:
        found: dict = {}

        def done() -> bool:
            found.update(self.ops.get(f"/api/v1/rollouts/{rollout_id}"))
            return found["status"] in ("completed", "aborted")

        wait_until(done, timeout, f"rollout {rollout_id} to finish")
        return found

    def close(self) -> None:
        self._stop.set()
        self._feeder.join(5)
        for daemon in self.agents.values():
            daemon.stop(flush_timeout=0.5)
        self.ops.close()
        self.boss.close()
        self.server.stop()
        self.broker.cleanup()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, signing_keys, bundles):
    f = Fleet(tmp_path_factory.mktemp("rollout-e2e"), signing_keys, bundles)
    yield f
    f.close()


def _gates(detail: dict) -> dict[str, dict]:
    return {g["name"]: g for g in detail["gate_results"]}


def test_the_first_rollout_to_fresh_devices_completes(fleet):
    assert set(fleet.versions().values()) == {None}
    created = fleet.rollout("1.0.0", id="first")
    assert created["status"] == "running"
    detail = fleet.finished("first")
    assert detail["status"] == "completed", detail["audit"][-1]
    assert [e["action"] for e in detail["audit"]] == ["create", "start", "promote", "promote"]
    stage0 = detail["audit"][2]["numbers"]
    assert stage0["controls"] == 0  # nobody ran a bundle: no control, comparative gates skip
    skipped = {g["name"] for g in stage0["gates"] if g["outcome"] == "skip"}
    assert {"control_sample", "prediction_psi", "prediction_js"} <= skipped
    wait_until(lambda: set(fleet.versions().values()) == {"1.0.0"}, 20, "every agent on 1.0.0")


def test_a_passing_rollout_completes_and_every_device_runs_the_new_bundle(fleet):
    detail = fleet.rollout("1.1.0", id="upgrade")
    canaries = {d["device"] for d in detail["devices"] if d["role"] == "canary"}
    assert len(canaries) == 2
    detail = fleet.finished("upgrade")
    assert detail["status"] == "completed", detail["audit"][-1]
    stage0 = detail["audit"][2]
    assert stage0["action"] == "promote" and stage0["numbers"]["controls"] == 3
    gates = {g["name"]: g for g in stage0["numbers"]["gates"]}
    assert gates["prediction_js"]["outcome"] == "pass"
    assert gates["sample"]["value"] >= 150 and gates["control_sample"]["value"] >= 150
    wait_until(lambda: set(fleet.versions().values()) == {"1.1.0"}, 20, "every agent on 1.1.0")
    assert all(d["role"] == "complete" and d["running"] == "sensor@1.1.0"
               for d in fleet.ops.get("/api/v1/rollouts/upgrade")["devices"])


def test_a_bundle_that_fails_its_smoke_test_is_aborted(fleet):
    detail = fleet.rollout("1.2.0", id="broken")
    canaries = sorted(d["device"] for d in detail["devices"] if d["role"] == "canary")
    detail = fleet.finished("broken")
    assert detail["status"] == "aborted"
    assert _gates(detail)["install_failures"]["outcome"] == "fail"
    assert "install_failures" in detail["audit"][-1]["reason"]
    roles = {d["device"]: d["role"] for d in detail["devices"]}
    assert [d for d, r in roles.items() if r == "rollback"] == canaries
    # the agents kept (or went back to) the previous bundle, and are told to stay there
    assert fleet.versions() == dict.fromkeys(DEVICES, "1.1.0")
    s = fleet.server.services
    assert {s.desired.get(d).bundle.version for d in canaries} == {"1.1.0"}
    time.sleep(0.5)  # a few ticks later nothing has moved
    assert fleet.versions() == dict.fromkeys(DEVICES, "1.1.0")


def test_predictions_that_disagree_with_the_control_abort_and_roll_back(fleet):
    detail = fleet.rollout("1.3.0", id="inverted")
    canaries = sorted(d["device"] for d in detail["devices"] if d["role"] == "canary")
    wait_until(lambda: all(fleet.running(d) == "1.3.0" for d in canaries), 20,
               "the canaries to install the inverted bundle")
    detail = fleet.finished("inverted")
    assert detail["status"] == "aborted", detail["audit"][-1]
    failed = {g["name"] for g in detail["gate_results"] if g["outcome"] == "fail"}
    assert failed & {"prediction_psi", "prediction_js"}, detail["gate_results"]
    assert "install_failures" not in failed
    wait_until(lambda: fleet.versions() == dict.fromkeys(DEVICES, "1.1.0"), 20,
               "the canaries to roll back to 1.1.0")


def test_an_offline_device_catches_up_on_reconnect(fleet):
    fleet.stop_agent("dev4")
    s = fleet.server.services
    wait_until(lambda: not s.registry.get("dev4").online, 10, "dev4 to be offline")
    # one stage: every device at once; the offline one holds the healthy-devices gate
    # max_wait_s well past the test's own waits: on a loaded machine the online devices'
    # installs alone can take most of the default 20 s, and the stage must still be waiting
    fleet.rollout("1.4.0", id="catch-up", stages=[{"fraction": 1.0, "soak_s": 1.0}],
                  install_timeout_s=60, gates={**GATES, "max_wait_s": 120})
    others = [d for d in DEVICES if d != "dev4"]
    wait_until(lambda: all(fleet.running(d) == "1.4.0" for d in others), 20,
               "the online devices to install 1.4.0")
    time.sleep(2.0)  # well past the soak: still waiting for dev4
    detail = fleet.ops.get("/api/v1/rollouts/catch-up")
    assert detail["status"] == "running"
    assert _gates(detail)["healthy_devices"]["outcome"] == "wait"
    row = next(d for d in detail["devices"] if d["device"] == "dev4")
    assert row == {"device": "dev4", "role": "canary", "stage": 0, "phase": "pending",
                   "running": "sensor@1.1.0", "online": False}
    fleet.start_agent("dev4")  # the retained desired state is waiting on the broker
    wait_until(lambda: fleet.running("dev4") == "1.4.0", 20, "dev4 to catch up")
    assert fleet.finished("catch-up")["status"] == "completed"
    assert fleet.versions() == dict.fromkeys(DEVICES, "1.4.0")


def test_the_approval_rule(fleet):
    # a bundle signed by the build key only: no approver can approve it
    refused = fleet.rollout("1.5.0", id="unsigned", group="secure")
    assert refused["status"] == "pending_approval"
    with pytest.raises(ClientError) as err:
        fleet.boss.post("/api/v1/rollouts/unsigned/approve", {})
    assert err.value.status == 403 and err.value.kind == "ApprovalRequiredError"
    fleet.ops.post("/api/v1/rollouts/unsigned/abort", {"reason": "not approved"})
    # signed by an approver key too: an approver approves, then it runs
    created = fleet.rollout("2.0.0", id="approved", group="secure")
    assert created["status"] == "pending_approval"
    time.sleep(0.6)  # two ticks: nothing is assigned before approval
    assert fleet.versions() == dict.fromkeys(DEVICES, "1.4.0")
    with pytest.raises(ClientError) as err:
        fleet.ops.post("/api/v1/rollouts/approved/start", {})
    assert err.value.status == 403
    with pytest.raises(ClientError) as err:
        fleet.ops.post("/api/v1/rollouts/approved/approve", {})
    assert err.value.status == 403 and err.value.kind == "ActorNotAllowedError"
    assert fleet.boss.post("/api/v1/rollouts/approved/approve", {})["status"] == "ready"
    assert fleet.ops.post("/api/v1/rollouts/approved/start", {})["status"] == "running"
    detail = fleet.finished("approved")
    assert detail["status"] == "completed", detail["audit"][-1]
    assert [e["actor"] for e in detail["audit"][:3]] == ["operator:ops", "operator:boss",
                                                         "operator:ops"]
    wait_until(lambda: fleet.versions() == dict.fromkeys(DEVICES, "2.0.0"), 20,
               "every agent on 2.0.0")


def test_a_staged_rollout_resumes_across_a_server_restart(fleet):
    """The server goes away in the middle of a stage (its engine, ingest and HTTP stop) and a
    new one starts on the same database: the rollout resumes where it stood, completes, and
    applies each transition once; every device ends on the new bundle."""
    detail = fleet.rollout("2.1.0", id="across", gates={**GATES, "max_wait_s": 120},
                           stages=[{"fraction": 0.4, "min_devices": 2, "soak_s": 3.0},
                                   {"fraction": 1.0, "min_devices": 1, "soak_s": 1.0}])
    canaries = sorted(d["device"] for d in detail["devices"] if d["role"] == "canary")
    assert len(canaries) == 2
    wait_until(lambda: all(fleet.running(d) == "2.1.0" for d in canaries), 30,
               "the canaries to install 2.1.0")
    before = fleet.ops.get("/api/v1/rollouts/across")
    assert (before["status"], before["stage"]) == ("running", 0)
    fleet.restart_server()
    detail = fleet.finished("across", timeout=60)
    assert detail["status"] == "completed", detail["audit"][-1]
    assert [e["action"] for e in detail["audit"]] == ["create", "start", "promote", "promote"]
    assert [e["stage"] for e in detail["audit"]] == [0, 0, 0, 1]
    wait_until(lambda: fleet.versions() == dict.fromkeys(DEVICES, "2.1.0"), 30,
               "every agent on 2.1.0")


def _label_shadowed_rows(fleet, version: str, per_device: int = 120) -> list[str]:
    """On each device that runs ``version`` as its shadow: serve labelled rows with ids
    of our own and return their outcomes through the Python route, as a local app would."""
    shadowed: list[str] = []

    def ready() -> bool:
        shadowed[:] = [d for d, a in fleet.agents.items()
                       if a.agent.shadow is not None and a.agent.shadow.ref.version == version]
        return len(shadowed) == 2
    wait_until(ready, 30, f"two agents to run {version} as their shadow")
    for j, device in enumerate(shadowed):
        agent = fleet.agents[device].agent
        start = 1000 * j
        ids = [f"paired-{version}-{device}-{i}" for i in range(per_device)]
        agent.predict(ROWS[start:start + per_device], ids=ids)
        counts = agent.record_outcomes(list(zip(ids, LABELS[start:start + per_device],
                                                strict=True)))
        assert counts.joined == per_device
    return shadowed


def test_a_shadow_worse_on_the_same_labelled_rows_is_stopped_by_the_paired_gate(fleet):
    """A candidate that gets the labelled rows wrong (trained on the inverted target) runs
    as a shadow; agreement is switched off so the paired accuracy gate alone must stop it:
    outcomes for rows the shadow answered come back, the agents count McNemar's table, and
    the server's shadow gate aborts the rollout before any device serves the candidate."""
    detail = fleet.rollout("1.3.0", id="paired-bad", shadow_first=True, shadow_soak_s=8.0,
                           gates={**GATES, "min_shadow_agreement": None, "min_labels": 100,
                                  "max_wait_s": 60})
    assert detail["status"] == "shadow"
    shadowed = _label_shadowed_rows(fleet, "1.3.0")
    detail = fleet.finished("paired-bad", timeout=60)
    assert detail["status"] == "aborted", detail["audit"][-1]
    assert "shadow_accuracy" in detail["audit"][-1]["reason"]
    result = _gates(detail)["shadow_accuracy"]
    assert result["outcome"] == "fail" and result["value"] < 0.3, result
    assert result["threshold"] > 0.6 and "McNemar" in result["reason"], result
    wait_until(lambda: all(fleet.agents[d].agent.shadow is None for d in shadowed), 30,
               "the shadows to stop")
    assert fleet.versions() == dict.fromkeys(DEVICES, "2.1.0")


def test_a_shadow_as_good_on_the_same_labelled_rows_passes_the_paired_gate(fleet):
    """The same model as the live one (another version): every labelled row is a
    concordant pair, the paired gate passes on them, and the rollout goes on to complete."""
    detail = fleet.rollout("2.2.0", id="paired-good", shadow_first=True, shadow_soak_s=120.0,
                           gates={**GATES, "min_labels": 100, "max_wait_s": 60})
    assert detail["status"] == "shadow"
    _label_shadowed_rows(fleet, "2.2.0")
    found: dict = {}

    def judged() -> bool:
        found.update(_gates(fleet.ops.get("/api/v1/rollouts/paired-good")))
        gate = found.get("shadow_accuracy", {})
        return gate.get("outcome") == "pass" and "240 paired rows" in gate.get("reason", "")
    wait_until(judged, 30, "the paired gate to pass on the labelled rows")
    assert "0 only the shadow got right, 0 only the live model" in \
        found["shadow_accuracy"]["reason"]
    fleet.ops.post("/api/v1/rollouts/paired-good/promote", {})  # no need to sit the soak out
    detail = fleet.finished("paired-good", timeout=60)
    assert detail["status"] == "completed", detail["audit"][-1]
    wait_until(lambda: fleet.versions() == dict.fromkeys(DEVICES, "2.2.0"), 30,
               "every agent on 2.2.0")
