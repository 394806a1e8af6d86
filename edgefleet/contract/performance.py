"""Performance blocks: realized (from joined outcomes) and estimated (from confidences).

A summary carries, per bundle that answered rows in the window, a mergeable
**performance block** (:class:`PerformanceEntry`): the device builds it, the server adds
blocks of many windows and devices, and reads metrics with 95 % intervals off the sums.
One module does all three, so the device and the server compute the same thing.

:class:`Realized` accumulates the *labelled* rows of one bundle (an outcome joined with
the prediction it belongs to):

- classifiers: the confusion matrix (``cm[true, predicted]``, as scikit-learn's
  ``confusion_matrix``); per-class score histograms over :data:`SCORE_EDGES` (one-vs-rest:
  the class's probability among rows of that class and among the others; binary tasks
  keep the positive class ``classes[1]`` only), enough for a binned ROC AUC; the exact sums
  of the per-row Brier score and of its square; a reliability table over
  :data:`RELIABILITY_EDGES` (per bin: rows, Σp, positives), whence the expected
  calibration error;
- regressors: n, Σerr, Σerr², Σ|err| and Σerr⁴ (the last for the RMSE's interval), with
  ``err = predicted - true``, and an error histogram over the spec's ``error_edges``
  (:data:`ERROR_EDGES` by default);
- both: a label-delay histogram (seconds from prediction to outcome, :data:`DELAY_EDGES`).

:class:`Estimated` accumulates *every* served row for confidence-based performance
estimation (CBPE, as NannyML): with calibrated probabilities, the chance a prediction is
right is its calibrated confidence ``q``, so the expected number right is Σq, and its
spread (a sum of independent Bernoullis) has variance Σq(1-q). Kept per predicted class:
rows, Σq, Σq(1-q). For binary tasks ``q`` is ``p = P(classes[1])`` on rows predicted
positive and ``1 - p`` on the others, which gives the expected confusion matrix
(E[TP] = Σ_{pred=1} p, E[FP] = n₁ - E[TP], E[FN] = n₀ - Σ_{pred=0} q, E[TN] = Σ_{pred=0} q)
and so expected precision, recall and F1.

What the estimate cannot see (documented, tested): it holds while the *inputs* move and
the labelling rule stays (covariate shift), and it is blind to a change of the rule
itself (concept drift: labels flipped in a region of the input space leave every
confidence as it was). The realized block is what catches that, once labels arrive.

Merging adds every counter and sum, so ``merge(a, b)`` equals accumulating the rows of
both: exactly for counts, to floating-point rounding for sums. The wire form
(``to_wire``) is a small dict of lists, round-tripping exactly; ``from_wire`` checks
every number against the spec and raises :class:`SchemaError` naming the field.

Metrics (:class:`Metric`: value, 95 % interval, n, method):

===================  ==========================================================
``accuracy``         Wilson score interval (realized); normal over Σq(1-q) (estimated)
``precision[c]``     Wilson on the rows predicted ``c``
``recall[c]``        Wilson on the rows whose truth is ``c``
``f1[c]``            2TP / (2TP + FP + FN), delta method over the multinomial counts
``f1_macro``         the mean over classes seen in truth or prediction (scikit-learn's
                     ``average="macro"``); delta method, classes taken as independent
``precision``,       binary tasks: the above for the positive class ``classes[1]``
``recall``, ``f1``
``auc``              binary: binned ROC AUC (ties within a bin count one half), interval
                     of Hanley & McNeil (1982); ``auc[c]``: one-vs-rest, multi-class
``brier``            mean per-row Brier score (binary: (p - y)²; multi-class: Σ_c
                     (p_c - y_c)²), normal interval from the exact Σ and Σ²
``ece``              Σ_b (n_b / n) |mean p_b - positives_b / n_b| (no interval)
``mae``, ``bias``    normal interval (the sample variance from Σerr, Σerr²)
``rmse``             delta method over the MSE (uses Σerr⁴)
===================  ==========================================================

A metric whose denominator is zero (precision of a class never predicted) has value
``None``, where scikit-learn would say 0 with a warning.

This module does not join outcomes with predictions (the agent does), store blocks or
judge drops (the server does), and does not fit calibration maps (the packager does).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.wire import FAST_CHECKS_FLOATS, Fields

if TYPE_CHECKING:
    from edgefleet.contract.manifest import Manifest
    from edgefleet.contract.messages import BundleRef

__all__ = [
    "DELAY_EDGES",
    "ERROR_EDGES",
    "MAX_CLASSES",
    "MAX_ENTRIES",
    "RELIABILITY_EDGES",
    "SCORE_EDGES",
    "Estimated",
    "Metric",
    "PerformanceEntry",
    "PerformanceSpec",
    "Realized",
    "wilson",
]

Label = int | str
TASKS = ("classification", "regression")
MAX_ENTRIES = 8  # performance entries per summary: bundles that answered in one window
MAX_SCORE_CLASSES = 16  # multi-class tasks beyond it keep no score histograms
# a k x k confusion matrix: 256 classes is 64 K counters (512 KiB on the server, and a
# mostly-zero list that deflates well); beyond it a block would not fit a message
MAX_CLASSES = 256
Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def _score_edges() -> tuple[float, ...]:
    # the middle, 0.05 to 0.95, in steps of 0.01; each tail in steps of 4/15 of logit(p)
    # down to logit -16 (p = 1.1e-7, below float32's resolution near 1), rounded to 4
    # significant digits and mirrored (1 - x), so the edges are the same decimal numbers
    # on every platform (np.exp may differ in its last bit between C libraries)
    middle = [round(i / 100, 2) for i in range(5, 96)]
    z = np.arange(-16.0, math.log(0.05 / 0.95), 4 / 15)
    low = sorted({float(f"{v:.4g}") for v in 1.0 / (1.0 + np.exp(-z))})
    return (*low, *middle, *(1.0 - x for x in reversed(low)))


# Score histogram edges: fine where confident models put their scores (near 0 and 1,
# log-spaced in odds) and where hesitant ones do (0.01 wide in the middle): 190 counters
# keep the binned ROC AUC within 0.005 of scikit-learn's exact one: worst 0.0022 over 60
# models (logistic, gradient boosting, naive Bayes on make_classification, class separation
# 0.1 to 4: near-useless to saturated) when the edges were chosen, where a flat 0.01 grid
# missed by 0.0025 (saturated) and a flat logit grid of 102 counters by 0.009 (hesitant);
# tests/contract/test_performance.py checks calibrated models from AUC 0.51 to 0.9999.
SCORE_EDGES = _score_edges()
# Reliability diagram (and ECE): 10 equal-width bins, the usual reading.
RELIABILITY_EDGES = tuple(i / 10 for i in range(1, 10))
# Label delay (seconds): 1 min, 5 min, 15 min, 30 min, 1 h, 2 h, 6 h, 12 h, 1 d, 2 d,
# 3 d, 7 d, 14 d, 30 d; below the first and beyond the last have a counter each.
DELAY_EDGES = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0,
               172800.0, 259200.0, 604800.0, 1209600.0, 2592000.0)
# Regression error histogram: symmetric, log-spaced 1-2-5 per decade from 0.001 to
# 1,000,000 on each side of 0 (61 edges, 62 counters): a regressor's scale is unknown at
# this layer, so the edges cover nine decades; the exact Σ sums give MAE/RMSE/bias.
_POS = (*(float(f"{m * 10.0 ** e:.6g}") for e in range(-3, 6) for m in (1, 2, 5)), 1e6)
ERROR_EDGES = (*(-x for x in reversed(_POS)), 0.0, *_POS)
MAX_ERROR_EDGES = 256
MAX_ERROR = 1e60  # |predicted - true| beyond it is refused: Σerr⁴ would overflow a float


class Metric(NamedTuple):
    """One metric: its value, the bounds of its 95 % interval, the rows behind it and how
    the interval was found (``wilson``, ``normal``, ``delta``, ``hanley-mcneil``,
    ``binned``: no interval). ``value`` is None when undefined (no rows)."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    method: str


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n`` (n > 0)."""
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(successes: int, n: int) -> Metric:
    if n <= 0:
        return Metric(None, None, None, 0, "wilson")
    low, high = wilson(successes, n)
    return Metric(successes / n, low, high, int(n), "wilson")


def _normal(value: float, se: float, n: int, method: str = "normal",
            lo: float = -math.inf, hi: float = math.inf) -> Metric:
    se = se if math.isfinite(se) and se >= 0 else 0.0
    return Metric(value, max(lo, value - Z95 * se), min(hi, value + Z95 * se), int(n), method)


@dataclass(frozen=True)
class PerformanceSpec:
    """What a bundle's performance blocks are over: the task, the classes (classifiers)
    and the error histogram's edges (regressors). Two blocks merge only over one spec."""

    task: str  # classification | regression
    classes: tuple[Label, ...] = ()
    error_edges: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SchemaError(f"performance spec: unknown task {self.task!r}", field="task")
        if self.task == "classification" and not 2 <= len(self.classes) <= MAX_CLASSES:
            raise SchemaError(f"performance spec: performance blocks cover classifiers of 2 "
                              f"to {MAX_CLASSES} classes, not {len(self.classes)}",
                              field="classes")
        if self.task == "regression":
            edges = self.error_edges
            if not edges or len(edges) > MAX_ERROR_EDGES \
                    or any(not b > a for a, b in itertools.pairwise(edges)):
                raise SchemaError("performance spec: error edges must be strictly "
                                  f"increasing, 1 to {MAX_ERROR_EDGES}", field="error_edges")

    @property
    def k(self) -> int:
        return len(self.classes)

    @property
    def binary(self) -> bool:
        return self.task == "classification" and self.k == 2

    @property
    def score_classes(self) -> tuple[int, ...]:
        """The class indices that keep a score histogram."""
        if self.binary:
            return (1,)
        return tuple(range(self.k)) if self.k <= MAX_SCORE_CLASSES else ()

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> PerformanceSpec:
        """The spec of a bundle's performance blocks.

        Raises:
            SchemaError: a classifier whose manifest lists fewer than two classes or more
                than :data:`MAX_CLASSES` (the agent then keeps no performance block).
        """
        if manifest.task == "regression":
            return cls("regression", (), ERROR_EDGES)
        return cls("classification", tuple(manifest.classes))


