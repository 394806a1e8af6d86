"""The input-drift gate on small canary stages: sample-size aware, and measured.

A canary stage serves a few hundred rows, which the gate compares with the bundle's
reference (here 800 training rows, as the test bundles have). Each feature's statistic
drifts only past its no-drift bound at the two sides' sizes
(:func:`~fleet_server.profiles.statistics.noise_bounds`), so samples of the reference's
own distribution pass the gate at about the rate ``alpha`` promises, while a real shift at
the same size fails it. Seeded draws, many of them, with the bounds asserted: the rule
before the noise bounds failed one same-distribution stage in 50 here, which the
first test catches.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.profile import Profile, ProfileSpec, categorical_spec, numeric_spec
from fleet_server.profiles.drift import Thresholds, compare
from fleet_server.profiles.statistics import noise_bounds
from fleet_server.rollouts.metrics import input_drift_of
from packager.sample_data import FEATURES, sensor_matrix

SITES = ("north", "south", "east", "west")
SITE_P = (0.5, 0.3, 0.15, 0.05)
# the shape of the test bundles' permutation importances, and a categorical input that
# carries a third of them, so its mix alone can drift the group
IMPORTANCES = {"temperature": 0.2, "humidity": -0.001, "vibration": 0.1, "current": 0.1,
               "site": 0.2}


def _columns(rng: np.random.Generator, n: int, shift: dict[str, float] | None = None,
             scale: dict[str, float] | None = None, sites=SITE_P) -> dict[str, np.ndarray]:
    x, _ = sensor_matrix(n, rng, shift)
    columns = {name: x[:, i] for i, name in enumerate(FEATURES)}
    for name, factor in (scale or {}).items():
        mean = columns[name].mean()
        columns[name] = mean + factor * (columns[name] - mean)
    columns["site"] = rng.choice(np.array((*SITES, "new"), dtype=object), n,
                                 p=[*sites, 1 - sum(sites)] if len(sites) == 4 else sites)
    return columns


def _reference() -> Profile:
    columns = _columns(np.random.default_rng(1), 800)
    numeric = [numeric_spec(name, columns[name], 10) for name in FEATURES]
    spec = ProfileSpec((*numeric, categorical_spec("site", columns["site"])), ())
    ref = Profile(spec)
    ref.update(columns, rows=800)
    return ref


REF = _reference()


def _live(rng: np.random.Generator, n: int, **kw) -> Profile:
    p = Profile(REF.spec)
    p.update(_columns(rng, n, **kw), rows=n)
    return p


def _gate(live: Profile) -> dict:
    return input_drift_of(compare(REF, live, Thresholds(), (), IMPORTANCES))


def test_same_distribution_stages_pass_the_input_gate():
    rng = np.random.default_rng(2026)
    fired: Counter[int] = Counter()
    draws = 400
    for n in (400, 500):
        for _ in range(draws):
            out = _gate(_live(rng, n))
            assert "input_drift" in out  # judged: n is past the 360-row floor
            fired[n] += out["input_drift"]
    # five features, five statistics each at alpha = 0.001: at most 2.5 % by the union
    # bound, far less in fact; the rule before the noise bounds fired on 16 of these 800
    assert sum(fired.values()) <= 2, fired


@pytest.mark.parametrize("n", [400, 2000])
def test_each_statistic_passes_its_noise_bound_at_most_at_the_rate_alpha(n):
    # at alpha = 0.05 the rate is measurable with a few hundred draws; each bound is
    # conservative (the binned KS is below the raw one, the Wasserstein bound holds for any
    # distribution), so the rates sit at or below alpha, never above it by more than noise
    rng = np.random.default_rng(n)
    t = Thresholds(alpha=0.05)
    over: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for _ in range(200):
        for f in compare(REF, _live(rng, n), t).features:
            for key, value in (("ks", "ks"), ("wasserstein", "wasserstein_excess"),
                               ("psi", "psi"), ("js", "js")):
                bound, x = f.stats[f"{key}_noise"], f.stats[value]
                if bound is not None and x is not None:
                    total[key] += 1
                    over[key] += x >= bound
    assert set(total) == {"ks", "wasserstein", "psi", "js"}
    for key, count in total.items():
        assert over[key] / count <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / count), (key, over)


@pytest.mark.parametrize(("change", "feature"), [
    pytest.param({"shift": {"temperature": 4.0}}, "temperature", id="mean-shift-half-sigma"),
    pytest.param({"scale": {"temperature": 1.6}}, "temperature", id="scale-change"),
    pytest.param({"shift": {"vibration": 0.4, "current": 0.5}}, "vibration",
                 id="two-lesser-inputs"),
    pytest.param({"sites": (0.25, 0.25, 0.25, 0.25)}, "site", id="category-mix"),
    pytest.param({"sites": (0.45, 0.3, 0.15, 0.05)}, "site", id="new-category-5pct"),
])
def test_a_real_shift_at_the_same_size_fails_the_gate(change, feature):
    rng = np.random.default_rng(7)
    fired = 0
    for _ in range(50):
        report = compare(REF, _live(rng, 400, **change), Thresholds(), (), IMPORTANCES)
        out = input_drift_of(report)
        fired += out["input_drift"]
        assert out["input_drift"] is False or feature in report.drifted
    assert fired >= 48


def test_a_statistic_past_its_threshold_but_within_the_noise_only_warns():
    # at 400 rows a KS of 0.1 is within noise (bound ≈ 0.11 at alpha 0.001), at 100,000
    # it is not: the same effect, judged by the sample size behind it
    rng = np.random.default_rng(11)
    found = {}
    for _ in range(400):
        f = compare(REF, _live(rng, 400, shift={"temperature": 1.8})).feature("temperature")
        s = f.stats
        if s["ks"] >= 0.1 > 0 and s["ks"] < s["ks_noise"]:
            found = {"reasons": f.reasons, "verdict": f.verdict}
            break
    assert found, "no draw landed between the threshold and the noise bound"
    assert any(r.startswith("ks ") and "within the no-drift bound" in r
               for r in found["reasons"]), found


def test_below_the_row_floor_the_gate_says_not_enough_rows():
    from tests.fleet_server.test_rollout import (
        GATES,
        fleet,
        follow,
        gate,
        make_plan,
        start,
        tick,
    )
    # the fewest rows an input needs: the categorical one's 40 * (4 categories + 2 - 1)
    out = _gate(_live(np.random.default_rng(3), 150))
    assert out == {"input_rows": 150, "input_rows_needed": 200}
    plan, devices = make_plan(gates=replace(GATES, max_wait_s=100.0)), fleet()
    d = start(plan, devices)
    devices = follow(devices, d)
    metrics = {"input_drift": None, "input_drift_share": None, **out}
    waiting = tick(plan, d.state, devices, 150.0, **metrics)  # soak ends 110, deadline 210
    result = gate(waiting, "input_drift")
    assert result.outcome == "wait" and waiting.state == d.state
    assert result.reason == ("not enough rows: the canaries profiled 150, an input feature "
                             "needs 200 to be judged")
    late = tick(plan, d.state, devices, 210.0, **metrics)
    assert late.state.status == "aborted" and "not enough rows" in late.audit[0].reason


@settings(max_examples=200, deadline=None)
@given(n_base=st.integers(1, 10**7), n_live=st.integers(1, 10**7),
       alpha=st.floats(1e-9, 0.5), dof=st.integers(1, 300))
def test_noise_bounds_shrink_with_the_sample_and_grow_as_alpha_shrinks(n_base, n_live, alpha,
                                                                        dof):
    def bounds(nb: int, nl: int, a: float) -> dict:
        s2 = 1 / nb + 1 / nl
        stats = {"ks": 0.0, "wasserstein_bias": 0.0, "psi_bias": dof * s2, "js": 0.0}
        noise_bounds(stats, nb, nl, a)
        return {k: stats[k] for k in ("ks_noise", "wasserstein_noise", "psi_noise",
                                      "js_noise")}

    now = bounds(n_base, n_live, alpha)
    assert all(math.isfinite(v) and v >= 0 for v in now.values()), now
    assert now["ks_noise"] <= 1 and now["js_noise"] <= 1
    more = bounds(n_base, n_live * 4, alpha)
    stricter = bounds(n_base, n_live, alpha / 10)
    for key in now:
        assert more[key] <= now[key] + 1e-12, key
        assert stricter[key] >= now[key] - 1e-12, key
