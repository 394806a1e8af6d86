"""The gates of a rollout's window, judged: pure functions of the plan, state and numbers.

:func:`judge` classifies each touched device's install (healthy, failed, waiting), turns
the window's :class:`~fleet_server.rollouts.observations.GateMetrics` into one
:class:`~fleet_server.rollouts.values.GateResult` per gate (pass, fail, wait or skip,
with value, threshold and reason) and gives the window's verdict. The state machine
(:mod:`fleet_server.rollouts.machine`) acts on the verdict; the numbers come from
:mod:`fleet_server.rollouts.metrics`.

Nothing here reads a clock, a store or a socket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from fractions import Fraction
from typing import Any

from edgefleet.contract.messages import BundleRef
from fleet_server.profiles.paired import mcnemar_worse
from fleet_server.rollouts.observations import (
    DeviceObs,
    GateMetrics,
    GateWindow,
    Observation,
)
from fleet_server.rollouts.values import (
    ACTIVE,
    LATENCY_FLOOR_MS,
    GateResult,
    GateThresholds,
    RolloutPlan,
    RolloutState,
    TouchedDevice,
)

__all__ = ["classify", "gate_window", "judge", "phase_status", "same_bundle", "share_of",
           "window_verdict"]


def share_of(fraction: float, n: int) -> Fraction:
    # Fraction of the decimal text: ceil(0.1 * 100) must be 10, not 11 (float 10.000…02)
    return Fraction(repr(fraction)) * n


def same_bundle(a: BundleRef | None, b: BundleRef) -> bool:
    # devices report name and version; the digest decides only when both sides carry it
    return a is not None and a.name == b.name and a.version == b.version and (
        not a.sha256 or not b.sha256 or a.sha256 == b.sha256)


def phase_status(state: RolloutState) -> str:
    return (state.paused_from or "") if state.status == "paused" else state.status


def gate_window(plan: RolloutPlan, state: RolloutState,
                devices: Mapping[str, DeviceObs]) -> GateWindow | None:
    """Which devices the shell computes :class:`GateMetrics` over, and since when.

    ``None`` unless the rollout is in its shadow phase, running, or paused in one of
    them. Canaries: touched members in the phase's mode; controls: untouched members
    that run a bundle other than the rollout's.
    """
    phase = phase_status(state)
    if phase not in ACTIVE:
        return None
    mode = "shadow" if phase == "shadow" else "canary"
    ids = sorted(devices)
    canaries = tuple(d for d in ids if d in state.touched and state.touched[d].mode == mode)
    controls = tuple(d for d in ids if d not in state.touched
                     and devices[d].running is not None
                     and not same_bundle(devices[d].running, plan.bundle))
    since = state.stage_started_at if state.stage_started_at is not None else plan.created_at
    return GateWindow(mode, state.stage, since, plan.bundle, canaries, controls)


_OK = {"shadow": ("shadow_started",), "canary": ("installed",)}
_BAD = {"shadow": ("shadow_failed",), "canary": ("failed", "rolled_back")}


def classify(plan: RolloutPlan, t: TouchedDevice, o: DeviceObs, now: float) -> str:
    """pending | installed | healthy | failed | timeout, for one canary."""
    report = o.install if o.install is not None and o.install.time >= t.assigned_at else None
    runs = o.shadow if t.mode == "shadow" else o.running
    if same_bundle(runs, plan.bundle) or (report is not None and report.outcome in _OK[t.mode]):
        if t.mode == "canary" and o.healthy_predictions >= plan.gates.min_healthy_predictions:
            return "healthy"
        return "installed"
    if report is not None and report.outcome in _BAD[t.mode]:
        return "failed"
    return "timeout" if now >= t.assigned_at + plan.install_timeout_s else "pending"


def _gate(name: str, value: float | None, threshold: float | None, op: str, *,
          ready: bool = True, waiting: str = "waiting for the sample",
          missing: str = "not computed yet") -> GateResult:
    if threshold is None:
        return GateResult(name, "skip", value, None, op, "disabled")
    if value is None:
        return GateResult(name, "wait", None, threshold, op, missing)
    if not ready:
        return GateResult(name, "wait", value, threshold, op, waiting)
    ok = value <= threshold if op == "<=" else value >= threshold
    word = ("at most" if op == "<=" else "at least") if ok else \
        ("above" if op == "<=" else "below")
    return GateResult(name, "pass" if ok else "fail", value, threshold, op,
                      f"{name} {value:.6g} {word} {threshold:.6g}")


def _wait_or_pass(name: str, value: float, threshold: float, why: str) -> GateResult:
    ok = value >= threshold
    return GateResult(name, "pass" if ok else "wait", value, threshold, ">=",
                      "" if ok else why)


def _skip(name: str, op: str, why: str) -> GateResult:
    return GateResult(name, "skip", None, None, op, why)


def _rate(errors: int, served: int) -> float | None:
    return errors / (served + errors) if served + errors else None


def judge(plan: RolloutPlan, state: RolloutState,
           obs: Observation) -> tuple[list[GateResult], dict[str, Any], float]:
    """The gate results of the current window, counts for the audit, and the deadline."""
    g, now = plan.gates, obs.now
    window = gate_window(plan, state, obs.devices)
    assert window is not None  # callers judge only shadow, running and paused rollouts
    soak = plan.shadow_soak_s if window.phase == "shadow" else plan.stages[state.stage].soak_s
    soak_start = state.soak_started_at if state.soak_started_at is not None else now
    elapsed = max(0.0, now - soak_start)
    results = [_wait_or_pass("soak", elapsed, soak, f"soaking ({elapsed:.0f} of {soak:.0f} s)")]

    classes = {d: classify(plan, state.touched[d], obs.devices[d], now)
               for d in window.canaries}
    tally = {k: sum(1 for c in classes.values() if c == k)
             for k in ("pending", "installed", "healthy", "failed", "timeout")}
    n = len(window.canaries)
    failures = tally["failed"] + tally["timeout"]
    allowed = max(g.max_install_failures, math.floor(share_of(g.max_install_failure_rate, n)))
    results.append(GateResult(
        "install_failures", "pass" if failures <= allowed else "fail", failures, allowed, "<=",
        f"{failures} of {n} canaries failed to install ({tally['timeout']} timed out after "
        f"{plan.install_timeout_s:.0f} s); allowed {allowed}"))
    if n == 0:
        results.append(GateResult("canaries", "wait", 0, 1, ">=", "no canary in the group"))

    m = obs.gates if obs.gates is not None and obs.gates.window_start == window.since else None
    missing = ("gate metrics are for another window" if obs.gates is not None and m is None
               else "no gate metrics for this window yet")
    if window.phase == "shadow":
        results.extend(_shadow_gates(g, m, missing))
    else:
        healthy_of = n - failures
        share = tally["healthy"] / healthy_of if healthy_of else None
        results.append(_gate("healthy_devices", share, g.min_healthy_share, ">=",
                             missing="no canary installed yet") if share is None else
                       _wait_or_pass("healthy_devices", share, g.min_healthy_share,
                                     f"{tally['healthy']} of {healthy_of} canaries have "
                                     f"{g.min_healthy_predictions} healthy predictions"))
        results.extend(_metric_gates(g, m, missing, bool(window.controls)))
    numbers = {"canaries": n, "controls": len(window.controls),
               "offline": sum(1 for d in window.canaries if not obs.devices[d].online),
               **tally}
    return results, numbers, soak_start + soak + g.max_wait_s


def _metric_gates(g: GateThresholds, m: GateMetrics | None, missing: str,
                  controls: bool) -> list[GateResult]:
    if m is None:
        return [GateResult("sample", "wait", None, g.min_canary_predictions, ">=", missing)]
    out = [_wait_or_pass("sample", m.canary_predictions, g.min_canary_predictions,
                         "too few canary predictions")]
    out.append(_wait_or_pass("control_sample", m.control_predictions,
                             g.min_control_predictions, "too few control predictions")
               if controls else _skip("control_sample", ">=", "no control devices"))
    canary_ok = out[0].outcome == "pass"
    both_ok = canary_ok and out[1].outcome in ("pass", "skip")
    canary_rate = _rate(m.canary_errors, m.canary_predictions)
    out.append(_gate("error_rate", canary_rate, g.max_error_rate, "<=", ready=canary_ok))
    out.extend(_input_gates(g, m, canary_ok))
    if not controls:
        why = "no control devices (the stage covers the group)"
        out.extend(_skip(name, "<=", why) for name in (
            "error_rate_delta", "latency_p95_ratio", "prediction_psi", "prediction_js",
            _performance_name(m)))
        return out
    control_rate = _rate(m.control_errors, m.control_predictions)
    delta = None if canary_rate is None or control_rate is None else canary_rate - control_rate
    ratio = None if m.canary_p95_ms is None or m.control_p95_ms is None else \
        max(m.canary_p95_ms, LATENCY_FLOOR_MS) / max(m.control_p95_ms, LATENCY_FLOOR_MS)
    out.append(_gate("error_rate_delta", delta, g.max_error_rate_delta, "<=", ready=both_ok))
    out.append(_gate("latency_p95_ratio", ratio, g.max_latency_p95_ratio, "<=",
                     ready=both_ok))
    out.append(_gate("prediction_psi", m.prediction_psi, g.max_prediction_psi, "<=",
                     ready=both_ok))
    out.append(_gate("prediction_js", m.prediction_js, g.max_prediction_js, "<=",
                     ready=both_ok))
    out.append(_performance_gate(g, m, both_ok))
    return out


def _performance_name(m: GateMetrics) -> str:
    return "mae" if m.performance_metric == "mae" else "accuracy"


def _performance_gate(g: GateThresholds, m: GateMetrics, sample_ok: bool) -> GateResult:
    """Canary accuracy (or MAE) against the controls', realized or estimated (the reason
    says which). A drop (or rise) beyond the threshold fails only when the canary's 95 %
    bound on its favourable side is still worse than the controls' value."""
    name = _performance_name(m)
    threshold = g.max_mae_rise if name == "mae" else g.max_accuracy_drop
    if threshold is None:
        return _skip(name, "<=", "disabled")
    canary, control = m.canary_performance, m.control_performance
    if m.performance_source is None and canary is None and control is None:
        # neither side reports performance (agents before it, or a regressor without labels)
        return _skip(name, "<=", "no performance blocks in the window on either side")
    if canary is None or control is None or m.performance_source is None:
        side = "canaries" if canary is None else "controls"
        return GateResult(name, "wait", None, threshold, "<=",
                          f"no {name} for the {side} yet")
    source = m.performance_source
    if source == "realized":
        ready = min(m.canary_labelled, m.control_labelled) >= g.min_labels
    else:
        ready = sample_ok
    if name == "mae":
        value = canary / control - 1 if control > 0 else (0.0 if canary == 0 else math.inf)
        bound = m.canary_performance_bound if m.canary_performance_bound is not None \
            else canary
        worse = bound > control
        what = f"{source} MAE {canary:.4g} vs the controls' {control:.4g} ({value:+.1%})"
    else:
        value = control - canary
        bound = m.canary_performance_bound if m.canary_performance_bound is not None \
            else canary
        worse = bound < control
        what = (f"{source} accuracy {canary:.4g} vs the controls' {control:.4g} "
                f"({-value:+.4f})")
    if source == "realized":
        what += f" on {m.canary_labelled} and {m.control_labelled} labelled rows"
    if not ready:
        return GateResult(name, "wait", value, threshold, "<=",
                          f"{what}: waiting for {g.min_labels} labelled rows a side"
                          if source == "realized" else f"{what}: waiting for the sample")
    if value > threshold and worse:
        return GateResult(name, "fail", value, threshold, "<=",
                          f"{what}: beyond {threshold:.4g} and outside the canaries' interval")
    return GateResult(name, "pass", value, threshold, "<=",
                      f"{what}: within {threshold:.4g}" if value <= threshold else
                      f"{what}: beyond {threshold:.4g} but within the canaries' interval")


