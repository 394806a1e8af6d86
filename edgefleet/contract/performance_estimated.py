"""The estimated performance block: confidence-based estimation over every served row.

:class:`Estimated` (CBPE; see :mod:`edgefleet.contract.performance` for the sums it keeps
and what the estimate cannot see) and its wire form.

This module does not fit calibration maps (the packager does).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.performance_metrics import Metric, normal_metric
from edgefleet.contract.performance_spec import (
    Block,
    PerformanceSpec,
    count_list,
    float_list,
    index_array,
    same_spec,
)
from edgefleet.contract.wire import Fields

__all__ = ["Estimated"]


class Estimated(Block):
    """Mutable accumulator over every served row of one bundle, for CBPE (see the module
    docstring). ``calibrated`` is False when the bundle had no calibration map and the
    raw probabilities were used (the estimate is then only as good as the model's own
    calibration). A regressor's block counts rows only and has no metrics."""

    def __init__(self, spec: PerformanceSpec, calibrated: bool = True) -> None:
        self.spec = spec
        self.calibrated = calibrated
        k = max(spec.k, 1)
        self.rows = np.zeros(k, dtype=np.int64)  # per predicted class
        self.q = np.zeros(k)  # Σ P(the prediction is right)
        self.v = np.zeros(k)  # Σ q(1 - q)

    @property
    def n(self) -> int:
        return int(self.rows.sum())

    def add(self, calibrated: Any, predicted: Any) -> None:
        """Add served rows: ``calibrated`` is, per row, the calibrated P(classes[1])
        (binary) or top-class probability (multi-class); ``predicted`` the class indices.
        For a regressor, ``calibrated`` is ignored and the rows are only counted.

        Raises:
            SchemaError: arrays of different lengths, a class index outside the spec, a
                probability that is not in [0, 1].
        """
        if self.spec.task == "regression":
            self.rows[0] += len(np.asarray(predicted))
            return
        k = self.spec.k
        pred = np.asarray(predicted)
        if pred.ndim != 1 or pred.dtype.kind not in "iu":
            pred = index_array(pred, "predicted", k)
        p = np.asarray(calibrated, dtype=np.float64)
        if p.shape != pred.shape:
            raise SchemaError(f"calibrated: {p.shape} values for {pred.shape} predictions",
                              field="calibrated")
        if not len(p):
            return
        lo, hi = pred.min(), pred.max()
        if lo < 0 or hi >= k:
            index_array(pred, "predicted", k)  # raises, naming the index
        if not (p.min() >= 0.0 and p.max() <= 1.0):  # also refuses NaN
            raise SchemaError("calibrated: probabilities must be in [0, 1]",
                              field="calibrated")
        q = np.where(pred == 1, p, 1.0 - p) if k == 2 else p
        self.rows += np.bincount(pred, minlength=k)
        self.q += np.bincount(pred, weights=q, minlength=k)
        self.v += np.bincount(pred, weights=q * (1.0 - q), minlength=k)

    def merge(self, other: Estimated) -> Estimated:
        """Add ``other`` into this block in place and return self; the result is
        calibrated only if both were.

        Raises:
            ReferenceMismatchError: the blocks are over different specs.
        """
        same_spec(self.spec, other.spec)
        self.rows += other.rows
        self.q += other.q
        self.v += other.v
        self.calibrated = self.calibrated and other.calibrated
        return self

    def to_wire(self) -> dict[str, Any]:
        """The compact form a summary carries (exact: no rounding)."""
        return {"calibrated": self.calibrated, "n": self.rows.tolist(), "q": self.q.tolist(),
                "v": self.v.tolist()}

    @classmethod
    def from_wire(cls, spec: PerformanceSpec, obj: Any, where: str = "estimated") -> Estimated:
        """Rebuild a block from :meth:`to_wire` output, checked against ``spec``.

        Raises:
            SchemaError: a missing, mis-sized or impossible field (named).
        """
        f = Fields(obj, where)
        out = cls(spec, f.bool("calibrated"))
        k = len(out.rows)
        out.rows = count_list(f, "n", k)
        out.q = float_list(f, "q", f.raw("q"), k)
        out.v = float_list(f, "v", f.raw("v"), k)
        f.done()
        slack = 1e-9 * np.maximum(1.0, out.rows)
        if (out.q < 0).any() or (out.q > out.rows + slack).any():
            raise f.bad("q", "a sum of probabilities outside 0..rows")
        # Σq(1-q) <= Σq and <= Σ(1-q), and (Cauchy-Schwarz) <= Σq - (Σq)²/rows
        if (out.v < 0).any() or (out.v > np.minimum(out.q, out.rows - out.q) + slack).any():
            raise f.bad("v", "a sum of variances impossible for its rows")
        if spec.task == "regression" and (out.q.any() or out.v.any()):
            raise f.bad("q", "a regressor's block holds no probabilities")
        return out

    def metrics(self, calibration_rows: int = 0) -> dict[str, Metric]:
        """Expected ``accuracy`` (and, binary, ``precision``, ``recall``, ``f1`` of the
        positive class; multi-class, ``precision[c]``), each with the normal interval
        of the sum of Bernoullis (the spread of the realized metric around the estimate
        if the calibration holds). Method ``cbpe``.

        The calibration map was fitted on a finite held-out set and the estimate inherits
        that set's sampling noise: its accuracy is off the model's by up to about
        1.96 sqrt(a(1 - a) / rows) (0.012 at 5,000 rows; benchmarks/performance.py saw a
        held-out set 0.016 above the model's accuracy carry the estimate with it). With
        ``calibration_rows`` (``Calibration.rows``) the accuracy's interval adds
        ``a(1 - a) / calibration_rows`` to its variance, so it covers that too."""
        if self.spec.task == "regression":
            return {}
        n = self.n
        if n == 0:
            return {"accuracy": Metric(None, None, None, 0, "cbpe")}
        acc = float(self.q.sum()) / n
        var = float(self.v.sum()) / (n * n)
        if calibration_rows > 0:
            var += acc * (1 - acc) / calibration_rows
        out = {"accuracy": normal_metric(acc, math.sqrt(var), n, "cbpe", 0.0, 1.0)}
        if self.spec.binary:
            n0, n1 = int(self.rows[0]), int(self.rows[1])
            tp, v1 = float(self.q[1]), float(self.v[1])
            fn, v0 = n0 - float(self.q[0]), float(self.v[0])  # E[FN]: rows predicted 0, true 1
            none = Metric(None, None, None, 0, "cbpe")
            out["precision"] = normal_metric(tp / n1, math.sqrt(v1) / n1, n1, "cbpe", 0.0, 1.0) \
                if n1 else none
            pos = tp + fn
            if pos > 0:
                var = (fn * fn * v1 + tp * tp * v0) / pos ** 4
                out["recall"] = normal_metric(tp / pos, math.sqrt(var), n, "cbpe", 0.0, 1.0)
            else:
                out["recall"] = none
            d = tp + n1 + fn  # 2TP + FP + FN
            if d > 0:
                var = (4 * (n1 + fn) ** 2 * v1 + 4 * tp * tp * v0) / d ** 4
                out["f1"] = normal_metric(2 * tp / d, math.sqrt(var), n, "cbpe", 0.0, 1.0)
            else:
                out["f1"] = none
        else:
            for i, c in enumerate(self.spec.classes):
                rows = int(self.rows[i])
                out[f"precision[{c}]"] = Metric(None, None, None, 0, "cbpe") if not rows \
                    else normal_metric(float(self.q[i]) / rows, math.sqrt(float(self.v[i])) / rows,
                                 rows, "cbpe", 0.0, 1.0)
        return out

    def __repr__(self) -> str:
        return f"Estimated({self.spec.task}, n={self.n}, calibrated={self.calibrated})"

