"""Ground truth end to end: real agents, a real Mosquitto, a real FleetServer (issue 14).

Three :class:`~edge_agent.daemon.AgentDaemon`\\ s (per-device broker accounts, their local
HTTP API on, bundles downloaded from the server and verified) serve real rows; true labels
come back by every route: the device's ``POST /outcomes``, ``Agent.record_outcomes``, and
``fleet outcomes upload`` through the CLI against the server, which routes them over MQTT to
the devices. What the server then reports (``GET /api/v1/performance``, ``fleet
performance --json``) is compared with scikit-learn on exactly the rows that were labelled,
per bundle and device, from a ledger this module keeps of every prediction and label.

One fleet serves the module and the tests run in file order, each adding to the ledger:
every route on ``sensor@1.0.0``; outcomes that arrive after a switch to ``2.0.0`` counted
for the bundle that predicted; a device stopped while its outcomes are uploaded getting
them on restart, once; a running agent cut off by a broker outage getting them when the
broker is back; and concept drift on ``3.0.0`` (labels flipped where the
temperature is high, inputs as in training) that raises ``performance_drop`` and calls the
webhook while the drift monitors, which only see inputs and outputs, stay quiet.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from fleet_server.cli.main import main as fleet_cli
from fleet_server.models import FLEET_SCOPE
from fleet_server.monitoring.evaluator import Evaluator
from fleet_server.monitoring.performance import PerformanceWatch
from tests.edge_agent.agent_helpers import wait_until
from tests.fleet_server.fleet_harness import DEVICES, Fleet, assert_equals_sklearn, inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, signing_keys, bundles):
    f = Fleet(tmp_path_factory.mktemp("ground-truth-e2e"), signing_keys, bundles)
    try:
        f.deploy("1.0.0")
        yield f
    finally:
        f.close()


def test_outcomes_by_every_route_give_sklearns_metrics(fleet):
    # dev0: the local HTTP API, the agent's own ids
    rows0, truth0, _ = inputs(200, seed=101)
    served = fleet.http("dev0", "/predict", {"rows": rows0})
    assert served["bundle"] == "sensor@1.0.0"
    ids0 = [p["id"] for p in served["predictions"]]
    assert len(set(ids0)) == 200 and all(ids0)
    pred0 = [p["label"] for p in served["predictions"]]
    got = fleet.http("dev0", "/outcomes", {"outcomes": [
        {"id": i, "label": int(y)} for i, y in zip(ids0[:150], truth0[:150], strict=True)]})
    assert got["counts"]["joined"] == 150
    fleet.label("1.0.0", "dev0", truth0[:150], pred0[:150])

    # dev1: the Python API, the caller's own ids (an event id from the app's world)
    rows1, truth1, _ = inputs(220, seed=102)
    ids1 = [f"evt-{k:04d}" for k in range(220)]
    result = fleet.agents["dev1"].agent.predict(rows1, ids=ids1)
    assert result.bundle == "sensor@1.0.0" and list(result.ids) == ids1
    counts = fleet.agents["dev1"].agent.record_outcomes(
        list(zip(ids1[20:180], truth1[20:180].tolist(), strict=True)))
    assert counts.joined == 160
    fleet.label("1.0.0", "dev1", truth1[20:180], result.labels[20:180])

    # dev2: labels uploaded centrally, routed to the device over MQTT
    rows2, truth2, _ = inputs(240, seed=103)
    result = fleet.agents["dev2"].agent.predict(rows2)
    ids2 = list(result.ids)
    assert len(set(ids2)) == 240
    fleet.upload([("dev2", i, int(y)) for i, y in zip(ids2[40:210], truth2[40:210],
                                                       strict=True)])
    wait_until(lambda: fleet.receipted("dev2") == 170, 30, "dev2's outcomes receipted")
    fleet.label("1.0.0", "dev2", truth2[40:210], result.labels[40:210])

    report = fleet.reported("1.0.0", 480)
    assert report["total"]["devices"] == 3
    assert_equals_sklearn(report, *fleet.rows("1.0.0"))
    for device, n in (("dev0", 150), ("dev1", 160), ("dev2", 170)):
        assert_equals_sklearn(fleet.reported("1.0.0", n, device),
                              *fleet.rows("1.0.0", (device,)))
    # the CLI shows the server's numbers
    shown = CliRunner().invoke(fleet_cli, ["performance", "sensor@1.0.0", "--since", "1h",
                                           "--json"],
                               env={"FLEET_SERVER": fleet.url, "FLEET_TOKEN": fleet.viewer})
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["total"]["realized"] == report["total"]["realized"]


def test_outcomes_after_a_switch_count_for_the_bundle_that_predicted(fleet):
    agent = lambda: fleet.agents["dev1"].agent  # noqa: E731 (the daemon keeps its Agent)
    rows_a, truth_a, _ = inputs(200, seed=201)
    ids_a = [f"sw-a-{k}" for k in range(200)]
    before = agent().predict(rows_a, ids=ids_a)
    assert before.bundle == "sensor@1.0.0"
    fleet.deploy("2.0.0", ("dev1",))
    rows_b, truth_b, _ = inputs(120, seed=202)
    ids_b = [f"sw-b-{k}" for k in range(120)]
    after = agent().predict(rows_b, ids=ids_b)
    assert after.bundle == "sensor@2.0.0"
    # labels for the old bundle's rows arrive now, centrally and on the device
    fleet.upload([("dev1", i, int(y)) for i, y in zip(ids_a[:100], truth_a[:100],
                                                      strict=True)])
    counts = agent().record_outcomes(
        list(zip(ids_a[100:] + ids_b, [*truth_a[100:].tolist(), *truth_b.tolist()],
                 strict=True)))
    assert counts.joined == 220
    fleet.label("1.0.0", "dev1", truth_a, before.labels)
    fleet.label("2.0.0", "dev1", truth_b, after.labels)
    wait_until(lambda: fleet.receipted("dev1") == 100, 30, "dev1's outcomes receipted")

    old = fleet.reported("1.0.0", 160 + 200, "dev1")
    assert_equals_sklearn(old, *fleet.rows("1.0.0", ("dev1",)))
    new = fleet.reported("2.0.0", 120, "dev1")
    assert_equals_sklearn(new, *fleet.rows("2.0.0", ("dev1",)))
    assert_equals_sklearn(fleet.reported("1.0.0", 480 + 200), *fleet.rows("1.0.0"))


def test_a_device_offline_during_the_upload_gets_its_outcomes_on_restart_once(fleet):
    rows, truth, _ = inputs(300, seed=301)
    ids = [f"off-{k}" for k in range(300)]
    result = fleet.agents["dev2"].agent.predict(rows, ids=ids)
    assert result.bundle == "sensor@1.0.0"
    before = fleet.receipted("dev2")
    fleet.stop_agent("dev2")
    s = fleet.services
    wait_until(lambda: not s.registry.get("dev2").online, 20, "dev2 to be offline")
    fleet.upload([("dev2", i, int(y)) for i, y in zip(ids, truth, strict=True)])
    status = s.outcomes.status("dev2")[0]
    assert (status.queued + status.sent, status.receipted) == (300, before)
    fleet.label("1.0.0", "dev2", truth, result.labels)
    daemon = fleet.start_agent("dev2")  # the same data directory: its prediction store
    wait_until(lambda: fleet.receipted("dev2") == before + 300, 60,
               "dev2's outcomes receipted after its restart")
    assert daemon.store.totals.joined == 300 and daemon.store.totals.duplicate == 0
    assert daemon.store.totals.unknown == 0
    report = fleet.reported("1.0.0", 170 + 300, "dev2")
    assert_equals_sklearn(report, *fleet.rows("1.0.0", ("dev2",)))


def test_outcomes_uploaded_while_the_broker_is_down_arrive_once_it_is_back(fleet):
    """The agents keep running; every connection to the broker is gone while the labels
    are uploaded (the server takes them over HTTP and queues them)."""
    rows, truth, _ = inputs(250, seed=351)
    ids = [f"down-{k}" for k in range(250)]
    result = fleet.agents["dev0"].agent.predict(rows, ids=ids)
    assert result.bundle == "sensor@1.0.0"
    before = fleet.receipted("dev0")
    fleet.broker.stop()
    try:
        wait_until(lambda: not fleet.server.link.connected and not any(
            a.link.connected for a in fleet.agents.values()), 20, "every link to drop")
        fleet.upload([("dev0", i, int(y)) for i, y in zip(ids, truth, strict=True)])
    finally:
        fleet.broker.start()
    fleet.label("1.0.0", "dev0", truth, result.labels)
    wait_until(lambda: fleet.receipted("dev0") == before + 250, 60,
               "dev0's outcomes receipted after the broker came back")
    report = fleet.reported("1.0.0", 150 + 250, "dev0")
    assert_equals_sklearn(report, *fleet.rows("1.0.0", ("dev0",)))


def test_concept_drift_raises_performance_drop_and_the_drift_monitors_stay_quiet(fleet):
    fleet.deploy("3.0.0")
    s = fleet.services
    served = 0
    for k, device in enumerate(DEVICES):
        rows, truth, frame = inputs(1500, seed=401 + k)
        # the world changed where it is hot: the labels flip there, the inputs do not move
        truth = np.where(frame["temperature"].to_numpy() > 60.0, 1 - truth, truth)
        ids = [f"cd-{k}-{j}" for j in range(1500)]
        result = fleet.agents[device].agent.predict(rows, ids=ids)
        assert result.bundle == "sensor@3.0.0"
        pairs = list(zip(ids, truth.tolist(), strict=True))
        if device == "dev0":
            for lo in range(0, 1500, 500):
                fleet.http("dev0", "/outcomes", {"outcomes": [
                    {"id": i, "label": y} for i, y in pairs[lo:lo + 500]]})
        elif device == "dev1":
            assert fleet.agents["dev1"].agent.record_outcomes(pairs).joined == 1500
        else:
            fleet.upload([(device, i, y) for i, y in pairs])
        fleet.label("3.0.0", device, truth, result.labels)
        served += 1500
    report = fleet.reported("3.0.0", served)
    assert_equals_sklearn(report, *fleet.rows("3.0.0"))
    realized = report["total"]["realized"]["accuracy"]
    estimated = report["total"]["estimated"]["accuracy"]
    expected = report["expected"]["accuracy"]["value"]
    assert realized["high"] < expected - 0.05  # the labels say the model is wrong ...
    assert estimated["value"] > expected - 0.05  # ... its confidences cannot see it

    raised = PerformanceWatch(s.performance, s.alerts).evaluate(time.time())
    assert ("sensor@3.0.0", FLEET_SCOPE, "performance_drop") in raised
    assert ("sensor@3.0.0", "all", "performance_drop") in raised
    assert not [r for r in raised if r[2] == "estimated_performance_drop"], raised
    assert not [r for r in raised if r[0] != "sensor@3.0.0"], raised

    def hooked() -> list[dict]:
        return [b["alert"] for b, _ in fleet.hook.bodies
                if b["alert"]["kind"] == "performance_drop"]

    wait_until(lambda: len(hooked()) >= 2, 30, "the webhook to be called")
    sent = hooked()
    assert {a["bundle"] for a in sent} == {"sensor@3.0.0"}
    assert sent[0]["details"]["side"] == "realized"
    assert sent[0]["details"]["metric"] == "accuracy"

    # the drift monitors judge inputs and outputs only: as in training, so no alert. Every
    # window with data is judged now (``now`` a minute past the last one closes it).
    windows = Evaluator(s.store, s.bundles, s.registry, s.alerts, s.config.drift,
                        s.config.ingest_config).evaluate(time.time() + 2 * s.config.drift.window_s)
    mine = [w for w in windows if w.bundle == "sensor@3.0.0" and w.scope == FLEET_SCOPE]
    assert sum(w.rows for w in mine) == served
    assert not [w for w in windows if w.verdict == "drift"], \
        [(w.bundle, w.scope, w.features) for w in windows if w.verdict == "drift"]
    assert any(w.verdict == "ok" and w.rows >= 1500 for w in mine), mine
    assert s.store.list_alerts(kind="drift") == []
    assert s.store.list_alerts(kind="suspect_sensor") == []
