"""Every drift setting, for the server (``fleet serve --drift``) and per group (``fleet group
create/update --drift``), stored on both engines, used by the evaluator and the reports,
and shown by ``fleet drift``."""

from __future__ import annotations

import json
import re
import time

import click
import pytest
from click.testing import CliRunner

from fleet_server.cli import main
from fleet_server.cli.serve import drift_config
from fleet_server.config import DEFAULT_DRIFT, DRIFT_KEYS, DriftConfig
from fleet_server.errors import ConfigError, InvalidRequestError
from fleet_server.models import FLEET_SCOPE
from fleet_server.profiles.drift import Thresholds
from tests.fleet_server.test_cli import cli  # noqa: F401 (a fixture)
from tests.fleet_server.test_evaluation import T0, W, evaluator, feed, fleet  # noqa: F401

# -- the settings themselves -----------------------------------------------------------------


def test_every_threshold_persistence_and_lateness_is_a_setting():
    assert set(DRIFT_KEYS) == {*Thresholds().to_dict(), "lateness_s"}
    assert DEFAULT_DRIFT.settings()["importance_share"] == 0.3
    config = DEFAULT_DRIFT.with_overrides({"importance_share": "0.2", "persistence": "1",
                                           "persistence_of": 2, "lateness_s": 30,
                                           "psi_drift": 0.3, "min_rows": 100})
    assert config.thresholds == Thresholds(importance_share=0.2, persistence=1,
                                           persistence_of=2, psi_drift=0.3, min_rows=100)
    assert config.lateness_s == 30.0 and config.window_s == DEFAULT_DRIFT.window_s
    assert DEFAULT_DRIFT.with_overrides({}) is DEFAULT_DRIFT


