"""Outcome batches over a real Mosquitto to a real agent daemon: each batch applied exactly
once (out of order, duplicated, across a restart), each answered with a receipt, and every
joined outcome counted in exactly one summary."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.config import load_config
from edge_agent.daemon import AgentDaemon
from edgefleet.contract.bundle import read_unverified
from edgefleet.contract.messages import Outcome, Outcomes, Receipt, Summary, encode, topic
from edgefleet.contract.performance import PerformanceSpec, Realized
from fleet_server.telemetry.broker import ACL_TEMPLATE
from tests.broker import SERVER_USER, Mosquitto
from tests.bundles import FEATURES, sensor_data
from tests.edge_agent.agent_helpers import BundleServer, Recorder, wait_until, write_config
from tests.edge_agent.test_daemon import install

pytestmark = pytest.mark.slow

PASSWORDS = {"dev1": "pw-dev1-Oc", SERVER_USER: "pw-server-Rt"}
# the production ACL and the two lines outcome routing adds: the device reads its own
# outcomes and writes its own receipts, the server writes every device's outcomes
ACL = ACL_TEMPLATE.replace(
    "\n# the fleet server's ingest account",
    "pattern read edgefleet/v1/%u/outcomes\npattern write edgefleet/v1/%u/receipt\n"
    "\n# the fleet server's ingest account") + "topic write edgefleet/v1/+/outcomes\n"


@pytest.fixture
def setup(request, tmp_path, signing_keys):
    broker = Mosquitto(acl=ACL)
    request.addfinalizer(broker.cleanup)
    for user, password in PASSWORDS.items():
        broker.add_user(user, password)
    broker.start()
    fleet = Recorder(broker, PASSWORDS[SERVER_USER])
    request.addfinalizer(fleet.stop)
    downloads = BundleServer(PASSWORDS["dev1"])
    request.addfinalizer(downloads.stop)

    def make() -> AgentDaemon:
        path = write_config(tmp_path / "dev1", device="dev1", broker=broker,
                            password=PASSWORDS["dev1"], trust=signing_keys.trust_specs(),
                            server_url=downloads.url, seconds=0.5, http_port=0)
        daemon = AgentDaemon(load_config(path))
        request.addfinalizer(daemon.stop)
        daemon.start()
        wait_until(lambda: daemon.link.connected, 10, "the agent to connect")
        return daemon

    return fleet, downloads, make


def send(fleet: Recorder, batch: int, outcomes: list[tuple[str, object]]) -> None:
    message = Outcomes("dev1", batch, tuple(Outcome(i, label) for i, label in outcomes))
    fleet.client.publish(topic("dev1", "outcomes"), encode(message), qos=1) \
        .wait_for_publish(5)


def receipts(fleet: Recorder) -> list[int]:
    return [r.outcomes for r in fleet.of(Receipt)]


def summaries(fleet: Recorder) -> list[Summary]:
    return list({s.seq: s for s in fleet.of(Summary)}.values())  # a resend counts once


def totals(fleet: Recorder, key: str) -> int:
    return sum(s.errors.get(key, 0) for s in summaries(fleet))


def realized(fleet: Recorder, manifest) -> Realized:
    spec = PerformanceSpec.from_manifest(manifest)
    block = Realized(spec)
    for s in summaries(fleet):
        for entry in s.performance:
            if entry.realized is not None:
                block.merge(Realized.from_wire(spec, entry.realized))
    return block


def test_batches_apply_exactly_once_in_order_across_a_restart(setup, bundles):
    fleet, downloads, make = setup
    daemon = make()
    path = bundles.build("1.0.0")
    manifest = read_unverified(path.read_bytes()).manifest
    install(fleet, daemon, downloads.add(path), 1)
    data = sensor_data(60, seed=5)
    ids = [f"evt-{i}" for i in range(60)]
    truth = data["fault"].astype(int).tolist()
    daemon.agent.predict(data[list(FEATURES)].to_dict("records"), ids=ids)
    labelled = list(zip(ids, truth, strict=True))

    send(fleet, 2, labelled[10:20])  # from the future: ignored, receipted as 0
    wait_until(lambda: 0 in receipts(fleet), 10, "a receipt for nothing applied yet")
    send(fleet, 1, [*labelled[:10], ("evt-0", 1), ("never-served", 0)])
    wait_until(lambda: 1 in receipts(fleet), 10, "the receipt of batch 1")
    send(fleet, 1, labelled[:10])  # a resend of batch 1: receipted again, not applied again
    wait_until(lambda: receipts(fleet).count(1) >= 2, 10, "batch 1 receipted again")
    send(fleet, 2, [*labelled[10:20], ("evt-20", 7)])  # a label outside the classes
    wait_until(lambda: 2 in receipts(fleet), 10, "the receipt of batch 2")
    assert daemon.store.totals.joined == 20

    daemon.stop()
    again = make()  # the same data directory: the applied batch number survives
    wait_until(lambda: receipts(fleet).count(2) >= 2, 10, "a receipt on reconnect")
    send(fleet, 2, labelled[10:20])
    send(fleet, 3, labelled[20:30])
    wait_until(lambda: 3 in receipts(fleet), 10, "the receipt of batch 3")
    assert again.store.applied_batch == 3 and again.store.totals.joined == 10
    assert again.store.totals.duplicate == 0  # batch 2's resend was not applied twice
    health = again.health()
    assert health["outcomes"]["joined"] == 10 and health["outcome_batch"] == 3
    assert health["predictions_stored"] == 60

    wait_until(lambda: again.store.unreported() == 0, 10, "the outcomes to be reported")
    wait_until(lambda: totals(fleet, "outcome_bad_label") == 1, 10, "the counters' summary")
    assert totals(fleet, "outcome_unknown") == 1 and totals(fleet, "outcome_duplicate") == 1
    assert receipts(fleet) == sorted(receipts(fleet)), "receipts never go back"
    # each joined outcome in exactly one summary, and the metrics are those of its rows
    wait_until(lambda: realized(fleet, manifest).n == 30, 10, "30 labelled rows reported")
    answers = again.agent.predict(data[list(FEATURES)].to_dict("records"),
                                  ids=[f"check-{i}" for i in range(60)])
    right = (np.asarray(answers.labels).astype(int)[:30] == np.asarray(truth[:30])).sum()
    assert realized(fleet, manifest).confusion().trace() == right
