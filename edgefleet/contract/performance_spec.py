"""What a performance block is over: the spec, the edges, the bounds, the shared base.

The constants and the spec of :mod:`edgefleet.contract.performance` (read its docstring
for what the blocks hold), the :class:`Block` base both blocks extend, and the strict
readers of their wire lists. Kept apart so the realized and estimated blocks, and the
summary entry, share one copy.

This module accumulates nothing and computes no metric.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.wire import Fields

if TYPE_CHECKING:
    from edgefleet.contract.manifest import Manifest

__all__ = ["DELAY_EDGES", "ERROR_EDGES", "MAX_CLASSES", "MAX_ENTRIES", "MAX_ERROR",
           "MAX_ERROR_EDGES", "MAX_SCORE_CLASSES", "RELIABILITY_EDGES", "SCORE_EDGES", "TASKS",
           "Block", "PerformanceSpec", "count_list", "float_list", "index_array", "int_list",
           "same_spec"]

Label = int | str
TASKS = ("classification", "regression")
MAX_ENTRIES = 8  # performance entries per summary: bundles that answered in one window
MAX_SCORE_CLASSES = 16  # multi-class tasks beyond it keep no score histograms
# a k x k confusion matrix: 256 classes is 64 K counters (512 KiB on the server, and a
# mostly-zero list that deflates well); beyond it a block would not fit a message
MAX_CLASSES = 256


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


def index_array(x: Any, name: str, k: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise SchemaError(f"{name}: expected a 1-d array of class indices", field=name)
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= k):
        bad = arr[(arr < 0) | (arr >= k)][0]
        raise SchemaError(f"{name}: class index {int(bad)} outside 0..{k - 1}", field=name)
    return arr


_B = TypeVar("_B", bound="Block")


class Block:
    """What both blocks share: a spec, an exact merge, the sum of many, and copies and
    equality over the wire form."""

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

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls: type[_B], spec: PerformanceSpec, obj: Any, where: str = "block") -> _B:
        raise NotImplementedError

    def copy(self: _B) -> _B:
        return type(self).from_wire(self.spec, self.to_wire())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and self.spec == other.spec \
            and self.to_wire() == other.to_wire()

    __hash__ = None  # type: ignore[assignment]


def same_spec(a: PerformanceSpec, b: PerformanceSpec) -> None:
    if a != b:
        raise ReferenceMismatchError("cannot merge performance blocks over different specs "
                                     f"({a.task}, {a.k} classes vs {b.task}, {b.k} classes)")


def int_list(f: Fields, key: str, value: Any, size: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) != size:
        raise f.bad(key, f"expected a list of {size} counts")
    if not all(type(c) is int and 0 <= c < 2**62 for c in value):
        raise f.bad(key, "counts must be non-negative integers")
    return np.array(value, dtype=np.int64)


def count_list(f: Fields, key: str, size: int) -> np.ndarray:
    return int_list(f, key, f.raw(key), size)


def float_list(f: Fields, key: str, value: Any, size: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) != size:
        raise f.bad(key, f"expected a list of {size} numbers")
    if not all(type(x) in (int, float) and math.isfinite(x) for x in value):
        raise f.bad(key, "must be finite numbers")
    return np.array(value, dtype=np.float64)

