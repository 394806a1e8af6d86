"""Data capture per group, end to end (issue 15): a real Mosquitto, the server over HTTP and
real agents (onnxruntime, the durable queue). `fleet group update --capture ...` reaches the
devices through their desired states; rows arrive in `fleet dataset export` while it is on,
with only the group's features, and none once it is off again.
"""

from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from edgefleet.contract.messages import CapturePolicy
from fleet_server.cli.main import main as fleet_cli
from tests.bundles import FEATURES
from tests.edge_agent.agent_helpers import wait_until
from tests.fleet_server.fleet_harness import DEVICES, Fleet, inputs


@pytest.fixture
def fleet(tmp_path, signing_keys, bundles):
    # every device's own config captures every row of every input: the group narrows it
    fleet = Fleet(tmp_path, signing_keys, bundles, versions=("1.0.0",),
                  agent={"capture_enabled": True, "capture_features": FEATURES,
                         "capture_rate": 1.0, "capture_max_rows": 5000,
                         "capture_window_s": 0.5, "capture_upload_s": 0.2})
    try:
        yield fleet
    finally:
        fleet.close()


def _fleet(fleet: Fleet, *args: str) -> str:
    done = CliRunner().invoke(fleet_cli, [*args, "--server", fleet.url,
                                          "--token", fleet.operator])
    assert done.exit_code == 0, done.output
    return done.output


def _exported(fleet: Fleet) -> list[dict[str, str]]:
    out = fleet.tmp / "fresh.csv"
    _fleet(fleet, "dataset", "export", "sensor@1.0.0", "--group", "all", "--since", "1d",
           "--out", str(out))
    with out.open() as fh:
        return list(csv.DictReader(fh))


def _serve(fleet: Fleet, n: int, seed: int) -> set[tuple[str, str]]:
    """``n`` rows on every device through its local API; the (device, id) of each."""
    rows, _, _ = inputs(n, seed)
    served = set()
    for d in DEVICES:
        answer = fleet.http(d, "/predict", {"rows": rows})
        served |= {(d, p["id"]) for p in answer["predictions"]}
    for d in DEVICES:  # profiled, so offered to capture (or not)
        assert fleet.agents[d].agent.wait_idle(30)
    return served


def _policy_on_every_device(fleet: Fleet, policy: CapturePolicy | None) -> None:
    wait_until(lambda: all(fleet.agents[d].capture.policy == policy for d in DEVICES), 30,
               f"every agent to apply {policy}")


def test_a_groups_capture_turns_on_and_off_through_the_desired_state(fleet):
    fleet.deploy("1.0.0")
    # off for the group: the devices' own "yes" is bounded by it, nothing is sampled
    assert "capture off" in _fleet(fleet, "group", "update", "all", "--capture", "off")
    _policy_on_every_device(fleet, CapturePolicy(False))
    _serve(fleet, 40, seed=1)
    for d in DEVICES:
        capture = fleet.agents[d].capture
        assert capture.roll(force=True) == 0 and capture.queue.counter("sampled") == 0
    assert _exported(fleet) == []

    # on, with an allowlist of two inputs: every served row (rate 1), two features only
    _fleet(fleet, "group", "update", "all", "--capture-rate", "1", "--capture-cap", "1000",
           "--capture-features", "temperature,vibration")
    on = CapturePolicy(True, 1.0, 1000, ("temperature", "vibration"))
    _policy_on_every_device(fleet, on)
    assert "rate 1, at most 1000 rows a window" in _fleet(fleet, "group", "show", "all")
    served = _serve(fleet, 60, seed=2)
    wait_until(lambda: len(_exported(fleet)) >= len(served), 60,
               "the captured rows in the export")
    rows = _exported(fleet)
    assert {(r["device"], r["id"]) for r in rows} == served  # each once, none other
    assert list(rows[0]) == ["device", "id", "time", "temperature", "vibration", "predicted",
                             "label"]

    # off again: stops at once; nothing more reaches the server
    _fleet(fleet, "group", "update", "all", "--capture", "off")
    _policy_on_every_device(fleet, CapturePolicy(False))
    sampled = {d: fleet.agents[d].capture.queue.counter("sampled") for d in DEVICES}
    _serve(fleet, 50, seed=3)
    for d in DEVICES:
        capture = fleet.agents[d].capture
        assert capture.roll(force=True) == 0
        assert capture.queue.counter("sampled") == sampled[d]
        wait_until(lambda c=capture: c.queue.depth() == 0, 30, f"{d}'s queue to drain")
    assert {(r["device"], r["id"]) for r in _exported(fleet)} == served
    # the devices' desired states carried it: each change a revision of its own
    state = fleet.services.desired.get("dev0")
    assert state.capture == CapturePolicy(False) and state.bundle.version == "1.0.0"
