"""Acts 8 and 9: the model heals itself, and a retrain that loses deploys nothing.

Act 8: the labelling rule flips for high-vibration machines (concept drift); v2's realized
accuracy falls, a ``performance_drop`` alert calls the webhook, one tick of the retraining
watcher trains a challenger on the fresh labelled rows, proves it better than v2 and rolls
it out through canaries; realized accuracy recovers and ``fleet retrain show`` prints the
lineage. Act 9: the same recipe trained on shuffled labels (a broken join in the label
pipeline) builds a challenger that loses to the champion: the run is recorded ``rejected``
with the comparison's reason, and nothing is uploaded or rolled out.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from demo.lines import banner, comparison_lines, metric, performance_lines, say
from demo.stage import (
    FLIP_VIBRATION,
    FRESH_MIN,
    PERFORMANCE_WINDOW_S,
    Demo,
    StoryFailed,
    wait_for,
)

RECIPE = """\
# the demo's retraining recipe (edgepack retrain): see demo/retraining.py
name = "sensor-retrain"
bundle = "sensor"
group = "everyone"
key = "../keys/build.key"
target = "fault"
data = "demo.retraining:load"
train = "demo.retraining:fit"
time_column = "ts"
holdout = 0.25
promote_if = ["accuracy>=+0.02"]
version = "minor"

[rollout]
stages = "10%,50%,100%"
soak = "6s"
# a model retrained for a changed rule is meant to answer differently from the controls:
# the accuracy gate on labels judges it, the prediction-shift gates only catch a wild one;
# before labels arrive the gate compares estimates, and the controls' estimate is the old
# model's own confidence, which concept drift does not dent: a wider tolerance until then
gates = { min_healthy_predictions = 10, min_canary_predictions = 60, \
min_control_predictions = 60, min_labels = 100, max_wait_s = 60, \
max_prediction_js = 0.3, max_prediction_psi = 1.0, max_accuracy_drop = 0.05 }

[watch]
alerts = ["performance_drop"]
cooldown = "1h"
"""


def heal(demo: Demo) -> None:
    """Issue 15's act: concept drift, the alert, a retrain that must win, its rollout."""
    banner("8. the rule changes: v2 goes wrong, the fleet retrains itself and heals")
    say(f"new bearings: a machine vibrating above {FLIP_VIBRATION} mm/s now fails where the "
        "old rule said it would not, and the reverse (concept drift: the readings do not "
        "move, what they mean does)")
    changed = time.time()
    for d in demo.devices:
        d.flipped = True
    _the_drop(demo, changed)
    work = _fresh_rows(demo)
    outcome = _watcher_tick(demo, work)
    run = demo.client.get(f"/api/v1/retrains/{outcome.run_id}")
    comparison_lines(run["metrics"]["comparison"])
    _challenger_rolls_out(demo, outcome)
    say(f"$ fleet retrain show {outcome.run_id}")
    demo.fleet("retrain", "show", str(outcome.run_id))


def _the_drop(demo: Demo, changed: float) -> None:
    """Wait for v2's ``performance_drop`` alert (and the fresh rows), and show that only
    the labels saw it: not the estimate, not the drift monitors; then the webhook."""

    def drop() -> list[dict[str, Any]] | None:
        found = [a for a in demo.client.get("/api/v1/alerts", state="open")
                 if a["kind"] == "performance_drop" and a["bundle"] == "sensor@2.0.0"]
        # the recipe's group (or the fleet) must have dropped: a site alone does not
        # trigger the retrain; and the retrain wants a few thousand fresh rows
        watched = any(a["group"] in ("everyone", "*") for a in found)
        rows = sum(len(d.fresh_rows()) for d in demo.devices)
        return found if watched and rows >= FRESH_MIN else None

    alerts = sorted(wait_for("v2's realized accuracy to drop", drop, 120, every=1.0),
                    key=lambda a: a["id"])
    first = alerts[0]
    say(f"alert #{first['id']} ({first['kind']}, group {first['group']}): {first['message']}")
    if alerts[1:]:
        say("  and for group " + ", ".join(f"{a['group']} (#{a['id']})" for a in alerts[1:]))
    say(f"  (over the last {PERFORMANCE_WINDOW_S:.0f} s of labels, some still under the old "
        "rule; the limit is the packaged accuracy minus the 0.05 tolerance)")
    estimate = demo.client.get("/api/v1/performance", bundle="sensor@2.0.0",
                               since=str(changed))["total"]["estimated"].get("accuracy")
    say(f"  v2's label-free estimate this hour still says {metric(estimate, 'served rows')}:"
        " calibrated confidences cannot see concept drift, only labels can")
    drifts = [a for a in demo.client.get("/api/v1/alerts", state="open")
              if a["kind"] == "drift" and a["opened"] >= changed]
    say(f"  drift alerts since the change: {len(drifts)} (every input histogram is where it "
        "was)")
    calls = wait_for("the retraining webhook", lambda: [
        c for c in demo.webhook.calls
        if (c.get("alert") or {}).get("kind") == "performance_drop"], 30)
    say(f"webhook called: {demo.webhook.url} ← {json.dumps(calls[0])[:120]}…")


