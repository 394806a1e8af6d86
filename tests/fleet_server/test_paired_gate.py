"""The shadow's paired accuracy gate: McNemar's exact test and the gate's verdicts."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.profiles.paired import EXACT_UP_TO, mcnemar_worse
from tests.fleet_server.test_rollout import GATES, fleet, gate, make_plan, start, tick


def brute(b: int, c: int) -> float:
    m = b + c
    return sum(math.comb(m, k) for k in range(b, m + 1)) / 2 ** m if m else 1.0


@given(st.integers(0, 300), st.integers(0, 300))
def test_mcnemar_is_the_exact_binomial_tail(b, c):
    assert mcnemar_worse(b, c) == pytest.approx(brute(b, c), rel=1e-9, abs=1e-300)


def test_mcnemar_beyond_the_exact_range_is_close_to_it():
    m = EXACT_UP_TO
    for b in (m // 2, m // 2 + 150, m // 2 + 300):
        exact = mcnemar_worse(b, m - b)
        approx = mcnemar_worse(b + 1, m - b + 1)  # two more rows: the approximation
        assert approx == pytest.approx(exact, rel=0.05, abs=1e-4)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_worse(-1, 3)


def shadow_tick(**metrics):
    plan = make_plan(shadow_first=True, shadow_soak_s=100.0,
                     gates=replace(GATES, min_shadow_rows=10, min_labels=100))
    devices = fleet()
    d = start(plan, devices)
    return tick(plan, d.state, devices, 50.0, **metrics)


@pytest.mark.parametrize(("cells", "outcome", "words"), [
    pytest.param((0, 0, 0, 0), "skip", "no paired rows", id="no-outcomes-yet"),
    pytest.param((40, 10, 0, 0), "wait", "waiting for 100 paired rows", id="too-few"),
    pytest.param((180, 5, 5, 10), "pass", "within 0.02", id="as-good"),
    pytest.param((150, 2, 30, 18), "pass", "within 0.02", id="better"),
    # 6 of 10 discordant rows the live model's: 2 points lower, but chance explains it
    pytest.param((90, 6, 2, 2), "pass", "within chance", id="worse-but-noise"),
    pytest.param((150, 30, 5, 15), "fail", "rules out chance", id="worse"),
])
def test_the_shadow_accuracy_gate(cells, outcome, words):
    both, live_only, shadow_only, neither = cells
    d = shadow_tick(paired_both=both, paired_live_only=live_only,
                    paired_shadow_only=shadow_only, paired_neither=neither)
    result = gate(d, "shadow_accuracy")
    assert result.outcome == outcome and words in result.reason, result
    n = sum(cells)
    if n:
        assert result.value == pytest.approx((both + shadow_only) / n)
        assert result.threshold == pytest.approx((both + live_only) / n - 0.02)
        assert f"on {n} paired rows" in result.reason


def test_a_worse_shadow_aborts_after_the_soak_and_names_the_gate():
    plan = make_plan(shadow_first=True, shadow_soak_s=100.0,
                     gates=replace(GATES, min_shadow_rows=10, min_labels=100))
    devices = fleet()
    d = start(plan, devices)
    bad = {"paired_both": 150, "paired_live_only": 30, "paired_shadow_only": 5,
           "paired_neither": 15}
    assert tick(plan, d.state, devices, 50.0, **bad).state == d.state  # still soaking
    late = tick(plan, d.state, devices, 111.0, **bad)
    assert late.state.status == "aborted" and "shadow_accuracy" in late.audit[0].reason


def test_the_gate_is_off_with_the_accuracy_tolerance():
    plan = make_plan(shadow_first=True, shadow_soak_s=100.0,
                     gates=replace(GATES, min_shadow_rows=10, max_accuracy_drop=None))
    devices = fleet()
    d = start(plan, devices)
    result = gate(tick(plan, d.state, devices, 50.0, paired_live_only=500), "shadow_accuracy")
    assert (result.outcome, result.reason) == ("skip", "disabled")
