"""Realized and estimated performance on the server: ingest, merge, report, alerts, gates.

Summaries carry performance entries built with the contract's own accumulators
(:mod:`edgefleet.contract.performance`) from known rows, and go through the real ingest
rules (``Ingestor.process``) into a real store (SQLite, and PostgreSQL where the fixtures
make it cheap); what the server merges back is compared with scikit-learn on the same rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

from edgefleet.contract.messages import BundleRef, encode, topic
from edgefleet.contract.performance import Estimated, PerformanceEntry, PerformanceSpec, Realized
from fleet_server.cli.main import main as fleet_cli
from fleet_server.config import DriftConfig, PerformanceConfig
from fleet_server.models import FLEET_SCOPE
from fleet_server.monitoring.evaluator import Evaluator
from fleet_server.monitoring.performance import PerformanceService, PerformanceWatch
from fleet_server.profiles.performance import Expected, Tolerances, judge_drop
from fleet_server.telemetry.link import Incoming
from tests.fleet_server.conftest import profile_of, summary_of
from tests.fleet_server.test_evaluation import Receiver, _hooked

W = 60
T0 = 1_800_000_000 // 86400 * 86400  # a day boundary, far from the real clock
SPEC = PerformanceSpec("classification", (0, 1))


def rows(n: int, seed: int, accuracy: float = 0.92) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(truth, predicted, P(1))`` of a calibrated-looking binary model: each prediction is
    right with probability ``accuracy``."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n)
    right = rng.random(n) < accuracy
    pred = np.where(right, truth, 1 - truth)
    conf = np.clip(rng.normal(accuracy, 0.05, n), 0.5, 0.999)
    p1 = np.where(pred == 1, conf, 1 - conf)
    return truth, pred, p1


def entry(truth, pred, p1, version: str = "1.0.0", *, estimated_only: bool = False
          ) -> PerformanceEntry:
    est = Estimated(SPEC)
    est.add(p1, pred)
    if estimated_only:
        return PerformanceEntry(BundleRef("sensor", version), None, est.to_wire())
    real = Realized(SPEC)
    real.add(pred, truth, np.c_[1 - p1, p1])
    return PerformanceEntry(BundleRef("sensor", version), real.to_wire(), est.to_wire())


def send(services, device: str, seq: int, start: float, entries, *, version="1.0.0",
         n_rows: int = 400, shift=None):
    ref = services.bundles.reference(services.bundles.get("sensor", "1.0.0").id)
    msg = summary_of(device, seq, profile_of(ref.spec, n_rows, seq * 31 + int(device[3:]),
                                             shift, ref.base), start, start + W, version)
    msg = replace(msg, performance=tuple(entries))
    return services.ingestor.process(
        [Incoming(topic(device, "summary"), encode(msg), 1, seq, 1, start + W)], now=start + W)


@pytest.fixture
def fleet_on(services_on, sensor_bundle):
    s = services_on
    s.bundles.upload(sensor_bundle.read_bytes(), "test", T0)
    for d, site in (("dev1", "a"), ("dev2", "a"), ("dev3", "b")):
        s.registry.add_device(d, {"site": site}, "test", T0)
    s.registry.create_group("plant-a", {"site": "a"}, "test", T0)
    return s


@pytest.fixture
def fleet(services, sensor_bundle):
    s = services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", T0)
    for d, site in (("dev1", "a"), ("dev2", "a"), ("dev3", "b")):
        s.registry.add_device(d, {"site": site}, "test", T0)
    s.registry.create_group("plant-a", {"site": "a"}, "test", T0)
    return s


# --------------------------------------------------------------------------- ingest


def test_entries_are_stored_per_bundle_and_bad_ones_dead_lettered_alone(fleet_on):
    s = fleet_on
    truth, pred, p1 = rows(300, 1)
    bad = entry(truth, pred, p1).realized
    bad = {**bad, "cm": [[1, 2], [3]]}  # a confusion matrix row missing
    result = send(s, "dev1", 1, T0, [
        entry(truth, pred, p1),
        PerformanceEntry(BundleRef("sensor", "7.7.7"), None, entry(truth, pred, p1).estimated),
        PerformanceEntry(BundleRef("sensor", "1.0.0", ), bad, None),
    ])
    assert result.stored["summary"] == 1  # the summary itself is kept
    assert result.dead == {"SchemaError": 2}
    reasons = [d.reason for d in s.store.list_dead_letters()]
    stored = s.store.read_performance(1, T0, T0 + W)
    assert [(r.device, r.seq, r.labelled, r.served) for r in stored] == [("dev1", 1, 300, 300)]
    assert any("7.7.7" in r for r in reasons) and any("cm[1]" in r for r in reasons)
    # a duplicate summary (the outbox re-sends it) adds no entry
    again = send(s, "dev1", 1, T0, [entry(truth, pred, p1)])
    assert again.duplicates["summary"] == 1
    assert len(s.store.read_performance(1, T0, T0 + W)) == 1


def test_an_entry_counts_for_its_own_bundle_not_the_summarys(fleet, bundles):
    """Outcomes joined after the device switched to 1.1.0 still count for 1.0.0."""
    s = fleet
    s.bundles.upload(bundles.build("1.1.0").read_bytes(), "test", T0)
    truth, pred, p1 = rows(250, 2)
    # 1.1.0 has other training bins: the summary's profile is 1.1.0's own
    new = s.bundles.reference(s.bundles.get("sensor", "1.1.0").id)
    msg = summary_of("dev1", 1, profile_of(new.spec, 100, 5, None, new.base), T0, T0 + W,
                     "1.1.0")
    msg = replace(msg, performance=(entry(truth, pred, p1, "1.0.0"),))
    result = s.ingestor.process([Incoming(topic("dev1", "summary"), encode(msg), 1, 1, 1,
                                          T0 + W)], now=T0 + W)
    assert result.stored["summary"] == 1 and not result.dead
    old_id = s.bundles.get("sensor", "1.0.0").id
    new_id = s.bundles.get("sensor", "1.1.0").id
    assert len(s.store.read_performance(old_id, T0, T0 + W)) == 1
    assert s.store.read_performance(new_id, T0, T0 + W) == []
    report = s.performance.report("sensor@1.0.0", since=T0, until=T0 + W, now=T0 + W)
    assert report.total.labelled == 250


# --------------------------------------------------------------------------- merge = sklearn


def test_merged_realized_metrics_equal_sklearns_on_the_same_rows(fleet_on):
    s = fleet_on
    all_truth, all_pred = [], []
    seq = 0
    for hour in range(3):
        for device in ("dev1", "dev2", "dev3"):
            seq += 1
            truth, pred, p1 = rows(97 + 13 * seq, seq, accuracy=0.7 + 0.02 * seq)
            all_truth.append(truth)
            all_pred.append(pred)
            assert not send(s, device, seq, T0 + hour * 3600, [entry(truth, pred, p1)]).dead
    truth, pred = np.concatenate(all_truth), np.concatenate(all_pred)
    report = s.performance.report("sensor@1.0.0", since=T0, until=T0 + 3 * 3600,
                                  now=T0 + 3 * 3600)
    r = report.total.realized
    assert report.step == 3600 and len(report.points) == 3
    assert r["accuracy"]["value"] == accuracy_score(truth, pred)
    assert r["accuracy"]["n"] == len(truth)
    assert r["accuracy"]["low"] < r["accuracy"]["value"] < r["accuracy"]["high"]
    for c in (0, 1):
        assert r[f"precision[{c}]"]["value"] == pytest.approx(
            precision_score(truth, pred, pos_label=c), abs=1e-12)
        assert r[f"recall[{c}]"]["value"] == pytest.approx(
            recall_score(truth, pred, pos_label=c), abs=1e-12)
    assert r["f1_macro"]["value"] == pytest.approx(f1_score(truth, pred, average="macro"),
                                                   abs=1e-12)
    assert report.confusion == {"classes": ["0", "1"],
                                "counts": confusion_matrix(truth, pred).tolist()}
    # each hour's point is the merge of that hour's three summaries only
    first = np.concatenate(all_truth[:3]), np.concatenate(all_pred[:3])
    assert report.points[0].realized["accuracy"]["value"] == accuracy_score(*first)
    assert report.points[0].devices == 3 and report.points[0].labelled == len(first[0])
    # a group and a device are their members' rows only
    group = s.performance.report("sensor@1.0.0", group="plant-a", since=T0,
                                 until=T0 + 3 * 3600, now=T0 + 3 * 3600)
    mine = [i for i in range(9) if i % 3 != 2]  # dev1 and dev2
    t = np.concatenate([all_truth[i] for i in mine])
    p = np.concatenate([all_pred[i] for i in mine])
    assert group.total.realized["accuracy"]["value"] == accuracy_score(t, p)
    one = s.performance.report("sensor@1.0.0", device="dev3", since=T0, until=T0 + 3 * 3600,
                               now=T0 + 3 * 3600)
    assert one.total.devices == 1 and one.scope == "device:dev3"
    assert one.total.labelled == sum(len(all_truth[i]) for i in (2, 5, 8))


def test_a_report_without_labels_has_the_estimate_and_the_expectation(fleet):
    s = fleet
    truth, pred, p1 = rows(800, 3, accuracy=0.9)
    send(s, "dev1", 1, T0, [entry(truth, pred, p1, estimated_only=True)])
    report = s.performance.report("sensor@1.0.0", since="1d", now=T0 + 3600)
    assert report.total.realized == {} and report.total.labelled == 0
    est = report.total.estimated["accuracy"]
    assert est["n"] == 800 and est["value"] == pytest.approx(
        float(np.where(pred == 1, p1, 1 - p1).mean()), abs=1e-12)
    assert report.expected["accuracy"].data == "training"
    assert report.verdicts["realized"].verdict == "insufficient"
    assert report.verdicts["estimated"].verdict == "ok"


# --------------------------------------------------------------------------- the drop rule


@pytest.mark.parametrize(("value", "low", "high", "n", "verdict"), [
    pytest.param(0.80, 0.78, 0.82, 1000, "drop", id="below-and-excluded"),
    pytest.param(0.80, 0.60, 0.93, 1000, "ok", id="below-but-interval-holds-expectation"),
    pytest.param(0.89, 0.87, 0.905, 1000, "ok", id="within-tolerance"),
    pytest.param(0.50, 0.40, 0.60, 50, "insufficient", id="too-few-rows"),
    pytest.param(None, None, None, 0, "insufficient", id="no-value"),
])
def test_the_drop_rule(value, low, high, n, verdict):
    expected = Expected("accuracy", 0.91, 0.89, 0.93, 800, "held_out")
    got = judge_drop("accuracy", value, low, high, n, expected, Tolerances(), 200)
    assert got.verdict == verdict


def test_an_error_metric_drops_upward():
    expected = Expected("mae", 2.0, 1.8, 2.2, 800, "held_out")
    assert judge_drop("mae", 3.0, 2.8, 3.2, 500, expected, Tolerances(), 200).verdict == "drop"
    assert judge_drop("mae", 1.0, 0.9, 1.1, 500, expected, Tolerances(), 200).verdict == "ok"
    assert judge_drop("mae", 3.0, 2.8, 3.2, 500, None, Tolerances(), 200).verdict == "unknown"


# --------------------------------------------------------------------------- alerts


def _collapse(services, *, start: float, windows: int, flip: bool) -> None:
    """Windows of every device with in-distribution inputs; with ``flip`` the truth is
    flipped wherever the (made-up) input region holds (40 % of rows), the model unchanged:
    concept drift, no input drift."""
    seq = {"dev1": 0, "dev2": 0, "dev3": 0}
    for k in range(windows):
        for device in seq:
            seq[device] += 1
            n = 400
            truth, pred, p1 = rows(n, 100 * k + seq[device] + int(device[3:]), 0.93)
            if flip:
                region = np.random.default_rng(k).random(n) < 0.4
                truth = np.where(region, 1 - truth, truth)
            result = send(services, device, 1000 * int(flip) + seq[device], start + k * W,
                          [entry(truth, pred, p1)], n_rows=n)
            assert not result.dead, dict(result.dead)


def test_an_accuracy_collapse_without_input_drift_alerts_and_calls_the_webhook(fleet):
    s = fleet
    r = Receiver([])
    hook, alerts = _hooked(s, r.url)
    try:
        config = PerformanceConfig(window_s=3 * W)
        watch = PerformanceWatch(PerformanceService(s.store, s.bundles, s.registry, config),
                                 alerts)
        drift = Evaluator(s.store, s.bundles, s.registry, alerts,
                          DriftConfig(window_s=W, lateness_s=0),
                          s.config.ingest_config, clock=time.time)
        _collapse(s, start=T0, windows=3, flip=False)  # healthy: ~0.93 realized
        assert watch.evaluate(T0 + 3 * W) == []
        _collapse(s, start=T0 + 3 * W, windows=3, flip=True)
        raised = watch.evaluate(T0 + 6 * W)
        assert ("sensor@1.0.0", FLEET_SCOPE, "performance_drop") in raised
        assert ("sensor@1.0.0", "plant-a", "performance_drop") in raised
        # the label-free estimate cannot see concept drift (confidences did not move)
        assert not any(kind == "estimated_performance_drop" for _, _, kind in raised)
        # ... and neither can the drift monitors: inputs are as in training
        for now in range(T0 + W, T0 + 7 * W, W):
            drift.evaluate(now)
        assert s.store.list_alerts(kind="drift") == []
        # deduplicated while open
        assert watch.evaluate(T0 + 6 * W + 1) == []
        assert hook.wait_idle(10)
    finally:
        hook.stop()
        r.close()
    (alert,) = [a for a in s.store.list_alerts(kind="performance_drop")
                if a.group == FLEET_SCOPE]
    d = alert.details
    assert d["side"] == "realized" and d["metric"] == "accuracy"
    assert d["value"] < 0.7 and d["high"] < d["expected"] == pytest.approx(0.91125)
    assert d["n"] >= 3 * 3 * 400  # the collapsed windows' labels at least
    assert alert.webhook == "delivered"
    sent = [b for b, _ in r.bodies if b["alert"]["kind"] == "performance_drop"]
    assert sent and sent[0]["alert"]["details"]["metric"] == "accuracy"


def test_a_recovered_model_resolves_the_alert(fleet):
    s = fleet
    watch = PerformanceWatch(PerformanceService(s.store, s.bundles, s.registry,
                                                PerformanceConfig(window_s=3 * W)), s.alerts)
    _collapse(s, start=T0, windows=3, flip=True)
    assert watch.evaluate(T0 + 3 * W)
    _collapse(s, start=T0 + 3 * W, windows=3, flip=False)
    watch.evaluate(T0 + 6 * W)
    assert s.store.list_alerts(kind="performance_drop", state="open") == []


def test_sinking_confidences_raise_the_estimated_drop_before_any_label(fleet):
    s = fleet
    watch = PerformanceWatch(PerformanceService(s.store, s.bundles, s.registry,
                                                PerformanceConfig(window_s=3 * W)), s.alerts)
    for k in range(3):
        for device in ("dev1", "dev2", "dev3"):
            truth, pred, p1 = rows(400, 10 * k + int(device[3:]), accuracy=0.7)
            send(s, device, k + 1, T0 + k * W, [entry(truth, pred, p1, estimated_only=True)])
    raised = watch.evaluate(T0 + 3 * W)
    assert ("sensor@1.0.0", FLEET_SCOPE, "estimated_performance_drop") in raised
    assert not any(kind == "performance_drop" for _, _, kind in raised)  # no labels yet
    (alert,) = [a for a in s.store.list_alerts(kind="estimated_performance_drop")
                if a.group == FLEET_SCOPE]
    assert alert.details["side"] == "estimated" and alert.details["n"] == 3600
    assert alert.details["value"] == pytest.approx(0.7, abs=0.02)


# --------------------------------------------------------------------------- API and CLI


def test_the_api_and_the_cli_show_the_same_numbers(server_factory, sensor_bundle):
    server = server_factory(http=True)
    s = server.services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", T0)
    s.registry.add_device("dev1", {"site": "a"}, "test", T0)
    truth, pred, p1 = rows(500, 7)
    send(s, "dev1", 1, T0, [entry(truth, pred, p1)])
    token = s.auth.create_token("viewer-1", "viewer", "test", time.time()).secret
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{server.base_url}/api/v1/performance"
    got = httpx.get(url, params={"bundle": "sensor@1.0.0", "since": str(T0),
                                 "until": T0 + 3600}, headers=headers)
    assert got.status_code == 200, got.text
    body = got.json()
    acc = accuracy_score(truth, pred)
    assert body["total"]["realized"]["accuracy"]["value"] == acc
    assert body["expected"]["accuracy"]["value"] == pytest.approx(0.91125)
    assert body["verdicts"]["realized"]["verdict"] == "ok"
    for params, status in (({"since": "soon"}, 422), ({"group": "nope"}, 404),
                           ({"device": "dev1", "colour": "red"}, 422)):
        assert httpx.get(url, params={"bundle": "sensor@1.0.0", **params},
                         headers=headers).status_code == status, params

    runner = CliRunner()
    env = {"FLEET_SERVER": server.base_url, "FLEET_TOKEN": token}
    window = ["--since", str(T0), "--until", str(T0 + 3600)]
    shown = runner.invoke(fleet_cli, ["performance", "sensor@1.0.0", *window], env=env)
    as_json = runner.invoke(fleet_cli, ["performance", "sensor@1.0.0", *window, "--json"],
                            env=env)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert "realized accuracy [95 %]" in lines[1] and "expected" in lines[1]
    low, high = (body["total"]["realized"]["accuracy"][k] for k in ("low", "high"))
    total = next(line for line in lines if line.startswith("total"))
    assert total.split() == ["total", "1", "500", f"{acc:.3f}", f"[{low:.3f},", f"{high:.3f}]",
                             f"{body['total']['estimated']['accuracy']['value']:.3f}", "0.911"]
    assert json.loads(as_json.output)["total"]["labelled"] == 500
    both = runner.invoke(fleet_cli, ["performance", "sensor@1.0.0", "--group", "g",
                                     "--device", "dev1"], env=env)
    assert both.exit_code == 1 and "not both" in both.output


# --------------------------------------------------------------------------- rollout gates

PERF = {"performance_metric": "accuracy", "performance_source": "realized",
        "canary_labelled": 500, "control_labelled": 500}


@pytest.mark.parametrize(("over", "outcome", "status"), [
    pytest.param({"canary_performance": 0.80, "canary_performance_bound": 0.85,
                  "control_performance": 0.92}, "fail", "aborted", id="collapse"),
    pytest.param({"canary_performance": 0.88, "canary_performance_bound": 0.95,
                  "control_performance": 0.92}, "pass", "running", id="within-interval"),
    pytest.param({"canary_performance": 0.91, "canary_performance_bound": 0.93,
                  "control_performance": 0.92}, "pass", "running", id="within-tolerance"),
    pytest.param({"canary_performance": 0.80, "canary_performance_bound": 0.85,
                  "control_performance": 0.92, "canary_labelled": 20}, "wait", "running",
                 id="too-few-labels"),
    pytest.param({"canary_performance": 0.80, "canary_performance_bound": 0.85,
                  "control_performance": 0.92, "performance_source": "estimated",
                  "canary_labelled": 0, "control_labelled": 0}, "fail", "aborted",
                 id="estimated-collapse"),
    pytest.param({"performance_metric": "mae", "canary_performance": 3.0,
                  "canary_performance_bound": 2.8, "control_performance": 2.0}, "fail",
                 "aborted", id="mae-rise"),
    pytest.param({"performance_metric": None, "performance_source": None,
                  "canary_labelled": 0, "control_labelled": 0}, "skip", "running",
                 id="no-performance-reported"),
])
def test_the_accuracy_gate_judges_canaries_against_controls(over, outcome, status):
    from tests.fleet_server.test_rollout import fleet as members
    from tests.fleet_server.test_rollout import follow, gate, make_plan, start, tick

    plan, devices = make_plan(), members()
    d = start(plan, devices)
    devices = follow(devices, d)
    d2 = tick(plan, d.state, devices, 110.0, **{**PERF, **over})
    name = "mae" if over.get("performance_metric") == "mae" else "accuracy"
    result = gate(d2, name)
    assert result.outcome == outcome, result.reason
    if outcome != "skip":
        source = over.get("performance_source", "realized")
        assert result.reason.startswith(source), result.reason
    if status == "running":
        assert d2.state.status == "running"  # waits or promotes, never aborts
    else:
        assert d2.state.status == "aborted" and name in d2.audit[0].reason


def test_the_shadow_phase_says_what_it_cannot_compare():
    from tests.fleet_server.test_rollout import GATES, gate, make_plan, start, tick
    from tests.fleet_server.test_rollout import fleet as members

    plan = make_plan(shadow_first=True, shadow_soak_s=100.0,
                     gates=replace(GATES, min_shadow_rows=10))
    devices = members()
    d = start(plan, devices)
    shadow = tick(plan, d.state, devices, 50.0)
    result = gate(shadow, "shadow_accuracy")
    assert result.outcome == "skip" and "no paired rows" in result.reason


def test_gate_metrics_read_the_windows_entries(fleet, bundles):
    """Canaries on 1.1.0 whose labels say they are wrong far more often than the controls
    on 1.0.0: the reader merges each side's entries, realized once both have labels."""
    from fleet_server.rollouts.metrics import GateMetricsReader
    from fleet_server.rollouts.observations import GateWindow
    from tests.fleet_server.test_rollout import make_plan

    s = fleet
    s.bundles.upload(bundles.build("1.1.0").read_bytes(), "test", T0)
    reader = GateMetricsReader(s.store, s.registry, s.bundles, s.drift, 20_000)
    new = BundleRef("sensor", "1.1.0")
    plan = make_plan(bundle=new)
    window = GateWindow("canary", 0, T0, new, ("dev1",), ("dev2", "dev3"))
    canary = rows(600, 11, accuracy=0.75)
    controls = [rows(400, 12 + i, accuracy=0.93) for i in range(2)]
    ref_new = s.bundles.reference(s.bundles.get("sensor", "1.1.0").id)
    msg = summary_of("dev1", 1, profile_of(ref_new.spec, 600, 3, None, ref_new.base),
                     T0, T0 + W, "1.1.0")
    msg = replace(msg, performance=(entry(*canary, "1.1.0", estimated_only=True),))
    s.ingestor.process([Incoming(topic("dev1", "summary"), encode(msg), 1, 1, 1, T0 + W)],
                       now=T0 + W)
    for i, device in enumerate(("dev2", "dev3")):
        send(s, device, 1, T0, [entry(*controls[i], estimated_only=True)])
    m = reader.read(plan, window)
    # no labels yet: the estimate, both sides from it
    assert (m.performance_metric, m.performance_source) == ("accuracy", "estimated")
    assert m.canary_labelled == 0
    q = np.where(canary[1] == 1, canary[2], 1 - canary[2])
    assert m.canary_performance == pytest.approx(float(q.mean()), abs=1e-12)
    # labels arrive: realized, and the canary's collapse shows
    msg2 = replace(msg, seq=2, performance=(entry(*canary, "1.1.0"),))
    s.ingestor.process([Incoming(topic("dev1", "summary"), encode(msg2), 1, 2, 1, T0 + W)],
                       now=T0 + W)
    for i, device in enumerate(("dev2", "dev3")):
        send(s, device, 2, T0, [entry(*controls[i])])
    m = reader.read(plan, window)
    assert m.performance_source == "realized" and m.canary_labelled == 600
    assert m.control_labelled == 800
    assert m.canary_performance == accuracy_score(canary[0], canary[1])
    both = np.concatenate([c[0] for c in controls]), np.concatenate([c[1] for c in controls])
    assert m.control_performance == accuracy_score(*both)
    assert m.canary_performance_bound > m.canary_performance


