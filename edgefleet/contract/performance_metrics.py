"""The metrics of a performance block, each with its 95 % interval.

:class:`Metric` and the interval methods (Wilson, normal, delta, Hanley & McNeil) the
table in :mod:`edgefleet.contract.performance`'s docstring names, and the metrics of a
realized block's sums. Pure arithmetic over counts and sums.

This module reads blocks; it neither fills nor checks them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from edgefleet.contract.performance_realized import Realized

__all__ = ["Z95", "Metric", "class_metrics", "normal_metric", "regression_metrics", "wilson"]

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


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


def normal_metric(value: float, se: float, n: int, method: str = "normal",
            lo: float = -math.inf, hi: float = math.inf) -> Metric:
    se = se if math.isfinite(se) and se >= 0 else 0.0
    return Metric(value, max(lo, value - Z95 * se), min(hi, value + Z95 * se), int(n), method)

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
    return normal_metric(a, math.sqrt(max(var, 0.0)), n0 + n1, "hanley-mcneil", 0.0, 1.0)


def class_metrics(r: Realized) -> dict[str, Metric]:
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
            out[f"f1[{c}]"] = normal_metric(f1, math.sqrt(var), n, "delta", 0.0, 1.0)
    if f1s:
        mean = sum(v for v, _ in f1s) / len(f1s)
        se = math.sqrt(sum(v for _, v in f1s)) / len(f1s)
        out["f1_macro"] = normal_metric(mean, se, n, "delta", 0.0, 1.0)
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
        out["brier"] = normal_metric(mean, math.sqrt(var / scored), scored, "normal", 0.0)
        gap = np.abs(r.rel_p - r.rel_pos)  # n_b |mean_p - frac_pos|
        out["ece"] = Metric(float(gap.sum()) / scored, None, None, scored, "binned")
    else:
        out["brier"] = Metric(None, None, None, 0, "normal")
        out["ece"] = Metric(None, None, None, 0, "binned")
    return out


def regression_metrics(n: int, err: np.ndarray) -> dict[str, Metric]:
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
    return {"mae": normal_metric(mae, math.sqrt(var_abs / n), n, "normal", 0.0),
            "rmse": normal_metric(rmse, se_rmse, n, "delta", 0.0),
            "bias": normal_metric(bias, math.sqrt(var_e / n), n, "normal")}