def _fresh_rows(demo: Demo) -> Path:
    """The fresh labelled rows (what the devices served since the change, with its labels)
    and the recipe, into ``out/retrain``; returns that folder."""
    from packager.sample_data import FEATURES

    work = demo.out / "retrain"
    work.mkdir(exist_ok=True)
    fresh = sorted(r for d in demo.devices for r in d.fresh_rows())
    with (work / "fresh.csv").open("w") as fh:
        fh.write(",".join(("ts", *FEATURES, "fault")) + "\n")
        fh.writelines(",".join(map(str, (_iso(t), *row, label))) + "\n"
                      for t, row, label in fresh)
    (work / "recipe.toml").write_text(RECIPE)
    say(f"{len(fresh):,} labelled rows served since the change → {work / 'fresh.csv'}")
    return work


def _watcher_tick(demo: Demo, work: Path) -> Any:
    """One tick of ``edgepack retrain --watch``: it answers the alert with a run that must
    promote a challenger."""
    from packager.retrain import FleetApi, load_recipe
    from packager.watch import Watcher, policy_of

    say(f"$ edgepack retrain {work / 'recipe.toml'} --watch --server {demo.url}   "
        "(one tick of the watcher)")
    recipe = load_recipe(work / "recipe.toml")
    api = FleetApi(demo.url, demo.token)
    try:
        outcome = Watcher(recipe, api, policy_of(recipe), work=work / "runs",
                          say=lambda line: say(f"  {line}")).tick()
    finally:
        api.close()
    if outcome is None or outcome.status != "promoted":
        raise StoryFailed(f"the retrain did not promote a challenger: {outcome}")
    return outcome


def _challenger_rolls_out(demo: Demo, outcome: Any) -> None:
    """Follow the challenger's rollout to every device, then its realized accuracy."""
    detail = demo.follow(outcome.rollout, outcome.challenger.split("@")[1], "completed")
    judged = [g for entry in detail["audit"] for g in (entry.get("numbers") or {}).get(
        "gates", ()) if isinstance(g, dict) and g.get("name") == "accuracy"
        and g.get("outcome") == "pass"]
    if judged:
        say(f"  the canaries' accuracy gate at the first stage: {judged[0]['reason']}")
    wait_for(f"every agent to run {outcome.challenger}",
             lambda: demo.running() == {outcome.challenger: 20}, 60)
    say(f"devices by bundle: {demo.running()}")
    healed = time.time()

    def recovered() -> dict[str, Any] | None:
        r = demo.client.get("/api/v1/performance", bundle=outcome.challenger,
                            since=str(healed))
        return r if r["total"]["labelled"] >= 1000 else None

    result = wait_for(f"labels for {outcome.challenger}", recovered, 60)
    say(f"$ fleet performance {outcome.challenger}   (realized accuracy is back; packaged: "
        "on the held-out fresh rows)")
    performance_lines(result, explain=False)


def a_retrain_that_loses(demo: Demo) -> None:
    """Issue 15's negative path: a challenger that loses deploys nothing, and says why."""
    from packager.retrain import FleetApi, load_recipe, run

    banner("9. a retrain that loses: the challenger must win, or nothing ships")
    say("a bug in the label pipeline shuffles the fresh rows' labels; the same recipe, "
        "run by hand on them, trains a challenger that has learnt nothing")
    work = demo.out / "retrain"
    (work / "recipe-shuffled.toml").write_text(RECIPE.replace(
        "demo.retraining:fit", "demo.retraining:fit_shuffled"))
    before = demo.running()
    rollouts = len(demo.client.get("/api/v1/rollouts"))
    bundles = len(demo.client.get("/api/v1/bundles"))
    say(f"$ edgepack retrain {work / 'recipe-shuffled.toml'} --server {demo.url}")
    recipe = load_recipe(work / "recipe-shuffled.toml")
    api = FleetApi(demo.url, demo.token)
    try:
        outcome = run(recipe, api, trigger="manual", work=work / "runs-shuffled",
                      say=lambda line: say(f"  {line}"))
    finally:
        api.close()
    if outcome.status != "rejected":
        raise StoryFailed(f"the shuffled-label retrain was not rejected: {outcome}")
    record = demo.client.get(f"/api/v1/retrains/{outcome.run_id}")
    say(f"run {outcome.run_id} is {record['status']}: the challenger {outcome.challenger} "
        f"lost to the champion {outcome.champion}")
    say(f"$ fleet retrain show {outcome.run_id}")
    demo.fleet("retrain", "show", str(outcome.run_id))
    after = (len(demo.client.get("/api/v1/rollouts")), len(demo.client.get("/api/v1/bundles")))
    say(f"nothing deployed: rollouts {rollouts} → {after[0]}, bundles {bundles} → {after[1]}; "
        f"devices by bundle: {demo.running()}")
    if after != (rollouts, bundles) or demo.running() != before:
        raise StoryFailed("a rejected retrain changed the fleet")


def _iso(t: float) -> str:
    """A row's time as the recipe's ``time_column`` holds it (ISO 8601 sorts as time)."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")