# --------------------------------------------------------------------------- the server's merge


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 2**31), st.booleans()),
                min_size=1, max_size=6))
def test_the_servers_merge_of_stored_entries_is_the_contracts(parts):
    """Adding wire forms field by field equals merging the rebuilt blocks one by one."""
    from fleet_server.profiles.performance import merged_blocks
    from fleet_server.store import PerformanceRow

    stored, real, est = [], Realized(SPEC), Estimated(SPEC)
    reg_spec = PerformanceSpec.from_manifest(type("M", (), {"task": "regression"})())
    reg_rows, reg = [], Realized(reg_spec)
    for i, (n, seed, calibrated) in enumerate(parts):
        truth, pred, p1 = rows(n, seed)
        r, e = Realized(SPEC), Estimated(SPEC, calibrated)
        r.add(pred, truth, np.c_[1 - p1, p1], delays_s=np.full(n, 90.0))
        e.add(p1, pred)
        real.merge(r)
        est.merge(e)
        stored.append(PerformanceRow("d", i, 1, 0, 60, r.n, e.n, r.to_wire(), e.to_wire()))
        g = Realized(reg_spec)
        g.add(p1 * 10, truth * 10.0)
        reg.merge(g)
        reg_rows.append(PerformanceRow("d", i, 2, 0, 60, g.n, 0, g.to_wire(), None))
    got_real, got_est = merged_blocks(SPEC, stored)
    assert got_real.confusion().tolist() == real.confusion().tolist()
    assert got_real.to_wire()["hist"] == real.to_wire()["hist"]
    assert got_real.to_wire()["delay"] == real.to_wire()["delay"]
    assert got_real.to_wire()["brier"] == pytest.approx(real.to_wire()["brier"])
    assert got_est.calibrated == est.calibrated and got_est.n == est.n
    assert got_est.to_wire()["q"] == pytest.approx(est.to_wire()["q"])
    got_reg, none = merged_blocks(reg_spec, reg_rows)
    assert none is None and got_reg.n == reg.n
    assert got_reg.to_wire()["err"] == pytest.approx(reg.to_wire()["err"])
    assert got_reg.to_wire()["hist"] == reg.to_wire()["hist"]


