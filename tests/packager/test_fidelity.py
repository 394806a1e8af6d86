"""The fidelity gate's judgement (a pure core over arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.contract.runtime import Prediction
from packager.errors import BuildError
from packager.fidelity import Bounds, judge, parse_bounds

PROBS = np.array([[0.5, 0.5], [0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])


def _agreement(original_labels, shipped_labels) -> float:
    original = {"label": np.array(original_labels), "probabilities": PROBS}
    report, _ = judge(original, Prediction(np.array(shipped_labels), PROBS),
                      "classification", Bounds(), (0, 1))
    return report.label_agreement


def test_an_exact_vote_tie_broken_the_other_way_is_agreement():
    # rows 0 and 2 are 0.5/0.5 ties: either label is right
    assert _agreement([0, 1, 1, 0], [1, 1, 0, 0]) == 1.0


def test_a_real_flip_still_counts_as_disagreement():
    assert _agreement([0, 1, 1, 0], [0, 0, 1, 1]) == 0.5


def test_regressor_error_is_relative_to_the_spread():
    want = np.array([0.0, 10.0, 20.0, 30.0])
    shipped = Prediction(values=want + np.array([0, 0, 0, 0.5]))
    report, rows = judge({"value": want}, shipped, "regression", Bounds(rel_error=0.05))
    assert report.max_abs_error == 0.5
    assert report.max_rel_error == pytest.approx(0.5 / want.std())  # 0.0447
    assert report.passed is True and rows[0][0] == "rel_error"
    tight, _ = judge({"value": want}, shipped, "regression", Bounds(rel_error=0.04))
    assert tight.passed is False


@pytest.mark.parametrize(("items", "field", "value"), [
    (("0.05",), "label_disagreement", 0.05),
    (("0.05",), "rel_error", 0.05),
    (("prob_diff=0.2",), "prob_diff", 0.2),
], ids=["bare-classifier", "bare-regressor", "keyed"])
def test_parse_bounds(items, field, value):
    assert getattr(parse_bounds(items), field) == value


@pytest.mark.parametrize("items", [("nope=1",), ("prob_diff=x",), ("prob_diff=-1",)],
                         ids=["unknown-key", "not-a-number", "negative"])
def test_parse_bounds_refuses(items):
    with pytest.raises(BuildError):
        parse_bounds(items)
