"""Governance the fleet enforces: review dates, group requirements, review alerts, and the
six questions of ``fleet bundle show``, through the real API (TestClient over real services,
real SQLite, bundles built by the real packager with cards).

The review dates are relative to today (the API's clock is the real one): ``gov@1.0.0``'s
card was due for review ten days ago; an approver's renewal (``edgepack sign --role
approver --review-by``) re-uploaded lets it go out again.
"""

from __future__ import annotations

import calendar
import json
import time
import warnings
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from edgefleet.contract.approval import sign_approval
from edgefleet.contract.bundle import read_unverified, sign_bundle
from edgefleet.contract.messages import BundleRef
from edgefleet.contract.signing import load_private_key
from fleet_server.api import create_app
from fleet_server.cli import main
from fleet_server.errors import UnknownRequirementError
from fleet_server.registry.governance import REQUIREMENTS, parse_requirements

FEATURES = ["x1", "x2", "x3"]
TODAY = datetime.now(timezone.utc).date()
PAST = (TODAY - timedelta(days=10)).isoformat()
LATER = (TODAY + timedelta(days=100)).isoformat()
HOSTILE = "<script>alert(1)</script> & co"


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["f", "m"], size=n)
    x1, x2, x3 = rng.normal(size=n), rng.normal(size=n), rng.uniform(-1, 1, size=n)
    logit = 1.5 * x1 - 1.0 * x2 + 0.3 * x3 + rng.normal(scale=0.8, size=n)
    return pd.DataFrame({"x1": x1, "x2": x2, "x3": x3, "sex": sex,
                         "target": (logit > 0.2).astype(int)})


