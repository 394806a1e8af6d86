"""Explanations on the device: real bundles built by the packager, real onnxruntime.

- a linear model (scaled logistic regression): each contribution is the coefficient times the
  distance from the reference mean, and they add up to the log-odds' distance from the
  baseline row's, which is checked by predicting the baseline row itself;
- a linear model over a categorical input (one-hot): the same, per input column;
- a tree ensemble: baseline substitution, each contribution recomputed row by row;
- bad rows: the errors predict gives, from the library, the local HTTP endpoint and the CLI.
"""

from __future__ import annotations

import http.client
import json
import warnings

import joblib
import numpy as np
import pandas as pd
import pytest

from edge_agent.agent import Agent, NoModelError
from edge_agent.cli import main
from edge_agent.explain import Explainer, _median
from edge_agent.httpapi import LocalServer
from edge_agent.model import LoadedModel
from edgefleet.contract.bundle import read_unverified, verify_bundle
from edgefleet.contract.errors import InputError
from edgefleet.contract.signing import TrustStore
from tests.bundles import FEATURES, sensor_data

ROWS = sensor_data(6, seed=11)[list(FEATURES)].to_dict("records")


def _load(path, signing_keys) -> LoadedModel:
    trust = TrustStore.from_files(signing_keys.trust_specs())
    return LoadedModel(verify_bundle(path.read_bytes(), trust))


def _agent(model: LoadedModel):
    agent = Agent("dev")
    agent.activate(model)
    return agent


def _log_odds(agent: Agent, row, cls: int) -> float:
    p = float(np.clip(agent.predict([row]).probabilities[0][cls], 1e-7, 1 - 1e-7))
    return float(np.log(p) - np.log1p(-p))


def _build(directory, signing_keys, name: str, pipe, frame: pd.DataFrame):
    from packager.build import BuildOptions, build

    directory.mkdir(parents=True, exist_ok=True)
    frame.to_csv(directory / "train.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.fit(frame.drop(columns=["fault"]), frame["fault"])
    joblib.dump(pipe, directory / "model.joblib")
    return build(BuildOptions(model=directory / "model.joblib",
                              train_data=directory / "train.csv", target="fault", name=name,
                              version="1.0.0", key=signing_keys.build.private,
                              out_dir=directory, code_revision="test")).path


@pytest.fixture(scope="module")
def linear(bundles, signing_keys):
    path = bundles.build("1.0.0")  # Pipeline(StandardScaler, LogisticRegression)
    pipe = joblib.load(path.parent / "model.joblib")
    return _load(path, signing_keys), pipe


@pytest.fixture(scope="module")
def forest(tmp_path_factory, signing_keys):
    from sklearn.ensemble import RandomForestClassifier

    frame = sensor_data(600, seed=3)[[*FEATURES, "fault"]]
    path = _build(tmp_path_factory.mktemp("forest"), signing_keys, "forest",
                  RandomForestClassifier(n_estimators=15, max_depth=5, random_state=0), frame)
    return _load(path, signing_keys), frame


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, signing_keys):
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = sensor_data(600, seed=4)[[*FEATURES, "fault"]]
    frame.insert(0, "site", np.random.default_rng(4).choice(["a", "b", "c"], len(frame)))
    pipe = Pipeline([("prep", ColumnTransformer([
        ("num", StandardScaler(), list(FEATURES)),
        ("cat", OneHotEncoder(handle_unknown="ignore"), ["site"])])),
        ("model", LogisticRegression(max_iter=500))])
    path = _build(tmp_path_factory.mktemp("mixed"), signing_keys, "mixed", pipe, frame)
    return _load(path, signing_keys)


