"""The drift statistics, vectorised over features: PSI, KS, Wasserstein, Jensen-Shannon, rates.

Every statistic is computed from two profiles' summaries (per-slot counts and sums,
missing, min, max, M2), never from raw rows: :func:`numeric_stats` and
:func:`categorical_stats` fill one ``dict`` of statistics per feature, for
:mod:`fleet_server.profiles.drift` to judge. Nothing here decides a verdict.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

from edgefleet.contract.profile import NumericSpec

__all__ = ["GRID", "SMOOTHING", "STAT_KEYS", "categorical_stats", "chi2_quantile",
           "noise_bounds", "numeric_stats", "rate_noise", "rates", "side_of"]

STAT_KEYS = (
    "psi", "psi_raw", "psi_bias", "ks", "ks_upper", "wasserstein", "wasserstein_lower",
    "wasserstein_bias", "wasserstein_excess", "js",
    "missing_rate", "missing_rate_base", "out_of_range_rate", "out_of_range_rate_base",
    "unseen_rate", "unseen_rate_base", "mean", "mean_base", "std", "std_base",
    "psi_noise", "ks_noise", "wasserstein_noise", "js_noise",
)
SMOOTHING = 0.5  # Jeffreys / Krichevsky–Trofimov pseudo-count per occupied slot
GRID = 17  # points per slot for the crossing term of the Wasserstein distance
# Chebyshev–Lobatto points: dense at the slot ends, where a skewed slot's CDF is steep
_T = (1 - np.cos(np.linspace(0.0, math.pi, GRID))) / 2
_DT = np.diff(_T) / 2  # trapezoid weights per segment
_SQRT_2_PI = math.sqrt(2 / math.pi)

# Features are stacked into (features × slots) arrays, padded at the end with empty
# zero-width slots (which add nothing to any statistic), so a comparison costs a fixed
# number of numpy calls however many features it has.


class _Side(NamedTuple):
    """One side's summary of one feature, read once from the profile's state."""

    counts: np.ndarray  # float64 over the compared slots (categorical: without missing)
    sums: np.ndarray  # numeric only (categorical: the counts again, unused)
    n: int  # present values
    missing: int
    low: float
    high: float
    m2: float


def side_of(state: Any) -> _Side:
    # reads the state objects' fields (see the report: a public accessor would be better)
    if isinstance(state.spec, NumericSpec):
        counts = state.counts.astype(np.float64)
        return _Side(counts, state.sums, int(state.counts.sum()), int(state.missing),
                     float(state.min), float(state.max), float(state.m2))
    counts = state.counts[:-1].astype(np.float64)
    return _Side(counts, counts, int(state.counts[:-1].sum()), int(state.counts[-1]),
                 0.0, 0.0, 0.0)


def _stack(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, :r.size] = r
    return out


def _psi(cb: np.ndarray, cl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw PSI over the occupied slots (smoothed) and its expected value under no drift."""
    occupied = (cb + cl) > 0
    q = np.where(occupied, cb + SMOOTHING, 0.0)
    p = np.where(occupied, cl + SMOOTHING, 0.0)
    q /= q.sum(axis=1, keepdims=True)
    p /= p.sum(axis=1, keepdims=True)
    terms = np.where(occupied, (p - q) * np.log(np.where(occupied, p / q, 1.0)), 0.0)
    bias = (occupied.sum(axis=1) - 1) * (1 / cl.sum(axis=1) + 1 / cb.sum(axis=1))
    return np.maximum(terms.sum(axis=1), 0.0), bias


def _js(cb: np.ndarray, cl: np.ndarray) -> np.ndarray:
    q = cb / cb.sum(axis=1, keepdims=True)
    p = cl / cl.sum(axis=1, keepdims=True)
    m = (p + q) / 2
    terms = (np.where(p > 0, p * np.log2(np.where(p > 0, p / m, 1.0)), 0.0)
             + np.where(q > 0, q * np.log2(np.where(q > 0, q / m, 1.0)), 0.0))
    return np.sqrt(np.clip(terms.sum(axis=1) / 2, 0.0, 1.0))


