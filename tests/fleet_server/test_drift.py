"""Drift statistics against independent computations on the raw rows, and the verdict rules.

The oracles here work from the raw numpy data (histograms, scipy), never from the
profile's summaries, so they check both the summaries and the statistics drawn from them.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pytest
from scipy import integrate
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.profile import (
    CONFIDENCE_EDGES,
    CategoricalSpec,
    NumericSpec,
    Profile,
    ProfileSpec,
    categorical_spec,
    numeric_spec,
)
from edgefleet.contract.wire import canonical_json
from fleet_server.profiles.drift import (
    STAT_KEYS,
    DriftReport,
    FeatureDrift,
    Thresholds,
    compare,
    persistent_verdict,
    suspect_sensors,
)

N_BASE, N_LIVE = 5000, 3000


def profile(spec: ProfileSpec, columns: dict[str, Any], outputs: dict[str, Any] | None = None,
            ) -> Profile:
    p = Profile(spec)
    p.update(columns, outputs)
    return p


def draw(dist: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if dist == "normal":
        return rng.normal(0.0, 1.0, n)
    if dist == "uniform":
        return rng.uniform(0.0, 1.0, n)
    if dist == "lognormal":
        return rng.lognormal(0.0, 1.0, n)
    if dist == "bimodal":
        left = rng.random(n) < 0.5
        return np.where(left, rng.normal(-2.0, 0.6, n), rng.normal(2.0, 1.0, n))
    raise AssertionError(dist)


def one_numeric(ref: np.ndarray, live: np.ndarray, bins: int = 10, **kw: Any) -> FeatureDrift:
    spec = ProfileSpec((numeric_spec("x", ref, bins),))
    return compare(profile(spec, {"x": ref}), profile(spec, {"x": live}), **kw).features[0]


def slot_counts(edges: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    """Below, the bins (last one closed, as np.histogram), above: from the raw values."""
    x = x[np.isfinite(x)]
    inside = x[(x >= edges[0]) & (x <= edges[-1])]
    return np.concatenate(([np.sum(x < edges[0])], np.histogram(inside, bins=edges)[0],
                           [np.sum(x > edges[-1])])).astype(float)


def textbook_psi(base: np.ndarray, live: np.ndarray) -> float:
    keep = (base + live) > 0
    q = (base[keep] + 0.5) / (base[keep] + 0.5).sum()
    p = (live[keep] + 0.5) / (live[keep] + 0.5).sum()
    return float(np.sum((p - q) * np.log(p / q)))


# --------------------------------------------------------------------------- PSI


def test_numeric_psi_equals_the_textbook_computation_on_the_raw_rows():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=4000)
    # shifted, with values beyond both ends of the reference and a few missing
    live = np.concatenate([rng.normal(0.7, 1.3, 1500), [np.nan] * 20, [-9.0, 9.0, 9.5]])
    spec = numeric_spec("x", ref, 8)
    f = one_numeric(ref, live, bins=8)
    cb, cl = slot_counts(spec.edges, ref), slot_counts(spec.edges, live)
    assert cb[0] == cb[-1] == 0 and cl[0] >= 1 and cl[-1] >= 2  # the outer slots take part
    assert f.stats["psi_raw"] == pytest.approx(textbook_psi(cb, cl), rel=1e-12)
    k = int(((cb + cl) > 0).sum())
    bias = (k - 1) * (1 / cl.sum() + 1 / cb.sum())
    assert f.stats["psi_bias"] == pytest.approx(bias, rel=1e-12)
    assert f.stats["psi"] == pytest.approx(f.stats["psi_raw"] - bias, rel=1e-12)
    assert f.base_hist == pytest.approx(tuple(cb / cb.sum()))
    assert f.live_hist == pytest.approx(tuple(cl / cl.sum()))
    assert (f.n_base, f.n_live) == (4000, 1503)


def test_categorical_psi_and_js_equal_the_textbook_and_scipy():
    rng = np.random.default_rng(2)
    cats = np.array(list("abcdefgh"), dtype=object)
    ref = rng.choice(cats, 3000, p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.04, 0.01])
    spec = categorical_spec("c", ref, max_vocab=5)  # "f", "g", "h" go to the tail (other)
    live = np.concatenate([rng.choice(cats[:3], 900), ["zz"] * 30, [None] * 10]).astype(object)
    base_p = Profile(ProfileSpec((spec,)))
    base_p.update({"c": ref})
    live_p = Profile(ProfileSpec((spec,)))
    live_p.update({"c": live})
    f = compare(base_p, live_p).features[0]

    def counts(values: np.ndarray) -> np.ndarray:
        present = [str(v) for v in values if v is not None]
        return np.array([*(sum(v == c for v in present) for c in spec.vocabulary),
                         sum(v in spec.tail for v in present),
                         sum(v not in spec.vocabulary and v not in spec.tail for v in present)],
                        dtype=float)

    cb, cl = counts(ref), counts(live)
    assert cl[-1] == 30 and cb[-1] == 0 and cl[-2] == 0 and cb[-2] > 0
    assert f.stats["psi_raw"] == pytest.approx(textbook_psi(cb, cl), rel=1e-12)
    assert f.stats["js"] == pytest.approx(jensenshannon(cb, cl, base=2), rel=1e-12)
    assert f.stats["unseen_rate"] == pytest.approx(30 / 930)
    assert f.stats["missing_rate"] == pytest.approx(10 / 940)
    assert f.labels == (*spec.vocabulary, "(other)", "(unseen)")
    assert f.stats["ks"] is None and f.stats["wasserstein"] is None


@pytest.mark.parametrize("live_probs", [
    pytest.param([0.5, 0.5, 0.0], id="one-slot-empty"),
    pytest.param([0.0, 0.0, 1.0], id="disjoint"),
    pytest.param([0.34, 0.33, 0.33], id="near-base"),
])
def test_js_distance_matches_scipy_including_empty_slots(live_probs):
    spec = CategoricalSpec("c", ("a", "b"), ("t",))
    base = profile(ProfileSpec((spec,)), {"c": np.array(["a"] * 600 + ["b"] * 400, object)})
    n = 1000
    counts = [round(p * n) for p in live_probs]
    values = np.array(["a"] * counts[0] + ["b"] * counts[1] + ["t"] * counts[2], object)
    f = compare(base, profile(ProfileSpec((spec,)), {"c": values})).features[0]
    expected = jensenshannon([600, 400, 0, 0], [*counts, 0], base=2)
    assert f.stats["js"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert 0.0 <= f.stats["js"] <= 1.0


# --------------------------------------------------------------------------- KS, W vs scipy

SHIFTS = [(0.0, 1.0), (0.1, 1.0), (0.5, 1.0), (1.0, 1.0), (2.0, 1.0), (0.0, 0.5), (0.0, 2.0)]
# Largest |W - scipy| allowed (in reference stds). 0.01 holds with room to spare except in
# two places (measured over 40 seeds at n_base=5000, n_live=3000, 10 bins):
# - lognormal: the last reference bin runs from q90 to the sample max (3.5 .. 40-100), and
#   the two samples' sparse tails cross each other inside it where no summary can see
#   (p90 0.0067, max 0.0136); with n_base=20000, n_live=5000 the max is 0.0091;
# - bimodal x0.5: the live mass moves into the reference's wide bin over the gap between
#   the modes and is bimodal inside it; a per-bin count and mean cannot show where the
#   CDFs cross there (p90 0.020, max 0.032; 0.023 at the larger sizes).
W_TOLERANCE = {("lognormal", None): 0.015, ("bimodal", (0.0, 0.5)): 0.035}


def w_tolerance(dist: str, change: tuple[float, float], n_base: int) -> float:
    if n_base > N_BASE and dist == "lognormal":
        return 0.01
    return W_TOLERANCE.get((dist, change), W_TOLERANCE.get((dist, None), 0.01))


def check_against_scipy(dist: str, change: tuple[float, float], n_base: int, n_live: int,
                        ) -> None:
    shift, scale = change
    for seed in range(3):
        rng = np.random.default_rng([seed, len(dist), int(shift * 10), int(scale * 10)])
        ref = draw(dist, rng, n_base)
        sd, mu = ref.std(), ref.mean()
        live = mu + (draw(dist, rng, n_live) - mu) * scale + shift * sd
        f = one_numeric(ref, live)
        d = sps.ks_2samp(ref, live, method="asymp").statistic
        # exact bounds: the grid maximum cannot exceed D, D cannot exceed the grid plus
        # the mass the two sides share in one slot (<= 1/B + 1/n for equal-mass bins)
        assert f.stats["ks"] <= d + 1e-12
        assert d <= f.stats["ks_upper"] + 1e-12
        assert d - f.stats["ks"] <= 1 / 10 + 1e-3
        w = sps.wasserstein_distance(ref, live) / sd
        assert f.stats["wasserstein_lower"] <= w + 1e-9  # exact lower bound
        assert f.stats["wasserstein"] == pytest.approx(
            w, abs=w_tolerance(dist, change, n_base)), seed


@pytest.mark.parametrize("change", SHIFTS, ids=[f"shift{s}-scale{k}" for s, k in SHIFTS])
@pytest.mark.parametrize("dist", ["normal", "uniform", "lognormal", "bimodal"])
def test_ks_and_wasserstein_from_summaries_match_scipy_on_raw_rows(dist, change):
    check_against_scipy(dist, change, N_BASE, N_LIVE)


@pytest.mark.parametrize("change", SHIFTS, ids=[f"shift{s}-scale{k}" for s, k in SHIFTS])
def test_lognormal_wasserstein_within_a_hundredth_with_larger_samples(change):
    check_against_scipy("lognormal", change, 20000, 5000)


@pytest.mark.parametrize("scale", [0.5, 2.0])
@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_within_slot_model_recovers_where_the_cdfs_cross(dist, scale):
    # a scale change makes the CDFs cross inside a slot, where the exact per-slot lower
    # bound misses the part of opposite sign; the within-slot model restores it
    model, lower = [], []
    for seed in range(5):
        rng = np.random.default_rng([seed, 99])
        ref = draw(dist, rng, N_BASE)
        live = ref.mean() + (draw(dist, rng, N_LIVE) - ref.mean()) * scale
        f = one_numeric(ref, live)
        w = sps.wasserstein_distance(ref, live) / ref.std()
        model.append(abs(f.stats["wasserstein"] - w))
        lower.append(w - f.stats["wasserstein_lower"])
    assert max(model) <= 0.001
    assert sum(model) < 0.5 * sum(lower)


def test_wasserstein_is_exact_for_a_shift_without_overlap():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=2000)
    live = rng.normal(size=1000) + 10.0  # every live value above the reference's max
    f = one_numeric(ref, live)
    w = sps.wasserstein_distance(ref, live) / ref.std()
    assert f.stats["wasserstein"] == pytest.approx(w, rel=1e-9)
    assert f.stats["wasserstein_lower"] == pytest.approx(w, rel=1e-9)
    assert f.stats["out_of_range_rate"] == 1.0 and f.stats["ks"] == 1.0


# --------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("dist", ["normal", "uniform", "lognormal", "bimodal"])
def test_no_false_alarm_on_fresh_samples_of_the_reference_distribution(dist):
    rng = np.random.default_rng(10)
    ref = draw(dist, rng, N_BASE)
    spec = ProfileSpec((numeric_spec("x", ref),))
    base = profile(spec, {"x": ref})
    verdicts = [compare(base, profile(spec, {"x": draw(dist, rng, n)})).features[0].verdict
                for n in (1000, 2000, 5000) for _ in range(8)]
    assert verdicts.count("drift") == 0 and verdicts.count("warn") == 0
    # at the minimum sample (360 rows for 10 bins) a false alarm is possible but rare
    small = [compare(base, profile(spec, {"x": draw(dist, rng, 360)})).features[0].verdict
             for _ in range(40)]
    assert small.count("drift") <= 2, small


@pytest.mark.parametrize(("dist", "shift", "scale"), [
    ("normal", 0.5, 1.0), ("uniform", 0.5, 1.0), ("lognormal", 0.5, 1.0), ("bimodal", 0.5, 1.0),
    ("normal", 0.0, 2.0), ("normal", 0.0, 0.5), ("lognormal", 0.2, 1.0),
])
def test_drift_on_shifted_or_scaled_samples(dist, shift, scale):
    rng = np.random.default_rng(11)
    ref = draw(dist, rng, N_BASE)
    live = ref.mean() + (draw(dist, rng, 1000) - ref.mean()) * scale + shift * ref.std()
    f = one_numeric(ref, live)
    assert f.verdict == "drift"
    assert f.reasons and all("≥" in r for r in f.reasons)


def test_reasons_name_the_statistic_and_the_threshold():
    rng = np.random.default_rng(12)
    ref = rng.normal(size=N_BASE)
    f = one_numeric(ref, rng.normal(1.0, 1.0, 2000))
    kinds = {r.split()[0] for r in f.reasons}
    assert {"psi", "ks", "wasserstein"} <= kinds
    psi = next(r for r in f.reasons if r.startswith("psi"))
    assert psi == f"psi {f.stats['psi']:.3g} ≥ 0.25"
    ks = next(r for r in f.reasons if r.startswith("ks"))
    assert ks == f"ks {f.stats['ks']:.3g} ≥ 0.1"


def test_psi_warn_level_between_warn_and_drift():
    rng = np.random.default_rng(13)
    ref = rng.normal(size=20000)
    thresholds = Thresholds(ks_drift=1.0, wasserstein_drift=10.0)  # PSI alone decides
    f = one_numeric(ref, rng.normal(0.45, 1.0, 20000), thresholds=thresholds)
    assert 0.1 <= f.stats["psi"] < 0.25, f.stats["psi"]
    assert f.verdict == "warn" and f.reasons[0].endswith("(warn)")


def test_insufficient_below_min_rows_and_judged_from_it():
    rng = np.random.default_rng(14)
    ref = rng.normal(size=N_BASE)
    shifted = rng.normal(2.0, 1.0, 400)
    assert one_numeric(ref, shifted[:359]).verdict == "insufficient"  # 40 * (10 - 1) = 360
    assert one_numeric(ref, shifted[:360]).verdict == "drift"
    f = one_numeric(ref, shifted[:359])
    assert f.min_rows == 360 and f.reasons == ("live has 359 rows, 360 needed",)
    assert f.stats["psi"] is not None  # still computed for the dashboard, not judged
    custom = one_numeric(ref, shifted[:50], thresholds=Thresholds(min_rows=50))
    assert custom.verdict == "drift" and custom.min_rows == 50
    # a small base is no basis either (live against live, as in a rollout gate)
    assert one_numeric(ref[:100], shifted).verdict == "insufficient"


def test_corrected_psi_is_near_zero_without_drift_where_the_raw_psi_is_inflated():
    rng = np.random.default_rng(15)
    ref = rng.normal(size=N_BASE)
    spec = ProfileSpec((numeric_spec("x", ref, 20),))
    base = profile(spec, {"x": ref})
    raw, corrected, bias = [], [], []
    for _ in range(60):
        f = compare(base, profile(spec, {"x": rng.normal(size=800)})).features[0]
        raw.append(f.stats["psi_raw"])
        corrected.append(f.stats["psi"])
        bias.append(f.stats["psi_bias"])
    # E[PSI] = (k-1)(1/n_live + 1/n_base) = 19 * (1/800 + 1/5000) = 0.0276
    assert np.mean(bias) == pytest.approx(19 * (1 / 800 + 1 / 5000), rel=0.1)
    assert np.mean(raw) == pytest.approx(np.mean(bias), rel=0.25)
    assert np.mean(corrected) < 0.25 * np.mean(raw)
    assert max(corrected) < 0.05


def test_wasserstein_rule_judges_the_distance_beyond_its_no_drift_level():
    rng = np.random.default_rng(16)
    ref = rng.normal(size=N_BASE)
    f = one_numeric(ref, rng.normal(size=400))
    spread = integrate.quad(lambda x: math.sqrt(sps.norm.cdf(x) * sps.norm.sf(x)), -9, 9)[0]
    e0 = math.sqrt(2 / math.pi) * math.sqrt(1 / 400 + 1 / N_BASE) * spread
    assert f.stats["wasserstein_bias"] == pytest.approx(e0, rel=0.05)
    assert f.stats["wasserstein_excess"] == pytest.approx(
        max(f.stats["wasserstein"] - f.stats["wasserstein_bias"], 0.0))


# --------------------------------------------------------------------------- rates


def test_missing_rate_increase_is_drift_with_the_reason():
    rng = np.random.default_rng(20)
    ref = np.concatenate([rng.normal(size=N_BASE), [np.nan] * 50])  # 1 % missing
    values = rng.normal(size=1000)
    ok = one_numeric(ref, np.concatenate([values, [np.nan] * 40]))  # 3.8 %
    assert ok.verdict == "ok"
    live = np.concatenate([values, [np.nan] * 100])  # 9.1 %
    f = one_numeric(ref, live)
    assert f.stats["missing_rate"] == pytest.approx(100 / 1100)
    assert f.stats["missing_rate_base"] == pytest.approx(50 / 5050)
    assert f.verdict == "drift"
    assert f.reasons == (f"missing rate {100 / 1100:.3g} vs {50 / 5050:.3g} "
                         f"(+{100 / 1100 - 50 / 5050:.3g} ≥ 0.05)",)


def test_a_feature_gone_all_missing_drifts_instead_of_being_insufficient():
    rng = np.random.default_rng(21)
    f = one_numeric(rng.normal(size=N_BASE), np.full(500, np.nan))
    assert f.n_live == 0 and f.verdict == "drift"
    assert f.reasons[0].startswith("missing rate 1 vs 0")
    assert f.stats["psi"] is None and f.live_hist == (0.0,) * 12


def test_out_of_range_rate():
    rng = np.random.default_rng(22)
    ref = rng.uniform(0, 1, N_BASE)
    inside = rng.uniform(0.05, 0.95, 1000)
    f = one_numeric(ref, np.concatenate([inside[:940], [-1.0] * 20, [2.0] * 40]),
                    thresholds=Thresholds(psi_drift=100.0, psi_warn=100.0, ks_drift=1.0,
                                          wasserstein_drift=100.0))
    assert f.stats["out_of_range_rate"] == pytest.approx(0.06)
    assert f.stats["out_of_range_rate_base"] == 0.0
    assert f.verdict == "drift" and f.reasons[0].startswith("out-of-range rate 0.06 vs 0")
    assert f.labels[0] == f"< {ref.min():.6g}" and f.labels[-1] == f"> {ref.max():.6g}"
    assert f.labels[-2].endswith("]") and f.labels[1].endswith(")")


def test_unseen_category_share_of_one_percent_is_drift():
    spec = CategoricalSpec("c", ("a", "b"), ())
    base = profile(ProfileSpec((spec,)), {"c": np.array(["a", "b"] * 1000, object)})

    def live(unseen: int) -> FeatureDrift:
        values = np.array(["a", "b"] * ((1000 - unseen) // 2) + ["new"] * unseen, object)
        return compare(base, profile(ProfileSpec((spec,)), {"c": values})).features[0]

    assert live(4).verdict == "ok"  # 0.4 %
    f = live(12)  # 1.2 %
    assert f.verdict == "drift" and f.reasons == ("unseen rate 0.012 vs 0 (+0.012 ≥ 0.01)",)


# --------------------------------------------------------------------------- outputs


def classifier_spec() -> ProfileSpec:
    return ProfileSpec((NumericSpec("x", (0.0, 0.5, 1.0)),),
                       (CategoricalSpec("class", ("no", "yes"), ()),
                        NumericSpec("confidence", CONFIDENCE_EDGES)))


def test_outputs_are_judged_the_same_way_and_reported_after_the_inputs():
    rng = np.random.default_rng(30)
    spec = classifier_spec()
    n = 4000

    def window(p_yes: float, conf_mean: float, rows: int) -> Profile:
        cls = np.where(rng.random(rows) < p_yes, "yes", "no").astype(object)
        conf = np.clip(rng.normal(conf_mean, 0.05, rows), 0.5, 1.0)
        return profile(spec, {"x": rng.uniform(0, 1, rows)}, {"class": cls, "confidence": conf})

    base = window(0.3, 0.9, n)
    same = compare(base, window(0.3, 0.9, 2000))
    assert [(f.role, f.name) for f in same.features] == [
        ("input", "x"), ("output", "class"), ("output", "confidence")]
    assert [f.verdict for f in same.features] == ["ok", "ok", "ok"]
    moved = compare(base, window(0.6, 0.75, 2000))
    assert moved.feature("class", "output").verdict == "drift"
    assert moved.feature("confidence", "output").verdict == "drift"
    assert moved.feature("confidence", "output").labels[-1] == "> 1"
    # the predictions drifting drift the report (issue 14: the group rule), no input moved
    assert moved.verdict == "drift" and moved.share_drifted == 0.0
    assert moved.rules == ("predictions",)
    assert moved.reasons == ("the predictions drift: class, confidence",)
    marked = compare(base, window(0.6, 0.75, 2000), important=["class"])
    assert marked.rules == ("important", "predictions")
    with pytest.raises(KeyError):
        moved.feature("class")  # an output, not an input


def test_live_against_live_as_a_rollout_gate():
    rng = np.random.default_rng(31)
    spec = ProfileSpec((), (CategoricalSpec("class", ("a", "b", "c"), ()),))

    def window(probs: list[float], rows: int = 500) -> Profile:
        return profile(spec, {}, {"class": rng.choice(np.array(list("abc"), object), rows,
                                                       p=probs)})

    control = window([0.5, 0.3, 0.2])
    assert compare(control, window([0.5, 0.3, 0.2])).features[0].verdict == "ok"
    canary = compare(control, window([0.3, 0.3, 0.4]))
    assert canary.features[0].verdict == "drift"
    # both sides are small: the PSI bias counts both sample sizes
    assert canary.features[0].stats["psi_bias"] == pytest.approx(2 * (1 / 500 + 1 / 500))


# --------------------------------------------------------------------------- report verdict


def four_feature_case(shifted: tuple[str, ...], live_rows: int = 1000, **kw: Any) -> DriftReport:
    rng = np.random.default_rng(40)
    names = ("a", "b", "c", "d")
    ref = {k: rng.normal(size=N_BASE) for k in names}
    spec = ProfileSpec(tuple(numeric_spec(k, v) for k, v in ref.items()))
    live = {k: rng.normal(2.0 if k in shifted else 0.0, 1.0, live_rows) for k in names}
    return compare(profile(spec, ref), profile(spec, live), **kw)


@pytest.mark.parametrize(("shifted", "kw", "verdict", "share"), [
    pytest.param((), {}, "ok", 0.0, id="none"),
    pytest.param(("a",), {}, "warn", 0.25, id="one-of-four-warns"),
    pytest.param(("a", "b"), {}, "drift", 0.5, id="half-drifts"),
    pytest.param(("a", "b"), {"thresholds": Thresholds(group_share=0.75)}, "warn", 0.5,
                 id="below-a-higher-share"),
    pytest.param(("a", "b"), {"thresholds": Thresholds(group_min=3)}, "warn", 0.5,
                 id="below-a-higher-count"),
    pytest.param(("c",), {"important": ("c",)}, "drift", 0.25, id="important-feature"),
    pytest.param(("c",), {"important": ("a",)}, "warn", 0.25, id="important-but-not-drifting"),
])
def test_report_verdict_rules(shifted, kw, verdict, share):
    report = four_feature_case(shifted, **kw)
    assert report.verdict == verdict
    assert report.share_drifted == share
    assert report.drifted == shifted
    if verdict == "drift":
        assert report.reasons
    assert (report.rows_base, report.rows_live) == (N_BASE, 1000)


IMPORTANCES = {"a": 0.5, "b": 0.2, "c": 0.2, "d": 0.1}


@pytest.mark.parametrize(("shifted", "importances", "verdict", "rules", "carried"), [
    pytest.param(("a",), IMPORTANCES, "drift", ("importance",), 0.5, id="one-heavy-input"),
    pytest.param(("d",), IMPORTANCES, "warn", (), 0.1, id="one-light-input-warns"),
    pytest.param(("c", "d"), IMPORTANCES, "drift", ("importance",), 0.3,
                 id="two-light-inputs-reach-30-percent"),
    # negative importances are noise (permuting helped): left out of the total
    pytest.param(("b",), {"a": 0.3, "b": 0.3, "c": -0.2, "d": 0.0}, "drift", ("importance",),
                 0.5, id="negative-importances-ignored"),
    # nothing positive to weigh with: the count rule, max(2, 15 % of 4) = 2 inputs
    pytest.param(("a",), {"a": -0.1}, "warn", (), None, id="no-positive-falls-back-to-count"),
    pytest.param(("a", "b"), None, "drift", ("count",), None, id="count-two-of-four"),
    pytest.param((), IMPORTANCES, "ok", (), 0.0, id="nothing-drifts"),
])
def test_the_group_rule_weighs_inputs_by_importance(shifted, importances, verdict, rules,
                                                    carried):
    report = four_feature_case(shifted, importances=importances)
    assert (report.verdict, report.rules) == (verdict, rules)
    assert report.rule == ("count" if carried is None else "importance")
    if carried is None:
        assert report.importance_share is None
    else:
        assert report.importance_share == pytest.approx(carried)
    if "importance" in rules:  # the reason names the features and what they carry
        assert report.reasons[0].startswith(f"drifting inputs carry {carried:.0%}")
        for name in shifted:
            assert f"{name} " in report.reasons[0]
    again = DriftReport.from_dict(report.to_dict())
    assert (again.rule, again.importance_share, again.rules) == (
        report.rule, report.importance_share, report.rules)


@pytest.mark.parametrize(("n", "needed"), [(1, 1), (2, 2), (4, 2), (13, 2), (14, 3),
                                           (22, 4), (100, 15)])
def test_the_count_rule_without_importances(n, needed):
    assert Thresholds().drifted_needed(n) == needed


def test_the_share_of_importance_is_a_setting():
    strict = four_feature_case(("a",), importances=IMPORTANCES,
                               thresholds=Thresholds(importance_share=0.6))
    assert strict.verdict == "warn" and strict.importance_share == pytest.approx(0.5)
    assert "carry 50% of the model's importance (< 60%)" in strict.reasons[-1]


def test_a_new_category_in_3_percent_of_rows_drifts_the_group_alone():
    rng = np.random.default_rng(42)
    values = np.array(["north", "south", "east"], dtype=object)
    spec = ProfileSpec((categorical_spec("site", values[rng.integers(0, 3, N_BASE)]),))
    base = values[rng.integers(0, 3, N_BASE)]
    live = values[rng.integers(0, 3, N_LIVE)]
    live[rng.random(N_LIVE) < 0.03] = "west"  # never seen in training
    report = compare(profile(spec, {"site": base}), profile(spec, {"site": live}),
                     importances={"site": 0.01})
    f = report.feature("site")
    assert f.verdict == "drift" and 0.02 < f.stats["unseen_rate"] < 0.04
    assert any(r.startswith("unseen rate") for r in f.reasons)
    assert "unseen" in report.rules and report.verdict == "drift"
    # the same window without the new value is fine
    live[live == "west"] = "east"
    assert compare(profile(spec, {"site": base}), profile(spec, {"site": live})).verdict == "ok"


def test_a_reason_lists_at_most_a_few_features():
    rng = np.random.default_rng(43)
    names = [f"feature_with_a_long_name_{i:02d}" for i in range(40)]
    ref = {k: rng.normal(size=2000) for k in names}
    spec = ProfileSpec(tuple(numeric_spec(k, v) for k, v in ref.items()))
    live = {k: rng.normal(2.0, 1.0, 1000) for k in names}
    for weights in ({k: 1.0 for k in names}, None):
        report = compare(profile(spec, ref), profile(spec, live), importances=weights)
        assert report.verdict == "drift" and "and 32 more" in report.reasons[0]
        DriftReport.from_dict(report.to_dict())  # every reason within the wire bound


def test_report_share_counts_only_features_with_enough_data():
    rng = np.random.default_rng(41)
    ref = {k: rng.normal(size=N_BASE) for k in "ab"}
    spec = ProfileSpec(tuple(numeric_spec(k, v) for k, v in ref.items()))
    live = {"a": rng.normal(2.0, 1.0, 1000),
            "b": np.concatenate([rng.normal(size=100), np.full(900, np.nan)])}
    # b: rows enough, present values too few; as often missing as in the reference
    ref["b"] = np.concatenate([ref["b"][:500], np.full(4500, np.nan)])
    report = compare(profile(spec, ref), profile(spec, live))
    assert report.feature("b").verdict == "insufficient"
    assert report.share_drifted == 1.0 and report.verdict == "drift"


def test_report_insufficient_when_no_feature_has_enough_data():
    report = four_feature_case(("a",), live_rows=100)
    assert report.verdict == "insufficient" and report.share_drifted == 0.0
    assert {f.verdict for f in report.features} == {"insufficient"}


def test_compare_refuses_other_references_and_unknown_important_features():
    rng = np.random.default_rng(42)
    a = ProfileSpec((numeric_spec("x", rng.normal(size=100)),))
    b = ProfileSpec((numeric_spec("x", rng.normal(size=100)),))
    with pytest.raises(ReferenceMismatchError):
        compare(Profile(a), Profile(b))
    with pytest.raises(SchemaError) as err:
        compare(Profile(a), Profile(a), important=["nope"])
    assert err.value.field == "important" and "'nope'" in str(err.value)


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize(("windows", "thresholds", "expected"), [
    pytest.param([], Thresholds(), "insufficient", id="no-window"),
    pytest.param(["ok"], Thresholds(), "ok", id="one-ok"),
    pytest.param(["drift"], Thresholds(), "warn", id="one-drift-unconfirmed"),
    pytest.param(["drift", "drift"], Thresholds(), "drift", id="two-in-a-row"),
    pytest.param(["drift", "ok", "drift"], Thresholds(), "drift", id="two-of-three"),
    pytest.param(["drift", "ok", "ok"], Thresholds(), "ok", id="old-drift-then-ok"),
    pytest.param(["drift", "ok", "ok", "drift"], Thresholds(), "warn", id="out-of-the-window"),
    pytest.param(["ok", "drift", "insufficient"], Thresholds(), "insufficient",
                 id="latest-insufficient"),
    pytest.param(["drift", "drift", "warn"], Thresholds(), "drift", id="confirmed-then-warn"),
    pytest.param(["ok", "drift"], Thresholds(persistence=1, persistence_of=1), "drift",
                 id="immediate"),
    pytest.param(["drift", "drift", "ok"], Thresholds(persistence=3, persistence_of=4), "ok",
                 id="three-of-four-needed"),
])
def test_persistent_verdict(windows, thresholds, expected):
    assert persistent_verdict(windows, thresholds) == expected


def test_persistent_verdict_takes_reports_and_refuses_unknown_verdicts():
    drift = four_feature_case(("a", "b"))
    ok = four_feature_case(())
    assert persistent_verdict([drift, ok, drift]) == "drift"
    assert persistent_verdict([ok, "drift"]) == "warn"
    with pytest.raises(SchemaError) as err:
        persistent_verdict(["ok", "DRIFT"])
    assert err.value.field == "window_verdicts[1]"


# --------------------------------------------------------------------------- suspect sensors


def test_a_device_drifting_alone_is_a_suspect_sensor():
    rng = np.random.default_rng(50)
    ref = {"t": rng.normal(size=N_BASE), "h": rng.normal(size=N_BASE)}
    spec = ProfileSpec(tuple(numeric_spec(k, v) for k, v in ref.items()))
    base = profile(spec, ref)
    devices = {
        "dev-a": profile(spec, {"t": rng.normal(3.0, 1.0, 800), "h": rng.normal(size=800)}),
        "dev-b": profile(spec, {"t": rng.normal(size=20000), "h": rng.normal(size=20000)}),
        "dev-c": profile(spec, {"t": rng.normal(size=20000), "h": rng.normal(size=20000)}),
        "dev-d": profile(spec, {"t": rng.normal(3.0, 1.0, 100), "h": rng.normal(size=100)}),
    }
    group = compare(base, Profile.merged(spec, devices.values()))
    assert group.feature("t").verdict != "drift"
    reports = {k: compare(base, v) for k, v in devices.items()}
    # dev-d drifts as much but has too few rows to judge
    assert suspect_sensors(group, reports) == {"dev-a": ("t",)}
    # when the whole group drifts on t, a device drifting on t is no suspect
    assert suspect_sensors(reports["dev-a"], {"dev-a": reports["dev-a"]}) == {}
    other = ProfileSpec((numeric_spec("t", rng.normal(size=50)),))
    with pytest.raises(ReferenceMismatchError):
        suspect_sensors(group, {"x": compare(Profile(other), Profile(other))})


# --------------------------------------------------------------------------- thresholds


def test_thresholds_round_trip_and_partial_documents_keep_defaults():
    t = Thresholds(psi_warn=0.2, min_rows=100, persistence=3, persistence_of=5)
    assert Thresholds.from_dict(t.to_dict()) == t
    assert Thresholds.from_dict({}) == Thresholds()
    assert Thresholds.from_dict({"min_rows": None, "ks_drift": 1}) == Thresholds(ks_drift=1.0)
    assert canonical_json(Thresholds().to_dict())


@pytest.mark.parametrize(("doc", "field"), [
    pytest.param({"psi_limit": 0.3}, "thresholds.psi_limit", id="unknown-field"),
    pytest.param({"psi_drift": "0.25"}, "thresholds.psi_drift", id="string"),
    pytest.param({"psi_drift": True}, "thresholds.psi_drift", id="bool"),
    pytest.param({"psi_drift": float("nan")}, "thresholds.psi_drift", id="nan"),
    pytest.param({"psi_drift": -0.1}, "thresholds.psi_drift", id="negative"),
    pytest.param({"ks_drift": 0}, "thresholds.ks_drift", id="zero"),
    pytest.param({"js_drift": 1.5}, "thresholds.js_drift", id="js-above-one"),
    pytest.param({"group_share": 2}, "thresholds.group_share", id="share-above-one"),
    pytest.param({"psi_warn": 0.3}, "thresholds.psi_warn", id="warn-above-drift"),
    pytest.param({"alpha": 0}, "thresholds.alpha", id="alpha-zero"),
    pytest.param({"alpha": 0.6}, "thresholds.alpha", id="alpha-above-half"),
    pytest.param({"min_rows": 0}, "thresholds.min_rows", id="min-rows-zero"),
    pytest.param({"min_rows": 1.5}, "thresholds.min_rows", id="min-rows-float"),
    pytest.param({"persistence": True}, "thresholds.persistence", id="persistence-bool"),
    pytest.param({"persistence": 4}, "thresholds.persistence_of", id="more-than-of"),
    pytest.param([], "thresholds", id="not-an-object"),
])
def test_thresholds_from_dict_refuses_bad_documents(doc, field):
    with pytest.raises(SchemaError) as err:
        Thresholds.from_dict(doc)
    assert err.value.field == field
    assert field.rpartition(".")[2] in str(err.value)


def test_thresholds_constructor_validates_too():
    with pytest.raises(SchemaError) as err:
        Thresholds(rate_drift=-1)
    assert err.value.field == "thresholds.rate_drift"


# --------------------------------------------------------------------------- wire form


def test_report_round_trips_through_canonical_json():
    report = four_feature_case(("a",), important=("b",))
    doc = report.to_dict()
    assert doc["schema"] == 1 and set(doc["features"][0]["stats"]) == set(STAT_KEYS)
    assert DriftReport.from_dict(doc) == report
    assert canonical_json(doc)


@pytest.mark.parametrize(("patch", "field"), [
    pytest.param({"verdict": "bad"}, "drift.features[0].verdict", id="verdict"),
    pytest.param({"role": "both"}, "drift.features[0].role", id="role"),
    pytest.param({"base_hist": [0.5]}, "drift.features[0].base_hist", id="hist-length"),
    pytest.param({"stats": {"psi_x": 1.0}}, "drift.features[0].stats.psi_x", id="unknown-stat"),
    pytest.param({"live_hist": [2.0] * 12}, "drift.features[0].live_hist", id="hist-above-one"),
    pytest.param({"extra": 1}, "drift.features[0].extra", id="unknown-field"),
])
def test_report_from_dict_refuses_bad_features(patch, field):
    doc = four_feature_case(()).to_dict()
    doc["features"][0].update(patch)
    with pytest.raises(SchemaError) as err:
        DriftReport.from_dict(doc)
    assert err.value.field == field


# --------------------------------------------------------------------------- edge cases


def test_constant_reference_feature():
    spec = ProfileSpec((numeric_spec("k", np.full(500, 3.0)),))
    base = profile(spec, {"k": np.full(500, 3.0)})
    same = compare(base, profile(spec, {"k": np.full(100, 3.0)})).features[0]
    assert same.verdict == "ok" and same.min_rows == 40  # one bin: 40 * max(0, 1)
    assert same.stats["wasserstein"] is None  # the base std is 0: nothing to normalise by
    assert same.labels == ("< 3", "[3, 3]", "> 3")
    moved = compare(base, profile(spec, {"k": np.full(100, 4.0)})).features[0]
    assert moved.verdict == "drift" and moved.stats["out_of_range_rate"] == 1.0


def test_empty_profiles_are_insufficient_and_serialisable():
    rng = np.random.default_rng(60)
    spec = ProfileSpec((numeric_spec("x", rng.normal(size=100)),
                        categorical_spec("c", ["a", "b"])))
    report = compare(Profile(spec), Profile(spec))
    assert report.verdict == "insufficient"
    assert all(v is None for f in report.features for v in f.stats.values())
    assert canonical_json(report.to_dict())


def test_compare_of_twenty_features_is_fast():
    rng = np.random.default_rng(70)
    cols = {f"x{i}": rng.normal(size=20000) for i in range(16)}
    cols.update({f"c{i}": rng.choice(np.array(list("abcdefgh"), object), 20000)
                 for i in range(4)})
    spec = ProfileSpec(tuple(numeric_spec(k, v) if k[0] == "x" else categorical_spec(k, v)
                             for k, v in cols.items()))
    base = profile(spec, cols)
    live = profile(spec, {k: v[:3000] for k, v in cols.items()})
    best = math.inf
    for _ in range(30):
        start = time.perf_counter()
        compare(base, live)
        best = min(best, time.perf_counter() - start)
    assert best < 0.005, f"{best * 1e3:.2f} ms"


def test_the_wire_form_keeps_wasserstein_for_features_far_from_zero():
    """Sums travel as offsets from the bin edges: a level of 1e5 with a spread of 1 must
    not lose its per-bin means to rounding (absolute 5-digit sums moved W by ~0.01 here)."""
    from edgefleet.contract.profile import from_wire, to_wire

    rng = np.random.default_rng(7)
    ref = 101_325.0 + rng.normal(0, 1, 5000)
    live = 101_325.3 + rng.normal(0, 1, 3000)
    spec = ProfileSpec((numeric_spec("pressure", ref),))
    base, window = Profile(spec), Profile(spec)
    base.update({"pressure": ref})
    window.update({"pressure": live})
    exact = compare(base, window).feature("pressure").stats["wasserstein"]
    sent = compare(base, from_wire(to_wire(window), spec)).feature("pressure").stats
    assert abs(sent["wasserstein"] - exact) < 1e-3
    assert abs(sent["mean"] - live.mean()) < 1e-3