@pytest.fixture(scope="module")
def built(tmp_path_factory, signing_keys):
    """``gov@1.0.0``: a card due ten days ago, a fairness bound it passes; ``gov@2.0.0``:
    no card at all; ``gov@3.0.0``: a card, compared with 1.0.0 as its champion."""
    import joblib
    from sklearn.linear_model import LogisticRegression

    from packager.build import BuildOptions, build
    from packager.evaluate import parse_gaps

    d = tmp_path_factory.mktemp("governance")
    train, test = _frame(400, 1), _frame(300, 2)
    train.to_csv(d / "train.csv", index=False)
    test.to_csv(d / "test.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(max_iter=300).fit(train[FEATURES], train["target"])
    joblib.dump(model, d / "model.joblib")
    (d / "card.toml").write_text('owner = "Risk team"\ncontact = "risk@example.com"\n'
                                 f'intended_use = "Triage"\nlimitations = "{HOSTILE}"\n'
                                 f'review_by = {PAST}\n')
    out = {}
    for version, card, champion in (("1.0.0", True, None), ("2.0.0", False, None),
                                    ("3.0.0", True, "1.0.0")):
        result = build(BuildOptions(
            model=d / "model.joblib", train_data=d / "train.csv", eval_data=d / "test.csv",
            target="target", name="gov", version=version, key=signing_keys.build.private,
            out_dir=d, code_revision="test", card=d / "card.toml" if card else None,
            sensitive=("sex",) if card else (),
            fairness_bounds=parse_gaps(["demographic_parity_difference=0.9"]) if card
            else {}, importances=card,
            champion=out[champion] if champion else None))
        out[version] = result.path
    return out


def _approved(path, signing_keys, review_by: str | None, comment: str = "ok") -> bytes:
    key = load_private_key(signing_keys.approver.private)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return sign_bundle(path.read_bytes(), key, approve=lambda m: sign_approval(
        key, m, role="approver", comment=comment, signed_at=stamp, review_by=review_by))


@pytest.fixture
def api(services):
    now = time.time()
    tokens = {r: services.auth.create_token(r, r, "test", now).secret
              for r in ("viewer", "operator", "approver")}
    services.registry.add_device("dev1", {"site": "a"}, "test", now)
    services.registry.add_device("dev2", {"site": "b"}, "test", now)
    with TestClient(create_app(services)) as client:
        def call(method: str, path: str, who: str = "operator", **kw):
            return client.request(method, path, headers={
                "Authorization": f"Bearer {tokens[who]}"}, **kw)
        yield call


def _err(r) -> tuple[int, str, str]:
    body = r.json()["error"]
    return r.status_code, body["type"], body["message"]


def _rollout(call, bundle: str, group: str):
    return call("POST", "/api/v1/rollouts", json={"bundle": bundle, "group": group})


def test_a_rollout_past_its_review_date_is_refused_until_an_approver_renews_it(
        api, built, signing_keys):
    assert api("POST", "/api/v1/bundles", content=built["1.0.0"].read_bytes()).status_code \
        == 201
    assert api("POST", "/api/v1/groups", json={"name": "site-a", "selector": {"site": "a"}}
               ).status_code == 201
    status, kind, message = _err(_rollout(api, "gov@1.0.0", "site-a"))
    assert (status, kind) == (409, "ReviewOverdueError")
    assert "gov@1.0.0" in message and PAST in message and "re-approve" in message
    # and so is a desired state naming it
    status, kind, _ = _err(api("PUT", "/api/v1/devices/dev1/desired",
                               json={"bundle": "gov@1.0.0"}))
    assert (status, kind) == (409, "ReviewOverdueError")
    # an approval without a new date renews nothing
    r = api("POST", "/api/v1/bundles", content=_approved(built["1.0.0"], signing_keys, None))
    assert r.status_code == 200, r.text
    assert _err(_rollout(api, "gov@1.0.0", "site-a"))[1] == "ReviewOverdueError"
    # the approver renews it: the same manifest, signed again with a new date
    renewed = _approved(built["1.0.0"], signing_keys, LATER, "reviewed again")
    r = api("POST", "/api/v1/bundles", content=renewed)
    assert r.status_code == 200, r.text
    assert r.json()["sha256"] == read_unverified(built["1.0.0"].read_bytes()).sha256
    r = _rollout(api, "gov@1.0.0", "site-a")
    assert r.status_code == 201, r.text
    assert api("PUT", "/api/v1/devices/dev2/desired",
               json={"bundle": "gov@1.0.0"}).status_code == 200
    show = api("GET", "/api/v1/bundles/gov/1.0.0/governance", who="viewer").json()
    assert show["review"]["review_by"] == LATER and show["review"]["source"] == "approval"
    assert show["review"]["card_review_by"] == PAST
    assert [a["comment"] for a in show["approved"]["approvals"]] == ["ok", "reviewed again"]


def test_a_renewal_by_a_key_the_server_does_not_trust_as_approver_renews_nothing(
        services, built, signing_keys):
    from edgefleet.contract.signing import generate_key

    stranger = generate_key()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    services.bundles.upload(built["1.0.0"].read_bytes(), "test", time.time())
    services.registry.add_device("dev1", {"site": "a"}, "test", time.time())
    services.registry.create_group("site-a", {"site": "a"}, "test", time.time())
    data = sign_bundle(built["1.0.0"].read_bytes(), stranger, approve=lambda m: sign_approval(
        stranger, m, role="approver", comment="me", signed_at=stamp, review_by=LATER))
    services.bundles.upload(data, "test", time.time())
    record = services.bundles.get("gov", "1.0.0")
    assert [a.trusted for a in services.bundles.approvals(record)] == [False]
    from fleet_server.errors import ReviewOverdueError
    with pytest.raises(ReviewOverdueError, match="due for review"):
        services.rollouts.create({"bundle": "gov@1.0.0", "group": "site-a"},
                                 actor="operator:ana", roles={"operator"})


def test_group_requirements_are_enforced_naming_what_is_missing(api, built, signing_keys):
    for v in ("2.0.0", "3.0.0"):
        assert api("POST", "/api/v1/bundles", content=built[v].read_bytes()).status_code == 201
    r = api("POST", "/api/v1/groups", json={"name": "strict", "selector": {"site": "a"},
                                            "requires": list(REQUIREMENTS)})
    assert r.status_code == 201 and r.json()["requires"] == list(REQUIREMENTS)
    status, kind, message = _err(_rollout(api, "gov@2.0.0", "strict"))
    assert (status, kind) == (409, "RequirementsMissingError")
    assert "requires card, approval, fairness, champion of bundle gov@2.0.0" in message
    # a desired state for a device of the group is held to the same rule
    assert _err(api("PUT", "/api/v1/devices/dev1/desired", json={"bundle": "gov@2.0.0"}))[1] \
        == "RequirementsMissingError"
    # ... a device outside it is not
    assert api("PUT", "/api/v1/devices/dev2/desired",
               json={"bundle": "gov@2.0.0"}).status_code == 200
    # 3.0.0 has a card, a passed fairness bound and a champion comparison, no approval yet
    # (and a review date in the past: the approval renews it)
    api("POST", "/api/v1/bundles", content=_approved(built["3.0.0"], signing_keys, LATER))
    show = api("GET", "/api/v1/bundles/gov/3.0.0/governance", who="viewer").json()
    won = show["evaluation"]["champion"]["won"]
    r = _rollout(api, "gov@3.0.0", "strict")
    if won:
        assert r.status_code == 201, r.text
    else:
        status, kind, message = _err(r)
        assert (status, kind) == (409, "RequirementsMissingError")
        assert "requires champion of" in message and "lost to gov@1.0.0" in message
    group = next(g for g in show["fleet"]["groups"] if g["group"] == "strict")
    assert [m["requirement"] for m in group["missing"]] == ([] if won else ["champion"])


def test_unknown_requirements_are_refused_naming_them(api):
    status, kind, message = _err(api("POST", "/api/v1/groups", json={
        "name": "g", "selector": {}, "requires": ["card", "ethics", "vibes"]}))
    assert (status, kind) == (422, "UnknownRequirementError")
    assert "'ethics'" in message and "'vibes'" in message and "card" not in message.split(
        "(")[0]
    with pytest.raises(UnknownRequirementError):
        parse_requirements(["card,nope"])
    assert parse_requirements(["champion,card", "card"]) == ("card", "champion")


def test_review_alerts_open_before_and_after_the_date_and_resolve(services_on, built,
                                                                  signing_keys):
    s = services_on  # SQLite, then PostgreSQL: the governance migration on both engines
    t0 = time.time()
    record, _ = s.bundles.upload(_approved(built["1.0.0"], signing_keys, LATER), "test", t0)
    s.registry.add_device("dev1", {"site": "a"}, "test", t0)
    s.registry.create_group("strict", {"site": "a"}, "test", t0,
                            requires=["fairness", "card"])
    assert s.registry.group("strict").requires == ("card", "fairness")
    assert [a.statement.review_by for a in s.bundles.approvals(record)] == [LATER]
    due = calendar.timegm((TODAY + timedelta(days=100)).timetuple()) + 12 * 3600

    def open_kinds() -> list[str]:
        return sorted(a.kind for a in s.alerts.list(state="open"))

    # no device runs it: no alert even when overdue
    assert s.governance.review_alerts(due + 5 * 86400) == {"review_due": 0,
                                                           "review_overdue": 0}
    s.store.apply_status("dev1", online=True, time=t0, agent_version="1",
                         bundle=BundleRef("gov", "1.0.0"), shadow=None, labels={"site": "a"})
    assert s.governance.review_alerts(due - 30 * 86400)["review_due"] == 0
    assert open_kinds() == []
    assert s.governance.review_alerts(due - 10 * 86400)["review_due"] == 1
    alert = s.alerts.list(state="open")[0]
    assert alert.kind == "review_due" and alert.bundle == "gov@1.0.0"
    assert alert.details == {"review_by": LATER, "days": 10, "devices": 1}
    s.governance.review_alerts(due - 9 * 86400)
    assert open_kinds() == ["review_due"]  # one alert while it stays due
    token = s.auth.create_token("v", "viewer", "test", t0).secret
    with TestClient(create_app(s)) as client:  # filtered by its kind in the API
        listed = client.get("/api/v1/alerts", params={"kind": "review_due"},
                            headers={"Authorization": f"Bearer {token}"})
        assert [a["kind"] for a in listed.json()] == ["review_due"]
    s.governance.review_alerts(due + 86400)
    assert open_kinds() == ["review_overdue"]
    # the device moves off the bundle: the overdue alert resolves
    s.store.apply_status("dev1", online=True, time=t0, agent_version="1",
                         bundle=BundleRef("other", "1.0.0"), shadow=None, labels={"site": "a"})
    s.governance.review_alerts(due + 2 * 86400)
    assert open_kinds() == []
    assert record.label == "gov@1.0.0"


def test_bundle_show_answers_the_six_questions_with_evidence(server_factory, built,
                                                             signing_keys):
    server = server_factory(http=True)
    s = server.services
    now = time.time()
    s.bundles.upload(_approved(built["1.0.0"], signing_keys, LATER, "gaps reviewed"), "ana",
                     now)
    s.registry.add_device("dev1", {"site": "a"}, "test", now)
    s.registry.create_group("site-a", {"site": "a"}, "test", now, requires=["champion"])
    s.store.apply_status("dev1", online=True, time=now, agent_version="1",
                         bundle=BundleRef("gov", "1.0.0"), shadow=None, labels={"site": "a"})
    card = read_unverified(built["1.0.0"].read_bytes()).manifest.card
    token = s.auth.create_token("v", "viewer", "test", now).secret
    env = {"FLEET_SERVER": server.base_url, "FLEET_TOKEN": token}
    result = CliRunner().invoke(main, ["bundle", "show", "gov@1.0.0", "--json"], env=env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    approval = doc["approved"]["approvals"][0]
    assert approval["comment"] == "gaps reviewed" and approval["role_confirmed"]
    assert approval["keyid"] == signing_keys.approver.keyid
    assert doc["approved"]["answer"].startswith("approved by ")
    assert doc["data"]["lineage"]["data_rows"] == 400
    assert doc["data"]["columns"] == ["x1", "x2", "x3", "sex", "target"]
    assert doc["evaluation"]["evaluation"] == json.loads(json.dumps(
        card.evaluation.to_dict()))
    assert doc["biases"]["fairness"] == [r.to_dict() for r in card.fairness]
    assert doc["biases"]["checks"][0]["passed"] is True
    assert "1 bound(s) passed" in doc["biases"]["answer"]
    assert doc["review"] == {"answer": f"{LATER} (in 100 day(s), from the approval)",
                             "review_by": LATER, "card_review_by": PAST,
                             "source": "approval", "status": "ok", "days": 100}
    assert doc["explanations"]["top_features"][0]["feature"] == \
        card.importances.features[0].feature
    assert doc["explanations"]["on_device"] == "baseline_substitution"
    assert doc["fleet"]["devices"] == 1
    assert doc["fleet"]["groups"] == [{"group": "site-a", "running": 1,
                                       "requires": ["champion"], "missing": [{
                                           "requirement": "champion",
                                           "why": "no champion comparison (--champion)"}]}]
    # the same document for people
    result = CliRunner().invoke(main, ["bundle", "show", "gov@1.0.0"], env=env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "who approved it:" in out and "gaps reviewed" in out and "x2" in out
    assert "MISSING champion" in out and f"{LATER} (in 100 day(s)" in out
    assert "demographic_parity_difference" in out


def test_the_dashboards_bundle_page_shows_card_approvals_and_where_it_runs(services, built,
                                                                          signing_keys):
    s = services
    now = time.time()
    s.bundles.upload(_approved(built["1.0.0"], signing_keys, LATER, "gaps <reviewed>"), "ana",
                     now)
    s.registry.add_device("dev1", {"site": "a"}, "test", now)
    s.registry.create_group("site-a", {"site": "a"}, "test", now, requires=["champion"])
    s.store.apply_status("dev1", online=True, time=now, agent_version="1",
                         bundle=BundleRef("gov", "1.0.0"), shadow=None, labels={"site": "a"})
    token = s.auth.create_token("v", "viewer", "test", now).secret
    with TestClient(create_app(s), follow_redirects=False) as client:
        assert client.get("/bundles/gov@1.0.0").status_code == 303  # sign in first
        assert client.post("/login", data={"token": token}).status_code == 303
        overview = client.get("/").text
        assert 'href="/bundles/gov@1.0.0"' in overview  # linked from the bundles list
        r = client.get("/bundles/gov@1.0.0")
        assert r.status_code == 200 and "<script" not in r.text
        text = r.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in text  # the card, escaped
        assert "gaps &lt;reviewed&gt;" in text and LATER in text  # the approval
        assert "Who approved it" in text and "What biases were tested" in text
        assert "demographic parity difference" in text  # the fairness table
        assert 'href="/devices?group=site-a&amp;bundle=gov%401.0.0"' in text  # where it runs
        assert "champion</b>" in text  # what the group requires and the bundle lacks
        assert 'href="/performance?bundle=gov%401.0.0"' in text
        assert client.get("/bundles/gov@9.9.9").status_code == 404
        assert client.get("/bundles/nonsense").status_code == 400


def test_a_rollout_created_in_time_is_refused_to_start_once_the_date_has_passed(
        services, built, signing_keys):
    from fleet_server.errors import ReviewOverdueError

    s = services
    now = time.time()
    s.bundles.upload(_approved(built["1.0.0"], signing_keys, LATER), "test", now)
    s.registry.add_device("dev1", {"site": "a"}, "test", now)
    s.registry.create_group("site-a", {"site": "a"}, "test", now)
    created = s.rollouts.create({"bundle": "gov@1.0.0", "group": "site-a", "id": "r1"},
                                actor="operator:ana", roles={"operator"}, now=now)
    assert created["status"] == "ready"
    later = calendar.timegm((TODAY + timedelta(days=101)).timetuple()) + 3600
    with pytest.raises(ReviewOverdueError, match=f"due for review on {LATER}"):
        s.rollouts.act("r1", "start", actor="operator:ana", roles={"operator"}, now=later)
    assert s.rollouts.get("r1", later)["status"] == "ready"
    # abort is always allowed: it sends nothing further
    assert s.rollouts.act("r1", "abort", actor="operator:ana", roles={"operator"},
                          now=later)["status"] == "aborted"