def _array(x: Any, name: str, dtype: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise SchemaError(f"{name}: expected a 1-d array, got shape {arr.shape}", field=name)
    return arr.astype(dtype, copy=False)


def _indices(x: Any, name: str, k: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise SchemaError(f"{name}: expected a 1-d array of class indices", field=name)
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= k):
        bad = arr[(arr < 0) | (arr >= k)][0]
        raise SchemaError(f"{name}: class index {int(bad)} outside 0..{k - 1}", field=name)
    return arr


def _hist(values: np.ndarray, edges: np.ndarray, slots: int) -> np.ndarray:
    # bucket i is [edges[i-1], edges[i]): searchsorted right
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=slots)


_SCORE = np.asarray(SCORE_EDGES)
_REL = np.asarray(RELIABILITY_EDGES)
_DELAY = np.asarray(DELAY_EDGES)
_REL_BOUNDS = (0.0, *RELIABILITY_EDGES, 1.0)


_B = TypeVar("_B", bound="_Block")


class _Block:
    """What both blocks share: a spec, an exact merge, and the sum of many."""

    def __init__(self, spec: PerformanceSpec) -> None:
        self.spec = spec

    def merge(self: _B, other: _B) -> _B:
        raise NotImplementedError

    @classmethod
    def merged(cls: type[_B], spec: PerformanceSpec, blocks: Iterable[_B]) -> _B:
        """The sum of ``blocks`` (an empty block when there are none; an empty estimate
        counts as calibrated).

        Raises:
            ReferenceMismatchError: a block over another spec.
        """
        total = cls(spec)
        for block in blocks:
            total.merge(block)
        return total


