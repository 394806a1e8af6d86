"""The local endpoint over real HTTP: predictions, health, and errors as JSON with a status."""

from __future__ import annotations

import http.client
import json

import pytest

from edge_agent.agent import Agent
from edge_agent.httpapi import LocalServer
from edge_agent.model import LoadedModel
from edgefleet.contract.bundle import verify_bundle
from edgefleet.contract.signing import TrustStore
from tests.bundles import FEATURES, sensor_data


@pytest.fixture(scope="module")
def model(bundles, signing_keys):
    trust = TrustStore.from_files(signing_keys.trust_specs())
    return LoadedModel(verify_bundle(bundles.build("1.0.0").read_bytes(), trust))


@pytest.fixture
def served(model):
    agent = Agent("dev")
    server = LocalServer(agent, lambda: {"bundle": agent.model and agent.model.label},
                         port=0, max_body=50_000)
    server.start()
    yield agent, server
    server.stop()
    agent.close()


def call(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


ROWS = sensor_data(5, seed=9)[list(FEATURES)].to_dict("records")


def test_predict_and_health(served, model):
    agent, server = served
    assert call(server, "GET", "/health")[0] == 503  # nothing installed yet
    status, body = call(server, "POST", "/predict", {"rows": ROWS})
    assert status == 503 and body["error"]["type"] == "NoModel"
    agent.activate(model)
    status, body = call(server, "POST", "/predict", {"rows": ROWS})
    assert status == 200 and body["bundle"] == "sensor@1.0.0"
    ids = [p["id"] for p in body["predictions"]]
    assert len(set(ids)) == len(ROWS)  # every row has its own id
    want = agent.predict(ROWS, ids=ids).rows(model.classes)
    assert body["predictions"] == want
    status, body = call(server, "POST", "/predict", {"row": ROWS[0], "id": ids[0]})
    assert status == 200 and body["prediction"] == want[0]
    assert call(server, "GET", "/health") == (200, {"bundle": "sensor@1.0.0"})


@pytest.mark.parametrize(("method", "path", "body", "status", "kind"), [
    pytest.param("POST", "/predict", {"rows": [{"temperature": 1.0}]}, 400, "InputError",
                 id="missing-feature"),
    pytest.param("POST", "/predict", {"rows": "x"}, 400, "InputError", id="rows-not-a-list"),
    pytest.param("POST", "/predict", {"something": 1}, 400, "InputError", id="no-rows"),
    pytest.param("POST", "/predict", b"{not json", 400, "NotJson", id="not-json"),
    pytest.param("POST", "/predict", b"x" * 60_000, 413, "PayloadTooLarge", id="too-large"),
    pytest.param("GET", "/nope", None, 404, "NotFound", id="unknown-path"),
    pytest.param("POST", "/other", {"rows": []}, 404, "NotFound", id="unknown-post"),
])
def test_errors_are_json(served, model, method, path, body, status, kind):
    served[0].activate(model)
    got_status, got = call(served[1], method, path, body)
    assert got_status == status and got["error"]["type"] == kind
    assert got["error"]["message"]


def test_an_input_error_names_the_feature(served, model):
    served[0].activate(model)
    bad = dict(ROWS[0], humidity="wet")
    status, body = call(served[1], "POST", "/predict", {"rows": [ROWS[0], bad]})
    assert status == 400
    assert body["error"]["feature"] == "humidity" and body["error"]["row"] == 1


def test_keep_alive_serves_many_requests_on_one_connection(served, model):
    served[0].activate(model)
    conn = http.client.HTTPConnection(served[1].host, served[1].port, timeout=5)
    try:
        for row in ROWS:
            conn.request("POST", "/predict", body=json.dumps({"row": row}))
            response = conn.getresponse()
            assert response.status == 200
            json.loads(response.read())
    finally:
        conn.close()
    assert served[0].predictions == len(ROWS)


def test_an_answer_resting_on_an_unseen_category_says_so():
    """Served and counted as before, and now flagged in the answer (issue 17)."""
    from edge_agent.httpapi import _flag_unseen
    from edgefleet.contract.manifest import FeatureSpec

    inputs = (FeatureSpec("load", "numeric", "float64"),
              FeatureSpec("site", "categorical", "string", categories=("north", "south")),
              FeatureSpec("shift", "categorical", "string", categories=("day", "night")))
    answers = [{"label": 1}, {"label": 0}, {"label": 1}, {"label": 0}]
    rows = [{"load": 1.0, "site": "north", "shift": "day"},
            {"load": 2.0, "site": "east", "shift": "dusk"},
            [3.0, "south", "dusk"],  # a list in schema order
            {"load": 4.0, "site": None, "shift": "night"}]  # missing is not unseen
    _flag_unseen(answers, rows, inputs)
    assert answers == [{"label": 1}, {"label": 0, "unseen": ["site", "shift"]},
                       {"label": 1, "unseen": ["shift"]}, {"label": 0}]