@pytest.mark.parametrize(("items", "want"), [
    pytest.param((), PerformanceConfig(), id="defaults"),
    pytest.param(("rate=0.1", "min_labelled=50", "window_s=3600"),
                 PerformanceConfig(tolerances=Tolerances(rate=0.1, min_labelled=50),
                                   window_s=3600.0), id="set"),
])
def test_fleet_serve_reads_the_performance_settings(items, want):
    from fleet_server.cli.serve import _performance_config

    assert _performance_config(items) == want


@pytest.mark.parametrize("items", [("rate=2",), ("colour=1",), ("min_served=0",)],
                         ids=["rate-over-one", "unknown", "zero-rows"])
def test_fleet_serve_refuses_bad_performance_settings(items):
    from edgefleet.errors import EdgefleetError
    from fleet_server.cli.serve import _performance_config

    with pytest.raises(EdgefleetError):
        _performance_config(items)


def test_housekeeping_prunes_entries_with_the_summaries(fleet):
    s = fleet
    truth, pred, p1 = rows(50, 5)
    send(s, "dev1", 1, T0, [entry(truth, pred, p1)])
    send(s, "dev1", 2, T0 + 8 * 86400, [entry(truth, pred, p1)])
    ev = Evaluator(s.store, s.bundles, s.registry, s.alerts, DriftConfig(window_s=W),
                   s.config.ingest_config)
    removed = ev.housekeeping(T0 + 8 * 86400 + W)  # 7 days of retention
    assert removed["performance"] == 1
    # the hour rollups of the first (dev1's and the fleet's) go with them, days stay
    assert (removed["performance_rollups_3600"], removed["performance_rollups_86400"]) == \
        (2, 0)
    assert [r.seq for r in s.store.read_performance(1, T0, T0 + 9 * 86400)] == [2]