class Realized(_Block):
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
            pred = _indices(predicted, "predicted", spec.k)
            true = _indices(truth, "truth", spec.k)
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
        _same(self.spec, other.spec)
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
        out.delay = _counts(f, "delay", len(out.delay))
        if spec.task == "classification":
            k = spec.k
            cm = f.list("cm", max_len=k)
            if len(cm) != k:
                raise f.bad("cm", f"expected {k} rows")
            out.cm = np.array([_int_list(f, f"cm[{i}]", row, k) for i, row in enumerate(cm)],
                              dtype=np.int64).reshape(k, k)
            h, _, slots = out.hist.shape
            hist = f.list("hist", max_len=h)
            if len(hist) != h:
                raise f.bad("hist", f"expected {h} score histograms")
            for i, pair in enumerate(hist):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise f.bad(f"hist[{i}]", "expected two histograms")
                for j in range(2):
                    out.hist[i, j] = _int_list(f, f"hist[{i}][{j}]", pair[j], slots)
            out.brier = _float_list(f, "brier", f.raw("brier"), 2)
            rel = f.list("rel", max_len=3)
            if len(rel) != 3:
                raise f.bad("rel", "expected [counts, sums of p, positives]")
            slots = len(out.rel_n)
            out.rel_n = _int_list(f, "rel[0]", rel[0], slots)
            out.rel_p = _float_list(f, "rel[1]", rel[1], slots)
            out.rel_pos = _int_list(f, "rel[2]", rel[2], slots)
            f.done()
            _check_classes(f, out)
        else:
            out.count = f.int("n")
            out.err = _float_list(f, "err", f.raw("err"), 4)
            out.err_hist = _counts(f, "hist", len(out.err_hist))
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
            return _regression_metrics(self.count, self.err)
        return _class_metrics(self)

    def copy(self) -> Realized:
        return Realized.from_wire(self.spec, self.to_wire())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Realized) and self.spec == other.spec \
            and self.to_wire() == other.to_wire()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Realized({self.spec.task}, n={self.n})"


