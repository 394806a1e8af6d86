"""The realized performance block: the labelled rows of one bundle.

:class:`Realized` (see :mod:`edgefleet.contract.performance` for what it holds and how
its metrics read), its wire form and the checks that a block read off the wire is
possible for its rows.

This module does not join outcomes with predictions (the agent does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.performance_metrics import Metric, class_metrics, regression_metrics
from edgefleet.contract.performance_spec import (
    DELAY_EDGES,
    MAX_ERROR,
    RELIABILITY_EDGES,
    SCORE_EDGES,
    Block,
    PerformanceSpec,
    count_list,
    float_list,
    index_array,
    int_list,
    same_spec,
)
from edgefleet.contract.wire import Fields

__all__ = ["Realized"]


def _array(x: Any, name: str, dtype: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise SchemaError(f"{name}: expected a 1-d array, got shape {arr.shape}", field=name)
    return arr.astype(dtype, copy=False)


def _hist(values: np.ndarray, edges: np.ndarray, slots: int) -> np.ndarray:
    # bucket i is [edges[i-1], edges[i]): searchsorted right
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=slots)


_SCORE = np.asarray(SCORE_EDGES)
_REL = np.asarray(RELIABILITY_EDGES)
_DELAY = np.asarray(DELAY_EDGES)
_REL_BOUNDS = (0.0, *RELIABILITY_EDGES, 1.0)


class Realized(Block):
    """Mutable accumulator of the labelled rows of one bundle (see the module docstring)."""

    def __init__(self, spec: PerformanceSpec) -> None:
        self.spec = spec
        k = spec.k
        self.delay = np.zeros(len(DELAY_EDGES) + 1, dtype=np.int64)
        if spec.task == "classification":
            self.cm = np.zeros((k, k), dtype=np.int64)
            self.hist = np.zeros((len(spec.score_classes), 2, len(SCORE_EDGES) + 1),
                                 dtype=np.int64)
            self.brier = np.zeros(2)  # Σ per-row Brier score, Σ its square
            self.rel_n = np.zeros(len(RELIABILITY_EDGES) + 1, dtype=np.int64)
            self.rel_p = np.zeros(len(RELIABILITY_EDGES) + 1)
            self.rel_pos = np.zeros(len(RELIABILITY_EDGES) + 1, dtype=np.int64)
        else:
            self._edges = np.asarray(spec.error_edges)
            self.count = 0
            self.err = np.zeros(4)  # Σe, Σe², Σ|e|, Σe⁴
            self.err_hist = np.zeros(len(spec.error_edges) + 1, dtype=np.int64)

    # ----------------------------------------------------------------- accumulate

    @property
    def n(self) -> int:
        """Labelled rows."""
        if self.spec.task == "classification":
            return int(self.cm.sum())
        return self.count

    @property
    def scored(self) -> int:
        """Labelled rows that came with class probabilities (classifiers)."""
        return int(self.rel_n.sum()) if self.spec.task == "classification" else 0

    def add(self, predicted: Any, truth: Any, scores: Any = None,
            delays_s: Any = None) -> None:
        """Add labelled rows.

        Classifiers: ``predicted`` and ``truth`` are class indices into ``spec.classes``,
        ``scores`` the class probabilities ``[n, k]`` (None for a model without them).
        Regressors: predicted and true values. ``delays_s``: seconds from each
        prediction to its outcome (None or NaN: not known, not counted).

        Raises:
            SchemaError: arrays of different lengths or shapes, a class index outside the
                spec, a non-finite value or score (names the argument).
        """
        spec = self.spec
        if spec.task == "classification":
            pred = index_array(predicted, "predicted", spec.k)
            true = index_array(truth, "truth", spec.k)
        else:
            pred = _array(predicted, "predicted", np.float64)
            true = _array(truth, "truth", np.float64)
            if not (np.isfinite(pred).all() and np.isfinite(true).all()):
                raise SchemaError("predicted/truth: values must be finite", field="truth")
        n = len(pred)
        if len(true) != n:
            raise SchemaError(f"truth: {len(true)} values for {n} predictions", field="truth")
        delays = None
        if delays_s is not None:
            delays = _array(delays_s, "delays_s", np.float64)
            if len(delays) != n:
                raise SchemaError(f"delays_s: {len(delays)} values for {n} rows",
                                  field="delays_s")
        probs = None
        if scores is not None and spec.task == "classification":
            probs = np.asarray(scores, dtype=np.float64)
            if probs.shape != (n, spec.k):
                raise SchemaError(f"scores: shape {probs.shape}, expected ({n}, {spec.k})",
                                  field="scores")
            if not np.isfinite(probs).all():
                raise SchemaError("scores: probabilities must be finite", field="scores")
            probs = np.clip(probs, 0.0, 1.0)
        if n == 0:
            return
        if spec.task == "classification":
            self._add_classes(pred, true, probs)
        else:
            err = pred - true
            if np.abs(err).max() > MAX_ERROR:  # Σerr⁴ must stay finite to travel
                raise SchemaError(f"truth: an error beyond {MAX_ERROR:g} cannot be summed",
                                  field="truth")
            self.count += n
            self.err += (err.sum(), (err * err).sum(), np.abs(err).sum(), (err ** 4).sum())
            self.err_hist += _hist(err, self._edges, len(self.err_hist))
        if delays is not None:  # a negative delay (clock skew) counts as under a minute
            delays = delays[~np.isnan(delays)]
            self.delay += _hist(delays, _DELAY, len(self.delay))

    def _add_classes(self, pred: np.ndarray, true: np.ndarray, probs: np.ndarray | None) -> None:
        k = self.spec.k
        self.cm += np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
        if probs is None:
            return
        slots = self.hist.shape[2]
        for row, c in enumerate(self.spec.score_classes):
            is_c = true == c
            bins = np.searchsorted(_SCORE, probs[:, c], side="right")
            self.hist[row, 0] += np.bincount(bins[~is_c], minlength=slots)
            self.hist[row, 1] += np.bincount(bins[is_c], minlength=slots)
        if self.spec.binary:
            p = probs[:, 1]
            hit = true == 1
            per_row = (p - hit) ** 2
        else:
            p = probs[np.arange(len(pred)), pred]
            hit = pred == true
            onehot = np.zeros_like(probs)
            onehot[np.arange(len(true)), true] = 1.0
            per_row = ((probs - onehot) ** 2).sum(axis=1)
        self.brier += (per_row.sum(), (per_row * per_row).sum())
        bins = np.searchsorted(_REL, p, side="right")
        slots = len(self.rel_n)
        self.rel_n += np.bincount(bins, minlength=slots)
        self.rel_p += np.bincount(bins, weights=p, minlength=slots)
        self.rel_pos += np.bincount(bins, weights=hit, minlength=slots).astype(np.int64)

    def merge(self, other: Realized) -> Realized:
        """Add ``other`` into this block in place and return self.

        Raises:
            ReferenceMismatchError: the blocks are over different specs.
        """
        same_spec(self.spec, other.spec)
        self.delay += other.delay
        if self.spec.task == "classification":
            self.cm += other.cm
            self.hist += other.hist
            self.brier += other.brier
            self.rel_n += other.rel_n
            self.rel_p += other.rel_p
            self.rel_pos += other.rel_pos
        else:
            self.count += other.count
            self.err += other.err
            self.err_hist += other.err_hist
        return self

    # ----------------------------------------------------------------- wire

    def to_wire(self) -> dict[str, Any]:
        """The compact form a summary carries (exact: no rounding)."""
        if self.spec.task == "classification":
            return {"cm": self.cm.tolist(), "hist": self.hist.tolist(),
                    "brier": self.brier.tolist(),
                    "rel": [self.rel_n.tolist(), self.rel_p.tolist(), self.rel_pos.tolist()],
                    "delay": self.delay.tolist()}
        return {"n": self.count, "err": self.err.tolist(), "hist": self.err_hist.tolist(),
                "delay": self.delay.tolist()}

    @classmethod
    def from_wire(cls, spec: PerformanceSpec, obj: Any, where: str = "realized") -> Realized:
        """Rebuild a block from :meth:`to_wire` output, checked against ``spec``.

        Raises:
            SchemaError: a missing, mis-sized or impossible field (named).
        """
        f = Fields(obj, where)
        out = cls(spec)
        out.delay = count_list(f, "delay", len(out.delay))
        if spec.task == "classification":
            k = spec.k
            cm = f.list("cm", max_len=k)
            if len(cm) != k:
                raise f.bad("cm", f"expected {k} rows")
            out.cm = np.array([int_list(f, f"cm[{i}]", row, k) for i, row in enumerate(cm)],
                              dtype=np.int64).reshape(k, k)
            h, _, slots = out.hist.shape
            hist = f.list("hist", max_len=h)
            if len(hist) != h:
                raise f.bad("hist", f"expected {h} score histograms")
            for i, pair in enumerate(hist):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise f.bad(f"hist[{i}]", "expected two histograms")
                for j in range(2):
                    out.hist[i, j] = int_list(f, f"hist[{i}][{j}]", pair[j], slots)
            out.brier = float_list(f, "brier", f.raw("brier"), 2)
            rel = f.list("rel", max_len=3)
            if len(rel) != 3:
                raise f.bad("rel", "expected [counts, sums of p, positives]")
            slots = len(out.rel_n)
            out.rel_n = int_list(f, "rel[0]", rel[0], slots)
            out.rel_p = float_list(f, "rel[1]", rel[1], slots)
            out.rel_pos = int_list(f, "rel[2]", rel[2], slots)
            f.done()
            _check_classes(f, out)
        else:
            out.count = f.int("n")
            out.err = float_list(f, "err", f.raw("err"), 4)
            out.err_hist = count_list(f, "hist", len(out.err_hist))
            f.done()
            _check_regression(f, out)
        if int(out.delay.sum()) > out.n:
            raise f.bad("delay", "more label delays than labelled rows")
        return out

    # ----------------------------------------------------------------- read

    def confusion(self) -> np.ndarray:
        """The confusion matrix ``[true, predicted]`` (a copy)."""
        return self.cm.copy()

    def reliability(self) -> list[tuple[float, float, int, float, float]]:
        """The reliability diagram: ``(bin_low, bin_high, n, mean_p, frac_pos)`` per
        non-empty bin (binary: p = P(classes[1]), positive = truth is classes[1];
        multi-class: p = the predicted class's probability, positive = right)."""
        if self.spec.task != "classification":
            return []
        out = []
        for i, count in enumerate(self.rel_n.tolist()):
            if count:
                out.append((_REL_BOUNDS[i], _REL_BOUNDS[i + 1], count,
                            float(self.rel_p[i]) / count, int(self.rel_pos[i]) / count))
        return out

    def metrics(self) -> dict[str, Metric]:
        """Every metric of the block with its 95 % interval (see the module docstring)."""
        if self.spec.task == "regression":
            return regression_metrics(self.count, self.err)
        return class_metrics(self)

    def __repr__(self) -> str:
        return f"Realized({self.spec.task}, n={self.n})"


def _slack(total: float) -> float:
    # sums travel exactly, but a sum of n rounded terms may sit a hair past its bound
    return 1e-9 * max(1.0, abs(total))


def _check_classes(f: Fields, r: Realized) -> None:
    n_true = r.cm.sum(axis=1)
    scored = int(r.rel_n.sum())
    if scored > r.n:
        raise f.bad("rel", "more scored rows than labelled rows")
    for i, c in enumerate(r.spec.score_classes):
        if int(r.hist[i].sum()) != scored:
            raise f.bad(f"hist[{i}]", f"{int(r.hist[i].sum())} rows, the scored rows are "
                                      f"{scored}")
        if int(r.hist[i, 1].sum()) > int(n_true[c]):
            raise f.bad(f"hist[{i}]", "more scored rows of the class than labelled ones")
    if (r.rel_pos > r.rel_n).any():
        raise f.bad("rel", "more positives than rows in a bin")
    low = np.asarray(_REL_BOUNDS[:-1]) * r.rel_n
    high = np.asarray(_REL_BOUNDS[1:]) * r.rel_n
    slack = 1e-9 * np.maximum(1.0, r.rel_n)
    if (r.rel_p < low - slack).any() or (r.rel_p > high + slack).any():
        raise f.bad("rel", "a bin's sum of p outside the bin's bounds times its rows")
    s, s2 = r.brier.tolist()
    # a row's Brier score is at most 1 (binary) or 2 (multi-class, probabilities summing to
    # one); a model whose probabilities do not sum to one can reach k, so that is the bound
    top = 1.0 if r.spec.binary else float(r.spec.k)
    if s < 0 or s2 < 0 or s > top * scored + _slack(s) or s2 > top * s + _slack(s2) \
            or s * s > scored * s2 + _slack(s * s):
        raise f.bad("brier", "sums impossible for the scored rows")


def _check_regression(f: Fields, r: Realized) -> None:
    s, s2, sa, s4 = r.err.tolist()
    n = r.count
    if int(r.err_hist.sum()) != n:
        raise f.bad("hist", f"{int(r.err_hist.sum())} errors, n is {n}")
    if n == 0 and any((s, s2, sa, s4)):
        raise f.bad("err", "sums without rows")
    if s2 < 0 or sa < 0 or s4 < 0 or abs(s) > sa + _slack(sa) \
            or sa * sa > n * s2 + _slack(sa * sa) or s2 * s2 > n * s4 + _slack(s2 * s2):
        raise f.bad("err", "sums impossible for n rows")