# --------------------------------------------------------------------------- through the engine


@pytest.fixture
def rollout_fleet(tmp_path, signing_keys, bundles):
    """Six devices of plant-a on sensor@1.0.0, 1.1.0 uploaded; the rollout service."""
    from fleet_server.services import build_services
    from tests.fleet_server.conftest import make_config
    from tests.fleet_server.rollout_helpers import Recorder, Seeder, devices_named

    s = build_services(make_config(tmp_path, signing_keys), publisher=Recorder())
    t0 = time.time()
    for version in ("1.0.0", "1.1.0"):
        s.bundles.upload(bundles.build(version).read_bytes(), "test", t0)
    seed = Seeder(s)
    for d in devices_named(6):
        s.registry.add_device(d, {"site": "a"}, "test", t0)
        seed.online(d, "1.0.0", t0)
    s.registry.create_group("plant-a", {"site": "a"}, "test", t0)
    yield s, seed, t0
    s.close()


@pytest.mark.parametrize(("canary_accuracy", "status", "outcome"), [
    pytest.param(0.6, "aborted", "fail", id="wrong-canaries"),
    pytest.param(0.93, "running", "pass", id="as-good-as-the-controls"),
])
def test_a_canary_whose_labels_say_it_is_wrong_aborts_the_rollout(rollout_fleet,
                                                                   canary_accuracy, status,
                                                                   outcome):
    s, seed, t0 = rollout_fleet
    detail = s.rollouts.create(
        {"bundle": "sensor@1.1.0", "group": "plant-a", "id": "r1", "start": True,
         "stages": [{"fraction": 0.34, "min_devices": 2, "soak_s": 10},
                    {"fraction": 1.0, "min_devices": 1, "soak_s": 10}],
         "gates": {"min_canary_predictions": 300, "min_control_predictions": 300,
                   "min_healthy_predictions": 50, "max_wait_s": 100}},
        actor="operator:ana", roles={"viewer", "operator"}, now=t0)
    for i, d in enumerate(detail["devices"]):
        canary = d["role"] == "canary"
        version = "1.1.0" if canary else "1.0.0"
        if canary:
            seed.report(d["device"], version, "installed", t0 + 1)
        seed.summary(d["device"], version, t0 + 1, t0 + 5)  # inputs and outputs as trained
        # the labels that came back: the controls are right 93 % of the time
        truth, pred, p1 = rows(300, 70 + i, accuracy=canary_accuracy if canary else 0.93)
        ref = s.bundles.reference(s.bundles.get("sensor", version).id)
        msg = replace(summary_of(d["device"], seed._next(d["device"]),
                                 profile_of(ref.spec, 10, i, None, ref.base), t0 + 5, t0 + 6,
                                 version), performance=(entry(truth, pred, p1, version),))
        result = s.ingestor.process([Incoming(msg.topic, encode(msg), 1, 1, 1, t0 + 6)],
                                    now=t0 + 6)
        assert not result.dead, dict(result.dead)
    s.rollouts.tick(t0 + 11)
    detail = s.rollouts.get("r1")
    gates = {g["name"]: g for g in detail["gate_results"]}
    assert detail["status"] == status, gates
    assert gates["accuracy"]["outcome"] == outcome
    assert gates["accuracy"]["reason"].startswith("realized accuracy")
    assert gates["prediction_psi"]["outcome"] == "pass"  # its outputs look as trained


