"""Acts 3 to 6: v1 in stages, site B's drift, v2 with its card and one explanation, and
the faulty v3 that the gates catch and roll back.

Each act is one function over the running :class:`~demo.stage.Demo`; the order is
:func:`demo.story.story`'s.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from demo.lines import banner, fmt, say
from demo.stage import Demo, wait_for

# canary stages: 10 %, then 50 %, then all, seconds-long soaks
STAGES: list[dict[str, Any]] = [{"fraction": 0.1, "min_devices": 2, "soak_s": 6},
                                {"fraction": 0.5, "min_devices": 2, "soak_s": 6},
                                {"fraction": 1.0, "min_devices": 1, "soak_s": 4}]


def roll_out_v1(demo: Demo) -> None:
    """v1 to every device, in stages."""
    banner("3. roll out v1 to every device in stages (10 %, 50 %, 100 %)")
    demo.rollout("1.0.0", STAGES, "completed")
    wait_for("every agent to run v1", lambda: demo.running() == {"sensor@1.0.0": 20}, 60)
    say(f"devices by bundle: {demo.running()}")


def site_b_drifts(demo: Demo) -> None:
    """Site B's humidity reads high: the drift alert, its report, the webhook."""
    banner("4. site B's humidity sensors drift (+25 %RH); the server notices")
    for d in demo.devices:
        if d.site == "b":
            d.shift = {"humidity": 25.0}
    wait_for("a drift alert", lambda: next(iter(demo.client.get(
        "/api/v1/alerts", state="open")), None), 120, every=1.0)
    for a in demo.client.get("/api/v1/alerts", state="open"):  # every open alert, not one
        say(f"alert #{a['id']} ({a['kind']}, group {a['group'] or '-'}): {a['message']}")
    report = demo.client.get("/api/v1/drift", bundle="sensor@1.0.0", group="site-b",
                             since=time.time() - 20)
    say("  (PSI and W/σ are net of their small-sample bias, so 0 means no more than noise; "
        "KS is raw)")
    for f in report["report"]["features"]:
        if f["role"] == "input":
            s = f["stats"]
            say(f"  site-b {f['name']:<12} {f['verdict']:<6} PSI {fmt(s.get('psi'))}  KS "
                f"{fmt(s.get('ks'))}  W/σ {fmt(s.get('wasserstein'))}")
    wait_for("the retraining webhook", lambda: demo.webhook.calls, 30)
    say(f"webhook called (the retraining trigger): {demo.webhook.url} ← "
        f"{json.dumps(demo.webhook.calls[0])[:160]}…")
    for d in demo.devices:
        d.shift = {}  # the field crew recalibrates site B
    say("site B recalibrated")


def roll_out_v2(demo: Demo) -> None:
    """v2 through canaries; ``fleet bundle show`` answers its card's six questions."""
    banner("5. roll out v2 (the MLP) through canary stages to all")
    demo.rollout("2.0.0", STAGES, "completed")
    wait_for("every agent to run v2", lambda: demo.running() == {"sensor@2.0.0": 20}, 60)
    say(f"devices by bundle: {demo.running()}")
    say("$ fleet bundle show sensor@2.0.0")
    show = demo.client.get("/api/v1/bundles/sensor/2.0.0/governance")
    for key, question in (("approved", "who approved it"), ("data", "what data trained it"),
                          ("evaluation", "how it was evaluated"),
                          ("biases", "what biases were tested"),
                          ("review", "when it is reviewed next"),
                          ("explanations", "how it is explained")):
        say(f"  {question + ':':<27} {show[key]['answer']}")
    explain_one(demo)


def roll_out_v3(demo: Demo) -> None:
    """The faulty v3: the prediction-drift gate aborts it, every device goes back."""
    banner("6. roll out the faulty v3: the gates catch it and roll back")
    detail = demo.rollout("3.0.0", STAGES, "aborted")
    wait_for("every agent back on v2", lambda: demo.running() == {"sensor@2.0.0": 20}, 90)
    failed = [g for g in detail["gate_results"] if g["outcome"] == "fail"]
    for g in failed:
        say(f"  gate {g['name']}: {fmt(g['value'])} against {g['op']} {fmt(g['threshold'])}"
            f" — {g['reason']}")
    say(f"devices by bundle: {demo.running()} (every touched device rolled back, "
        "from its local slot, no download)")


def explain_one(demo: Demo) -> None:
    """One prediction on one device, explained by its agent's local endpoint."""
    import urllib.request

    from edge_agent.httpapi import LocalServer
    from packager.sample_data import FEATURES, sensor_matrix

    device = demo.devices[0]
    x, _ = sensor_matrix(1, np.random.default_rng(7), {"temperature": 12.0})
    row = dict(zip(FEATURES, [round(v, 2) for v in x[0].tolist()], strict=True))
    # the demo's agents run without their local endpoint (20 in one process): this one
    # opens it for the question, as an app on the device would find it
    http = LocalServer(device.daemon.agent, lambda: {}, port=0)
    http.start()
    try:
        say(f"$ curl -d '{{\"row\": {json.dumps(row)}}}' {http.url}/explain   "
            f"(on {device.device})")
        request = urllib.request.Request(f"{http.url}/explain",
                                         json.dumps({"row": row}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    finally:
        http.stop()
    p = answer["prediction"]
    say(f"  prediction: fault={p['label']} (p={max(p['probabilities'].values()):.2f}); "
        f"{answer['score']} {answer['value']:.2f}; method {answer['method']}")
    for c in answer["contributions"]:
        say(f"  {c['feature']:<12} {c['contribution']:+.2f}  (value {c['value']}, baseline "
            f"{c['baseline']:.2f})")
