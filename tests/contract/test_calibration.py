"""The calibration map: exact inverse wire form, numpy application equal to scikit-learn's,
refusals naming the field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.contract.calibration import Calibration
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.wire import canonical_json, parse_json

unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def calibrations(draw: st.DrawFn) -> Calibration:
    target = draw(st.sampled_from(["positive", "top"]))
    score = draw(st.none() | unit)
    rows = draw(st.integers(0, 10**6))
    if draw(st.booleans()):
        x = sorted(set(draw(st.lists(unit, min_size=1, max_size=20))))
        y = sorted(draw(st.lists(unit, min_size=len(x), max_size=len(x))))
        return Calibration("isotonic", target, tuple(x), tuple(y), rows=rows, score=score)
    a = draw(st.floats(-50, 50, allow_nan=False))
    b = draw(st.floats(-50, 50, allow_nan=False))
    return Calibration("platt", target, a=a, b=b, rows=rows, score=score)


@given(calibrations())
def test_the_wire_form_is_an_exact_inverse(cal: Calibration) -> None:
    data = canonical_json(cal.to_dict())
    assert Calibration.from_dict(parse_json(data, what="t", max_bytes=1 << 20)) == cal


@given(calibrations(), st.lists(unit, min_size=1, max_size=50))
def test_applied_probabilities_stay_in_the_unit_interval_and_keep_order(
        cal: Calibration, ps: list[float]) -> None:
    p = np.sort(np.asarray(ps))
    out = cal.apply(p)
    assert out.shape == p.shape and np.all((out >= 0) & (out <= 1))
    if cal.method == "isotonic" or cal.a >= 0:
        assert np.all(np.diff(out) >= -1e-12)  # monotone maps keep the ranking


def test_isotonic_matches_scikit_learn() -> None:
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(3)
    p = rng.uniform(size=2000)
    y = (rng.uniform(size=2000) < p**2).astype(float)
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p, y)
    cal = Calibration("isotonic", "positive", tuple(iso.X_thresholds_.tolist()),
                      tuple(iso.y_thresholds_.tolist()), rows=2000)
    q = np.linspace(-0.1, 1.1, 501)
    np.testing.assert_allclose(cal.apply(q), iso.predict(q), rtol=0, atol=1e-12)


def test_platt_is_the_logistic_of_the_logit() -> None:
    cal = Calibration("platt", "positive", a=2.0, b=-1.0)
    p = np.array([0.1, 0.5, 0.9])
    logit = np.log(p / (1 - p))
    np.testing.assert_allclose(cal.apply(p), 1 / (1 + np.exp(-(2 * logit - 1))), rtol=1e-12)


@pytest.mark.parametrize(("doc", "field"), [
    ({"method": "spline", "target": "top", "rows": 1, "score": None}, "method"),
    ({"method": "isotonic", "target": "top", "rows": 1, "score": None,
      "x": [0.5, 0.2], "y": [0.1, 0.2]}, "x"),
    ({"method": "isotonic", "target": "top", "rows": 1, "score": None,
      "x": [0.1, 0.2], "y": [0.3, 0.2]}, "y"),
    ({"method": "isotonic", "target": "top", "rows": 1, "score": None,
      "x": [0.1, 2.0], "y": [0.1, 0.2]}, "x"),
    ({"method": "platt", "target": "top", "rows": 1, "score": None, "a": 1.0}, "b"),
    ({"method": "platt", "target": "top", "rows": 1, "score": None, "a": 1.0, "b": 0.0,
      "x": [0.1]}, "x"),
])
def test_a_bad_map_is_refused_naming_the_field(doc: dict, field: str) -> None:
    with pytest.raises(SchemaError, match=field):
        Calibration.from_dict(doc, "manifest.calibration")