def _input_gates(g: GateThresholds, m: GateMetrics, ready: bool) -> list[GateResult]:
    # below the drift monitor's row floor no input feature can be judged: say so (the stage
    # waits, and at its deadline the reason says what it lacked)
    missing = (f"not enough rows: the canaries profiled {m.input_rows}, an input feature "
               f"needs {m.input_rows_needed} to be judged" if m.input_drift is None
               and m.input_rows_needed else "not computed yet")
    share = _gate("input_drift_share", m.input_drift_share, g.max_input_drift_share, "<=",
                  ready=ready, missing=missing)
    if not g.block_on_input_drift:
        return [share, _skip("input_drift", "<=", "disabled")]
    verdict = _gate("input_drift", None if m.input_drift is None else float(m.input_drift),
                    0.0, "<=", ready=ready, missing=missing)
    if verdict.outcome == "fail":
        verdict = replace(verdict, reason="the drift monitor finds the canaries' inputs "
                                          "drifting from the bundle's reference")
    return [share, verdict]


def _shadow_gates(g: GateThresholds, m: GateMetrics | None, missing: str) -> list[GateResult]:
    if m is None:
        return [GateResult("shadow_sample", "wait", None, g.min_shadow_rows, ">=", missing)]
    sample = _wait_or_pass("shadow_sample", m.shadow_rows, g.min_shadow_rows,
                           "too few shadow rows")
    ok = sample.outcome == "pass"
    agreement = m.shadow_agreed / m.shadow_rows if m.shadow_rows else None
    return [sample,
            _gate("shadow_agreement", agreement, g.min_shadow_agreement, ">=", ready=ok),
            _gate("shadow_error_rate", _rate(m.shadow_errors, m.shadow_rows),
                  g.max_error_rate, "<=", ready=ok),
            _shadow_accuracy(g, m)]


