"""``edgepack retrain RECIPE`` (issue 15): one run of the loop against a real fleet server
over real HTTP: the newest rows held out, the champion fetched from what the group runs,
the challenger built and compared through the packaged ONNX, promoted through a staged
rollout only when it wins, and every run recorded with its lineage."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from packager.cli import main as edgepack
from packager.errors import RecipeError
from packager.retrain import load_recipe, next_version, split_holdout
from tests.bundles import sensor_data

TRAINING = '''
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from packager.sample_data import FEATURES, sensor_data


def load():  # LOOP_ROWS: how much labelled data the warehouse holds now
    import os

    frame = sensor_data(int(os.environ.get("LOOP_ROWS", "3000")), seed=11)
    frame["ts"] = pd.date_range("2026-11-01", periods=len(frame), freq="min").astype(str)
    return frame


def _fit(frame, labels):
    model = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=500))])
    return model.fit(frame[list(FEATURES)], labels)


def fit(frame):
    return _fit(frame, frame["fault"])


def fit_inverted(frame):  # a challenger that must lose
    return _fit(frame, 1 - frame["fault"])
'''


def _recipe(tmp_path: Path, key: Path, train: str) -> Path:
    (tmp_path / "training_loop.py").write_text(TRAINING)
    path = tmp_path / "recipe.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "sensor-retrain"
        bundle = "sensor"
        group = "plant-a"
        key = "{key}"
        target = "fault"
        data = "training_loop:load"
        train = "training_loop:{train}"
        time_column = "ts"
        holdout = 0.25
        promote_if = ["accuracy>=+0.01"]

        [rollout]
        stages = "50%,100%"
        soak = "1h"
        """))
    return path


@pytest.fixture
def fleet(server_factory, bundles):
    """A server with three devices in plant-a whose desired bundle is sensor@1.0.0 of the
    given kind; an operator token."""
    def make(champion_kind: str):
        server = server_factory(http=True)
        s = server.services
        now = time.time()
        s.bundles.upload(bundles.build("1.0.0", model=champion_kind).read_bytes(), "t", now)
        for d in ("dev1", "dev2", "dev3"):
            s.registry.add_device(d, {"site": "a"}, "t", now)
            s.desired.assign(d, "sensor@1.0.0", actor="t", now=now)
        s.registry.create_group("plant-a", {"site": "a"}, "t", now)
        return server, s.auth.create_token("ci", "operator", "t", now).secret
    return make


def test_a_better_challenger_is_promoted_through_a_staged_rollout(
        fleet, signing_keys, tmp_path, capsys) -> None:
    server, token = fleet("inverted")  # the champion in the field has gone wrong
    recipe = _recipe(tmp_path, signing_keys.build.private, "fit")
    code = edgepack(["retrain", str(recipe), "--server", server.base_url, "--token", token,
                     "--trigger", "manual", "--json"])
    assert code == 0, capsys.readouterr().err
    outcome = json.loads(capsys.readouterr().out)
    assert (outcome["status"], outcome["champion"], outcome["challenger"]) == \
        ("promoted", "sensor@1.0.0", "sensor@1.1.0")
    s = server.services
    assert s.bundles.get("sensor", "1.1.0") is not None  # uploaded
    rollout = s.rollouts.get(outcome["rollout"])
    assert rollout["bundle"] == "sensor@1.1.0" and rollout["group"] == "plant-a"
    assert rollout["status"] == "running"
    run = s.retrains.get(outcome["run_id"])
    assert run.recipe_hash == load_recipe(recipe).sha256
    assert (run.data["rows"], run.data["held_out_rows"]) == (3000, 750)
    assert run.data["held_out_from"] > run.data["time_range"][0]  # the newest rows
    comparison = run.metrics["comparison"]
    assert comparison["won"] is True and comparison["name"] == "sensor"
    steps = [link["step"] for link in s.retrains.lineage(run)]
    assert steps == ["trigger", "run", "champion", "challenger", "rollout"]


