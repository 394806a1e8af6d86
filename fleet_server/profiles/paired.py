"""Paired accuracy: two models' answers on the same labelled rows, McNemar's exact test.

A shadow candidate and the live model answer the same rows; when outcomes come back,
each row falls in one cell of McNemar's table (both right, live only, shadow only,
neither, :class:`~edgefleet.contract.messages.Paired`). The rows both got right or both
got wrong say nothing about which is better: only the discordant ones do, and under "the
two are equally accurate" each discordant row is the live model's with probability ½.
:func:`mcnemar_worse` is the exact one-sided p-value of the shadow being the less
accurate one. Paired, the comparison needs far fewer labels than two independent samples
would (the fairest online comparison there is).

Nothing here reads a store or decides a gate (:mod:`fleet_server.rollouts.gates` does).
"""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["EXACT_UP_TO", "mcnemar_worse"]

EXACT_UP_TO = 50_000  # discordant rows summed exactly; beyond, the normal approximation


def mcnemar_worse(live_only: int, shadow_only: int) -> float:
    """P(X ≥ live_only) for X ~ Binomial(live_only + shadow_only, ½): how likely a split
    at least this much in the live model's favour is when both are equally accurate (1.0
    without discordant rows). Exact up to :data:`EXACT_UP_TO` discordant rows, then the
    normal approximation with continuity correction.

    Raises:
        ValueError: a negative count.
    """
    if live_only < 0 or shadow_only < 0:
        raise ValueError("McNemar counts must be >= 0")
    m = live_only + shadow_only
    if m == 0 or live_only == 0:
        return 1.0
    if m > EXACT_UP_TO:
        z = (live_only - 0.5 - m / 2) / math.sqrt(m / 4)
        return 1 - NormalDist().cdf(z)
    # Σ_{k ≥ b} C(m, k) / 2^m in log space, largest term first
    log_half = m * math.log(0.5)
    lg = math.lgamma(m + 1)
    terms = [lg - math.lgamma(k + 1) - math.lgamma(m - k + 1) + log_half
             for k in range(live_only, m + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))
