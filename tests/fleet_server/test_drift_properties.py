"""Properties of the drift comparison over arbitrary specs and data (Hypothesis)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.contract.profile import (
    CONFIDENCE_EDGES,
    NumericSpec,
    Profile,
    ProfileSpec,
    categorical_spec,
    numeric_spec,
)
from edgefleet.contract.wire import canonical_json
from fleet_server.profiles.drift import STAT_KEYS, VERDICTS, DriftReport, Thresholds, compare

SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ANY_THRESHOLDS = Thresholds(min_rows=1)

moderate = st.floats(-1e6, 1e6, allow_nan=False)
extreme = st.one_of(moderate, st.just(math.nan), st.just(math.inf), st.just(-math.inf),
                    st.floats(-1e300, 1e300), st.floats(allow_nan=False, allow_infinity=False))
category = st.one_of(st.sampled_from(["a", "b", "c", "d", "e"]), st.none(), st.just("new"))


@st.composite
def specs(draw: Any) -> ProfileSpec:
    inputs: list = []
    for i in range(draw(st.integers(1, 3))):
        ref = draw(st.lists(moderate, min_size=1, max_size=40))
        inputs.append(numeric_spec(f"x{i}", np.array(ref), draw(st.integers(1, 12))))
    for i in range(draw(st.integers(0, 2))):
        ref = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=40))
        inputs.append(categorical_spec(f"c{i}", ref, max_vocab=draw(st.integers(1, 3))))
    outputs = (NumericSpec("confidence", CONFIDENCE_EDGES),) if draw(st.booleans()) else ()
    return ProfileSpec(tuple(inputs), outputs)


def rows(draw: Any, spec: ProfileSpec, values: st.SearchStrategy, min_size: int = 0,
         ) -> Profile:
    n = draw(st.integers(min_size, 30))
    columns = {}
    for s in spec.inputs:
        if isinstance(s, NumericSpec):
            columns[s.name] = np.array(draw(st.lists(values, min_size=n, max_size=n)), float)
        else:
            columns[s.name] = np.array(draw(st.lists(category, min_size=n, max_size=n)), object)
    outputs = {s.name: np.array(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)), float)
               for s in spec.outputs}
    p = Profile(spec)
    p.update(columns, outputs, rows=n)
    return p


@st.composite
def profile_pairs(draw: Any, values: st.SearchStrategy = extreme) -> tuple[Profile, Profile]:
    spec = draw(specs())
    return rows(draw, spec, values), rows(draw, spec, values)


@SETTINGS
@given(st.data())
def test_a_profile_against_itself_is_all_zero_and_ok(data):
    spec = data.draw(specs())
    p = rows(data.draw, spec, moderate, min_size=1)
    report = compare(p, p, ANY_THRESHOLDS)
    for f in report.features:
        s = f.stats
        for key in ("psi", "psi_raw", "ks", "js", "wasserstein", "wasserstein_lower",
                    "wasserstein_excess"):
            assert s[key] in (None, 0.0), (f.name, key, s[key])
        for key in ("missing_rate", "out_of_range_rate", "unseen_rate"):
            assert s[key] == s[f"{key}_base"]
        assert f.base_hist == f.live_hist
        assert f.verdict == ("ok" if f.n_live else "insufficient"), (f.name, f.reasons)
    assert report.verdict in ("ok", "insufficient")
    assert report.share_drifted == 0.0


@SETTINGS
@given(profile_pairs())
def test_statistics_are_bounded_and_the_report_is_canonical_json(pair):
    base, live = pair
    report = compare(base, live, ANY_THRESHOLDS)
    doc = report.to_dict()
    canonical_json(doc)  # no NaN, no infinity, only JSON types
    assert DriftReport.from_dict(doc).to_dict() == doc
    assert report.verdict in VERDICTS and 0.0 <= report.share_drifted <= 1.0
    for f in report.features:
        s = {k: v for k, v in f.to_dict()["stats"].items() if v is not None}
        assert set(f.stats) == set(STAT_KEYS)
        for key in ("psi", "psi_raw", "psi_bias", "wasserstein", "wasserstein_lower",
                    "wasserstein_bias", "wasserstein_excess", "std", "std_base"):
            assert s.get(key, 0.0) >= 0.0, (key, s)
        for key in ("ks", "ks_upper", "js", "missing_rate", "missing_rate_base",
                    "out_of_range_rate", "out_of_range_rate_base", "unseen_rate",
                    "unseen_rate_base"):
            assert 0.0 <= s.get(key, 0.0) <= 1.0, (key, s)
        assert s.get("ks", 0.0) <= s.get("ks_upper", 1.0)
        assert s.get("psi", 0.0) <= s.get("psi_raw", math.inf)
        if "wasserstein" in s:
            assert s["wasserstein_lower"] <= s["wasserstein"] * (1 + 1e-12)
        for hist, n in ((f.base_hist, f.n_base), (f.live_hist, f.n_live)):
            assert len(hist) == len(f.labels)
            assert sum(hist) == pytest.approx(1.0 if n else 0.0)


@SETTINGS
@given(st.data())
def test_the_order_live_windows_are_merged_in_does_not_change_the_report(data):
    spec = data.draw(specs())
    base = rows(data.draw, spec, moderate)
    windows = [rows(data.draw, spec, moderate) for _ in range(data.draw(st.integers(2, 4)))]
    order = data.draw(st.permutations(range(len(windows))))
    one = compare(base, Profile.merged(spec, windows), ANY_THRESHOLDS)
    other = compare(base, Profile.merged(spec, [windows[i] for i in order]), ANY_THRESHOLDS)
    assert (one.verdict, one.share_drifted, one.reasons) == (
        other.verdict, other.share_drifted, other.reasons)
    for a, b in zip(one.features, other.features, strict=True):
        assert (a.name, a.verdict, a.n_live, a.live_hist) == (b.name, b.verdict, b.n_live,
                                                              b.live_hist)
        for key in STAT_KEYS:
            x, y = a.stats[key], b.stats[key]
            # sums (and so means, M2 and Wasserstein) add in another order: rounding only
            assert (x is None) == (y is None), key
            if x is not None:
                assert x == pytest.approx(y, rel=1e-9, abs=1e-12), key
