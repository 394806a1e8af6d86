"""Retraining runs (issue 15): the server's record of the loop and its lineage, on both
store engines, through the service, the real HTTP API and the CLI."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from click.testing import CliRunner

from fleet_server.cli import main
from fleet_server.errors import ConflictError, InvalidRequestError, NotFoundError
from fleet_server.services import Services, build_services
from tests.fleet_server.conftest import make_config

T0 = 1_790_000_000.0


@pytest.fixture
def fleet(tmp_path, signing_keys, db, bundles) -> Services:
    services = build_services(make_config(tmp_path, signing_keys, db=db))
    services.bundles.upload(bundles.build("1.0.0").read_bytes(), "test", T0)
    services.registry.create_group("plant-a", {"site": "a"}, "test", T0)
    yield services
    services.close()


def _alert(s: Services) -> int:
    bundle = s.bundles.get("sensor", "1.0.0")
    return s.alerts.raise_alert("drift", bundle, group="plant-a", message="humidity drifts",
                                details={}, now=T0).id


def test_a_run_from_an_alert_to_a_promotion_keeps_its_lineage(fleet: Services) -> None:
    r = fleet.retrains
    alert_id = _alert(fleet)
    run = r.start(recipe="sensor", recipe_hash="ab" * 32, revision="c0ffee",
                  trigger=f"alert:{alert_id}", group="plant-a", bundle="sensor",
                  actor="runner", now=T0 + 1)
    assert (run.status, run.alert_id, run.started) == ("running", alert_id, T0 + 1)
    # one run of a recipe at a time
    with pytest.raises(ConflictError, match="in progress"):
        r.start(recipe="sensor", recipe_hash="", revision="", trigger="manual",
                group="plant-a", bundle="sensor", actor="runner", now=T0 + 2)
    r.update(run.id, {"data": {"rows": 5000}, "champion": "sensor@1.0.0"}, "runner", T0 + 3)
    r.update(run.id, {"data": {"sha256": "d" * 64}}, "runner", T0 + 4)  # merged, not replaced
    with pytest.raises(InvalidRequestError, match="challenger and the rollout"):
        r.update(run.id, {"status": "promoted"}, "runner", T0 + 5)
    done = r.update(run.id, {"status": "promoted", "challenger": "sensor@1.1.0",
                             "rollout": "retrain-1", "metrics": {"accuracy": [0.81, 0.9]}},
                    "runner", T0 + 6)
    assert (done.status, done.finished) == ("promoted", T0 + 6)
    assert done.data == {"rows": 5000, "sha256": "d" * 64}
    with pytest.raises(ConflictError, match="never changed"):
        r.update(run.id, {"reason": "late"}, "runner", T0 + 7)
    steps = [(link["step"], link["id"], link["state"]) for link in r.lineage(done)]
    assert steps == [("alert", alert_id, "open"), ("run", run.id, "promoted"),
                     ("champion", "sensor@1.0.0", "judged against"),
                     ("challenger", "sensor@1.1.0", "won"),
                     ("rollout", "retrain-1", "gone")]  # no such rollout was made here
    assert [x.id for x in r.list(alert_id=alert_id)] == [run.id]
    # by bundle: the runs that built it or were judged against it (the dashboard's filter)
    other = r.start(recipe="other", recipe_hash="", revision="", trigger="manual",
                    group="plant-a", bundle="sensor", actor="runner", now=T0 + 8)
    r.update(other.id, {"champion": "sensor@1.1.0", "challenger": "sensor@1.2.0"}, "runner",
             T0 + 9)
    assert [x.id for x in r.list(bundle="sensor@1.1.0")] == [other.id, run.id]
    assert [x.id for x in r.list(bundle="sensor@1.0.0")] == [run.id]
    assert [x.id for x in r.list(bundle="sensor@1.2.0", status="running")] == [other.id]
    assert r.list(bundle="sensor@9.0.0") == []
    # the audit log holds the start and the finish
    actions = [e.action for e in fleet.store.list_audit(target=f"retrain:{run.id}")]
    assert sorted(actions) == ["retrain.promoted", "retrain.start"]


def test_a_requested_run_is_claimed_once_and_a_loss_says_why(fleet: Services) -> None:
    r = fleet.retrains
    asked = r.start(recipe="sensor", recipe_hash="", revision="", trigger="manual",
                    group="plant-a", bundle="sensor", actor="ana", now=T0, requested=True)
    assert asked.status == "requested" and asked.started is None
    with pytest.raises(ConflictError, match="not running"):
        r.update(asked.id, {"status": "rejected", "reason": "x"}, "runner", T0)
    claimed = r.claim("sensor", "runner", T0 + 1)
    assert claimed is not None and (claimed.id, claimed.status) == (asked.id, "running")
    assert r.claim("sensor", "runner", T0 + 2) is None  # nothing else requested
    with pytest.raises(InvalidRequestError, match="says why"):
        r.update(asked.id, {"status": "rejected"}, "runner", T0 + 3)
    lost = r.update(asked.id, {"status": "rejected", "challenger": "sensor@1.1.0",
                               "reason": "accuracy +0.004 < +0.01 (McNemar p 0.41)"},
                    "runner", T0 + 4)
    assert lost.status == "rejected" and lost.rollout is None
    assert [link["step"] for link in r.lineage(lost)] == ["trigger", "run", "challenger"]
    assert r.lineage(lost)[-1]["state"] == "lost"


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"recipe": "a b"}, InvalidRequestError, "recipe"),
    ({"trigger": "alert:x"}, InvalidRequestError, "trigger"),
    ({"trigger": "alert:999"}, NotFoundError, "alert"),
    ({"group": "nope"}, NotFoundError, "group"),
    ({"bundle": "Bad Name"}, InvalidRequestError, "bundle"),
])
def test_bad_runs_are_refused_naming_the_field(fleet: Services, kwargs, error, words) -> None:
    args = {"recipe": "sensor", "recipe_hash": "", "revision": "", "trigger": "manual",
            "group": "plant-a", "bundle": "sensor", "actor": "a", "now": T0, **kwargs}
    with pytest.raises(error, match=words):
        fleet.retrains.start(**args)


def test_the_api_and_the_cli(server_factory, bundles) -> None:
    server = server_factory(http=True)
    s = server.services
    s.bundles.upload(bundles.build("1.0.0").read_bytes(), "test", time.time())
    s.registry.create_group("plant-a", {"site": "a"}, "test", time.time())
    tokens = {role: s.auth.create_token(role, role, "test", time.time()).secret
              for role in ("viewer", "operator")}
    url = server.base_url + "/api/v1/retrains"

    def call(method, path="", role="operator", **kw):
        return httpx.request(method, url + path, timeout=10,
                             headers={"Authorization": f"Bearer {tokens[role]}"}, **kw)

    body = {"recipe": "sensor", "group": "plant-a", "bundle": "sensor"}
    assert call("POST", json=body, role="viewer").status_code == 403
    assert call("POST", json={**body, "extra": 1}).status_code == 422
    made = call("POST", json=body)
    assert made.status_code == 201 and made.json()["status"] == "running"
    assert call("POST", json=body).status_code == 409
    assert call("POST", "/claim", json={"recipe": "sensor"}).status_code == 204
    run_id = made.json()["id"]
    patched = call("PATCH", f"/{run_id}", json={"status": "rejected", "reason": "lost"})
    assert patched.status_code == 200 and patched.json()["finished"] is not None
    assert call("PATCH", f"/{run_id}", json={"reason": "again"}).status_code == 409
    assert call("GET", "/999").status_code == 404

    env = {"FLEET_SERVER": server.base_url, "FLEET_TOKEN": tokens["operator"]}
    runner = CliRunner()
    out = runner.invoke(main, ["retrain", "start", "sensor", "--group", "plant-a",
                               "--bundle", "sensor"], env=env)
    assert out.exit_code == 0 and "requested for recipe sensor" in out.output
    listed = json.loads(runner.invoke(main, ["retrain", "list", "--json"], env=env).output)
    assert [(r["status"], r["trigger"]) for r in listed] == [("requested", "manual"),
                                                             ("rejected", "manual")]
    shown = runner.invoke(main, ["retrain", "show", str(run_id)], env=env).output
    assert shown.startswith(f"retrain run {run_id}: recipe sensor for group plant-a, rejected")
    assert "reason: lost" in shown and "lineage:" in shown
    missing = runner.invoke(main, ["retrain", "show", "999"], env=env)
    assert missing.exit_code == 3  # not found (edgefleet.cli)
