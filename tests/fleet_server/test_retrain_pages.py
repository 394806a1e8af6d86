"""The retraining pages over real HTTP, in Debian's headless Chromium (JavaScript off).

A real FleetServer (HTTP, no broker: summaries go through the real ingest rules) holds
``sensor@1.0.0`` (the champion) and ``sensor@2.0.0`` (the challenger), a
``performance_drop`` alert, the run it triggered (recorded through the retrain service as
``edgepack retrain`` records it: data, comparison, promoted with its rollout), a rejected
run and a requested one, and performance entries built with the contract's accumulators
from known rows: the champion's in the day before the run, the challenger's after it. The
run's page must show the chain alert → run → challenger → champion → rollout → the
realized accuracy after (exactly that of the rows), each linking to its page; the bundle
page links to the runs. Screenshots go where the dashboard tests put theirs.
"""

from __future__ import annotations

import html
import time

import httpx
import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from tests.fleet_server.test_dashboard import CHROMIUM, CHROMIUM_ARGS, shot
from tests.fleet_server.test_performance import entry, rows, send

pytestmark = pytest.mark.slow

COMPARISON = {
    "name": "sensor", "version": "1.0.0", "metric": "accuracy", "delta": 0.31,
    "low": 0.27, "high": 0.35, "won": True,
    "comparison": {
        "rows": 300, "verdict": "win", "reasons": [],
        "metrics": [{"name": "accuracy", "better": "higher", "champion": 0.62,
                     "challenger": 0.93, "delta": 0.31, "low": 0.27, "high": 0.35}],
        "test": {"name": "mcnemar_exact", "metric": "accuracy", "p_value": 1e-12,
                 "champion_only": 4, "challenger_only": 97},
        "rules": [{"rule": "accuracy>=+0.05", "metric": "accuracy", "kind": "absolute",
                   "observed": 0.31, "improvement": True, "significant": True,
                   "passed": True}]}}