def _ks(cb: np.ndarray, cl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nb, nl = cb.sum(axis=1, keepdims=True), cl.sum(axis=1, keepdims=True)
    d = np.abs(np.cumsum(cl, axis=1) / nl - np.cumsum(cb, axis=1) / nb).max(axis=1)
    # inside a slot neither CDF leaves its range, so the gap grows by at most the mass
    # both sides put in that slot
    shared = np.minimum(cb / nb, cl / nl).max(axis=1)
    return d, np.minimum(d + shared, 1.0)


def _side_cdf(x: np.ndarray, starts: np.ndarray, ends: np.ndarray, counts: np.ndarray,
              sums: np.ndarray, low: np.ndarray, high: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray]:
    """One side's modelled CDF at the grid ``x`` and its exact integral over each slot.

    In a slot a side's values lie in ``[max(start, min), min(end, max)]``; on that
    support the model is the power-law CDF with the slot's mean: ``u^k`` (density
    ``k·u^(k-1)``, mean ``k/(k+1)``) for a mean right of centre, mirrored left of it.
    """
    p = counts / counts.sum(axis=1, keepdims=True)
    mean = np.clip(np.where(counts > 0, sums / counts, (starts + ends) / 2), starts, ends)
    before = np.cumsum(p, axis=1) - p
    area = before * (ends - starts) + p * (ends - mean)  # ∫F = F(a)(b−a) + E[(b−X); slot]
    lo = np.clip(low[:, None], starts, ends)
    span = np.clip(high[:, None], starts, ends) - lo
    wide = span > 0
    u = np.clip(np.where(wide[..., None], (x - lo[..., None]) / span[..., None],
                         x >= lo[..., None]), 0.0, 1.0)
    mu = np.clip(np.where(wide, (mean - lo) / span, 0.5), 1e-9, 1 - 1e-9)[..., None]
    right = mu >= 0.5
    g = np.where(right, u, 1 - u) ** np.where(right, mu / (1 - mu), (1 - mu) / mu)
    return before[..., None] + p[..., None] * np.where(right, g, 1 - g), area


def _wasserstein(starts: np.ndarray, ends: np.ndarray, base: tuple, live: tuple,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W1 (estimate, exact lower bound) in the features' units, and ``∫ sqrt(F(1−F))``
    of the base, which the no-drift expectation needs: the two-sample CDF difference is
    ``sqrt(1/n_live + 1/n_base)`` times a Brownian bridge ``B(F)``, and
    ``E|B(u)| = sqrt(2/π)·sqrt(u(1−u))``."""
    x = starts[..., None] + (ends - starts)[..., None] * _T
    fb, ab = _side_cdf(x, starts, ends, *base)
    fl, al = _side_cdf(x, starts, ends, *live)
    lower = np.abs(al - ab).sum(axis=1)
    d = fl - fb
    # trapezoid sums of |d| and of d: by the triangle inequality each slot adds >= 0, and
    # exactly 0 where the modelled difference keeps its sign
    excess = ((np.abs(d[..., 1:]) + np.abs(d[..., :-1])) @ _DT
              - np.abs((d[..., 1:] + d[..., :-1]) @ _DT))
    width = ends - starts
    root = np.sqrt(np.clip(fb * (1 - fb), 0.0, None))
    spread = (((root[..., 1:] + root[..., :-1]) @ _DT) * width).sum(axis=1)
    return lower + (excess * width).sum(axis=1), lower, spread


def _rate(part: float, whole: float) -> float | None:
    return float(part) / whole if whole > 0 else None


Item = tuple[Any, _Side, _Side]  # (spec, base, live)


def rates(spec: Any, b: _Side, lv: _Side) -> dict[str, float | None]:
    stats: dict[str, float | None] = dict.fromkeys(STAT_KEYS)
    stats["missing_rate_base"] = _rate(b.missing, b.n + b.missing)
    stats["missing_rate"] = _rate(lv.missing, lv.n + lv.missing)
    if isinstance(spec, NumericSpec):
        stats["out_of_range_rate_base"] = _rate(b.counts[0] + b.counts[-1], b.n)
        stats["out_of_range_rate"] = _rate(lv.counts[0] + lv.counts[-1], lv.n)
        if b.n:
            stats.update(mean_base=float(b.sums.sum()) / b.n, std_base=math.sqrt(b.m2 / b.n))
        if lv.n:
            stats.update(mean=float(lv.sums.sum()) / lv.n, std=math.sqrt(lv.m2 / lv.n))
    else:
        stats["unseen_rate_base"] = _rate(b.counts[-1], b.n)
        stats["unseen_rate"] = _rate(lv.counts[-1], lv.n)
    return stats


def numeric_stats(items: list[Item], out: list[dict[str, float | None]]) -> None:
    width = max(spec.slots for spec, _, _ in items)
    cb, cl, sb, sl = (_stack([getattr(item[j], key) for item in items], width)
                      for j, key in ((1, "counts"), (2, "counts"), (1, "sums"), (2, "sums")))
    starts, ends = np.empty((len(items), width)), np.empty((len(items), width))
    for i, (spec, b, lv) in enumerate(items):
        k = spec.slots
        lo, hi = min(spec.edges[0], b.low, lv.low), max(spec.edges[-1], b.high, lv.high)
        starts[i, 0], starts[i, 1:k], starts[i, k:] = lo, spec.edges, hi
        ends[i, :k - 1], ends[i, k - 1:] = spec.edges, hi
    lows = [np.array([item[j].low for item in items]) for j in (1, 2)]
    highs = [np.array([item[j].high for item in items]) for j in (1, 2)]
    with np.errstate(all="ignore"):
        raw, bias = _psi(cb, cl)
        ks, ks_upper = _ks(cb, cl)
        w, lower, spread = _wasserstein(starts, ends, (cb, sb, lows[0], highs[0]),
                                        (cl, sl, lows[1], highs[1]))
    columns = zip(items, out, raw.tolist(), bias.tolist(), ks.tolist(), ks_upper.tolist(),
                  w.tolist(), lower.tolist(), spread.tolist(), strict=True)
    for (_, b, lv), stats, psi_raw, psi_bias, d, d_up, w_i, low_i, spread_i in columns:
        stats.update(psi_raw=psi_raw, psi_bias=psi_bias, psi=max(psi_raw - psi_bias, 0.0),
                     ks=d, ks_upper=d_up)
        std = stats["std_base"]
        if std and all(map(math.isfinite, (std, w_i, low_i, spread_i))):
            null = _SQRT_2_PI * math.sqrt(1 / lv.n + 1 / b.n) * spread_i / std
            stats.update(wasserstein=w_i / std, wasserstein_lower=min(low_i, w_i) / std,
                         wasserstein_bias=null, wasserstein_excess=max(w_i / std - null, 0.0))


def categorical_stats(items: list[Item], out: list[dict[str, float | None]]) -> None:
    width = max(b.counts.size for _, b, _ in items)
    cb = _stack([b.counts for _, b, _ in items], width)
    cl = _stack([lv.counts for _, _, lv in items], width)
    with np.errstate(all="ignore"):
        raw, bias = _psi(cb, cl)
        js = _js(cb, cl)
    for stats, psi_raw, psi_bias, d in zip(out, raw.tolist(), bias.tolist(), js.tolist(),
                                           strict=True):
        stats.update(psi_raw=psi_raw, psi_bias=psi_bias, psi=max(psi_raw - psi_bias, 0.0),
                     js=d)


# --------------------------------------------------------------------------- noise bounds


def chi2_quantile(dof: int, p: float) -> float:
    """The ``p`` quantile of χ² with ``dof`` degrees of freedom (Wilson–Hilferty, stdlib
    only: for ``p ≥ 0.999`` it is slightly above the exact value, by at most 7 % at one
    degree of freedom and 2 % from three on, so a bound built on it errs on the quiet
    side)."""
    z = NormalDist().inv_cdf(p)
    k = 2 / (9 * dof)
    return dof * max(0.0, 1 - k + z * math.sqrt(k)) ** 3


def noise_bounds(stats: dict[str, float | None], n_base: int, n_live: int,
                 alpha: float) -> None:
    """Fill ``*_noise``: the value each judged statistic stays under, with probability
    about ``1 − alpha``, when both sides are samples of one distribution (``n_base`` and
    ``n_live`` present values). A small sample needs a larger statistic to count as drift;
    all four shrink as ``sqrt(1/n_base + 1/n_live)``, so on large samples the effect
    thresholds decide.

    - ``ks``: the two-sample Kolmogorov bound ``sqrt(ln(2/α)/2)·s`` (``s² = 1/n_base +
      1/n_live``); the binned ``ks`` is at most the raw-data ``D``, so it holds for it too.
    - ``wasserstein_excess``: the normalised distance is ``s`` times ``∫|B(F)|/σ`` of a
      Brownian bridge, a supremum of a Gaussian process whose largest variance is
      ``Var(∫B(F)) = σ²`` (Hoeffding's identity): by the Borell–TIS inequality it exceeds its
      mean (``wasserstein_bias``) by ``t`` with probability at most ``exp(−t²/2s²)``, so the
      excess stays under ``sqrt(2·ln(1/α))·s``. Conservative (the real spread is about
      0.6·s for a normal feature), and free of any assumption on the distribution.
    - ``psi``: ``s²·χ²(k−1)`` at ``1 − α`` minus its mean (the ``psi_bias`` subtracted),
      ``k`` the occupied slots (``psi_bias / s² + 1``).
    - ``js``: the divergence is about ``s²·χ²(k−1) / (8·ln 2)`` bits, so the distance's
      bound is the root of that at ``1 − α``.
    """
    if n_base <= 0 or n_live <= 0:
        return
    s2 = 1 / n_base + 1 / n_live
    s = math.sqrt(s2)
    if stats.get("ks") is not None:
        stats["ks_noise"] = min(1.0, math.sqrt(math.log(2 / alpha) / 2) * s)
    if stats.get("wasserstein_bias") is not None:
        stats["wasserstein_noise"] = math.sqrt(2 * math.log(1 / alpha)) * s
    bias = stats.get("psi_bias")
    if bias is None or not math.isfinite(bias):
        return
    dof = round(bias / s2)
    q = chi2_quantile(dof, 1 - alpha) * s2 if dof >= 1 else 0.0
    stats["psi_noise"] = max(q - bias, 0.0)
    if stats.get("js") is not None:
        stats["js_noise"] = min(1.0, math.sqrt(q / (8 * math.log(2))))


def rate_noise(live: float, base: float, n_live: int, n_base: int, alpha: float) -> float:
    """How far a rate may rise by chance, with probability about ``1 − alpha``: the
    one-sided bound of the pooled two-proportion test, ``z·sqrt(p̄(1−p̄)(1/n_live +
    1/n_base))``."""
    if n_live <= 0 or n_base <= 0:
        return 0.0
    pooled = (live * n_live + base * n_base) / (n_live + n_base)
    z = NormalDist().inv_cdf(1 - alpha)
    return z * math.sqrt(max(pooled * (1 - pooled), 0.0) * (1 / n_live + 1 / n_base))
