"""Act 7: ground truth arrives, by a device's own endpoint and centrally, and v2's
realized accuracy is shown beside its label-free estimate and its packaged accuracy.

From this act on a :class:`~demo.stage.Labeller` keeps uploading the newest labels.
"""

from __future__ import annotations

import json
import time
from typing import Any

from demo.lines import banner, performance_lines, say
from demo.stage import SITES, Demo, Labeller, SimDevice, wait_for, write_labels


def ground_truth(demo: Demo) -> None:
    """Issue 14's scene: labels come back, by a device's own endpoint and centrally."""
    banner("7. ground truth arrives: v2's realized accuracy beside its estimate")
    say("the apps keep each prediction's id; whether the machine really failed is known "
        "later, from the inspections")
    started = time.time()
    for d in demo.devices:
        d.keep.set()
    wait_for("2,000 predictions to label", lambda: sum(
        d.waiting_labels() for d in demo.devices) >= 2000, 60)
    # two devices get their labels from an app on the device itself ...
    local = [demo.devices[0], demo.devices[SITES["a"]]]
    joined = sum(_label_locally(device) for device in local)
    # ... the rest from the plant's maintenance system, uploaded to the server
    total = joined + _upload_centrally(demo, [d for d in demo.devices if d not in local])

    def report() -> dict[str, Any] | None:
        r = demo.client.get("/api/v1/performance", bundle="sensor@2.0.0", since=str(started))
        return r if r["total"]["labelled"] >= total else None

    result = wait_for("the labelled rows in the summaries", report, 120)
    say("$ fleet performance sensor@2.0.0   (GET /api/v1/performance)")
    performance_lines(result, explain=True)
    verdicts = result["verdicts"]
    say(f"  verdict: realized {verdicts['realized']['verdict']}, estimated "
        f"{verdicts['estimated']['verdict']} (an alert needs a drop of more than "
        "0.05 with the interval excluding the packaged value)")
    demo.labeller = Labeller(demo.devices, demo.url, demo.token, demo.out)
    demo.labeller.start()
    say("from here on the labels keep coming: every 2 s the newest predictions' labels are "
        "uploaded the same way")


def _label_locally(device: SimDevice) -> int:
    """The device's waiting labels through its own ``POST /outcomes``; returns the joins."""
    from edge_agent.httpapi import LocalServer

    labels = device.take_labels()
    if not labels:
        return 0
    http = LocalServer(device.daemon.agent, lambda: {}, port=0)
    http.start()
    try:
        body = {"outcomes": [{"id": pid, "label": label} for pid, label in labels]}
        counts = _post(f"{http.url}/outcomes", body)["counts"]
    finally:
        http.stop()
    say(f"$ curl -d '{{\"outcomes\": [{{\"id\": \"{labels[0][0]}\", \"label\": "
        f"{labels[0][1]}}}, …]}}' {http.url}/outcomes   (on {device.device})")
    say(f"  {', '.join(f'{k} {v}' for k, v in counts.items())}")
    return counts["joined"]


def _upload_centrally(demo: Demo, devices: list[SimDevice]) -> int:
    """``fleet outcomes upload`` of the devices' waiting labels, until every device has
    receipted its own; returns the outcomes uploaded."""
    rows = [(d.device, pid, label) for d in devices for pid, label in d.take_labels()]
    path = demo.out / "labels.csv"
    write_labels(path, rows)
    say(f"$ fleet outcomes upload {path}   (columns device,id,label)")
    done = demo.client.upload_outcomes(path, "text/csv")
    say(f"  {done['outcomes']:,} outcome(s) queued for {len(done['devices'])} device(s); "
        "each gets its own over MQTT (edgefleet/v1/<device>/outcomes, readable by it alone)")
    wait_for("every device's receipt", lambda: all(
        r["queued"] == 0 and r["sent"] == 0 for r in demo.client.get("/api/v1/outcomes")), 60)
    receipted = sum(r["receipted"] for r in demo.client.get("/api/v1/outcomes"))
    say(f"$ fleet outcomes status   → {receipted:,} receipted by their devices, none waiting")
    return done["outcomes"]


def _post(url: str, body: dict[str, Any]) -> Any:
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())