@pytest.fixture(scope="module")
def site(tmp_path_factory, signing_keys, bundles):
    from fleet_server.server import FleetServer
    from tests.fleet_server.conftest import make_config

    server = FleetServer(make_config(tmp_path_factory.mktemp("retrain-pages"), signing_keys))
    try:
        server.start()
        base_url = server.start_http()
        s = server.services
        now = time.time()
        hour = int(now // 3600) * 3600
        for version in ("1.0.0", "2.0.0"):
            s.bundles.upload(bundles.build(version).read_bytes(), "test", now - 6 * 3600)
        s.registry.add_device("dev1", {"site": "a"}, "test", now - 6 * 3600)
        s.registry.create_group("plant-a", {"site": "a"}, "test", now - 6 * 3600)
        token = s.auth.create_token("ana", "viewer", "test", now).secret
        t0, p0, q0 = rows(400, 7, accuracy=0.62)  # the champion, the day before the run
        assert not send(s, "dev1", 1, hour - 5 * 3600 + 600, [entry(t0, p0, q0)]).dead
        alert = s.alerts.raise_alert("performance_drop", s.bundles.get("sensor", "1.0.0"),
                                     group="plant-a", message="realized accuracy 0.62",
                                     details={}, now=hour - 4 * 3600)
        run = s.retrains.start(recipe="sensor-retrain", recipe_hash="ab" * 32,
                               revision="c0ffee", trigger=f"alert:{alert.id}",
                               group="plant-a", bundle="sensor", actor="operator:ci",
                               now=hour - 3 * 3600)
        s.retrains.update(run.id, {
            "data": {"rows": 1200, "labelled_rows": 1200, "train_rows": 900,
                     "held_out_rows": 300, "held_out_from": "2026-12-06T09:00:00",
                     "time_range": ["2026-12-06T08:00:00", "2026-12-06T09:20:00"],
                     "sha256": "de" * 32},
            "champion": "sensor@1.0.0", "challenger": "sensor@2.0.0",
            "metrics": {"comparison": COMPARISON}}, "operator:ci", hour - 3 * 3600 + 60)
        s.rollouts.create({"id": f"retrain-{run.id}", "bundle": "sensor@2.0.0",
                           "group": "plant-a", "start": True}, actor="operator:ci",
                          roles={"operator"}, now=hour - 3 * 3600 + 90)
        s.retrains.update(run.id, {"status": "promoted", "rollout": f"retrain-{run.id}"},
                          "operator:ci", hour - 3 * 3600 + 100)
        t1, p1, q1 = rows(500, 8, accuracy=0.93)  # the challenger on the devices, after
        t2, p2, q2 = rows(300, 9, accuracy=0.9)
        assert not send(s, "dev1", 2, hour - 2 * 3600 + 600, [entry(t1, p1, q1, "2.0.0")],
                        version="2.0.0").dead
        assert not send(s, "dev1", 3, hour - 3600 + 600, [entry(t2, p2, q2, "2.0.0")],
                        version="2.0.0").dead
        lost = s.retrains.start(recipe="sensor-bad", recipe_hash="", revision="",
                                trigger="manual", group="plant-a", bundle="sensor",
                                actor="operator:ci", now=hour - 1800)
        s.retrains.update(lost.id, {"champion": "sensor@2.0.0", "challenger": "sensor@2.1.0",
                                    "status": "rejected",
                                    "reason": "accuracy>=+0.05: observed -0.41 <script>",
                                    "metrics": {"comparison_table": "metric  champion  "
                                                "challenger\naccuracy  0.93  0.52"}},
                          "operator:ci", hour - 1700)
        s.retrains.start(recipe="sensor-retrain", recipe_hash="", revision="",
                         trigger="manual", group="plant-a", bundle="sensor", actor="ana",
                         now=hour - 600, requested=True)
        after = accuracy_score(np.r_[t1, t2], np.r_[p1, p2])
        yield base_url, server, token, run.id, after, accuracy_score(t0, p0)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(site):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (the Makefile's setup installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    base_url, _, token, *_ = site
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(base_url=base_url, java_script_enabled=False,
                                          viewport={"width": 1280, "height": 900})
            pg = context.new_page()
            pg.goto("/retrains")
            pg.fill("input[name=token]", token)
            pg.click("button[type=submit]")
            pg.wait_for_url(f"{base_url}/retrains")
            yield pg
        finally:
            browser.close()


def test_the_runs_page_lists_every_run_and_links_its_lineage(page, site):
    _, _, _, run_id, _, _ = site
    shot(page, "retrains")
    assert page.title().startswith("Retraining")
    cells = [[td.inner_text().strip() for td in tr.query_selector_all("td")]
             for tr in page.query_selector_all("table.retrains tbody tr")]
    assert [(c[0], c[1], c[3]) for c in cells] == [
        (str(run_id + 2), "sensor-retrain", "requested"),
        (str(run_id + 1), "sensor-bad", "rejected"),
        (str(run_id), "sensor-retrain", "promoted")]
    assert "<script>" in cells[1][-1]  # the reason, escaped as text
    assert page.query_selector("header a[href='/retrains']") is not None
    page.click("text=rejected")  # the status filter
    page.wait_for_url("**/retrains?status=rejected")
    assert len(page.query_selector_all("table.retrains tbody tr")) == 1
    # the bundle page links to the runs that built or judged against it
    page.goto("/bundles/sensor@2.0.0")
    page.click("text=retrain runs")
    page.wait_for_url("**/retrains?bundle=sensor%402.0.0")
    ids = [tr.query_selector("td").inner_text().strip()
           for tr in page.query_selector_all("table.retrains tbody tr")]
    assert ids == [str(run_id + 1), str(run_id)]


def test_a_runs_page_shows_the_chain_from_the_alert_to_the_performance_after(page, site):
    _, _, _, run_id, after, before = site
    page.goto(f"/retrains/{run_id}")
    shot(page, "retrain")
    links = page.query_selector_all(".chain .card")
    steps = [c.query_selector(".muted").inner_text() for c in links]
    assert steps == ["alert", "run", "challenger", "champion", "rollout", "performance"]
    hrefs = [c.query_selector("a").get_attribute("href") if c.query_selector("a") else None
             for c in links]
    assert hrefs[0].startswith("/performance?bundle=sensor%401.0.0&group=plant-a")
    assert hrefs[2:] == ["/bundles/sensor@2.0.0", "/bundles/sensor@1.0.0",
                         f"/rollouts/retrain-{run_id}",
                         "/performance?bundle=sensor%402.0.0&group=plant-a&days=2"]
    performance = links[-1].inner_text()
    assert f"{after:.4g}" in performance and "800 labelled rows" in performance
    assert f"{before:.4g} on 400 labelled rows" in performance
    text = html.unescape(page.inner_text("main"))
    assert "accuracy>=+0.05" in text and "mcnemar_exact" in text
    assert "1 200 rows (1 200 labelled): 900 to train, 300 held out" in text
    page.click(".chain .lineage-rollout a")
    page.wait_for_url(f"**/rollouts/retrain-{run_id}")


def test_a_rejected_run_says_why(page, site):
    _, _, _, run_id, _, _ = site
    page.goto(f"/retrains/{run_id + 1}")
    steps = [c.query_selector(".muted").inner_text() for c in page.query_selector_all(
        ".chain .card")]
    assert steps == ["trigger", "run", "challenger", "champion"]
    text = page.inner_text("main")
    assert "nothing was deployed" in text and "observed -0.41 <script>" in text
    assert page.inner_text("pre.comparison-table").endswith("accuracy  0.93  0.52")


@pytest.mark.parametrize(("path", "status", "named"), [
    ("/retrains/999", 404, "not found"),
    ("/retrains/abc", 404, "not found"),
    ("/retrains?status=won", 400, "query parameter 'status'"),
    ("/retrains?bundle=sensor", 400, "'bundle'"),
    ("/retrains?bundel=x", 400, "query parameter 'bundel'"),
])
def test_retrain_page_errors_name_what_is_wrong(site, path, status, named):
    base_url, _, token, *_ = site
    with httpx.Client(base_url=base_url, timeout=10) as client:
        assert client.post("/login", data={"token": token}).status_code == 303
        r = client.get(path)
    assert r.status_code == status, r.text[:300]
    assert named in html.unescape(r.text)