@pytest.mark.parametrize(("settings", "words"), [
    pytest.param({"share": 0.2}, "unknown setting 'share'", id="unknown-key"),
    pytest.param({"persistence": 1.5}, "drift.persistence: must be a whole number",
                 id="fractional-count"),
    pytest.param({"importance_share": "lots"}, "is not a number", id="not-a-number"),
    pytest.param({"importance_share": float("nan")}, "must be finite", id="nan"),
    pytest.param({"importance_share": True}, "is not a number", id="bool"),
    pytest.param({"importance_share": 1.5}, "drift.importance_share: must be at most 1",
                 id="share-above-one"),
    pytest.param({"persistence": 3, "persistence_of": 2}, "persistence_of: must be >=",
                 id="persistence-of-fewer"),
    pytest.param({"psi_warn": 0.5}, "psi_warn: must not exceed psi_drift",
                 id="warn-above-drift"),
    pytest.param({"lateness_s": -1}, "lateness_s: must be >= 0", id="negative-lateness"),
    pytest.param({"group_min": 0}, "drift.group_min: must be >= 1", id="zero-count"),
    pytest.param({"persistence_of": 101}, "drift.persistence_of: must be <= 100",
                 id="persistence-beyond-the-bound"),
])
def test_bad_settings_are_refused_by_name(settings, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        DEFAULT_DRIFT.with_overrides(settings)


def test_fleet_serve_reads_drift_settings():
    config = drift_config(600, ["importance_share=0.25", "lateness_s=60", "persistence=3",
                                "persistence_of=4"])
    assert (config.window_s, config.lateness_s) == (600, 60.0)
    assert (config.thresholds.importance_share, config.thresholds.persistence,
            config.thresholds.persistence_of) == (0.25, 3, 4)
    with pytest.raises(ConfigError, match="--drift: unknown setting 'importance'"):
        drift_config(300, ["importance=0.2"])
    with pytest.raises(click.BadParameter, match="expected key=value"):
        drift_config(300, ["importance_share"])
    result = CliRunner().invoke(main, ["serve", "--db", "unused.db", "--drift", "psi_drift=x"])
    assert result.exit_code == 1
    assert result.output.strip().endswith("fleet: error: --drift.psi_drift: 'x' is not a number")


# -- per group, stored on both engines ------------------------------------------------------


def test_a_group_keeps_its_own_settings(services_on):
    s = services_on
    g = s.registry.create_group("plant", {"site": "a"}, "test", T0,
                                drift={"importance_share": 0.2, "persistence": 1.0})
    assert g.drift == {"importance_share": 0.2, "persistence": 1}
    assert s.registry.group("plant").drift == {"importance_share": 0.2, "persistence": 1}
    g = s.registry.update_group("plant", "test", T0, drift={"lateness_s": 600},
                                reset_drift=["persistence"], important_features=["x"])
    assert s.registry.group("plant") == g
    assert g.drift == {"importance_share": 0.2, "lateness_s": 600.0}
    assert g.important_features == ("x",)
    g = s.registry.update_group("plant", "test", T0, reset_drift=["all"])
    assert (g.drift, g.important_features) == ({}, ("x",))
    assert s.registry.groups()[0].drift == {}
    with pytest.raises(InvalidRequestError, match="drift: unknown setting 'share'"):
        s.registry.create_group("other", {}, "test", T0, drift={"share": 0.2})
    with pytest.raises(InvalidRequestError, match=re.escape("drift.persistence_of: must be >=")):
        s.registry.update_group("plant", "test", T0, drift={"persistence": 4})
    with pytest.raises(InvalidRequestError, match="reset_drift: unknown setting 'nope'"):
        s.registry.update_group("plant", "test", T0, reset_drift=["nope"])
    actions = [e.action for e in s.store.list_audit(limit=10)]
    assert actions.count("group.update") == 2


# -- the evaluator and the reports use a group's settings ----------------------------------


def test_the_evaluator_judges_each_group_by_its_own_settings(fleet):  # noqa: F811
    s = fleet
    s.registry.create_group("quick", {"site": "a"}, "test", T0,
                            drift={"persistence": 1, "persistence_of": 1})
    s.registry.create_group("late", {"site": "a"}, "test", T0, drift={"lateness_s": 2 * W})
    ev = evaluator(s)  # the server's: persistence 2 of 3, no lateness
    for d in ("dev1", "dev2", "dev3"):  # site a: 3 of 4 features drift
        feed(s, d, 0, T0, shift={"temperature": 15.0, "humidity": 25.0, "current": 3.0})
    judged = ev.evaluate(T0 + W)
    assert {w.scope for w in judged} == {FLEET_SCOPE, "plant-a", "quick"}  # not late yet
    opened = s.store.list_alerts(kind="drift", state="open")
    assert [a.group for a in opened] == ["quick"]  # one window is enough for it alone
    assert opened[0].details["settings"]["persistence"] == 1
    assert opened[0].details["windows"] == ["drift"]
    assert {w.scope for w in ev.evaluate(T0 + 3 * W)} == {"late"}  # two windows later
    # the on-demand report says which settings applied and which were the group's
    result = s.drift.report("sensor@1.0.0", group="quick", since=T0, until=T0 + W, now=T0)
    assert result.overrides == ("persistence", "persistence_of")
    assert result.settings == {**DriftConfig(lateness_s=0).settings(), "persistence": 1,
                               "persistence_of": 1}
    assert s.drift.report("sensor@1.0.0", since=T0, until=T0 + W, now=T0).overrides == ()


def test_a_group_threshold_changes_the_verdict(fleet):  # noqa: F811
    s = fleet
    for d in ("dev1", "dev2", "dev3"):
        feed(s, d, 0, T0, shift={"temperature": 15.0})
    lenient = s.drift.report("sensor@1.0.0", group="plant-a", since=T0, until=T0 + W, now=T0)
    s.registry.update_group("plant-a", "test", T0, drift={"ks_drift": 0.99, "psi_drift": 50,
                                                          "psi_warn": 40, "rate_drift": 0.5,
                                                          "wasserstein_drift": 50})
    strict = s.drift.report("sensor@1.0.0", group="plant-a", since=T0, until=T0 + W, now=T0)
    assert lenient.report.feature("temperature").verdict == "drift"
    assert strict.report.feature("temperature").verdict == "ok"


# -- the CLI and the API --------------------------------------------------------------------


def test_group_settings_and_fleet_drift_from_the_cli(cli, sensor_bundle):  # noqa: F811
    run, server = cli
    run("bundle", "upload", str(sensor_bundle))
    out = run("group", "create", "plant-a", "--selector", "site=a", "--drift",
              "importance_share=0.2", "--drift", "persistence=1").output
    assert "drift settings importance_share=0.2,persistence=1" in out
    assert "importance_share=0.2,persistence=1" in run("group", "list").output
    out = run("group", "update", "plant-a", "--drift", "lateness_s=30", "--reset-drift",
              "persistence", "--important", "vibration").output
    assert out.strip() == ("group 'plant-a': important vibration; drift settings "
                           "importance_share=0.2,lateness_s=30")
    bad = run("group", "update", "plant-a", "--drift", "psi_drift=-1", ok=False)
    assert bad.exit_code == 1 and "drift.psi_drift: must be a finite number > 0" in bad.output
    out = run("drift", "sensor@1.0.0", "--group", "plant-a").output
    settings = next(line for line in out.splitlines() if line.startswith("settings: "))
    assert "importance_share=0.2*" in settings and "lateness_s=30*" in settings
    assert "persistence=2," in settings and "(* the group's own)" in settings
    report = json.loads(run("drift", "sensor@1.0.0", "--group", "plant-a", "--json").output)
    assert report["overrides"] == ["importance_share", "lateness_s"]
    assert report["settings"]["importance_share"] == 0.2
    assert report["report"]["rule"] in ("importance", "count")
    # the drift page shows them too
    s = server.services
    page = httpx_get(server, s, "/drift?bundle=sensor@1.0.0&group=plant-a")
    assert "importance_share=0.2 <b>(group)</b>" in page and "group rules fired" in page


def httpx_get(server, services, path: str) -> str:
    """A dashboard page, signed in as a viewer."""
    import httpx

    token = services.auth.create_token(f"viewer-{time.monotonic_ns()}", "viewer", "test",
                                       time.time()).secret
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        assert client.post("/login", data={"token": token, "next": "/"}).status_code == 303
        r = client.get(path)
    assert r.status_code == 200, r.text[:500]
    return r.text
