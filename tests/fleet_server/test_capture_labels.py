"""Labels that join on a device reach the captured rows on the server (issue 15).

Real agents (a real Mosquitto, a real FleetServer over HTTP, capture on with a small
reservoir so some served rows are not captured) serve rows and get their true labels on
the device only: through the local HTTP API (``POST /outcomes``) and the Python API
(``Agent.record_outcomes``), some while the captured rows still wait in the open window,
some after they were uploaded. The export (``fleet dataset export``'s service) must then
hold every captured row with exactly the label the device joined, and no other row.
"""

from __future__ import annotations

import pytest

from fleet_server.telemetry.capture import CaptureService
from tests.bundles import FEATURES
from tests.edge_agent.agent_helpers import wait_until
from tests.fleet_server.fleet_harness import Fleet, inputs

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path, signing_keys, bundles):
    f = Fleet(tmp_path, signing_keys, bundles, versions=("1.0.0",),
              agent={"capture_enabled": True, "capture_features": FEATURES,
                     "capture_rate": 1.0, "capture_max_rows": 25, "capture_window_s": 2.0,
                     "capture_upload_s": 0.2})
    try:
        f.deploy("1.0.0", ("dev0", "dev1"))
        yield f
    finally:
        f.close()


def exported(capture: CaptureService, device: str) -> dict[str, object]:
    return {r["id"]: r["label"] for r in capture.export("sensor", "1.0.0")
            if r["device"] == device}


def test_device_joined_labels_label_the_captured_rows_exactly(fleet) -> None:
    s = fleet.services
    truth: dict[str, dict[str, int]] = {"dev0": {}, "dev1": {}}
    # dev0: labels right after serving (the rows still in the open window's sample)
    rows, y, _ = inputs(60, seed=71)
    served = fleet.http("dev0", "/predict", {"rows": rows})
    ids = [p["id"] for p in served["predictions"]]
    got = fleet.http("dev0", "/outcomes", {"outcomes": [
        {"id": i, "label": int(v)} for i, v in zip(ids, y, strict=True)]})
    assert got["counts"]["joined"] == 60
    truth["dev0"].update(zip(ids, map(int, y), strict=True))
    # dev1: labels once the captured rows are on the server
    rows, y, _ = inputs(60, seed=72)
    ids = [f"late-{k}" for k in range(60)]
    fleet.agents["dev1"].agent.predict(rows, ids=ids)
    wait_until(lambda: len(exported(s.capture, "dev1")) == 25, 30, "dev1's rows captured")
    assert set(exported(s.capture, "dev1").values()) == {None}
    counts = fleet.agents["dev1"].agent.record_outcomes(list(zip(ids, map(int, y),
                                                                 strict=True)))
    assert counts.joined == 60
    truth["dev1"].update(zip(ids, map(int, y), strict=True))

    for device in ("dev0", "dev1"):
        wait_until(lambda d=device: (e := exported(s.capture, d)) and len(e) == 25 and
                   None not in e.values(), 30, f"{device}'s captured rows labelled")
        e = exported(s.capture, device)
        assert e == {i: truth[device][i] for i in e}  # exactly the device's labels
    labelled = list(s.capture.export("sensor", "1.0.0", labelled=True))
    assert len(labelled) == 50
    assert all(r["label"] in (0, 1) and r["predicted"] in (0, 1) for r in labelled)
    # each agent's counters: 25 labels queued (only for rows it captured), none pending
    for device in ("dev0", "dev1"):
        daemon = fleet.agents[device]
        assert daemon.capture is not None and daemon.capture.queue.counter("labels") == 25