def test_a_challenger_that_loses_deploys_nothing_and_says_why(
        fleet, signing_keys, tmp_path, capsys) -> None:
    server, token = fleet("logreg")
    recipe = _recipe(tmp_path, signing_keys.build.private, "fit_inverted")
    code = edgepack(["retrain", str(recipe), "--server", server.base_url, "--token", token])
    captured = capsys.readouterr()
    assert code == 6, captured.err  # refused by a check (edgefleet.cli)
    assert "rejected" in captured.out
    s = server.services
    assert [b.version for b in s.bundles.list("sensor")] == ["1.0.0"]  # nothing uploaded
    assert s.rollouts.list() == []
    [run] = s.retrains.list(recipe="sensor-retrain")
    assert run.status == "rejected" and run.rollout is None and run.finished is not None
    assert "accuracy" in run.reason  # the rule that failed, with the numbers


def test_a_second_run_while_one_runs_is_refused(fleet, signing_keys, tmp_path) -> None:
    server, token = fleet("logreg")
    server.services.retrains.start(recipe="sensor-retrain", recipe_hash="", revision="",
                                   trigger="manual", group="plant-a", bundle="sensor",
                                   actor="other", now=time.time())
    recipe = _recipe(tmp_path, signing_keys.build.private, "fit")
    code = edgepack(["retrain", str(recipe), "--server", server.base_url, "--token", token])
    assert code == 4  # conflict: runs of one recipe never overlap
    assert [b.version for b in server.services.bundles.list("sensor")] == ["1.0.0"]


def test_the_newest_rows_are_held_out() -> None:
    frame = sensor_data(10, seed=1)
    frame["t"] = [5, 1, 9, 3, 7, 2, 8, 0, 6, 4]
    train, held = split_holdout(frame, "t", 0.3)
    assert sorted(held["t"]) == [7, 8, 9] and sorted(train["t"]) == list(range(7))
    train, held = split_holdout(frame, None, 0.3)  # no time column: the last rows
    assert list(held.index) == [7, 8, 9]
    assert [next_version(v, b) for v, b in (("1.4.2", "minor"), ("1.4.2", "patch"),
                                            ("1.4.2", "major"), (None, "minor"))] == \
        ["1.5.0", "1.4.3", "2.0.0", "1.0.0"]


@pytest.mark.parametrize(("text", "key"), [
    ('name = "r"\nbundle = "s"\ngroup = "g"\nkey = "k"\ntarget = "y"\ndata = "m:f"\n'
     'train = "m:g"\nsurprise = 1\n', "surprise"),
    ('name = "r"\nbundle = "s"\ngroup = "g"\nkey = "k"\ntarget = "y"\ndata = "m.f"\n'
     'train = "m:g"\n', "data"),
    ('name = "r"\nbundle = "Bad"\ngroup = "g"\nkey = "k"\ntarget = "y"\ndata = "m:f"\n'
     'train = "m:g"\n', "bundle"),
    ('name = "r"\nbundle = "s"\ngroup = "g"\nkey = "k"\ntarget = "y"\ndata = "m:f"\n'
     'train = "m:g"\nholdout = 0.9\n', "holdout"),
    ('name = "r"\nbundle = "s"\ngroup = "g"\nkey = "k"\ndata = "m:f"\ntrain = "m:g"\n',
     "target"),
])
def test_a_bad_recipe_is_refused_naming_the_key(tmp_path, text, key) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.field == key and str(path) in str(err.value)


def _watcher(server, token, recipe_path: Path, tmp_path: Path, clock, **policy):
    from packager.retrain import FleetApi
    from packager.watch import Watcher, WatchPolicy

    api = FleetApi(server.base_url, token)
    return Watcher(load_recipe(recipe_path), api, WatchPolicy(**policy),
                   work=tmp_path / "watch", clock=clock), api