def test_a_linear_models_contributions_are_exact(linear):
    model, pipe = linear
    agent = _agent(model)
    scaler, logreg = pipe.named_steps["scale"], pipe.named_steps["model"]
    try:
        for row in ROWS:
            answer = agent.explain(row)
            assert answer.method == "linear_exact" and "LogisticRegression" in answer.why
            c = int(np.argmax(agent.predict([row]).probabilities[0]))
            # (float32: a row in a batch of five rounds a little differently than alone)
            assert answer.value == pytest.approx(_log_odds(agent, row, c), abs=1e-4)
            base = {x.feature: x.baseline for x in answer.contributions}
            # the baseline row, predicted on its own, has the log-odds the answer gives, and
            # the contributions add up to the distance from it
            assert answer.baseline_value == pytest.approx(_log_odds(agent, base, c), abs=2e-4)
            total = sum(x.contribution for x in answer.contributions)
            assert total == pytest.approx(answer.value - _log_odds(agent, base, c), abs=2e-4)
            # coefficient times the distance from the reference mean (the training mean)
            sign = 1.0 if c == 1 else -1.0
            for x in answer.contributions:
                j = FEATURES.index(x.feature)
                assert base[x.feature] == pytest.approx(scaler.mean_[j], rel=1e-9)
                want = sign * logreg.coef_[0][j] * (row[x.feature] - scaler.mean_[j]) \
                    / scaler.scale_[j]
                assert x.contribution == pytest.approx(want, abs=2e-4)
            mags = [abs(x.contribution) for x in answer.contributions]
            assert mags == sorted(mags, reverse=True)
    finally:
        agent.close()


def test_a_linear_model_over_a_categorical_input_is_exact_per_input_column(mixed):
    agent = _agent(mixed)
    rows = sensor_data(5, seed=12)[list(FEATURES)].to_dict("records")
    try:
        for row, site in zip(rows, ["a", "b", "c", "zzz", "a"], strict=True):
            row = {"site": site, **row}
            answer = agent.explain(row)
            assert answer.method == "linear_exact"
            names = [x.feature for x in answer.contributions]
            assert sorted(names) == sorted(["site", *FEATURES])
            base = {x.feature: x.baseline for x in answer.contributions}
            assert base["site"] in ("a", "b", "c")  # the reference's most frequent
            c = int(np.argmax(agent.predict([row]).probabilities[0]))
            total = sum(x.contribution for x in answer.contributions)
            assert total == pytest.approx(answer.value - _log_odds(agent, base, c), abs=3e-4)
    finally:
        agent.close()


def test_a_linear_regressors_contributions_add_up_to_its_value_from_the_baseline(
        tmp_path_factory, signing_keys):
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler

    frame = sensor_data(400, seed=5)[list(FEATURES)]
    frame["fault"] = 2.0 * frame["temperature"] - 30.0 * frame["vibration"] + 0.1 * \
        np.random.default_rng(5).normal(size=len(frame))
    path = _build(tmp_path_factory.mktemp("ridge"), signing_keys, "ridge",
                  Pipeline([("scale", MinMaxScaler()), ("model", Ridge(alpha=0.1))]), frame)
    model = _load(path, signing_keys)
    agent = _agent(model)
    try:
        for row in ROWS:
            answer = agent.explain(row)
            assert answer.method == "linear_exact" and answer.score == "value"
            base = {x.feature: x.baseline for x in answer.contributions}
            direct = float(np.asarray(agent.predict([base]).values).reshape(-1)[0])
            assert answer.baseline_value == pytest.approx(direct, rel=1e-5, abs=1e-3)
            assert answer.value == pytest.approx(
                float(np.asarray(agent.predict([row]).values).reshape(-1)[0]), rel=1e-5)
            assert answer.contributions[0].feature in ("temperature", "vibration")
    finally:
        agent.close()


