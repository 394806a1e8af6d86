"""The calibration map a bundle carries: raw model confidence → calibrated probability.

``edgepack build --eval-data`` fits it on the held-out rows (isotonic regression or Platt
scaling, whichever calibrates those rows better) and writes it into the signed manifest;
the device applies it to every served row so that a window's *estimated* performance
(confidence-based performance estimation, CBPE) holds even when no label ever comes.

What is calibrated (``target``):

- ``positive`` (binary classifiers): the probability of the second class,
  ``classes[1]``; the calibrated probability of the first is one minus it.
- ``top`` (multi-class classifiers): the top-class probability, calibrated to the
  probability that the predicted class is right.

Two forms, both exact to apply with numpy alone (the device imports no scikit-learn):

- ``isotonic``: knots ``x`` (strictly increasing, in [0, 1]) and values ``y``
  (non-decreasing, in [0, 1]); the map is linear between knots and constant beyond them
  (``numpy.interp``, what scikit-learn's ``IsotonicRegression(out_of_bounds="clip")``
  predicts).
- ``platt``: ``sigmoid(a * logit(p) + b)``, with ``p`` clipped to [1e-7, 1 - 1e-7].

This module does not fit maps (see :mod:`packager.calibrate`) and does not estimate
performance (see :mod:`edgefleet.contract.performance`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.contract.wire import Fields

__all__ = ["METHODS", "TARGETS", "Calibration"]

METHODS = ("isotonic", "platt")
TARGETS = ("positive", "top")
MAX_KNOTS = 1024
_EPS = 1e-7


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration map (see the module docstring); immutable, signed with the
    manifest. ``score`` records how well it calibrated the held-out rows it was fitted on
    (the Brier score of the calibrated probabilities, cross-validated), and ``rows`` how
    many there were."""

    method: str  # isotonic | platt
    target: str  # positive | top
    x: tuple[float, ...] = ()  # isotonic knots
    y: tuple[float, ...] = ()
    a: float = 1.0  # platt
    b: float = 0.0
    rows: int = 0
    score: float | None = None  # Brier score on the held-out rows (lower is better)

    def apply(self, p: np.ndarray) -> np.ndarray:
        """The calibrated probabilities of ``p`` (any shape), as float64 in [0, 1]."""
        p = np.asarray(p, dtype=np.float64)
        if self.method == "isotonic":
            return np.interp(p, self.x, self.y)
        q = np.clip(p, _EPS, 1.0 - _EPS)
        z = self.a * (np.log(q) - np.log1p(-q)) + self.b
        with np.errstate(over="ignore"):  # exp(-z) = inf for z << 0 gives 0.0, as it should
            return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"method": self.method, "target": self.target,
                               "rows": self.rows, "score": self.score}
        if self.method == "isotonic":
            doc.update(x=list(self.x), y=list(self.y))
        else:
            doc.update(a=self.a, b=self.b)
        return doc

    @classmethod
    def from_dict(cls, obj: Any, where: str = "calibration") -> Calibration:
        """Parse and check a calibration map.

        Raises:
            SchemaError: naming the field at fault (an unknown method, knots out of order
                or outside [0, 1], a non-finite coefficient).
        """
        f = Fields(obj, where)
        method = f.choice("method", METHODS)
        target = f.choice("target", TARGETS)
        rows = f.int("rows")
        score = f.opt_float("score")
        if method == "isotonic":
            x = tuple(_unit(f, "x", v) for v in f.list("x", max_len=MAX_KNOTS))
            y = tuple(_unit(f, "y", v) for v in f.list("y", max_len=MAX_KNOTS))
            if not x or len(x) != len(y):
                raise f.bad("x", "isotonic knots: x and y non-empty and of one length")
            if any(b <= a for a, b in itertools.pairwise(x)):
                raise f.bad("x", "isotonic knots must be strictly increasing")
            if any(b < a for a, b in itertools.pairwise(y)):
                raise f.bad("y", "isotonic values must be non-decreasing")
            cal = cls(method, target, x, y, rows=rows, score=score)
        else:
            a, b = f.float("a"), f.float("b")
            if not (math.isfinite(a) and math.isfinite(b)):
                raise f.bad("a", "platt coefficients must be finite")
            cal = cls(method, target, a=a, b=b, rows=rows, score=score)
        f.done()
        return cal


def _unit(f: Fields, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 <= value <= 1.0:
        raise f.bad(key, f"{value!r} is not a number in [0, 1]")
    return float(value)