# --------------------------------------------------------------------------- over MQTT


def test_entries_travel_through_the_broker_and_show_in_the_report(broker, devices,
                                                                  server_factory, sensor_bundle,
                                                                  sensor_ref):
    """The device's own outbox and link, a real Mosquitto, the server's ingest worker."""
    from tests.fleet_server.conftest import wait_until

    server = server_factory(broker)
    s = server.services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    spec, base = sensor_ref
    now = time.time()
    sent_truth, sent_pred = [], []
    for name in ("dev1", "dev2"):
        dev = devices(name)
        dev.online({"site": "a"}, BundleRef("sensor", "1.0.0"))
        for seq in range(1, 4):
            truth, pred, p1 = rows(200, seq * 7 + int(name[3:]))
            sent_truth.append(truth)
            sent_pred.append(pred)
            msg = summary_of(name, seq, profile_of(spec, 200, seq, None, base),
                             now - 240 + 60 * seq, now - 180 + 60 * seq)
            dev.send(replace(msg, performance=(entry(truth, pred, p1),)))
        dev.flush()
    wait_until(lambda: s.store.count_performance() == 6, 20, "six entries stored")
    report = s.performance.report("sensor@1.0.0", since="1h", now=time.time())
    truth, pred = np.concatenate(sent_truth), np.concatenate(sent_pred)
    assert report.total.realized["accuracy"]["value"] == accuracy_score(truth, pred)
    assert report.total.devices == 2 and report.total.labelled == 1200


def test_the_watch_judges_entries_of_the_last_fraction_of_a_second(fleet):
    """Labels joined moments ago are judged now: the watch's range ends at ``now``, not at
    the whole second before it (windows shorter than a second, as tests and a busy agent's
    row-count windows make, used to be left out, though ``performance_bundles`` saw them)."""
    s = fleet
    start, end = T0 + 10.2, T0 + 10.6
    ref = s.bundles.reference(s.bundles.get("sensor", "1.0.0").id)
    truth, pred, p1 = rows(600, 5, accuracy=0.5)
    msg = replace(summary_of("dev1", 1, profile_of(ref.spec, 50, 1, None, ref.base), start,
                             end), performance=(entry(truth, pred, p1),))
    done = s.ingestor.process([Incoming(msg.topic, encode(msg), 1, 1, 1, end)], now=end)
    assert not done.dead, dict(done.dead)
    watch = PerformanceWatch(s.performance, s.alerts)
    assert ("sensor@1.0.0", FLEET_SCOPE, "performance_drop") in watch.evaluate(T0 + 10.8)