def _same(a: PerformanceSpec, b: PerformanceSpec) -> None:
    if a != b:
        raise ReferenceMismatchError("cannot merge performance blocks over different specs "
                                     f"({a.task}, {a.k} classes vs {b.task}, {b.k} classes)")


def _int_list(f: Fields, key: str, value: Any, size: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) != size:
        raise f.bad(key, f"expected a list of {size} counts")
    if not all(type(c) is int and 0 <= c < 2**62 for c in value):
        raise f.bad(key, "counts must be non-negative integers")
    return np.array(value, dtype=np.int64)


def _counts(f: Fields, key: str, size: int) -> np.ndarray:
    return _int_list(f, key, f.raw(key), size)


def _float_list(f: Fields, key: str, value: Any, size: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) != size:
        raise f.bad(key, f"expected a list of {size} numbers")
    if not all(type(x) in (int, float) and math.isfinite(x) for x in value):
        raise f.bad(key, "must be finite numbers")
    return np.array(value, dtype=np.float64)


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


def _f1(tp: float, fp: float, fn: float, n: float) -> tuple[float | None, float]:
    """F1 = 2TP / (2TP + FP + FN) and its delta-method variance over multinomial counts
    from ``n`` rows (TP and FP-or-FN are disjoint events of a row)."""
    b = fp + fn
    d = 2 * tp + b
    if d <= 0:
        return None, 0.0
    value = 2 * tp / d
    pa, pb = tp / n, b / n
    ga, gb = 2 * b / (d * d), -2 * tp / (d * d)
    var = n * (ga * ga * pa * (1 - pa) + gb * gb * pb * (1 - pb) - 2 * ga * gb * pa * pb)
    return value, max(var, 0.0)


def _auc(neg: np.ndarray, pos: np.ndarray) -> tuple[float, int, int] | None:
    n0, n1 = int(neg.sum()), int(pos.sum())
    if n0 == 0 or n1 == 0:
        return None
    below = np.concatenate(([0], np.cumsum(neg)[:-1]))
    wins = float((pos * (below + 0.5 * neg)).sum())
    return wins / (n0 * n1), n0, n1


