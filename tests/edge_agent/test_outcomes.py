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
from edgefleet.contract.messages import ID_RE, Outcome
from edgefleet.contract.signing import TrustStore
from tests.bundles import FEATURES, sensor_data


@pytest.fixture(scope="module")
def load(bundles, signing_keys):
    trust = TrustStore.from_files(signing_keys.trust_specs())

    def make(version: str = "1.0.0", model: str = "logreg") -> LoadedModel:
        return LoadedModel(verify_bundle(bundles.build(version, model=model).read_bytes(),
                                         trust))

    return make


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
