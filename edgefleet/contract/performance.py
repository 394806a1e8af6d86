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

This module is the public face: it names everything above and holds the summary's
:class:`PerformanceEntry`; the pieces live beside it, one concept each
(``performance_spec``: the spec, edges and bounds; ``performance_realized`` and
``performance_estimated``: the two blocks; ``performance_metrics``: the metrics and
their intervals). Import from here.

This module does not join outcomes with predictions (the agent does), store blocks or
judge drops (the server does), and does not fit calibration maps (the packager does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgefleet.contract.performance_estimated import Estimated
from edgefleet.contract.performance_metrics import Metric, wilson
from edgefleet.contract.performance_realized import Realized
from edgefleet.contract.performance_spec import (
    DELAY_EDGES,
    ERROR_EDGES,
    MAX_CLASSES,
    MAX_ENTRIES,
    RELIABILITY_EDGES,
    SCORE_EDGES,
    PerformanceSpec,
)
from edgefleet.contract.wire import FAST_CHECKS_FLOATS, Fields

if TYPE_CHECKING:
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
