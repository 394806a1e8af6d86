"""A profile's per-feature accumulators: what one window of served rows adds up to.

A numeric feature keeps per-slot counts and sums over its reference bins, missing,
out-of-range, min, max and M2 (Chan's parallel update), all mergeable by addition; a
categorical one keeps counts over its vocabulary, plus one slot for unseen values. Each
is fed whole numpy columns (``searchsorted`` into the edges, ``bincount``), so profiling
costs a few vectorised calls per batch. :class:`~edgefleet.contract.profile.Profile`
owns one accumulator per feature; nothing else should build them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgefleet.contract.bins import (
    _MAX,
    MAX_BINS,
    MAX_VOCAB,
    CategoricalSpec,
    FeatureBins,
    NumericSpec,
    missing_mask,
)
from edgefleet.contract.wire import Fields

__all__ = ["WIRE_ORDER_TOLERANCE", "Categorical", "Numeric", "NumericBlock", "state_for"]

WIRE_ORDER_TOLERANCE = 1e-5




class Numeric:
    __slots__ = ("counts", "hi", "inner", "lo", "m2", "max", "min", "missing", "spec", "sums")

    def __init__(self, spec: NumericSpec) -> None:
        self.spec = spec
        self.inner = np.asarray(spec.edges[1:-1], dtype=np.float64)
        self.lo, self.hi = spec.edges[0], spec.edges[-1]
        self.counts = np.zeros(spec.slots, dtype=np.int64)
        self.sums = np.zeros(spec.slots, dtype=np.float64)
        self.missing = 0
        self.min, self.max, self.m2 = math.inf, -math.inf, 0.0

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def mean(self) -> float | None:
        n = self.n
        return float(self.sums.sum() / n) if n else None

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64)
        ok = np.isfinite(x)
        v = x if ok.all() else x[ok]
        self.missing += int(x.size - v.size)
        if v.size == 0:
            return
        idx = np.searchsorted(self.inner, v, side="right") + 1
        idx[v < self.lo] = 0
        idx[v > self.hi] = self.spec.slots - 1
        slots = self.spec.slots
        counts = np.bincount(idx, minlength=slots)
        sums = np.bincount(idx, weights=v, minlength=slots)
        mean_b = float(sums.sum()) / v.size
        with np.errstate(over="ignore"):
            self._add(counts, sums, float(np.square(v - mean_b).sum()))
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    def _add(self, counts: np.ndarray, sums: np.ndarray, m2_b: float) -> None:
        # Chan et al.: the M2 of a union from the parts' sizes, means and M2s.
        n_a, n_b = self.n, int(counts.sum())
        if n_a and n_b:
            delta = float(sums.sum()) / n_b - float(self.sums.sum()) / n_a
            self.m2 = self.m2 + m2_b + delta * delta * n_a * n_b / (n_a + n_b)
        elif n_b:
            self.m2 = m2_b
        self.counts += counts
        self.sums += sums
        if not (math.isfinite(self.m2) and np.isfinite(self.sums).all()):
            # values near the float limit (|x| > ~1e154 squared) overflow; clamp so the
            # window can still be written as JSON and sent (the counts stay exact)
            self.m2 = _MAX if not math.isfinite(self.m2) else self.m2
            np.clip(np.nan_to_num(self.sums, nan=0.0, posinf=_MAX, neginf=-_MAX), -_MAX,
                    _MAX, out=self.sums)

    def merge(self, other: Numeric) -> None:
        self._add(other.counts, other.sums, other.m2)
        self.missing += other.missing
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def to_dict(self) -> dict[str, Any]:
        empty = self.n == 0
        return {"counts": self.counts.tolist(), "sums": self.sums.tolist(),
                "missing": self.missing, "min": None if empty else self.min,
                "max": None if empty else self.max, "m2": self.m2}

    @property
    def _span(self) -> float:
        return abs(self.spec.edges[0]) + abs(self.spec.edges[-1])

    def load(self, f: Fields, *, wire: bool = False) -> None:
        """Read a state; ``wire``: sums, min and max as :func:`to_wire` writes them
        (offsets from the anchors), turned back into values before they are checked."""
        counts = f.list("counts", max_len=MAX_BINS + 3)
        sums = f.list("sums", max_len=MAX_BINS + 3)
        for key, values in (("counts", counts), ("sums", sums)):
            if len(values) != self.spec.slots:
                raise f.bad(key, f"expected {self.spec.slots} bins for {self.spec.name}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**63
                   for c in counts):
            raise f.bad("counts", "must be non-negative 64-bit integers")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)
                   for s in sums):
            raise f.bad("sums", "must be finite numbers")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.sums = np.asarray(sums, dtype=np.float64)
        self.missing = f.int("missing")
        lo, hi = f.opt_float("min"), f.opt_float("max")
        if wire:
            self.sums = self.sums + self.counts * np.asarray(self.spec.anchors)
            lo = None if lo is None else lo + self.spec.edges[0]
            hi = None if hi is None else hi + self.spec.edges[-1]
            if not (np.isfinite(self.sums).all() and (lo is None or math.isfinite(lo))
                    and (hi is None or math.isfinite(hi))):
                raise f.bad("sums", "overflow when restored from the wire form")
            if lo is not None and hi is not None and lo > hi and \
                    lo - hi <= WIRE_ORDER_TOLERANCE * (abs(lo) + abs(hi) + self._span):
                hi = lo  # min == max, each rounded on its own: not out of order
        self.m2 = f.float("m2")
        if self.m2 < 0:
            raise f.bad("m2", "must be >= 0")
        if self.n and (lo is None or hi is None or lo > hi):
            raise f.bad("min", "min and max must be set and ordered when there are values")
        self.min = lo if lo is not None and self.n else math.inf
        self.max = hi if hi is not None and self.n else -math.inf


class Categorical:
    __slots__ = ("counts", "index", "known", "spec")

    def __init__(self, spec: CategoricalSpec) -> None:
        self.spec = spec
        k = len(spec.vocabulary)
        self.index = {c: i for i, c in enumerate(spec.vocabulary)}
        self.index.update({c: k for c in spec.tail})  # other
        self.counts = np.zeros(spec.slots, dtype=np.int64)

    @property
    def n(self) -> int:
        return int(self.counts[:-1].sum())

    @property
    def missing(self) -> int:
        return int(self.counts[-1])

    def update(self, values: np.ndarray) -> None:
        arr = np.asarray(values)
        if arr.dtype.kind not in "biuf":
            arr = np.asarray(values, dtype=object)
        miss = missing_mask(arr)
        k = len(self.spec.vocabulary)
        self.counts[k + 2] += int(miss.sum())
        present = arr[~miss]
        if present.size == 0:
            return
        unseen = k + 1
        if present.dtype == object:
            uniq, inverse = np.unique(present.astype(str), return_inverse=True)
            keys = uniq.tolist()
        else:
            # numbers (a classifier's labels): unique on the numbers, then only the few
            # distinct values become text, as str() writes them (1 → "1", 1.5 → "1.5")
            uniq, inverse = np.unique(present, return_inverse=True)
            keys = [str(u) for u in uniq.tolist()]
        codes = np.fromiter((self.index.get(u, unseen) for u in keys),
                            dtype=np.int64, count=len(keys))
        self.counts += np.bincount(codes[inverse], minlength=self.spec.slots)

    def merge(self, other: Categorical) -> None:
        self.counts += other.counts

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.tolist()}

    def load(self, f: Fields) -> None:
        counts = f.list("counts", max_len=MAX_VOCAB + 3)
        if len(counts) != self.spec.slots:
            raise f.bad("counts", f"expected {self.spec.slots} counters for {self.spec.name}")
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**63
                   for c in counts):
            raise f.bad("counts", "must be non-negative 64-bit integers")
        self.counts = np.asarray(counts, dtype=np.int64)


class NumericBlock:
    """All numeric features of a spec, updated together from one ``(n, F)`` matrix.

    One pass over the matrix instead of a dozen small numpy calls per feature: bin indices
    come from comparing every value with its feature's inner edges (padded with +inf to a
    common width), counts and per-bin sums from one ``bincount`` over slot numbers offset
    per feature. The counts are identical to :meth:`Numeric.update`'s; sums and M2 agree
    to floating-point rounding (they are accumulated in another order).
    """

    def __init__(self, states: list[Numeric]) -> None:
        self.states = states
        width = max(1, max(s.inner.size for s in states))
        self.inner = np.full((len(states), width), np.inf)
        for j, s in enumerate(states):
            self.inner[j, : s.inner.size] = s.inner
        self.lo = np.array([s.lo for s in states])
        self.hi = np.array([s.hi for s in states])
        slots = np.array([s.spec.slots for s in states])
        self.top = slots - 1
        self.offsets = np.concatenate([[0], np.cumsum(slots)])
        self.total = int(self.offsets[-1])

    def update(self, x: np.ndarray) -> None:
        n, width = x.shape
        finite = np.isfinite(x)
        all_finite = bool(finite.all())
        safe = x if all_finite else np.where(finite, x, 0.0)
        # slot = 1 + (inner edges <= v) + (v > max) - (v < min): below → 0, above → B + 1.
        # One (n, F) comparison per edge column is several times faster than one
        # searchsorted per feature, and gives the same slots (side="right").
        slot = np.ones(x.shape, dtype=np.int8)
        for k in range(self.inner.shape[1]):
            slot += safe >= self.inner[:, k]
        slot += safe > self.hi
        slot -= safe < self.lo
        idx = slot.astype(np.intp)
        idx += self.offsets[:-1]
        if all_finite:
            flat, vals = idx.ravel(), safe.ravel()
        else:
            flat, vals = idx[finite], safe[finite]
        counts = np.bincount(flat, minlength=self.total)
        sums = np.bincount(flat, weights=vals, minlength=self.total)
        n_ok = finite.sum(axis=0) if not all_finite else np.full(width, n)
        sum_ok = np.add.reduceat(sums, self.offsets[:-1])
        mean = np.divide(sum_ok, n_ok, out=np.zeros(width), where=n_ok > 0)
        dev = safe - mean
        if not all_finite:
            dev[~finite] = 0.0
        with np.errstate(over="ignore"):
            m2 = np.einsum("ij,ij->j", dev, dev)
        if n == 0:
            return
        if all_finite:
            lows, highs = safe.min(axis=0), safe.max(axis=0)
        else:
            lows = np.where(finite, safe, np.inf).min(axis=0)
            highs = np.where(finite, safe, -np.inf).max(axis=0)
        for j, state in enumerate(self.states):
            state.missing += int(n - n_ok[j])
            if n_ok[j] == 0:
                continue
            a, b = self.offsets[j], self.offsets[j + 1]
            state._add(counts[a:b], sums[a:b], float(m2[j]))
            state.min = min(state.min, float(lows[j]))
            state.max = max(state.max, float(highs[j]))


def state_for(spec: FeatureBins) -> Numeric | Categorical:
    return Numeric(spec) if isinstance(spec, NumericSpec) else Categorical(spec)
