"""The retraining loop end to end (issue 15): a real Mosquitto, a real FleetServer, three
real agents capturing what they serve, and ``edgepack retrain --watch`` as a subprocess.

The labelling rule changes on the devices (concept drift: a fault is now whatever the
humidity says, which the champion ``sensor@1.0.0`` never looked at) → the labels come back
(``fleet outcomes upload``) and label the captured rows on the server and, routed over
MQTT, the predictions on the devices → realized accuracy falls → the server's evaluator
raises ``performance_drop`` → the watcher, which polls for it, retrains on the fleet's
exported labelled rows (``[data] source = "fleet"``) → the challenger beats the champion on
the newest held-out rows → it is uploaded and rolled out in stages → the gates pass on the
canaries against the controls, with labels → every device runs it → its realized accuracy
is back (asserted against scikit-learn on the ledger of labelled rows). Then the negative
path: a recipe whose challenger loses deploys nothing, and its run says why.

Small data, a 1-s drift window, 0.2-s rollout ticks, 1-s soaks: about a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from fleet_server.config import DriftConfig, IngestConfig
from fleet_server.models import FLEET_SCOPE
from packager.cli import main as edgepack
from tests.bundles import FEATURES
from tests.edge_agent.agent_helpers import wait_until
from tests.fleet_server.fleet_harness import DEVICES, Fleet, assert_equals_sklearn, inputs

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SERVED = 400  # rows a device serves after the rule changed, before the alert

TRAINING = '''
import warnings

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

FEATURES = ("temperature", "humidity", "vibration", "current")


def _fit(frame, labels):
    model = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=500))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(frame[list(FEATURES)], labels)


def fit(frame):
    return _fit(frame, frame["fault"])


def fit_inverted(frame):  # a challenger that must lose
    return _fit(frame, 1 - frame["fault"])
'''

GATES = ("{ min_canary_predictions = 100, min_control_predictions = 100, min_labels = 100, "
         "min_healthy_predictions = 20, max_latency_p95_ratio = 10.0, "
         # the new concept moves the class mix: the prediction gates would stop the cure
         "max_prediction_psi = 100.0, max_prediction_js = 1.0, max_wait_s = 120.0 }")


def new_rule(frame) -> np.ndarray:
    """The labelling rule after the change: a fault is a humid machine."""
    return (frame["humidity"].to_numpy() > 50.0).astype(int)


def write_recipe(folder: Path, key: Path, name: str, train: str) -> Path:
    (folder / "training_e2e.py").write_text(TRAINING)
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "{name}"
        bundle = "sensor"
        group = "all"
        key = "{key}"
        target = "fault"
        train = "training_e2e:{train}"
        time_column = "ts"
        holdout = 0.25
        promote_if = ["accuracy>=+0.05"]

        [data]
        source = "fleet"
        since = "1h"

        [rollout]
        stages = "50%,100%"
        soak = "1s"
        gates = {GATES}

        [watch]
        poll = "0.3s"
        cooldown = "1h"
        max_per_day = 4
        alerts = ["performance_drop"]
        """))
    return path


@pytest.fixture
def fleet(tmp_path, signing_keys, bundles):
    f = Fleet(tmp_path, signing_keys, bundles, versions=("1.0.0",),
              server={"evaluate": True, "rollout_tick_s": 0.2,
                      "drift": DriftConfig(window_s=1, lateness_s=0),
                      "ingest_config": IngestConfig(batch_wait_s=0.02, levels=(1, 60, 3600))},
              agent={"capture_enabled": True, "capture_features": FEATURES,
                     "capture_rate": 1.0, "capture_max_rows": 5000, "capture_window_s": 0.5,
                     "capture_upload_s": 0.2})
    try:
        f.deploy("1.0.0")
        yield f
    finally:
        f.close()


@pytest.fixture
def watcher(fleet, tmp_path, signing_keys):
    """``edgepack retrain --watch`` in its own process, stopped by its handle."""
    recipe = write_recipe(tmp_path, signing_keys.build.private, "sensor-loop", "fit")
    log = (tmp_path / "watcher.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "packager.cli", "retrain", str(recipe), "--watch",
         "--server", fleet.url, "--token", fleet.operator],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def serve(fleet: Fleet, device: str, n: int, seed: int):
    """``n`` rows served on ``device``: (ids, truth by the new rule, the result)."""
    rows, _, frame = inputs(n, seed)
    ids = [f"{device}-{seed}-{k}" for k in range(n)]
    result = fleet.agents[device].agent.predict(rows, ids=ids)
    return ids, new_rule(frame), result


def label_on_device(fleet: Fleet, device: str, n: int, seed: int) -> str:
    ids, truth, result = serve(fleet, device, n, seed)
    counts = fleet.agents[device].agent.record_outcomes(
        list(zip(ids, truth.tolist(), strict=True)))
    assert counts.joined == n
    fleet.label(result.bundle.split("@")[1], device, truth, result.labels)
    return result.bundle


