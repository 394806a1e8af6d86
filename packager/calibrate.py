"""Fitting the calibration map a classifier's bundle carries (``edgepack build --eval-data``).

The map is fitted on the held-out rows' *shipped* probabilities: the ONNX graph's, run by
the device's own runner, exactly what the agent will calibrate on every served row.

- Binary classifiers: ``P(classes[1])`` against "the label is ``classes[1]``" (target
  ``positive``).
- Multi-class classifiers: the top-class probability against "the predicted label is
  right" (target ``top``).

Two candidates are fitted: isotonic regression (scikit-learn's
``IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)``, stored as its knots) and Platt
scaling (a logistic regression on ``logit(p)``, practically unregularised). The one with the
lower cross-validated Brier score on those rows (seeded, stratified :data:`FOLDS` folds)
is kept and refitted on all of them; its score is recorded in the map, and the raw
probabilities' Brier score on the same rows beside it (:attr:`Fitted.raw_brier`), so a
reader sees how much the map helped. When neither beats the raw probabilities (a model
that is calibrated already, where a fitted map only adds the noise of its fit), the map is
the identity, written as Platt scaling with ``a = 1, b = 0`` and the raw score. The Brier
score here is that of the calibrated target, one probability per row (for a binary task,
half the two-class sum).

An isotonic map with more than :data:`~edgefleet.contract.calibration.MAX_KNOTS` knots is
thinned to that many, keeping the first and the last; the values at the knots kept are
unchanged (a subset of a non-decreasing sequence stays non-decreasing).

Not fitted (``None`` with the reason): a regressor, a classifier without probabilities,
fewer than :data:`MIN_ROWS` rows, or a target with fewer than two rows of each outcome (a
calibration learnt from one side says nothing).

This module does not apply maps (:class:`~edgefleet.contract.calibration.Calibration` does,
the same on the device) and reads no files.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgefleet.contract.calibration import MAX_KNOTS, Calibration
from edgefleet.contract.runtime import Prediction

__all__ = ["FOLDS", "MIN_ROWS", "RAW_BRIER", "Fitted", "brier", "fit", "targets", "thin"]

FOLDS = 5
SEED = 0
MIN_ROWS = 20
_EPS = 1e-7
# the manifest metric holding the raw probabilities' Brier score on the held-out rows (the
# map's own, cross-validated, is its ``score``)
RAW_BRIER = "eval_brier_uncalibrated"


@dataclass(frozen=True)
class Fitted:
    """The chosen map, the raw probabilities' Brier score on the same rows, and both
    candidates' cross-validated scores (for the build's progress line)."""

    calibration: Calibration
    raw_brier: float
    scores: dict[str, float]


def brier(p: np.ndarray, y: np.ndarray) -> float:
    """Mean squared difference between probabilities and 0/1 outcomes."""
    return float(np.mean((np.asarray(p, dtype=np.float64) - y) ** 2))


def targets(classes: Sequence[object], pred: Prediction, truth: np.ndarray
            ) -> tuple[str, np.ndarray, np.ndarray] | str:
    """The calibrated target, its raw probabilities and 0/1 outcomes; or why there are none."""
    if pred.probabilities is None:
        return "the model has no probability output"
    probs = np.clip(np.asarray(pred.probabilities, dtype=np.float64), 0.0, 1.0)
    truth = np.asarray(truth).astype(str)
    if len(classes) == 2:
        return ("positive", probs[:, 1],
                (truth == str(classes[1])).astype(np.float64))
    return ("top", probs.max(axis=1),
            (np.asarray(pred.labels).astype(str) == truth).astype(np.float64))


def thin(x: np.ndarray, y: np.ndarray, limit: int = MAX_KNOTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` knots, evenly spread over the index, first and last kept."""
    if len(x) <= limit:
        return x, y
    keep = np.unique(np.round(np.linspace(0, len(x) - 1, limit)).astype(int))
    return x[keep], y[keep]


def _isotonic(p: np.ndarray, y: np.ndarray) -> Calibration:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p, y)
    x, v = thin(np.asarray(iso.X_thresholds_, dtype=np.float64),
                np.clip(np.asarray(iso.y_thresholds_, dtype=np.float64), 0.0, 1.0))
    return Calibration("isotonic", "", tuple(x.tolist()), tuple(v.tolist()))


def _platt(p: np.ndarray, y: np.ndarray) -> Calibration:
    from sklearn.linear_model import LogisticRegression

    q = np.clip(p, _EPS, 1.0 - _EPS)
    z = (np.log(q) - np.log1p(-q)).reshape(-1, 1)
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(z, y.astype(int))
    return Calibration("platt", "", a=float(lr.coef_[0, 0]), b=float(lr.intercept_[0]))


FITTERS = {"isotonic": _isotonic, "platt": _platt}


def _cross_validated(method: str, p: np.ndarray, y: np.ndarray, folds: int) -> float:
    from sklearn.model_selection import StratifiedKFold

    out = np.empty_like(p)
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=SEED).split(p, y):
        out[test] = FITTERS[method](p[train], y[train]).apply(p[test])
    return brier(out, y)


def fit(classes: Sequence[object], pred: Prediction, truth: np.ndarray) -> Fitted | str:
    """Fit both maps on the held-out rows, keep the better by cross-validated Brier score.

    Returns:
        The fitted map, or a sentence saying why there is none.
    """
    found = targets(classes, pred, truth)
    if isinstance(found, str):
        return found
    target, p, y = found
    n = len(p)
    if n < MIN_ROWS:
        return f"{n} evaluation rows; a calibration map needs at least {MIN_ROWS}"
    least = int(min(y.sum(), n - y.sum()))
    if least < 2:
        return (f"the {'positive class' if target == 'positive' else 'predictions right or'}"
                f"{'' if target == 'positive' else ' wrong'} occurs {least} time(s) in the "
                "evaluation rows; a map needs both outcomes")
    folds = min(FOLDS, least)
    raw = brier(p, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on separable folds
        scores = {m: _cross_validated(m, p, y, folds) for m in FITTERS}
        method = min(scores, key=lambda m: (scores[m], m))
        chosen = FITTERS[method](p, y)
    if scores[method] >= raw:  # already calibrated: a fitted map would only add noise
        return Fitted(Calibration("platt", target, a=1.0, b=0.0, rows=n, score=raw), raw,
                      {**scores, "identity": raw})
    cal = Calibration(method, target, chosen.x, chosen.y, chosen.a, chosen.b, rows=n,
                      score=scores[method])
    return Fitted(cal, raw, scores)
