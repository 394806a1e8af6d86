"""The performance page over real HTTP, in Debian's headless Chromium (JavaScript off).

A real FleetServer (HTTP, no broker: summaries go through the real ingest rules) holds a
bundle and six hours of summaries whose performance entries were built with the
contract's accumulators from known rows; the page must show the realized and estimated
accuracy over time with their bands, the reliability diagram and the confusion matrix of
exactly those rows. Screenshots go where the dashboard tests put theirs.
"""

from __future__ import annotations

import html
import re
import time

import httpx
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix

from tests.fleet_server.test_dashboard import CHROMIUM, CHROMIUM_ARGS, shot
from tests.fleet_server.test_performance import entry, rows, send

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory, signing_keys, sensor_bundle):
    from fleet_server.server import FleetServer
    from tests.fleet_server.conftest import make_config

    server = FleetServer(make_config(tmp_path_factory.mktemp("perf-page"), signing_keys))
    try:
        server.start()
        base_url = server.start_http()
        s = server.services
        now = time.time()
        s.bundles.upload(sensor_bundle.read_bytes(), "test", now)
        s.registry.add_device("dev1", {"site": "a"}, "test", now)
        s.registry.create_group("plant-a", {"site": "a"}, "test", now)
        token = s.auth.create_token("ana", "viewer", "test", now).secret
        truth, pred = [], []
        hour = int(now // 3600) * 3600
        for k in range(6):
            t, p, p1 = rows(300, 40 + k, accuracy=0.93 - 0.05 * k)  # accuracy sinks
            truth.append(t)
            pred.append(p)
            result = send(s, "dev1", k + 1, hour - (6 - k) * 3600 + 600, [entry(t, p, p1)])
            assert not result.dead, dict(result.dead)
        from fleet_server.monitoring.performance import PerformanceWatch

        raised = PerformanceWatch(s.performance, s.alerts).evaluate(now)  # accuracy sank
        assert ("sensor@1.0.0", "*", "performance_drop") in raised
        yield base_url, server, token, np.concatenate(truth), np.concatenate(pred)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(site):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (the Makefile's setup installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    base_url, _, token, _, _ = site
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(base_url=base_url, java_script_enabled=False,
                                          viewport={"width": 1280, "height": 900})
            pg = context.new_page()
            pg.goto("/performance")
            pg.fill("input[name=token]", token)
            pg.click("button[type=submit]")
            pg.wait_for_url(f"{base_url}/performance")
            yield pg
        finally:
            browser.close()


def test_the_performance_page_shows_accuracy_bands_reliability_and_confusion(page, site):
    _, _, _, truth, pred = site
    shot(page, "performance-index")
    page.click("table.picker a")  # the first bundle's fleet link
    page.wait_for_url("**/performance?bundle=*")
    assert page.title().startswith("Performance · sensor@1.0.0 · fleet")
    page.click("text=1 d")  # a day: hourly steps (the default week is daily)
    page.wait_for_url("**days=1")
    text = page.inner_text("main")
    assert "realized\tdrop" in text or "realized\tok" in text
    assert f"{1800:,}".replace(",", " ") in text  # labelled rows
    assert "0.9113" in text  # the packaged accuracy (the card's)
    chart = page.query_selector("svg.band")
    assert chart is not None
    assert len(chart.query_selector_all("polygon.band")) == 2  # realized and estimated
    assert chart.query_selector('title:text("realized accuracy")') is not None \
        or "realized accuracy" in chart.inner_text()
    assert len(page.query_selector_all("svg.reliability circle.bin")) >= 3
    cells = [[td.inner_text().replace(" ", "") for td in tr.query_selector_all("td")]
             for tr in page.query_selector_all("table.confusion tbody tr")]
    assert [[int(c) for c in row] for row in cells] == confusion_matrix(truth, pred).tolist()
    per_window = page.query_selector_all("table.perf-points tbody tr")
    assert len(per_window) == 6
    total = f"{accuracy_score(truth, pred):.4g}"
    assert total in html.unescape(page.content())
    shot(page, "performance")
    # reached from the drift page and the navigation
    page.goto("/drift?bundle=sensor@1.0.0")
    assert page.query_selector("a[href='/performance?bundle=sensor%401.0.0']") is not None
    assert page.query_selector("header a[href='/performance']") is not None


@pytest.mark.parametrize(("path", "status", "named"), [
    ("/performance?bundle=nosuch@1.0.0", 404, "bundle 'nosuch@1.0.0' not found"),
    ("/performance?bundle=sensor@1.0.0&group=nope", 404, "group 'nope' not found"),
    ("/performance?bundle=sensor@1.0.0&days=0", 400, "query parameter 'days'"),
    ("/performance?bundle=sensor@1.0.0&group=plant-a&device=dev1", 400, "'device'"),
    ("/performance?bundel=x", 400, "query parameter 'bundel'"),
])
def test_performance_page_errors_name_what_is_wrong(site, path, status, named):
    base_url, _, token, _, _ = site
    with httpx.Client(base_url=base_url) as client:
        assert client.post("/login", data={"token": token}).status_code == 303
        r = client.get(path)
        assert r.status_code == status, r.text[:300]
        assert named in html.unescape(r.text)
        ok = client.get("/performance?bundle=sensor@1.0.0&group=plant-a&days=2")
        assert ok.status_code == 200 and "<script" not in ok.text


def test_performance_alerts_link_to_the_performance_page(site):
    base_url, _, token, _, _ = site
    with httpx.Client(base_url=base_url) as client:
        assert client.post("/login", data={"token": token}).status_code == 303
        for path in ("/alerts", "/"):
            r = client.get(path)
            assert r.status_code == 200
            assert 'href="/performance?bundle=sensor%401.0.0&amp;days=2"' in r.text, path
        assert "performance page" in client.get("/alerts").text


def test_the_page_shows_the_tolerances_applied_and_a_groups_own(site):
    base_url, server, token, _, _ = site
    s = server.services
    with httpx.Client(base_url=base_url) as client:
        assert client.post("/login", data={"token": token}).status_code == 303
        fleet = _tolerances(client.get("/performance?bundle=sensor@1.0.0&days=2").text)
        assert "rate 0.05" in fleet and "this group's own" not in fleet
        s.registry.update_group("plant-a", "test", time.time(), performance={"rate": 0.02})
        try:
            group = _tolerances(client.get(
                "/performance?bundle=sensor@1.0.0&group=plant-a&days=2").text)
        finally:
            s.registry.update_group("plant-a", "test", time.time(), reset_performance=["all"])
        assert "rate 0.02 (this group's own)" in group
        assert "min_labelled" in group and "rate 0.05" not in group


def _tolerances(page: str) -> str:
    """The text of the page's tolerances cell."""
    cell = re.search(r'<td class="tolerances[^"]*">(.*?)</td>', page, re.S)
    assert cell is not None, page[:300]
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", cell.group(1))).split())
