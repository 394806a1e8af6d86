"""The dashboard over real HTTP: a real FleetServer, Mosquitto, devices and drift windows.

One server per module carries a small fleet: four devices (two online and sending window
summaries over MQTT, one never seen, one gone stale), two groups, a signed bundle, install
reports, a desired state, evaluated drift windows and the alerts they opened. Chromium
(Debian's, never a downloaded one; JavaScript off, as the dashboard needs none) signs in
through the form and loads every page; each page's full-size screenshot goes to
``$EDGEFLEET_SCREENSHOTS`` (default ``test-artifacts/dashboard/``). Plain httpx checks the
HTTP rules: redirects to the sign-in page, 400 and 404 pages, the cookie's flags, and that
the token appears in no page and no header.

Two rollouts are made through the real rollout service: one started on ``plant-a`` and
ticked once (its gates judged), one on ``plant-b`` aborted by an operator.
"""

from __future__ import annotations

import html
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from edgefleet.contract.messages import LATENCY_EDGES_MS, BundleRef
from fleet_server.config import DriftConfig
from fleet_server.dashboard.session import COOKIE
from fleet_server.monitoring.evaluator import Evaluator
from fleet_server.server import FleetServer
from tests.broker import SERVER_USER, Mosquitto
from tests.fleet_server.conftest import (
    PASSWORDS,
    SERVER_PASSWORD,
    FakeDevice,
    make_config,
    profile_of,
    summary_of,
    wait_until,
)

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(os.environ.get("EDGEFLEET_SCREENSHOTS") or
             Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard")
HOSTILE = '<script>alert("x")</script>'
SHIFT = {"temperature": 15.0, "humidity": 25.0, "current": 3.0}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, signing_keys, sensor_bundle):
    """A running server with a small fleet in it; yields (base_url, server, tokens)."""
    tmp = tmp_path_factory.mktemp("dashboard")
    broker = Mosquitto()
    broker.add_user(SERVER_USER, SERVER_PASSWORD)
    for device, password in PASSWORDS.items():
        broker.add_user(device, password)
    broker.start()
    # the rollout engine judges only when woken (the fixture ticks by hand), so the pages
    # and the assertions read the same gate results
    server = FleetServer(make_config(tmp, signing_keys, broker=broker, rollout_tick_s=3600.0))
    fakes: list[FakeDevice] = []
    try:
        server.start()
        link = server.link
        assert link is not None
        wait_until(lambda: link.connected, 10, "the server to connect")
        base_url = server.start_http()
        s = server.services
        now = time.time()
        tokens = {role: s.auth.create_token(f"ana-{role}", role, "test", now).secret
                  for role in ("viewer", "operator")}
        s.bundles.upload(sensor_bundle.read_bytes(), "test", now)
        device_secret = ""
        for d, labels in (("dev1", {"site": "a"}), ("dev2", {"site": "a", "note": HOSTILE}),
                          ("dev3", {"site": "b"}), ("dev4", {"site": "b"})):
            _, issued = s.registry.add_device(d, labels, "test", now)
            device_secret = device_secret or issued.secret
        s.registry.create_group("plant-a", {"site": "a"}, "test", now,
                                important_features=["vibration"])
        s.registry.create_group("plant-b", {"site": "b"}, "test", now)
        s.desired.assign("dev1", "sensor@1.0.0", actor="operator:ana")
        ref = s.bundles.reference(s.bundles.by_label("sensor@1.0.0").id)
        end = int(now // 60) * 60
        latency = [0] * (len(LATENCY_EDGES_MS) + 1)
        at = LATENCY_EDGES_MS.index(5.0)  # the p95 lands in [4, 5): "≤ 5 ms"
        latency[at - 5:at + 2] = [0, 0, 5, 40, 300, 50, 5]
        latency = tuple(latency)
        running = BundleRef("sensor", "1.0.0")
        for i, d in enumerate(("dev1", "dev2")):
            dev = FakeDevice(broker, tmp, d)
            fakes.append(dev)
            dev.online({"site": "a", "line": str(i + 1)}, bundle=running)
            dev.heartbeat(predictions=1600 + i)
            dev.report(seq=1, revision=1, outcome="installed" if d == "dev1" else "failed")
            for k in range(4):
                start = end - 240 + 60 * k
                msg = summary_of(d, k + 1, profile_of(ref.spec, 400, 31 * k + i, SHIFT,
                                                      ref.base), start, start + 60)
                dev.send(replace(msg, latency_counts=latency, errors={"refused": k}))
            dev.flush()
        wait_until(lambda: sum(s.registry.get(d).summaries for d in ("dev1", "dev2")) == 8,
                   10, "the summaries to be stored")
        wait_until(lambda: len(s.store.list_reports()) == 2, 10, "the install reports")
        wait_until(lambda: s.registry.get("dev2").health is not None, 10, "the heartbeats")
        with s.store.transaction():  # dev4 said online an hour ago, then went quiet
            s.store.apply_status("dev4", online=True, time=now - 3600, agent_version="0.1.0",
                                 bundle=running, shadow=None, labels=None)
            s.store.touch_devices({"dev4": now - 3600})
        ev = Evaluator(s.store, s.bundles, s.registry, s.alerts,
                       DriftConfig(window_s=60, lateness_s=0), s.config.ingest_config)
        ev.evaluate(end)
        assert s.alerts.list(state="open"), "the drifted windows opened no alert"
        stages = [{"fraction": 0.5, "min_devices": 1, "soak_s": 0},
                  {"fraction": 1.0, "min_devices": 1, "soak_s": 600}]
        s.rollouts.create({"id": "r-sensor-2", "bundle": "sensor@1.0.0", "group": "plant-a",
                           "stages": stages, "start": True}, actor="operator:ana-operator",
                          roles={"operator"}, now=now)
        s.rollouts.tick(now + 1)
        s.rollouts.create({"id": "r-old", "bundle": "sensor@1.0.0", "group": "plant-b",
                           "start": True}, actor="operator:ana-operator", roles={"operator"},
                          now=now)
        s.rollouts.act("r-old", "abort", actor="operator:ana-operator", roles={"operator"},
                       reason="wrong group", now=now + 2)
        yield base_url, server, {**tokens, "device": device_secret}
    finally:
        for dev in fakes:
            dev.stop()
        server.stop()
        broker.cleanup()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (the Makefile's setup installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def signed_in(browser, fleet):
    """A browser page (JavaScript off) signed in through the form as a viewer."""
    base_url, _, tokens = fleet
    context = browser.new_context(base_url=base_url, java_script_enabled=False,
                                  viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto("/devices")
    assert page.url.startswith(f"{base_url}/login?next=")
    shot(page, "login")
    page.fill("input[name=token]", tokens["viewer"])
    page.click("button[type=submit]")
    page.wait_for_url(f"{base_url}/devices")
    yield page, context
    context.close()


def shot(page, name: str, *, full_page: bool = True) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def text_of(page, selector: str = "main") -> str:
    return page.inner_text(selector)


# --------------------------------------------------------------------------- in Chromium


def test_sign_in_sets_a_strict_http_only_session_cookie(signed_in, fleet):
    page, context = signed_in
    _, _, tokens = fleet
    cookies = {c["name"]: c for c in context.cookies()}
    assert set(cookies) == {COOKIE}
    c = cookies[COOKIE]
    assert c["httpOnly"] and c["sameSite"] == "Strict" and c["path"] == "/"
    assert tokens["viewer"] not in c["value"] and len(c["value"]) >= 40
    assert "ana-viewer (viewer)" in page.inner_text("header")


def test_fleet_overview_counts_devices_alerts_and_rollouts(signed_in):
    page, _ = signed_in
    page.goto("/")
    cards = {c.inner_text().split("\n")[0]: c.inner_text().split("\n")[1]
             for c in page.query_selector_all(".card")}
    assert cards["devices"] == "4"
    assert (cards["online"], cards["stale"], cards["offline"]) == ("2", "1", "1")
    assert cards["active rollouts"] == "1"
    assert int(cards["open alerts"]) >= 2  # the fleet's and plant-a's
    text = text_of(page)
    assert "sensor@1.0.0" in text and "plant-a" in text and "r-sensor-2" in text
    assert len(page.query_selector_all("main svg")) == 3  # by status, bundle, group
    assert page.query_selector('svg title:text("devices by running bundle")') is not None
    shot(page, "fleet")


def test_device_list_and_filters(signed_in):
    page, _ = signed_in
    page.goto("/devices")
    rows = page.query_selector_all("main table tbody tr")
    status = {r.query_selector("td").inner_text(): r.query_selector_all("td")[1].inner_text()
              for r in rows}
    assert status == {"dev1": "online", "dev2": "online", "dev3": "offline", "dev4": "stale"}
    assert "sensor@1.0.0" in text_of(page)
    shot(page, "devices")
    page.goto("/devices?group=plant-a")
    ids = [r.query_selector("td").inner_text()
           for r in page.query_selector_all("main table tbody tr")]
    assert ids == ["dev1", "dev2"]
    page.goto("/devices?status=stale")
    assert [r.query_selector("td").inner_text()
            for r in page.query_selector_all("main table tbody tr")] == ["dev4"]


def test_device_page_shows_health_history_and_desired_state(signed_in):
    page, _ = signed_in
    page.goto("/devices/dev1")
    text = text_of(page)
    assert page.title().startswith("Device dev1")
    assert "predictions\t1 600" in text  # the last heartbeat's body, humanised
    assert re.search(r"uptime\t\d+ (s|min)", text)
    assert re.search(r"memory \(RSS\)\t[\d.]+ MiB", text)
    uptime = page.query_selector("table.heartbeat td[title$=' s']")
    assert uptime is not None  # the exact value stays in the title
    assert "installed" in text and "revision\t1" in text
    assert "plant-a" in text and "line\t1\t1" in text  # reported label, effective too
    windows = page.query_selector_all("h2:text('Recent windows') ~ table tbody tr")
    assert len(windows) == 4
    first = [td.inner_text() for td in windows[0].query_selector_all("td")]
    assert first[1:5] == ["sensor@1.0.0", "400", "3", "≤ 5 ms"]  # rows, errors, p95
    assert len(page.query_selector_all("main svg")) == 3  # rows, errors, latency
    assert re.search(r"last seen\t\d+ s ago", text)
    assert page.query_selector("td time[title$='UTC']") is not None
    shot(page, "device-dev1")
    page.goto("/devices/dev2")
    assert "failed" in text_of(page)
    assert HOSTILE in text_of(page)  # shown as text, never run as markup
    assert page.query_selector("main script") is None


def test_drift_index_is_a_heatmap_of_verdicts_drifting_first(signed_in):
    page, _ = signed_in
    page.goto("/drift")
    rows = [[td.inner_text() for td in r.query_selector_all("td")]
            for r in page.query_selector_all("table.drift-index tbody tr")]
    scopes = [(r[0], r[1]) for r in rows]
    assert ("sensor@1.0.0", "plant-a") in scopes and ("sensor@1.0.0", "fleet") in scopes
    nows = [r[2] for r in rows]
    assert nows[0] == "drift" and nows == sorted(nows, key=["drift", "warn", "ok",
                                                            "insufficient"].index)
    heat = page.query_selector("svg.heatmap")
    assert heat is not None
    cells = heat.query_selector_all("rect > title")
    assert any(": drift" in c.text_content() for c in cells)
    legend = [t.text_content() for t in heat.query_selector_all(":scope > text")]
    assert {"ok", "warn", "drift", "no data"} <= set(legend)
    shot(page, "drift-index")


def test_drift_page_per_feature_verdicts_series_and_histograms(signed_in):
    page, _ = signed_in
    page.goto("/drift")
    with page.expect_navigation():
        page.click("table.picker a:text-is('plant-a')")
    page.wait_for_load_state()
    assert "group=plant-a" in page.url and "bundle=sensor%401.0.0" in page.url
    assert "Drift · sensor@1.0.0 · group:plant-a" in page.title()
    rows = page.query_selector_all("table.features tbody tr")
    features = {r.query_selector_all("td")[0].inner_text(): (
        r.query_selector_all("td")[2].inner_text(), r.query_selector_all("td")[3].inner_text())
        for r in rows}
    assert {"temperature", "humidity", "vibration", "current", "class", "confidence"} <= \
        set(features)
    assert features["temperature"] == ("drift", "drift")  # now, and over the range
    assert features["humidity"][1] == "drift"
    order = [r.query_selector("td").inner_text() for r in rows]
    severity = ["drift", "warn", "ok", "insufficient", "unknown"]
    ranks = [severity.index(features[f][0]) for f in order]
    assert ranks == sorted(ranks)  # drifting features first
    heat = page.query_selector("svg.heatmap")
    assert heat is not None and "temperature (input)" in heat.inner_html()
    panel = page.query_selector("#feature-temperature")
    assert panel is not None
    titles = [t.text_content() for t in panel.query_selector_all("svg > title")]
    assert titles == ["temperature (input): psi over time", "temperature (input): reference vs "
                                                              "live"]
    assert len(panel.query_selector_all("svg polyline")) == 1  # four windows, one line
    legend = panel.query_selector("svg.series").inner_html()
    assert "drift at 0.25" in legend and "warn at 0.1" in legend  # the dashed lines, named
    ticks = [t.text_content() for t in panel.query_selector_all("svg.series > text")]
    assert sum(bool(re.fullmatch(r"\d\d:\d\d", t)) for t in ticks) >= 3  # time ticks
    assert sum(bool(re.fullmatch(r"[\d.]+", t)) for t in ticks) >= 3  # value ticks
    bins = [t.text_content() for t in panel.query_selector_all("svg.histogram > text tspan")]
    assert len(bins) >= 5 and all(len(b) <= 18 and "…" not in b for b in bins), bins
    assert len(page.query_selector_all("main svg")) == 2 * len(features) + 1
    text = text_of(page)
    assert "devices\t2" in text and "one step is 1 min" in text
    shot(page, "drift-plant-a")


def test_alerts_page(signed_in):
    page, _ = signed_in
    page.goto("/alerts")
    text = text_of(page)
    assert re.search(r"Open \([1-9]\d*\)", text)
    assert "plant-a" in text and "sensor@1.0.0" in text and "drift" in text
    shot(page, "alerts")


def test_rollout_pages_show_stages_gates_and_decisions(signed_in, fleet):
    page, _ = signed_in
    _, server, _ = fleet
    page.goto("/rollouts")
    listed = {r.query_selector("td").inner_text(): [td.inner_text() for td in
                                                    r.query_selector_all("td")[3:]]
              for r in page.query_selector_all("main table tbody tr")}
    assert {k: v[0] for k, v in listed.items()} == {"r-sensor-2": "running", "r-old": "aborted"}
    assert listed["r-sensor-2"][1] == "1/2 · 50 %"
    assert listed["r-old"][1].startswith("1/") and listed["r-old"][-1] == "wrong group"
    shot(page, "rollouts")
    with page.expect_navigation():
        page.click("text=r-sensor-2")
    page.wait_for_load_state()
    assert page.title().startswith("Rollout r-sensor-2")

    def shown() -> dict[str, str]:
        return {r.query_selector("td").inner_text(): r.query_selector_all("td")[1].inner_text()
                for r in page.query_selector_all("h2:text('Gates') + table tbody tr")}

    # an engine tick woken by the abort may land between the page and this read: reload
    deadline = time.monotonic() + 10
    while True:
        judged = server.services.rollouts.get("r-sensor-2")["gate_results"]
        if shown() == {g["name"]: g["outcome"] for g in judged} or time.monotonic() > deadline:
            break
        page.reload()
    gates = {r.query_selector("td").inner_text(): r for r in
             page.query_selector_all("h2:text('Gates') + table tbody tr")}
    assert list(gates) == [g["name"] for g in judged]
    assert {"soak", "install_failures", "healthy_devices", "error_rate"} <= set(gates)
    cells = [td.inner_text() for td in gates["healthy_devices"].query_selector_all("td")]
    assert cells[1:5] == ["wait", "0", ">=", "0.9"]
    assert "canaries have 20 healthy predictions" in cells[6]
    assert gates["healthy_devices"].query_selector("svg title").text_content() == \
        "healthy_devices: 0 >= 0.9"
    assert gates["install_failures"].query_selector_all("td")[1].inner_text() == "pass"
    stages = page.query_selector_all("h2:text('Stages') + .cards .card")
    assert [s.inner_text().split("\n")[1:3] for s in stages] == [
        ["50 %", "current 1 device"], ["100 %", "pending 2 devices"]]
    assert "progress\t1/2 · 50 %" in text_of(page, "table.rollout-head")
    decisions = text_of(page, "table.decisions")
    assert "operator:ana-operator" in decisions and "ready → running" in decisions
    assert "2 devices: 1 canary" in text_of(page, "h2:text('Devices') + p")
    devices = text_of(page, "table.rollout-devices")
    assert re.search(r"dev1\tcanary\t1\t", devices)  # stage 1 of 2, as on the cards
    assert re.search(r"dev2\tcontrol", devices)
    shot(page, "rollout-r-sensor-2")
    page.goto("/rollouts/r-old")
    decisions = text_of(page, "table.decisions")
    assert "running → aborted" in decisions and "wrong group" in decisions
    assert re.search(r"gates: \d+ pass, \d+ skip, \d+ wait", decisions)
    assert "aborted wrong group" in text_of(page, "table.rollout-head")  # the reason, up top
    shot(page, "rollout-r-old")


# --------------------------------------------------------------------------- plain HTTP


@pytest.fixture(scope="module")
def http(fleet):
    base_url, _, tokens = fleet
    with httpx.Client(base_url=base_url, timeout=10) as client:
        r = client.post("/login", data={"token": tokens["viewer"], "next": "/"})
        assert r.status_code == 303
        yield client, tokens


@pytest.mark.parametrize("path", ["/", "/devices", "/devices/dev1", "/drift?bundle=x",
                                  "/alerts", "/rollouts", "/rollouts/r-old"])
def test_pages_without_a_session_redirect_to_sign_in(fleet, path):
    base_url, _, _ = fleet
    r = httpx.get(base_url + path, cookies={COOKIE: "not-a-session"})
    assert r.status_code == 303
    assert r.headers["location"].startswith("/login?next=%2F")
    assert "set-cookie" not in r.headers


def test_sign_in_refuses_bad_tokens_and_device_secrets(fleet):
    base_url, _, tokens = fleet
    for token, status in (("efo_wrong", 401), ("", 401), (tokens["device"], 403)):
        r = httpx.post(base_url + "/login", data={"token": token})
        assert r.status_code == status and "set-cookie" not in r.headers
        assert "Not signed in" in r.text and (not token or token not in r.text)


def test_cookie_flags_and_the_token_never_leaves_the_server(fleet):
    base_url, _, tokens = fleet
    with httpx.Client(base_url=base_url) as client:
        r = client.post("/login", data={"token": tokens["operator"],
                                        "next": "//evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert tokens["operator"] not in cookie
        device_drift = client.get("/drift?bundle=sensor@1.0.0&device=dev1&hours=6")
        assert device_drift.status_code == 200 and "device:dev1" in device_drift.text
        assert "suspect sensor: drifts alone on" in device_drift.text
        for path in ("/", "/devices", "/devices/dev1", "/drift?bundle=sensor@1.0.0",
                     "/alerts", "/rollouts", "/rollouts/r-sensor-2", "/devices/nope",
                     "/bundles/sensor@1.0.0"):
            r = client.get(path)
            assert r.status_code in (200, 404), path
            assert tokens["operator"] not in r.text and tokens["operator"] not in str(r.headers)
            assert "script-src" not in r.headers["content-security-policy"]  # no script at all
            assert r.headers["cache-control"] == "no-store"
            assert "<script" not in r.text
        # signing out ends the session on the server, not only in the browser
        sid = client.cookies[COOKIE]
        assert client.post("/logout").status_code == 303
        r = httpx.get(base_url + "/", cookies={COOKIE: sid})
        assert r.status_code == 303 and r.headers["location"].startswith("/login")


def test_a_revoked_token_ends_its_sessions(fleet):
    base_url, server, _ = fleet
    s = server.services
    token = s.auth.create_token("short-lived", "viewer", "test", time.time()).secret
    with httpx.Client(base_url=base_url) as client:
        assert client.post("/login", data={"token": token}).status_code == 303
        assert client.get("/").status_code == 200
        s.auth.revoke_token("short-lived", "test", time.time())
        assert client.get("/").status_code == 303


@pytest.mark.parametrize("path, status, named", [
    ("/devices/nope", 404, "device 'nope' not found"),
    ("/rollouts/nope", 404, "rollout 'nope' not found"),
    ("/drift?bundle=nosuch@1.0.0", 404, "bundle 'nosuch@1.0.0' not found"),
    ("/drift?bundle=sensor@1.0.0&group=nope", 404, "group 'nope' not found"),
    ("/devices?group=nope", 404, "group 'nope' not found"),
    ("/drift?bundle=sensor", 400, "query parameter 'bundle'"),
    ("/drift?bundle=sensor@1.0.0&hours=abc", 400, "query parameter 'hours'"),
    ("/drift?bundle=sensor@1.0.0&hours=0", 400, "query parameter 'hours'"),
    ("/drift?bundel=sensor@1.0.0", 400, "query parameter 'bundel'"),
    ("/devices?status=sleepy", 400, "query parameter 'status'"),
    ("/devices?label=site", 400, "query parameter 'label'"),
    ("/devices?label=Bad%20Key=1", 400, "query parameter 'label'"),
    ("/devices?status=online&status=offline", 400, "query parameter 'status'"),
    ("/alerts?state=closed", 400, "query parameter 'state'"),
    ("/rollouts?status=done", 400, "query parameter 'status'"),
    ("/devices/dev1?x=1", 400, "query parameter 'x'"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("/") else None)
def test_error_pages_are_html_and_name_what_is_wrong(http, path, status, named):
    client, _ = http
    r = client.get(path)
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"].startswith("text/html")
    assert named in html.unescape(r.text)


def test_every_page_renders_without_the_rollout_service(fleet, http):
    _, server, _ = fleet
    client, _ = http
    s = server.services
    kept = s.rollouts  # type: ignore[attr-defined]
    del s.rollouts  # type: ignore[attr-defined]
    try:
        assert "no rollouts" in client.get("/rollouts").text
        assert "no rollout service" in client.get("/").text
        assert client.get("/rollouts/r-sensor-2").status_code == 404
    finally:
        s.rollouts = kept  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- more pages


def test_device_list_searches_sorts_and_filters_on_the_server(signed_in):
    page, _ = signed_in

    def ids() -> list[str]:
        return [r.query_selector("td").inner_text()
                for r in page.query_selector_all("table.devices tbody tr")]

    page.goto("/devices")
    page.fill("input[name=q]", "dev2")
    page.click("form.filters button[type=submit]")
    assert "q=dev2" in page.url and ids() == ["dev2"]
    page.goto("/devices?q=site%3Db")  # a label matches too
    assert ids() == ["dev3", "dev4"]
    page.goto("/devices")
    page.click("table.devices th a:text('status')")  # offline, stale, then online
    assert "sort=status" in page.url and ids() == ["dev3", "dev4", "dev1", "dev2"]
    page.click("table.devices th a:text('status')")  # again: the other way round
    assert "order=desc" in page.url and ids() == ["dev2", "dev1", "dev4", "dev3"]
    page.goto("/devices?bundle=none")
    assert ids() == ["dev3"]
    page.goto("/devices?bundle=sensor%401.0.0&status=online")
    assert ids() == ["dev1", "dev2"]
    assert page.inner_text("#count").startswith("2 devices match")
    offline = page.goto("/devices?status=offline")
    assert offline is not None and offline.ok
    assert page.query_selector("tr.row-offline") is not None  # highlighted
    shot(page, "devices-offline")


def test_overview_shows_what_needs_attention(signed_in):
    page, _ = signed_in
    page.goto("/")
    attention = page.inner_text("#attention")
    assert re.search(r"\d+ open alerts", attention)
    assert "1 device offline: dev3" in attention and "1 device stale" in attention
    assert "rollout r-old aborted" in attention and "wrong group" in attention
    assert page.query_selector(".card.bad:has-text('open alerts')") is not None  # red
    assert page.query_selector(".card.bad:has-text('offline')") is not None
    rollouts = text_of(page, "table.rollouts")
    assert "r-old" in rollouts and "wrong group" in rollouts and "1/2 · 50 %" in rollouts
    events = text_of(page, "table.events")
    assert "rollout.abort rollout:r-old (running → aborted): wrong group" in events
    assert "drift alert #" in events and "bundle.upload" in events
    assert "· fleet: " in events and "· *" not in events  # the fleet scope, named
    with page.expect_navigation():  # alert → drift page
        page.click("#attention a:text('drift on sensor@1.0.0 · plant-a')")
    page.wait_for_load_state()
    assert "Drift · sensor@1.0.0 · group:plant-a" in page.title()


def test_alerts_link_to_their_drift_page(signed_in):
    page, _ = signed_in
    page.goto("/alerts?state=open")
    row = page.query_selector("table.alerts tbody tr:has-text('plant-a')")
    assert row is not None and "row-open" in (row.get_attribute("class") or "")
    with page.expect_navigation():  # the URL changes before the new page has its title
        row.query_selector("a:text('drift page')").click()
    page.wait_for_load_state()
    assert "group=plant-a" in page.url and "hours=24" in page.url
    assert page.title().startswith("Drift · sensor@1.0.0 · group:plant-a")


def test_api_docs_load_from_this_server_only(browser, fleet):
    base_url, _, _ = fleet
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    elsewhere: list[str] = []

    def only_local(route):
        if route.request.url.startswith(base_url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_local)
    page = context.new_page()
    try:
        page.goto("/docs")
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)  # Swagger UI ran
        paths = [e.inner_text() for e in page.query_selector_all(".opblock-summary-path")]
        assert any("/api/v1/devices" in p for p in paths), paths[:5]
        shot(page, "docs")
        page.goto("/redoc")
        page.wait_for_selector("h1:has-text('edgefleet fleet server')", timeout=30_000)
        shot(page, "redoc", full_page=False)
    finally:
        context.close()
    assert elsewhere == []
    r = httpx.get(base_url + "/docs")
    assert "'unsafe-inline'" not in r.headers["content-security-policy"].split("style-src")[0]
    assert "cdn" not in r.text.lower() and "<script>" not in r.text  # no inline script
    assert httpx.get(base_url + "/docs/static/..%2Fcore.py").status_code == 404


def test_metrics_count_rollouts_drift_and_alerts(fleet):
    base_url, _, _ = fleet
    text = httpx.get(base_url + "/metrics").text
    assert 'edgefleet_rollouts{status="aborted"} 1.0' in text
    assert 'edgefleet_rollouts{status="running"} 1.0' in text
    assert 'edgefleet_rollouts{status="completed"} 0.0' in text
    found = {m.group(1): float(m.group(2)) for m in
             re.finditer(r'edgefleet_drift_windows\{verdict="(\w+)"\} ([\d.]+)', text)}
    assert set(found) == {"ok", "warn", "drift", "insufficient"} and found["drift"] >= 1
    assert re.search(r'edgefleet_drift_scopes\{verdict="drift"\} [1-9]', text)
    assert re.search(r'edgefleet_alerts_open\{kind="drift"\} [1-9]', text)
    assert 'edgefleet_alerts_open{kind="suspect_sensor"}' in text


def test_every_page_of_an_empty_fleet(browser, server_factory):
    server = server_factory(http=True)
    base_url = server.base_url  # type: ignore[attr-defined]
    token = server.services.auth.create_token("new", "viewer", "test", time.time()).secret
    context = browser.new_context(base_url=base_url, java_script_enabled=False,
                                  viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto("/login")
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base_url}/")
        assert "Nothing needs attention" in text_of(page)
        assert "nothing has happened yet" not in text_of(page)  # the token's creation
        shot(page, "empty-fleet")
        expected = {"/devices": "0 devices match", "/drift": "no bundles uploaded",
                    "/alerts": "no alerts", "/rollouts": "no rollouts"}
        for path, words in expected.items():
            response = page.goto(path)
            assert response is not None and response.status == 200, path
            assert words in text_of(page), path
            shot(page, "empty" + path.replace("/", "-"))
    finally:
        context.close()