def test_concept_drift_is_healed_by_the_watcher_through_a_staged_rollout(
        fleet, watcher, tmp_path, signing_keys, capsys) -> None:
    s = fleet.services
    started = time.monotonic()

    # -- the rule changes; the devices serve and capture; the labels come back centrally --
    outcomes = []
    for k, device in enumerate(DEVICES):
        ids, truth, result = serve(fleet, device, SERVED, seed=500 + k)
        assert result.bundle == "sensor@1.0.0"
        outcomes += [(device, i, int(y)) for i, y in zip(ids, truth, strict=True)]
        fleet.label("1.0.0", device, truth, result.labels)

    def captured(labelled: bool) -> int:
        return sum(1 for _ in s.capture.export("sensor", "1.0.0", labelled=labelled))

    total = SERVED * len(DEVICES)
    wait_until(lambda: captured(False) == total, 30, "every served row captured")
    assert s.retrains.list() == []  # the watcher waits for its trigger
    fleet.upload(outcomes)
    assert captured(True) == total  # the capture is labelled the moment the labels land
    drifted = fleet.reported("1.0.0", total)
    assert_equals_sklearn(drifted, *fleet.rows("1.0.0"))
    before = drifted["total"]["realized"]["accuracy"]["value"]
    assert before < drifted["expected"]["accuracy"]["value"] - 0.2

    # -- the server's evaluator raises performance_drop; the watcher answers it once --
    def drops() -> list:
        return [a for a in s.store.list_alerts(kind="performance_drop")
                if a.bundle == "sensor@1.0.0"]

    wait_until(lambda: {a.group for a in drops()} >= {"all", FLEET_SCOPE}, 30,
               "performance_drop for the group and the fleet")
    wait_until(lambda: [r for r in s.retrains.list() if r.status != "running"], 60,
               "the watcher's run to finish")
    [run] = s.retrains.list()
    assert run.status == "promoted", (run.reason, (tmp_path / "watcher.log").read_text())
    assert run.alert_id in {a.id for a in drops()} and run.trigger == f"alert:{run.alert_id}"
    assert (run.champion, run.challenger) == ("sensor@1.0.0", "sensor@1.1.0")
    # trained on the fleet's labelled capture, judged on its newest quarter
    assert (run.data["rows"], run.data["labelled_rows"]) == (total, total)
    assert run.data["held_out_rows"] == total // 4
    assert run.data["held_out_from"] > run.data["time_range"][0]
    comparison = run.metrics["comparison"]
    assert comparison["won"] is True
    assert s.bundles.get("sensor", "1.1.0") is not None

    # -- the staged rollout: canaries judged against controls on labelled traffic --
    seed = 1000
    deadline = time.monotonic() + 120
    while (rollout := s.rollouts.get(run.rollout))["status"] not in ("completed", "aborted"):
        assert time.monotonic() < deadline, rollout
        for device in DEVICES:
            seed += 1
            label_on_device(fleet, device, 60, seed)
        time.sleep(0.1)  # pacing the traffic, not waiting for a condition
    assert rollout["status"] == "completed", rollout
    fleet.wait_running("1.1.0")
    assert fleet.rows("1.0.0")[0].size > total  # the controls served on, labelled

    # -- realized accuracy recovers on every device (labels uploaded centrally again:
    # they label the new bundle's capture too, which the negative path trains on) --
    outcomes = []
    for device in DEVICES:
        seed += 1
        ids, truth, result = serve(fleet, device, 200, seed)
        assert result.bundle == "sensor@1.1.0"
        outcomes += [(device, i, int(y)) for i, y in zip(ids, truth, strict=True)]
        fleet.label("1.1.0", device, truth, result.labels)
    wanted = {i for _, i, _ in outcomes}
    wait_until(lambda: wanted <= {r["id"] for r in s.capture.export("sensor", "1.1.0")},
               30, "the new bundle's rows captured")
    fleet.upload(outcomes)
    truth, _ = fleet.rows("1.1.0")
    after = fleet.reported("1.1.0", truth.size)
    assert_equals_sklearn(after, *fleet.rows("1.1.0"))
    healed = after["total"]["realized"]["accuracy"]["value"]
    assert healed > 0.9 and healed > before + 0.3, (before, healed)
    for device in DEVICES:
        per = fleet.reported("1.1.0", fleet.rows("1.1.0", (device,))[0].size, device)
        assert per["total"]["realized"]["accuracy"]["value"] > 0.85
    steps = [(link["step"], link["state"]) for link in s.retrains.lineage(s.retrains.get(
        run.id))]
    assert steps[0][0] == "alert" and steps[1:] == [
        ("run", "promoted"), ("champion", "judged against"), ("challenger", "won"),
        ("rollout", "completed")]
    # the dashboard shows the chain to the end: the challenger's realized accuracy after
    with httpx.Client(base_url=fleet.url, timeout=30) as web:
        assert web.post("/login", data={"token": fleet.viewer}).status_code == 303
        shown = web.get(f"/retrains/{run.id}")
    assert shown.status_code == 200
    assert "lineage-performance" in shown.text and f"<b>{healed:.4g}</b>" in shown.text
    # the second alert (the other scope) waits out the cooldown: one run, one rollout
    assert len(s.retrains.list()) == 1 and len(s.rollouts.list()) == 1

    # -- the negative path: a challenger that loses deploys nothing, and says why --
    losing = write_recipe(tmp_path, signing_keys.build.private, "sensor-bad", "fit_inverted")
    capsys.readouterr()
    code = edgepack(["retrain", str(losing), "--server", fleet.url, "--token",
                     fleet.operator, "--trigger", "manual"])
    out = capsys.readouterr()
    assert code == 6, out.err
    assert "rejected" in out.out
    [bad] = s.retrains.list(recipe="sensor-bad")
    assert bad.status == "rejected" and bad.rollout is None and bad.finished is not None
    assert bad.champion == "sensor@1.1.0" and "accuracy" in bad.reason
    assert "accuracy" in bad.metrics["comparison_table"]  # the numbers behind the verdict
    assert [b.version for b in s.bundles.list("sensor")] == ["1.0.0", "1.1.0"]
    assert len(s.rollouts.list()) == 1
    assert all(fleet.running(d) == "1.1.0" for d in DEVICES)
    print(f"loop end to end: {time.monotonic() - started:.1f} s; accuracy {before:.3f} -> "
          f"{healed:.3f}")
