"""Request latency histograms: their edges, their formats, their sum and their p95.

A summary's latency histograms (and its shadow's) are versioned by ``latency_format``
(see :mod:`edgefleet.contract.messages`): format 2 is what agents send, format 1 is still
read. :func:`latency_p95` is the one reading of a p95 from a histogram.

This module knows nothing of messages beyond the reader of a histogram field.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.wire import Fields

__all__ = ["LATENCY_EDGES_BY_FORMAT", "LATENCY_EDGES_MS", "LATENCY_EDGES_V1_MS",
           "LATENCY_FORMAT", "latency_counts", "latency_format", "latency_p95",
           "merge_latency"]

# Request latency histogram (milliseconds), format 2: [0, 0.05), [0.05, 0.063), ...,
# [8000, 10000), [10000, inf). The edges are the Renard R10 preferred numbers (1, 1.25, 1.6,
# 2, 2.5, 3.15, 4, 5, 6.3, 8 per decade): log-spaced 1.25-1.28x apart, so a p95 is known to
# within about 25 %, and the 1-2-5 edges of format 1 are among them, so a format-2 histogram
# coarsens exactly onto format 1 (see merge_latency).
_R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
LATENCY_EDGES_MS = (0.05, 0.063, 0.08,
                    *(round(m * 10.0 ** e, 6) for e in range(-1, 4) for m in _R10), 10_000.0)
LATENCY_FORMAT = 2
# Format 1 (agents before format 2; a summary without ``latency_format``): 2-2.5x apart,
# too coarse for a 1.5 gate. Still decoded, so an agent upgraded late loses nothing.
LATENCY_EDGES_V1_MS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
LATENCY_EDGES_BY_FORMAT = {1: LATENCY_EDGES_V1_MS, 2: LATENCY_EDGES_MS}
_FORMAT_BY_SLOTS = {len(e) + 1: v for v, e in LATENCY_EDGES_BY_FORMAT.items()}


def latency_counts(f: Fields, key: str, fmt: int) -> tuple[int, ...]:
    slots = len(LATENCY_EDGES_BY_FORMAT[fmt]) + 1
    items = f.list(key, [], max_len=slots)
    if items and len(items) != slots:
        raise f.bad(key, f"expected {slots} counters (latency format {fmt})")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in items):
        raise f.bad(key, "must be non-negative integers")
    return tuple(items)


def latency_format(counts: Sequence[int]) -> int:
    """The latency format a histogram is in, by its number of counters (empty: current).

    Raises:
        SchemaError: a length no format has.
    """
    if not counts:
        return LATENCY_FORMAT
    try:
        return _FORMAT_BY_SLOTS[len(counts)]
    except KeyError:
        raise SchemaError(f"latency_counts: {len(counts)} counters match no latency format",
                          field="latency_counts") from None


def merge_latency(histograms: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """Sum latency histograms; empty ones are skipped.

    Histograms of one format add bucket by bucket. When format-1 histograms (old agents)
    are among them, every format-2 one is first coarsened onto the format-1 edges, which
    is exact (each format-1 edge is a format-2 edge): the sum then has format-1 resolution.

    Raises:
        SchemaError: a histogram whose length matches no format.
    """
    hists = [tuple(int(c) for c in h) for h in histograms if len(h)]
    if not hists:
        return ()
    formats = {latency_format(h) for h in hists}
    fmt = min(formats)
    if len(formats) > 1:
        hists = [h if latency_format(h) == fmt else _coarsen(h, fmt) for h in hists]
    out = [0] * len(hists[0])
    for h in hists:
        for i, c in enumerate(h):
            out[i] += c
    return tuple(out)


def _coarsen(counts: Sequence[int], fmt: int) -> tuple[int, ...]:
    src = LATENCY_EDGES_BY_FORMAT[latency_format(counts)]
    dst = LATENCY_EDGES_BY_FORMAT[fmt]
    out = [0] * (len(dst) + 1)
    for i, c in enumerate(counts):
        # bucket i of src is [src[i-1], src[i]); it lies inside the dst bucket of its low edge
        low = src[i - 1] if i else 0.0
        out[bisect.bisect_right(dst, low)] += c
    return tuple(out)


def latency_p95(counts: Sequence[int], q: float = 0.95) -> tuple[float, float] | None:
    """The bounds ``(low, high)`` in ms of the 95th-percentile latency of a histogram
    (or of the ``q`` quantile).

    The one reading of a p95 from a histogram (rollout gates, dashboard). A histogram
    only knows which bucket holds the p95, so both edges of that bucket are returned:
    ``low`` is 0 for the first bucket, ``high`` is ``inf`` for the overflow bucket. None
    for an empty histogram.

    Raises:
        SchemaError: a histogram whose length matches no format.
    """
    total = sum(counts)
    if total <= 0:
        return None
    edges = LATENCY_EDGES_BY_FORMAT[latency_format(counts)]
    rank = max(1, min(total, math.ceil(q * total)))
    seen = i = 0
    for i, c in enumerate(counts):  # noqa: B007 (i is the bucket after the loop)
        seen += c
        if seen >= rank:
            break
    return (edges[i - 1] if i else 0.0, edges[i] if i < len(edges) else math.inf)
