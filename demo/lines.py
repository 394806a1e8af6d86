"""How the demo prints what the fleet says: gates, audit entries, metrics, comparisons.

Pure formatting over the API's JSON answers (and ``say``); no act, no waiting.
"""

from __future__ import annotations

import time
from typing import Any


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say(f"\n=== {text} " + "=" * max(0, 74 - len(text)))


def fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# what each gate measures, said the first time it appears
GATE_HELP = {
    "install_failures": "canaries that failed to install the bundle",
    "healthy_devices": "share of the canaries serving on the new bundle (1 = all)",
    "sample": "predictions the canaries served this stage (enough to judge?)",
    "control_sample": "predictions the control devices (still on the old bundle) served",
    "error_rate": "share of the canaries' requests that failed",
    "error_rate_delta": "canary error rate minus the controls'",
    "latency_p95_ratio": "canaries' p95 latency over the controls'",
    "prediction_psi": "PSI of the canaries' predictions against the controls'",
    "prediction_js": "Jensen-Shannon distance of the same",
    "input_drift_share": "share of input features drifting on the canaries",
    "input_drift": "the drift monitor's verdict on the canaries' inputs (0 = none)",
    "shadow_agreement": "share of rows where the shadow agreed with the live model",
    "accuracy": "the controls' accuracy minus the canaries' (realized from labels once both "
                "sides have enough, else estimated; fails only outside the canaries' interval)",
}
_explained: set[str] = set()


def _gate(g: dict[str, Any]) -> str:
    op = {"<=": "≤", ">=": "≥"}.get(g.get("op") or "", g.get("op") or "")
    bound = f" {op} {fmt(g['threshold'])}" if g.get("threshold") is not None else ""
    return f"{g['name']} {fmt(g['value'])}{bound} {'✓' if g['outcome'] == 'pass' else '✗'}"


def audit_line(entry: dict[str, Any]) -> str:
    """One decision of the audit log: when, who, what, why, and the numbers behind it:
    every gate with its value and bound, explained the first time it appears."""
    when = time.strftime("%H:%M:%S", time.localtime(entry["time"]))
    line = (f"[{when}] {entry['actor']}: {entry['action']} {entry['from_status'] or '—'} → "
            f"{entry['to_status']} (stage {entry['stage']})")
    if entry.get("reason"):
        line += f": {entry['reason']}"
    numbers = entry.get("numbers") or {}
    counts = [f"{k} {fmt(v)}" for k, v in numbers.items()  # zeros say nothing here
              if isinstance(v, int | float) and not isinstance(v, bool) and v]
    gates = [g for g in numbers.get("gates", ())
             if isinstance(g, dict) and g.get("outcome") in ("pass", "fail")
             and g.get("name") != "soak"]
    if counts:
        line += f"\n      {', '.join(counts)}"
    if gates:
        line += f"\n      gates: {', '.join(_gate(g) for g in gates)}"
    new = [g["name"] for g in gates if g["name"] not in _explained and g["name"] in GATE_HELP]
    for name in new:
        _explained.add(name)
        line += f"\n        ({name}: {GATE_HELP[name]})"
    return line


def metric(m: dict[str, Any] | None, n_what: str) -> str:
    """``0.905 [0.893, 0.917] on 2,134 labelled rows`` (the interval when there is one)."""
    if not m or m.get("value") is None:
        return "-"
    band = f" [{m['low']:.3f}, {m['high']:.3f}]" if m.get("low") is not None else ""
    n = f" on {m['n']:,} {n_what}" if m.get("n") else ""
    return f"{m['value']:.3f}{band}{n}"


def performance_lines(report: dict[str, Any], *, explain: bool) -> None:
    """A bundle's realized accuracy beside its estimate and its packaged value."""
    total, expected = report["total"], report["expected"].get("accuracy")
    notes = ("  (outcomes joined with their predictions on the devices; 95 % Wilson "
             "interval, n = labelled rows)", "  (CBPE: the mean calibrated confidence of "
             "every served row; needs no label)", "  (edgepack build, on its held-out rows)"
             ) if explain else ("", "", "")
    say(f"  realized accuracy  {metric(total['realized'].get('accuracy'), 'labelled rows')}"
        + notes[0])
    say(f"  estimated accuracy {metric(total['estimated'].get('accuracy'), 'served rows')}"
        + notes[1])
    if expected:
        say(f"  packaged accuracy  {expected['value']:.3f} [{expected['low']:.3f}, "
            f"{expected['high']:.3f}] on {expected['rows']:,} rows" + notes[2])


def comparison_lines(champion: dict[str, Any]) -> None:
    """The challenger against the champion on the newest held-out rows, as signed into
    the challenger's card."""
    c = champion["comparison"]
    acc = next(m for m in c["metrics"] if m["name"] == "accuracy")
    test = c["test"]
    say(f"  on the newest {c['rows']:,} rows (held out: the challenger never trained on "
        "them), both run through their packaged ONNX:")
    say(f"  accuracy champion "
        f"{champion['name']}@{champion['version']} {acc['champion']:.3f}, challenger "
        f"{c['challenger_name']}@{c['challenger_version']} {acc['challenger']:.3f}, delta "
        f"{acc['delta']:+.3f} [{acc['low']:+.3f}, {acc['high']:+.3f}] (paired 95 % interval)")
    say(f"  McNemar's exact test: {test['challenger_only']} rows only the challenger got "
        f"right, {test['champion_only']} only the champion; p = {test['p_value']:.2g} (the "
        "chance of a split this lopsided if both were equally good)")
    rules = ", ".join(f"{r['rule']} {'pass' if r['passed'] else 'FAIL'}" for r in c["rules"])
    say(f"  rules: {rules}; verdict {c['verdict'].upper()} (signed into the challenger's card)")

