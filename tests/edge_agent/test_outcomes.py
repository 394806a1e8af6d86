"""Prediction ids and outcomes through the agent with real bundles, real onnxruntime and a
real prediction store: ids, the join by reason, attribution after a switch, and the local
HTTP routes (a real LocalServer)."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from edge_agent.agent import Agent, with_claim
from edge_agent.errors import OutcomeError, OutcomeLabelError, PredictionIdError
from edge_agent.httpapi import LocalServer
from edge_agent.model import LoadedModel
from edge_agent.predictions import OutcomeCounts, PredictionStore
from edgefleet.contract.bundle import verify_bundle
from edgefleet.contract.messages import ID_RE, Outcome, decode, encode
from edgefleet.contract.performance import Estimated, PerformanceSpec, Realized
from edgefleet.contract.signing import TrustStore
from tests.bundles import FEATURES, sensor_data


@pytest.fixture
def store(tmp_path):
    s = PredictionStore(tmp_path / "predictions.db")
    yield s
    s.close()


@pytest.fixture
def agent(store):
    a = Agent("dev-1", store=store)
    yield a
    a.close()


def rows(n: int, seed: int = 3) -> list[dict]:
    return sensor_data(n, seed=seed)[list(FEATURES)].to_dict("records")


def labelled(n: int, seed: int = 3) -> tuple[list[dict], list[int]]:
    data = sensor_data(n, seed=seed)
    return data[list(FEATURES)].to_dict("records"), data["fault"].astype(int).tolist()


def test_every_row_gets_an_id_unique_across_calls_and_agents(load, store):
    model = load()
    ids = []
    for _ in range(2):  # two agents: two processes' worth of ids
        agent = Agent("dev-1", store=store)
        try:
            agent.activate(model)
            ids += agent.predict(rows(30)).ids
            ids += [agent.predict_one(r)["id"] for r in rows(3)]
            ids += agent.predict(np.array([[20.0, 50.0, 1.0, 0.2]])).ids
        finally:
            agent.close()
    assert len(ids) == 2 * 34 and len(set(ids)) == len(ids)
    assert all(ID_RE.match(i) for i in ids)


def test_caller_ids_are_used_and_checked(agent, load):
    agent.activate(load())
    got = agent.predict(rows(3), ids=["order-1", "order-2", "order:3"])
    assert list(got.ids) == ["order-1", "order-2", "order:3"]
    assert [r["id"] for r in got.rows((0, 1))] == list(got.ids)
    for bad, row in ((["a", "b"], None), (["a", "b", "a"], 2), (["a", "b c", "d"], 1),
                     ("abc", None), (["a", "b", 3], 2), (["x" * 65, "b", "c"], 0)):
        with pytest.raises(PredictionIdError) as info:
            agent.predict(rows(3), ids=bad)
        assert info.value.row == row and info.value.field == "ids"
    assert agent.close_window().errors == {"ids": 6}


def test_outcomes_join_by_reason(agent, load):
    agent.activate(load())
    data, truth = labelled(40)
    ids = list(agent.predict(data[:20]).ids) + [agent.predict_one(r)["id"] for r in data[20:]]
    counts = agent.record_outcomes([*zip(ids[:30], truth[:30], strict=True),
                                    Outcome(ids[0], truth[0]), ("unseen-id", 1)])
    assert counts == OutcomeCounts(joined=30, duplicate=1, unknown=1)
    with pytest.raises(OutcomeLabelError) as info:
        agent.record_outcomes([(ids[30], truth[30]), (ids[31], 2)])
    assert info.value.id == ids[31]
    with pytest.raises(OutcomeError):
        agent.record_outcomes([("not an id", 1)])
    assert agent.record_outcomes(zip(ids[30:], truth[30:], strict=True)).joined == 10
    window = agent.close_window()
    claim = agent.store.claim(1)
    assert claim.rows == 40 and claim.counts == {"duplicate": 1, "unknown": 1}
    assert with_claim(window, claim).errors == {"outcome_duplicate": 1, "outcome_unknown": 1}
    (got,) = claim.bundles
    assert got.truth.tolist() == truth
    answers = agent.predict(data, ids=[f"again-{i}" for i in range(40)])
    assert got.predicted.tolist() == np.asarray(answers.labels).astype(int).tolist()
    np.testing.assert_allclose(got.scores, answers.probabilities, atol=1e-6)


def test_outcomes_after_a_switch_count_for_the_old_bundle(agent, load):
    v1, v2 = load("1.0.0"), load("1.1.0", model="inverted")
    agent.activate(v1)
    data, truth = labelled(25, seed=8)
    old = agent.predict(data).ids
    agent.activate(v2)
    new = agent.predict(data).ids
    agent.record_outcomes([*zip(old, truth, strict=True), *zip(new[:5], truth, strict=False)])
    by = {b.bundle.label: b for b in agent.store.claim(1).bundles}
    assert by["sensor@1.0.0"].rows == 25 and by["sensor@1.1.0"].rows == 5
    assert by["sensor@1.0.0"].bundle.sha256 == v1.ref.sha256


def test_a_repeated_caller_id_is_counted_not_refused(agent, load):
    agent.activate(load())
    agent.predict(rows(2), ids=["evt-1", "evt-2"])
    agent.predict(rows(1), ids=["evt-1"])
    agent.flush()
    assert agent.close_window().errors == {"duplicate_id": 1}


def test_no_store_no_outcomes(load):
    agent = Agent("dev-1")
    try:
        agent.activate(load())
        pid = agent.predict(rows(1)).ids[0]
        with pytest.raises(OutcomeError):
            agent.record_outcomes([(pid, 1)])
    finally:
        agent.close()


# -- the local HTTP routes --------------------------------------------------------------


@pytest.fixture
def server(agent):
    s = LocalServer(agent, lambda: {}, port=0, max_body=1 << 20)
    s.start()
    yield s
    s.stop()


def call(server, path, body):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("POST", path, body=body if isinstance(body, bytes) else
                     json.dumps(body).encode())
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_http_ids_and_outcomes(agent, server, load):
    agent.activate(load())
    data, truth = labelled(10)
    status, body = call(server, "/predict", {"rows": data[:8]})
    assert status == 200
    ids = [p["id"] for p in body["predictions"]]
    status, body = call(server, "/predict", {"rows": data[8:], "ids": ["app-1", "app-2"]})
    assert [p["id"] for p in body["predictions"]] == ["app-1", "app-2"]
    status, body = call(server, "/predict", {"row": data[0], "id": "app-3"})
    assert status == 200 and body["prediction"]["id"] == "app-3"
    outcomes = [{"id": i, "label": t} for i, t in zip([*ids, "app-1", "app-2"], truth,
                                                      strict=True)]
    status, body = call(server, "/outcomes", {"outcomes": [*outcomes, outcomes[0],
                                                           {"id": "gone", "label": 0}]})
    assert status == 200
    assert body == {"counts": {"joined": 10, "unknown": 1, "expired": 0, "duplicate": 1,
                               "bad_label": 0}}
    status, body = call(server, "/outcomes", {"outcomes": [{"id": "app-3", "label": 5}]})
    assert status == 400 and body["error"]["type"] == "OutcomeLabelError"
    assert body["error"]["id"] == "app-3"
    assert agent.store.claim(1).rows == 10


@pytest.mark.parametrize(("path", "body", "kind", "where"), [
    pytest.param("/predict", {"rows": "ROWS", "ids": ["a"]}, "PredictionIdError",
                 ("field", "ids"), id="id-count"),
    pytest.param("/predict", {"rows": "ROWS", "ids": ["a", "a"]}, "PredictionIdError",
                 ("row", 1), id="id-repeated"),
    pytest.param("/predict", {"rows": "ROWS", "ids": ["a", "b/c"]}, "PredictionIdError",
                 ("row", 1), id="id-bad"),
    pytest.param("/outcomes", {"outcomes": [{"id": "a"}]}, "SchemaError",
                 ("field", "outcomes[0].label"), id="no-label"),
    pytest.param("/outcomes", {"outcomes": [{"id": "a b", "label": 1}]}, "SchemaError",
                 ("field", "outcomes[0].id"), id="bad-id"),
    pytest.param("/outcomes", {"outcomes": [{"id": "a", "label": 1, "x": 2}]}, "SchemaError",
                 ("field", "outcomes[0].x"), id="unknown-field"),
    pytest.param("/outcomes", {"outcomes": "a"}, "SchemaError", ("field", "outcomes"),
                 id="not-a-list"),
    pytest.param("/outcomes", {"outcomes": [{"id": f"i{i}", "label": 0}
                                            for i in range(10_001)]},
                 "SchemaError", ("field", "outcomes"), id="too-many"),
])
def test_http_refusals_name_the_field(agent, server, load, path, body, kind, where):
    agent.activate(load())
    if body.get("rows") == "ROWS":
        body = dict(body, rows=rows(2))
    status, got = call(server, path, body)
    assert status == 400 and got["error"]["type"] == kind, got
    assert got["error"][where[0]] == where[1]
    assert agent.store.unreported() == 0


# -- performance blocks in the summary ---------------------------------------------------


def summary_of(window, claim):
    """The summary a daemon would store for ``window`` with ``claim``, through the wire."""
    message = with_claim(window, claim).summary("dev-1", claim.seq)
    return decode(message.topic, encode(message))


def test_realized_metrics_from_the_summaries_equal_sklearns(agent, load):
    from sklearn import metrics as sk

    model = load()
    agent.activate(model)
    data, truth = labelled(400, seed=12)
    result = agent.predict(data)
    ids = list(result.ids)
    predicted = np.asarray(result.labels).astype(int)
    picked = sorted({*range(0, 400, 3), *range(1, 400, 7)})
    agent.record_outcomes((ids[i], truth[i]) for i in picked[:100])
    first = summary_of(agent.close_window(), agent.store.claim(1))
    agent.record_outcomes((ids[i], truth[i]) for i in picked[100:])
    second = summary_of(agent.close_window(), agent.store.claim(2))
    spec = PerformanceSpec.from_manifest(model.manifest)
    blocks = [Realized.from_wire(spec, e.realized) for s in (first, second)
              for e in s.performance if e.realized is not None]
    merged = blocks[0].copy().merge(blocks[1])
    y, p = np.asarray(truth)[picked], predicted[picked]
    assert merged.n == len(picked)
    np.testing.assert_array_equal(merged.confusion(), sk.confusion_matrix(y, p))
    got = merged.metrics()
    assert got["accuracy"].value == pytest.approx(sk.accuracy_score(y, p), abs=1e-12)
    for c in (0, 1):
        for name, fn in (("precision", sk.precision_score), ("recall", sk.recall_score),
                         ("f1", sk.f1_score)):
            assert got[f"{name}[{c}]"].value == pytest.approx(fn(y, p, pos_label=c),
                                                                abs=1e-12)
    scores = np.asarray(result.probabilities)[picked][:, 1]
    assert abs(got["auc"].value - sk.roc_auc_score(y, scores)) < 0.005
    # every served row is in the windows' estimates, of the live bundle only
    estimates = [Estimated.from_wire(spec, e.estimated) for s in (first, second)
                 for e in s.performance if e.estimated is not None]
    assert sum(e.n for e in estimates) == 400
    assert all(e.bundle.sha256 == model.ref.sha256 for s in (first, second)
               for e in s.performance)


def test_the_estimate_uses_the_raw_probabilities_without_a_calibration_map(agent, load):
    model = load()
    assert model.manifest.calibration is None  # the test bundles carry none
    agent.activate(model)
    result = agent.predict(rows(50, seed=2))
    window = agent.close_window()
    (entry,) = window.performance
    assert entry.realized is None and entry.bundle == model.ref
    spec = PerformanceSpec.from_manifest(model.manifest)
    estimate = Estimated.from_wire(spec, entry.estimated)
    assert estimate.n == 50 and not estimate.calibrated
    proba = np.asarray(result.probabilities, dtype=np.float64)
    top = proba.max(axis=1)
    assert estimate.metrics()["accuracy"].value == pytest.approx(top.mean(), rel=1e-9)


def test_a_switched_devices_summary_carries_the_old_bundles_realized_block(agent, load):
    v1, v2 = load("1.0.0"), load("1.1.0", model="inverted")
    agent.activate(v1)
    data, truth = labelled(30, seed=4)
    old = agent.predict(data)
    agent.activate(v2)
    agent.predict(data[:10])
    agent.record_outcomes(zip(old.ids, truth, strict=True))
    summary = summary_of(agent.close_window(), agent.store.claim(1))
    by = {e.bundle.version: e for e in summary.performance}
    assert summary.bundle.version == "1.1.0"
    assert by["1.0.0"].realized is not None and by["1.0.0"].estimated is None
    assert by["1.1.0"].realized is None and by["1.1.0"].estimated is not None
    spec = PerformanceSpec.from_manifest(v1.manifest)
    block = Realized.from_wire(spec, by["1.0.0"].realized)
    want = (np.asarray(old.labels).astype(int) == np.asarray(truth)).mean()
    assert block.n == 30 and block.metrics()["accuracy"].value == pytest.approx(want)


@pytest.fixture(scope="module")
def other_tasks(tmp_path_factory, signing_keys):
    """A regressor (the current draw from the other readings) and a three-class model
    (the temperature band), built by the real packager on the sensor data."""
    import warnings

    import joblib
    from sklearn.linear_model import LogisticRegression, Ridge

    from packager.build import BuildOptions, build

    work = tmp_path_factory.mktemp("tasks")
    frame = sensor_data(600, seed=21)
    inputs = ["temperature", "humidity", "vibration"]
    frame["band"] = np.digitize(frame["temperature"], [55.0, 65.0])
    made = {}
    for name, est, target in (("load", Ridge(), "current"),
                              ("band", LogisticRegression(max_iter=1000), "band")):
        d = work / name
        d.mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est.fit(frame[inputs], frame[target])
        joblib.dump(est, d / "model.joblib")
        frame[[*inputs, target]].to_csv(d / "train.csv", index=False)
        result = build(BuildOptions(model=d / "model.joblib", train_data=d / "train.csv",
                                    target=target, name=name, version="1.0.0",
                                    key=signing_keys.build.private, out_dir=d))
        trust = TrustStore.from_files(signing_keys.trust_specs())
        made[name] = LoadedModel(verify_bundle(result.path.read_bytes(), trust))
    return made, frame, inputs


def test_a_regressors_realized_errors_equal_sklearns(agent, other_tasks):
    from sklearn import metrics as sk

    models, frame, inputs = other_tasks
    model = models["load"]
    assert model.task == "regression"
    agent.activate(model)
    result = agent.predict(frame[inputs].to_dict("records")[:200])
    truth = frame["current"].to_numpy()[:200]
    assert agent.record_outcomes(zip(result.ids, truth.tolist(), strict=True)).joined == 200
    extra = agent.predict(frame[inputs].to_dict("records")[:2]).ids
    for bad in ("high", float("nan")):
        with pytest.raises(OutcomeLabelError):
            agent.record_outcomes([(extra[0], bad)])
    summary = summary_of(agent.close_window(), agent.store.claim(1))
    (entry,) = summary.performance
    spec = PerformanceSpec.from_manifest(model.manifest)
    got = Realized.from_wire(spec, entry.realized).metrics()
    values = np.asarray(result.values, dtype=np.float64).reshape(-1)
    assert got["mae"].value == pytest.approx(sk.mean_absolute_error(truth, values), rel=1e-9)
    assert got["rmse"].value == pytest.approx(
        np.sqrt(sk.mean_squared_error(truth, values)), rel=1e-9)
    assert Estimated.from_wire(spec, entry.estimated).n == 202


def test_a_multiclass_models_realized_metrics_equal_sklearns(agent, other_tasks):
    from sklearn import metrics as sk

    models, frame, inputs = other_tasks
    model = models["band"]
    assert len(model.classes) == 3
    agent.activate(model)
    result = agent.predict(frame[inputs].to_dict("records")[200:500])
    truth = frame["band"].to_numpy()[200:500]
    agent.record_outcomes(zip(result.ids, truth.tolist(), strict=True))
    summary = summary_of(agent.close_window(), agent.store.claim(1))
    (entry,) = summary.performance
    spec = PerformanceSpec.from_manifest(model.manifest)
    block = Realized.from_wire(spec, entry.realized)
    pred = np.asarray(result.labels).astype(int)
    np.testing.assert_array_equal(block.confusion(), sk.confusion_matrix(truth, pred))
    got = block.metrics()
    assert got["accuracy"].value == pytest.approx(sk.accuracy_score(truth, pred))
    assert got["f1_macro"].value == pytest.approx(sk.f1_score(truth, pred, average="macro"))
    estimate = Estimated.from_wire(spec, entry.estimated)
    top = np.asarray(result.probabilities, dtype=np.float64).max(axis=1)
    assert estimate.metrics()["accuracy"].value == pytest.approx(top.mean(), rel=1e-9)
