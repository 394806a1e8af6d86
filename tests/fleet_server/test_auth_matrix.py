"""Every principal against every endpoint, over real HTTP.

The table below is the access policy. The test walks the application's own routes, so an
endpoint added without a rule here fails (``test_every_route_has_a_rule``), and a rule
for a route that no longer exists fails too.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from fleet_server.server import FleetServer
from tests.fleet_server.conftest import make_config

pytestmark = pytest.mark.slow

PUBLIC = frozenset({"anonymous", "revoked", "device", "other-device", "viewer", "operator",
                    "approver"})
VIEWER = frozenset({"viewer", "operator", "approver"})
OPERATOR = frozenset({"operator", "approver"})
APPROVER = frozenset({"approver"})
OWN_DEVICE_OR_VIEWER = VIEWER | {"device"}  # the path names dev1, "device" is dev1
# downloads: a device only of a bundle assigned to it (the fixture assigns sensor@1.0.0 to
# dev1, not to dev2)
ASSIGNED_DEVICE_OR_VIEWER = VIEWER | {"device"}

RULES: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/health"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/docs"): PUBLIC,
    ("GET", "/docs/static/{asset}"): PUBLIC,  # Swagger UI and ReDoc, served locally
    ("GET", "/redoc"): PUBLIC,
    ("GET", "/api/v1/devices"): VIEWER,
    ("POST", "/api/v1/devices"): OPERATOR,
    ("DELETE", "/api/v1/devices/{device}"): OPERATOR,
    ("GET", "/api/v1/devices/{device}"): VIEWER,
    ("PUT", "/api/v1/devices/{device}/labels"): OPERATOR,
    ("GET", "/api/v1/devices/{device}/desired"): OWN_DEVICE_OR_VIEWER,
    ("PUT", "/api/v1/devices/{device}/desired"): OPERATOR,
    ("GET", "/api/v1/devices/{device}/reports"): VIEWER,
    ("GET", "/api/v1/groups"): VIEWER,
    ("POST", "/api/v1/groups"): OPERATOR,
    ("GET", "/api/v1/groups/{name}"): VIEWER,
    ("DELETE", "/api/v1/groups/{name}"): OPERATOR,
    ("PATCH", "/api/v1/groups/{name}"): OPERATOR,
    ("GET", "/api/v1/bundles"): VIEWER,
    ("POST", "/api/v1/bundles"): OPERATOR,
    ("GET", "/api/v1/bundles/{name}/{version}"): VIEWER,
    ("GET", "/api/v1/bundles/{name}/{version}/governance"): VIEWER,
    ("GET", "/api/v1/bundles/{name}/{version}/download"): ASSIGNED_DEVICE_OR_VIEWER,
    ("GET", "/api/v1/summaries"): VIEWER,
    ("GET", "/api/v1/dead-letters"): VIEWER,
    ("GET", "/api/v1/drift"): VIEWER,
    ("GET", "/api/v1/drift/series"): VIEWER,
    ("GET", "/api/v1/drift/windows"): VIEWER,
    ("GET", "/api/v1/performance"): VIEWER,
    ("GET", "/api/v1/alerts"): VIEWER,
    ("GET", "/api/v1/alerts/{alert_id}"): VIEWER,
    ("POST", "/api/v1/alerts/{alert_id}/resolve"): OPERATOR,
    ("GET", "/api/v1/retrains"): VIEWER,
    ("GET", "/api/v1/retrains/{run_id}"): VIEWER,
    ("POST", "/api/v1/retrains"): OPERATOR,
    ("POST", "/api/v1/retrains/claim"): OPERATOR,
    ("PATCH", "/api/v1/retrains/{run_id}"): OPERATOR,
    ("GET", "/api/v1/audit"): VIEWER,
    ("GET", "/api/v1/audit/verify"): VIEWER,
    ("GET", "/api/v1/rollouts"): VIEWER,
    ("POST", "/api/v1/rollouts"): OPERATOR,
    ("POST", "/api/v1/rollouts/preview"): VIEWER,
    ("GET", "/api/v1/rollouts/{rollout_id}"): VIEWER,
    # approve also needs the approver role, which the rollout service checks (403 too)
    ("POST", "/api/v1/rollouts/{rollout_id}/{action}"): OPERATOR,
    # outcomes go to devices over MQTT only: a device reads none here, uploads none
    ("GET", "/api/v1/outcomes"): VIEWER,
    ("POST", "/api/v1/outcomes"): OPERATOR,
    # captured rows come from devices (any device, as itself); the export is for viewers
    ("POST", "/api/v1/capture"): frozenset({"device", "other-device"}),
    ("GET", "/api/v1/capture/export"): VIEWER,
}
PRINCIPALS = ("anonymous", "revoked", "device", "other-device", "viewer", "operator", "approver")
PATH_VALUES = {"device": "dev1", "name": "sensor", "version": "1.0.0", "alert_id": "1",
               "run_id": "1", "rollout_id": "r1", "action": "abort", "asset": "swagger-init.js"}
QUERY = {"/api/v1/drift": {"bundle": "sensor@1.0.0"},
         "/api/v1/drift/series": {"bundle": "sensor@1.0.0"},
         "/api/v1/drift/windows": {"bundle": "sensor@1.0.0"},
         "/api/v1/performance": {"bundle": "sensor@1.0.0"},
         "/api/v1/capture/export": {"bundle": "sensor@1.0.0"}}
# removing dev1 would take the "device" principal away from the tests after it
URLS = {("DELETE", "/api/v1/devices/{device}"): "/api/v1/devices/dev-none"}


def app_routes(app) -> set[tuple[str, str]]:
    try:  # FastAPI >= 0.16x keeps included routers lazily; this flattens them
        from fastapi.routing import iter_route_contexts
        routes = list(iter_route_contexts(app.routes))
    except ImportError:
        routes = app.routes
    out = set()
    for route in routes:  # API routes and Starlette's own (the docs) alike
        methods = getattr(route, "methods", None)
        if methods:
            out |= {(m, route.path) for m in methods if m != "HEAD"}
    return out


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, signing_keys, bundles):
    tmp = tmp_path_factory.mktemp("matrix")
    server = FleetServer(make_config(tmp, signing_keys))
    server.start()
    base = server.start_http()
    s = server.services
    now = time.time()
    s.bundles.upload(bundles.build("1.0.0").read_bytes(), "test", now)
    creds = {role: s.auth.create_token(role, role, "test", now).secret
             for role in ("viewer", "operator", "approver")}
    creds["revoked"] = s.auth.create_token("gone", "approver", "test", now).secret
    s.auth.revoke_token("gone", "test", now)
    creds["device"] = s.registry.add_device("dev1", {}, "test", now)[1].secret
    creds["other-device"] = s.registry.add_device("dev2", {}, "test", now)[1].secret
    s.desired.assign("dev1", "sensor@1.0.0", actor="test")
    client = httpx.Client(base_url=base, timeout=10)
    yield server, client, creds
    client.close()
    server.stop()


# The dashboard's HTML pages: a signed-in session cookie (tests/fleet_server/test_dashboard.py)
# or a redirect to the sign-in form; a bearer token, even an approver's, is not a session.
DASHBOARD_PAGES = frozenset({"/", "/devices", "/devices/{device_id}", "/drift", "/performance",
                             "/alerts", "/rollouts", "/rollouts/{rollout_id}",
                             "/bundles/{label}", "/retrains", "/retrains/{run_id}"})
DASHBOARD_OPEN = frozenset({("GET", "/login"), ("POST", "/login"), ("GET", "/logout"),
                            ("POST", "/logout")})


def test_every_route_has_a_rule(matrix):
    server, _, _ = matrix
    routes = app_routes(server.app)
    dashboard = {("GET", p) for p in DASHBOARD_PAGES} | DASHBOARD_OPEN
    assert routes - set(RULES) - dashboard == set(), "routes without an access rule"
    assert (set(RULES) | dashboard) - routes == set(), "rules for routes that do not exist"


@pytest.mark.parametrize("path", sorted(DASHBOARD_PAGES))
def test_dashboard_pages_need_a_session_not_a_token(matrix, path):
    _, client, creds = matrix
    url = path.replace("{device_id}", "dev1").replace("{rollout_id}", "r1")
    for who in PRINCIPALS:
        headers = {} if who == "anonymous" else {"Authorization": f"Bearer {creds[who]}"}
        r = client.get(url, headers=headers, follow_redirects=False)
        assert r.status_code == 303, (who, r.status_code)
        assert r.headers["location"].startswith("/login"), (who, r.headers["location"])
        assert "Bearer" not in r.text and (who == "anonymous" or creds[who] not in r.text)


@pytest.mark.parametrize(("method", "path"), sorted(RULES), ids=[f"{m} {p}" for m, p in
                                                                  sorted(RULES)])
def test_each_principal_is_allowed_or_refused_as_the_rules_say(matrix, method, path):
    _, client, creds = matrix
    url = URLS.get((method, path)) or re.sub(r"\{(\w+)\}", lambda m: PATH_VALUES[m.group(1)],
                                             path)
    allowed = RULES[(method, path)]
    for who in PRINCIPALS:
        headers = {} if who == "anonymous" else {"Authorization": f"Bearer {creds[who]}"}
        kwargs: dict = {"params": QUERY.get(path, {})}
        if method in ("POST", "PUT", "PATCH"):
            kwargs["json"] = {}  # valid JSON, invalid body: allowed callers get a 4xx
        r = client.request(method, url, headers=headers, **kwargs)
        assert r.status_code < 500, (who, r.status_code, r.text)
        if who in allowed:
            assert r.status_code not in (401, 403), (who, r.status_code, r.text)
        else:
            want = 401 if who in ("anonymous", "revoked") else 403
            assert r.status_code == want, (who, r.status_code, r.text)
            assert r.json()["error"]["type"] in ("AuthenticationError",
                                                 "PermissionDeniedError")