def test_a_tree_models_answer_is_baseline_substitution_recomputed_row_by_row(forest):
    model, frame = forest
    agent = _agent(model)
    explainer = Explainer(model)
    try:
        for row in ROWS:
            answer = agent.explain(row)
            assert answer.method == "baseline_substitution"
            assert "RandomForestClassifier is not a linear model" in answer.why
            assert answer.baseline_value is None
            assert any(abs(x.contribution) > 1e-3 for x in answer.contributions)
            c = int(np.argmax(agent.predict([row]).probabilities[0]))
            value = _log_odds(agent, row, c)
            assert answer.value == pytest.approx(value, abs=1e-4)
            for x in answer.contributions:
                swapped = {**row, x.feature: x.baseline}
                assert x.contribution == pytest.approx(value - _log_odds(agent, swapped, c),
                                                       abs=2e-4)
        # the baselines: each input's median, read from the reference bins (quantiles of
        # the training data): within one bin of the training column's own median
        for name, b in zip(model.validator.names, explainer.baseline_cells, strict=True):
            state = model.reference.inputs[name]
            edges = np.asarray(state.spec.edges)
            k = int(np.searchsorted(edges, np.median(frame[name])))
            width = edges[min(k, len(edges) - 1)] - edges[max(k - 1, 0)]
            assert abs(b - np.median(frame[name])) <= width
            assert b == _median(state)
    finally:
        agent.close()


BAD = [
    pytest.param({"temperature": 1.0}, id="missing-feature"),
    pytest.param({**ROWS[0], "humidity": "wet"}, id="wrong-type"),
    pytest.param({**ROWS[0], "vibration": float("nan")}, id="nan"),
    pytest.param([1.0, 2.0], id="short-list"),
    pytest.param("row", id="not-a-row"),
]


@pytest.mark.parametrize("row", BAD)
def test_bad_rows_get_the_errors_predict_gives(linear, row):
    agent = _agent(linear[0])
    try:
        with pytest.raises(InputError) as predicted:
            agent.predict([row])
        with pytest.raises(InputError) as explained:
            agent.explain(row)
        assert (str(explained.value), explained.value.feature) == \
            (str(predicted.value), predicted.value.feature)
    finally:
        agent.close()


def test_nothing_installed_is_no_model():
    agent = Agent("dev")
    try:
        with pytest.raises(NoModelError):
            agent.explain(ROWS[0])
    finally:
        agent.close()


def _post(server, path, body):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("POST", path, body=json.dumps(body).encode())
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_post_explain_on_the_local_endpoint(linear):
    model = linear[0]
    agent = Agent("dev")
    server = LocalServer(agent, lambda: {}, port=0)
    server.start()
    try:
        assert _post(server, "/explain", {"row": ROWS[0]})[1]["error"]["type"] == "NoModel"
        agent.activate(model)
        status, body = _post(server, "/explain", {"row": ROWS[0]})
        assert status == 200
        assert body == json.loads(json.dumps(agent.explain(ROWS[0]).to_dict()))
        assert body["method"] == "linear_exact" and len(body["contributions"]) == 4
        # a bad row: the same 400 body as /predict
        bad = {**ROWS[0], "humidity": "wet"}
        assert _post(server, "/explain", {"row": bad}) == _post(server, "/predict",
                                                                {"row": bad})
        assert _post(server, "/explain", {"rows": [ROWS[0]]})[0] == 400
    finally:
        server.stop()
        agent.close()


def test_edge_agent_explain_reads_a_row_as_json(bundles, signing_keys, capsys):
    bundle = bundles.build("1.0.0")
    trust = [a for spec in signing_keys.trust_specs() for a in ("--trust", spec)]
    assert main(["explain", "--bundle", str(bundle), "--row", json.dumps(ROWS[0]), *trust,
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["bundle"] == "sensor@1.0.0" and doc["method"] == "linear_exact"
    assert {c["feature"] for c in doc["contributions"]} == set(FEATURES)
    assert main(["explain", "--bundle", str(bundle), "--row", json.dumps(ROWS[0]),
                 *trust]) == 0
    out = capsys.readouterr().out
    assert "method: linear_exact" in out and "log-odds of class" in out
    assert main(["explain", "--bundle", str(bundle), "--row", '{"temperature": 1}',
                 *trust]) == 1
    assert "feature 'humidity' is missing" in capsys.readouterr().err
    assert main(["explain", "--bundle", str(bundle), "--row", "{not json", *trust]) == 1
    assert read_unverified(bundle.read_bytes()).manifest.name == "sensor"