def _hanley_mcneil(a: float, n0: int, n1: int) -> Metric:
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n0 * n1)
    return _normal(a, math.sqrt(max(var, 0.0)), n0 + n1, "hanley-mcneil", 0.0, 1.0)


def _class_metrics(r: Realized) -> dict[str, Metric]:
    spec, cm = r.spec, r.cm
    n = int(cm.sum())
    tp = np.diag(cm)
    n_pred, n_true = cm.sum(axis=0), cm.sum(axis=1)
    out: dict[str, Metric] = {"accuracy": _rate(int(tp.sum()), n)}
    f1s: list[tuple[float, float]] = []
    for i, c in enumerate(spec.classes):
        out[f"precision[{c}]"] = _rate(int(tp[i]), int(n_pred[i]))
        out[f"recall[{c}]"] = _rate(int(tp[i]), int(n_true[i]))
        f1, var = _f1(float(tp[i]), float(n_pred[i] - tp[i]), float(n_true[i] - tp[i]), n)
        if f1 is None:
            out[f"f1[{c}]"] = Metric(None, None, None, 0, "delta")
        else:
            f1s.append((f1, var))
            out[f"f1[{c}]"] = _normal(f1, math.sqrt(var), n, "delta", 0.0, 1.0)
    if f1s:
        mean = sum(v for v, _ in f1s) / len(f1s)
        se = math.sqrt(sum(v for _, v in f1s)) / len(f1s)
        out["f1_macro"] = _normal(mean, se, n, "delta", 0.0, 1.0)
    else:
        out["f1_macro"] = Metric(None, None, None, 0, "delta")
    if spec.binary:
        pos = spec.classes[1]
        for name in ("precision", "recall", "f1"):
            out[name] = out[f"{name}[{pos}]"]
    for i, c in enumerate(spec.score_classes):
        auc = _auc(r.hist[i, 0], r.hist[i, 1])
        name = "auc" if spec.binary else f"auc[{spec.classes[c]}]"
        out[name] = Metric(None, None, None, 0, "hanley-mcneil") if auc is None \
            else _hanley_mcneil(*auc)
    scored = int(r.rel_n.sum())
    if scored:
        s, s2 = r.brier.tolist()
        mean = s / scored
        var = max(s2 / scored - mean * mean, 0.0)
        out["brier"] = _normal(mean, math.sqrt(var / scored), scored, "normal", 0.0)
        gap = np.abs(r.rel_p - r.rel_pos)  # n_b |mean_p - frac_pos|
        out["ece"] = Metric(float(gap.sum()) / scored, None, None, scored, "binned")
    else:
        out["brier"] = Metric(None, None, None, 0, "normal")
        out["ece"] = Metric(None, None, None, 0, "binned")
    return out


def _regression_metrics(n: int, err: np.ndarray) -> dict[str, Metric]:
    if n == 0:
        return {name: Metric(None, None, None, 0, method) for name, method in
                (("mae", "normal"), ("rmse", "delta"), ("bias", "normal"))}
    s, s2, sa, s4 = err.tolist()
    mae, mse, bias = sa / n, s2 / n, s / n
    rmse = math.sqrt(mse)
    var_abs = max(mse - mae * mae, 0.0)  # variance of |e|
    var_e = max(mse - bias * bias, 0.0)
    var_sq = max(s4 / n - mse * mse, 0.0)  # variance of e²
    se_rmse = math.sqrt(var_sq / n) / (2 * rmse) if rmse > 0 else 0.0
    return {"mae": _normal(mae, math.sqrt(var_abs / n), n, "normal", 0.0),
            "rmse": _normal(rmse, se_rmse, n, "delta", 0.0),
            "bias": _normal(bias, math.sqrt(var_e / n), n, "normal")}


# --------------------------------------------------------------------------- estimated