SHADOW_P = 0.05  # McNemar's one-sided level: a drop fails only when chance is ruled out


def _shadow_accuracy(g: GateThresholds, m: GateMetrics) -> GateResult:
    """The shadow's realized accuracy against the live model's on the same labelled rows
    (paired): it may be at most ``max_accuracy_drop`` below, and fails only when McNemar's
    exact test also rules out chance (one-sided p < :data:`SHADOW_P`), so a small table's
    noise cannot fail it. Waits for ``min_labels`` paired rows; skipped when no outcome
    came back for a shadowed row at all (labels never come for some models)."""
    name = "shadow_accuracy"
    tolerance = g.max_accuracy_drop
    if tolerance is None:
        return _skip(name, ">=", "disabled")
    n = m.paired_both + m.paired_live_only + m.paired_shadow_only + m.paired_neither
    if n == 0:
        return _skip(name, ">=", "no outcomes for the rows the shadow answered (no paired "
                                 "rows)")
    live = (m.paired_both + m.paired_live_only) / n
    shadow = (m.paired_both + m.paired_shadow_only) / n
    threshold = max(0.0, live - tolerance)
    what = (f"shadow accuracy {shadow:.4g} vs the live model's {live:.4g} on {n} paired "
            f"rows ({m.paired_shadow_only} only the shadow got right, "
            f"{m.paired_live_only} only the live model)")
    if n < g.min_labels:
        return GateResult(name, "wait", shadow, threshold, ">=",
                          f"{what}: waiting for {g.min_labels} paired rows")
    p = mcnemar_worse(m.paired_live_only, m.paired_shadow_only)
    if live - shadow > tolerance and p < SHADOW_P:
        return GateResult(name, "fail", shadow, threshold, ">=",
                          f"{what}: more than {tolerance:.4g} below, and McNemar's exact "
                          f"test rules out chance (one-sided p = {p:.2g})")
    return GateResult(name, "pass", shadow, threshold, ">=",
                      f"{what}: within {tolerance:.4g}" if live - shadow <= tolerance else
                      f"{what}: more than {tolerance:.4g} below, but within chance "
                      f"(McNemar one-sided p = {p:.2g})")


def window_verdict(results: list[GateResult], now: float, deadline: float) -> str:
    """abort | promote | wait | insufficient."""
    by = {r.name: r for r in results}
    if by["install_failures"].outcome == "fail":
        return "abort"  # counted, not sampled: no need to sit out the soak
    if by["soak"].outcome == "wait":
        return "wait"
    if any(r.outcome == "fail" for r in results):
        return "abort"
    if any(r.outcome == "wait" for r in results):
        return "insufficient" if now >= deadline else "wait"
    return "promote"