def test_the_watcher_answers_an_alert_once_then_keeps_its_cooldown(
        fleet, signing_keys, tmp_path) -> None:
    server, token = fleet("inverted")
    s = server.services
    recipe = _recipe(tmp_path, signing_keys.build.private, "fit")
    now = [time.time()]
    watcher, api = _watcher(server, token, recipe, tmp_path, lambda: now[0],
                            cooldown_s=3600, max_per_day=2)
    try:
        assert watcher.tick() is None  # nothing asked, no alert, no schedule: no run
        bundle = s.bundles.get("sensor", "1.0.0")
        other = s.alerts.raise_alert("suspect_sensor", bundle, group="plant-a", device="dev1",
                                     message="one device", details={}, now=now[0])
        alert = s.alerts.raise_alert("drift", bundle, group="plant-a", message="humidity",
                                     details={}, now=now[0])
        done = watcher.tick()
        assert done is not None and done.status == "promoted"
        run = s.retrains.get(done.run_id)
        assert (run.trigger, run.alert_id) == (f"alert:{alert.id}", alert.id)
        assert s.retrains.lineage(run)[0]["step"] == "alert"
        assert watcher.tick() is None  # the alert has its run; the other kind is not watched
        assert other.id not in [r.alert_id for r in s.retrains.list()]
        # a new alert within the cooldown waits; after it, it is answered
        fresh = s.alerts.raise_alert("drift", s.bundles.get("sensor", "1.1.0"),
                                     group="plant-a", message="again", details={},
                                     now=now[0])
        assert "cooldown" in watcher.blocked(now[0] + 60)
        now[0] += 60
        assert watcher.tick() is None
        assert s.retrains.list(alert_id=fresh.id) == []
    finally:
        api.close()


def test_the_watcher_claims_a_requested_run_past_the_guardrails(
        fleet, signing_keys, tmp_path) -> None:
    server, token = fleet("logreg")
    s = server.services
    recipe = _recipe(tmp_path, signing_keys.build.private, "fit_inverted")
    now = time.time()
    watcher, api = _watcher(server, token, recipe, tmp_path, lambda: now,
                            cooldown_s=10**6, max_per_day=1)
    try:
        for _ in range(2):  # the cap and the cooldown are spent by the first run
            asked = s.retrains.start(recipe="sensor-retrain", recipe_hash="", revision="",
                                     trigger="manual", group="plant-a", bundle="sensor",
                                     actor="ana", now=now, requested=True)
            done = watcher.tick()
            assert done is not None and done.run_id == asked.id
            assert done.status == "rejected"  # the inverted challenger loses, said why
        assert watcher.blocked(now) is not None
        assert [b.version for b in s.bundles.list("sensor")] == ["1.0.0"]
    finally:
        api.close()


def test_the_watcher_waits_for_enough_new_labelled_rows(fleet, signing_keys, tmp_path,
                                                        monkeypatch) -> None:
    """min_new_rows: retraining on the rows the last run read would only re-learn it."""
    server, token = fleet("inverted")
    s = server.services
    recipe = _recipe(tmp_path, signing_keys.build.private, "fit")
    now = time.time() + 60  # the runner's clock may run ahead of the server's
    watcher, api = _watcher(server, token, recipe, tmp_path, lambda: now, cooldown_s=0,
                            max_per_day=10, min_new_rows=500)
    try:
        assert watcher.blocked(now) is None  # no run yet: nothing to compare with
        s.alerts.raise_alert("drift", s.bundles.get("sensor", "1.0.0"), group="plant-a",
                             message="humidity", details={}, now=now)
        done = watcher.tick()
        assert done is not None and done.status == "promoted"
        assert s.retrains.get(done.run_id).data["labelled_rows"] == 3000
        assert watcher.blocked(now) == ("0 new labelled rows since the last run "
                                        "(min_new_rows 500; 3000 now, 3000 then)")
        monkeypatch.setenv("LOOP_ROWS", "3400")
        assert "400 new labelled rows" in watcher.blocked(now)
        monkeypatch.setenv("LOOP_ROWS", "3500")
        assert watcher.blocked(now) is None
    finally:
        api.close()


def test_a_bad_watch_setting_is_refused_naming_it(tmp_path, signing_keys) -> None:
    from packager.watch import policy_of

    path = _recipe(tmp_path, signing_keys.build.private, "fit")
    path.write_text(path.read_text() + '\n[watch]\nmin_new_rows = -1\n')
    with pytest.raises(RecipeError) as err:
        policy_of(load_recipe(path))
    assert err.value.field == "watch.min_new_rows"
    path.write_text(path.read_text().replace("min_new_rows = -1", 'cooldown = "6"'))
    with pytest.raises(RecipeError) as err:
        policy_of(load_recipe(path))
    assert err.value.field == "watch.cooldown"