class Estimated(_Block):
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
            pred = _indices(pred, "predicted", k)
        p = np.asarray(calibrated, dtype=np.float64)
        if p.shape != pred.shape:
            raise SchemaError(f"calibrated: {p.shape} values for {pred.shape} predictions",
                              field="calibrated")
        if not len(p):
            return
        lo, hi = pred.min(), pred.max()
        if lo < 0 or hi >= k:
            _indices(pred, "predicted", k)  # raises, naming the index
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
        _same(self.spec, other.spec)
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
        out.rows = _counts(f, "n", k)
        out.q = _float_list(f, "q", f.raw("q"), k)
        out.v = _float_list(f, "v", f.raw("v"), k)
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
        out = {"accuracy": _normal(acc, math.sqrt(var), n, "cbpe", 0.0, 1.0)}
        if self.spec.binary:
            n0, n1 = int(self.rows[0]), int(self.rows[1])
            tp, v1 = float(self.q[1]), float(self.v[1])
            fn, v0 = n0 - float(self.q[0]), float(self.v[0])  # E[FN]: rows predicted 0, true 1
            none = Metric(None, None, None, 0, "cbpe")
            out["precision"] = _normal(tp / n1, math.sqrt(v1) / n1, n1, "cbpe", 0.0, 1.0) \
                if n1 else none
            pos = tp + fn
            if pos > 0:
                var = (fn * fn * v1 + tp * tp * v0) / pos ** 4
                out["recall"] = _normal(tp / pos, math.sqrt(var), n, "cbpe", 0.0, 1.0)
            else:
                out["recall"] = none
            d = tp + n1 + fn  # 2TP + FP + FN
            if d > 0:
                var = (4 * (n1 + fn) ** 2 * v1 + 4 * tp * tp * v0) / d ** 4
                out["f1"] = _normal(2 * tp / d, math.sqrt(var), n, "cbpe", 0.0, 1.0)
            else:
                out["f1"] = none
        else:
            for i, c in enumerate(self.spec.classes):
                rows = int(self.rows[i])
                out[f"precision[{c}]"] = Metric(None, None, None, 0, "cbpe") if not rows \
                    else _normal(float(self.q[i]) / rows, math.sqrt(float(self.v[i])) / rows,
                                 rows, "cbpe", 0.0, 1.0)
        return out

    def copy(self) -> Estimated:
        return Estimated.from_wire(self.spec, self.to_wire())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Estimated) and self.spec == other.spec \
            and self.to_wire() == other.to_wire()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Estimated({self.spec.task}, n={self.n}, calibrated={self.calibrated})"


# --------------------------------------------------------------------------- summary entry


@dataclass(frozen=True)
class PerformanceEntry:
    """One bundle's performance in a summary's window: the wire forms of its
    :class:`Realized` and :class:`Estimated` blocks (either may be absent).

    The summary checks the framing only (:meth:`from_dict`); the numbers are checked by
    ``Realized.from_wire`` / ``Estimated.from_wire`` with the bundle's spec, which only
    the server (holding the bundle's manifest) knows.
    """

    bundle: BundleRef
    realized: dict[str, Any] | None = None
    estimated: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle.to_dict(), "realized": self.realized,
                "estimated": self.estimated}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> PerformanceEntry:
        """Parse one entry's framing.

        Raises:
            SchemaError: a bad bundle reference, a block that is not an object (or
                holds a non-finite number), or an entry with neither block.
        """
        from edgefleet.contract.messages import BundleRef

        f = Fields(obj, where)
        bundle = BundleRef.from_dict(f.raw("bundle"), f"{where}.bundle")
        blocks = []
        for key in ("realized", "estimated"):
            raw = f.raw(key, None)
            if raw is not None:
                raw = f.mapping(key)
                # decode's fast parser refuses overflowing floats itself when it can
                if len(raw) > 8 or not (FAST_CHECKS_FLOATS or _finite(raw)):
                    raise f.bad(key, "at most 8 fields of finite numbers")
            blocks.append(raw)
        f.done()
        if blocks == [None, None]:
            raise f.bad("realized", "an entry holds a realized or an estimated block")
        return cls(bundle, blocks[0], blocks[1])


def _finite(value: Any, depth: int = 0) -> bool:
    """Whether every float in a block is finite (decode may skip the per-float hook)."""
    if depth > 4:
        return False
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(_finite(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(_finite(v, depth + 1) for v in value.values())
    return True
