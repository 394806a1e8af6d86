"""Feature profiles: reference bins, vectorised accumulation, exact merge, wire form.

One module computes the training reference (in ``edgepack``), the live window
summaries (on the device) and the merged views (on the server), so what is compared is
computed the same way everywhere.

A :class:`ProfileSpec` fixes the bins: for a numeric feature, edges ``e0 < ... < eB``
at quantiles of the reference (``e0`` its min, ``eB`` its max), giving ``B + 2``
counters ``[below e0, [e0,e1), ..., [e(B-1),eB], above eB]``; for a categorical feature,
the top-K reference categories that cover the mass (K <= 64), then ``other`` (seen in
the reference but outside the top K), ``unseen`` (never seen) and ``missing``.
Predictions are profiled the same way: a classifier's class mix (categorical) and
top-class confidence (numeric, fixed edges); a regressor's value (numeric, reference
quantiles). ``reference_hash`` is the sha256 of the spec's canonical JSON.

A :class:`Profile` holds, per numeric feature, per-bin counts and sums, missing,
min, max and M2 (the sum of squared deviations; the mean is sum/n). Merging adds
counts and sums and combines M2 with Chan's formula, so
``merge(profile(a), profile(b)) == profile(a + b)``: exactly for every count, min and
max; to floating-point rounding for sums and M2. Non-finite numbers (NaN, inf) and
``None`` count as missing.

This module does not judge drift (the server does) and does not encode messages
(see :mod:`edgefleet.contract.messages`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from typing import Any

import numpy as np

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.wire import Fields, canonical_json, parse_json, sha256_hex

__all__ = [
    "CONFIDENCE_EDGES",
    "CategoricalSpec",
    "NumericSpec",
    "Profile",
    "ProfileSpec",
    "categorical_spec",
    "from_wire",
    "numeric_spec",
    "parse_reference",
    "to_wire",
]

PROFILE_SCHEMA = 1
DEFAULT_BINS = 10
MAX_BINS = 32
MAX_VOCAB = 64
MAX_TAIL = 1024
COVERAGE = 0.99
_MAX = float(np.finfo(np.float64).max)
# Top-class confidence: fine near 1, where a healthy classifier's mass sits.
CONFIDENCE_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class NumericSpec:
    name: str
    edges: tuple[float, ...]  # non-decreasing; strictly increasing unless a constant

    @property
    def bins(self) -> int:
        return len(self.edges) - 1

    @property
    def slots(self) -> int:  # below + bins + above
        return len(self.edges) + 1

    @property
    def anchors(self) -> tuple[float, ...]:
        """Per slot, the edge the wire form measures that slot's sum and bounds from:
        ``e0`` for the slot below the range and the first bin, then each bin's left edge,
        and ``eB`` for the slot above."""
        e = self.edges
        return (e[0], *e[:-1], e[-1])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "numeric", "edges": list(self.edges)}


@dataclass(frozen=True)
class CategoricalSpec:
    name: str
    vocabulary: tuple[str, ...]  # top-K by reference frequency
    tail: tuple[str, ...] = ()  # the other reference categories, sorted (bounded)
    tail_complete: bool = True  # False: the tail was cut; "other" may hold unseen ones

    @property
    def slots(self) -> int:  # vocabulary + other + unseen + missing
        return len(self.vocabulary) + 3

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "categorical", "vocabulary": list(self.vocabulary),
                "tail": list(self.tail), "tail_complete": self.tail_complete}


FeatureBins = NumericSpec | CategoricalSpec


def _spec_from_dict(obj: Any, where: str) -> FeatureBins:
    f = Fields(obj, where)
    name = f.str("name", max_len=128)
    kind = f.choice("kind", ("numeric", "categorical"))
    if kind == "numeric":
        edges = f.list("edges", max_len=MAX_BINS + 1)
        if len(edges) < 2 or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e)
            for e in edges
        ):
            raise f.bad("edges", "need at least two finite numbers")
        edges_t = tuple(float(e) for e in edges)
        if any(b < a for a, b in pairwise(edges_t)) or (
            len(edges_t) > 2 and any(b <= a for a, b in pairwise(edges_t))
        ):
            raise f.bad("edges", "must be strictly increasing")
        f.done()
        return NumericSpec(name, edges_t)
    vocab = f.list("vocabulary", max_len=MAX_VOCAB)
    tail = f.list("tail", max_len=MAX_TAIL)
    if not all(isinstance(v, str) for v in [*vocab, *tail]):
        raise f.bad("vocabulary", "categories must be strings")
    if len(set(vocab) | set(tail)) != len(vocab) + len(tail):
        raise f.bad("vocabulary", "categories must be unique")
    out = CategoricalSpec(name, tuple(vocab), tuple(tail), f.bool("tail_complete"))
    f.done()
    return out


@dataclass(frozen=True)
class ProfileSpec:
    """The bins of every input feature and every profiled output."""

    inputs: tuple[FeatureBins, ...]
    outputs: tuple[FeatureBins, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"schema": PROFILE_SCHEMA, "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "spec") -> ProfileSpec:
        f = Fields(obj, where)
        if f.int("schema") != PROFILE_SCHEMA:
            raise f.bad("schema", f"unsupported profile schema (expected {PROFILE_SCHEMA})")
        inputs = tuple(_spec_from_dict(o, f"{where}.inputs[{i}]")
                       for i, o in enumerate(f.list("inputs", max_len=4096)))
        outputs = tuple(_spec_from_dict(o, f"{where}.outputs[{i}]")
                        for i, o in enumerate(f.list("outputs", max_len=16)))
        f.done()
        for group, specs in (("inputs", inputs), ("outputs", outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise f.bad(group, "names must be unique")
        return cls(inputs, outputs)

    @cached_property
    def reference_hash(self) -> str:
        # cached: a frozen spec never changes, and every Profile and from_wire asks
        return sha256_hex(canonical_json(self.to_dict()))

    def input(self, name: str) -> FeatureBins:
        for s in self.inputs:
            if s.name == name:
                return s
        raise KeyError(name)


def numeric_spec(name: str, values: np.ndarray, bins: int = DEFAULT_BINS) -> NumericSpec:
    """Equal-mass bins on the finite reference values (duplicates collapse).

    Raises:
        SchemaError: no finite value, or ``bins`` outside 1..32.
    """
    if not 1 <= bins <= MAX_BINS:
        raise SchemaError(f"{name}: bins must be between 1 and {MAX_BINS}", field=name)
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise SchemaError(f"{name}: no finite value to build reference bins from", field=name)
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size == 1:
        edges = np.array([edges[0], edges[0]])
    return NumericSpec(name, tuple(float(e) for e in edges))


def categorical_spec(name: str, values: Iterable[Any], max_vocab: int = MAX_VOCAB,
                     coverage: float = COVERAGE) -> CategoricalSpec:
    """Top categories covering ``coverage`` of the non-missing mass, at most ``max_vocab``.

    Ties are broken by the category's text, so the spec is deterministic.
    """
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=object)
    present = arr[~_missing_mask(arr)].astype(str)
    if present.size == 0:
        return CategoricalSpec(name, (), (), True)
    cats, counts = np.unique(present, return_counts=True)
    order = sorted(range(len(cats)), key=lambda i: (-int(counts[i]), str(cats[i])))
    total, acc, vocab = int(counts.sum()), 0, []
    for i in order:
        if len(vocab) >= max_vocab or acc >= coverage * total:
            break
        vocab.append(str(cats[i]))
        acc += int(counts[i])
    rest = sorted(set(map(str, cats)) - set(vocab))
    return CategoricalSpec(name, tuple(vocab), tuple(rest[:MAX_TAIL]), len(rest) <= MAX_TAIL)


# --------------------------------------------------------------------------- states


def _missing_mask(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == object:
        # elementwise: None, and NaN (the only value unequal to itself)
        return np.asarray((arr == None) | (arr != arr), dtype=bool)  # noqa: E711
    if arr.dtype.kind == "f":
        return ~np.isfinite(arr)
    return np.zeros(arr.shape, dtype=bool)


class _Numeric:
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

    def merge(self, other: _Numeric) -> None:
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


class _Categorical:
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
        miss = _missing_mask(arr)
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

    def merge(self, other: _Categorical) -> None:
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


class _NumericBlock:
    """All numeric features of a spec, updated together from one ``(n, F)`` matrix.

    One pass over the matrix instead of a dozen small numpy calls per feature: bin indices
    come from comparing every value with its feature's inner edges (padded with +inf to a
    common width), counts and per-bin sums from one ``bincount`` over slot numbers offset
    per feature. The counts are identical to :meth:`_Numeric.update`'s; sums and M2 agree
    to floating-point rounding (they are accumulated in another order).
    """

    def __init__(self, states: list[_Numeric]) -> None:
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


def _state(spec: FeatureBins) -> _Numeric | _Categorical:
    return _Numeric(spec) if isinstance(spec, NumericSpec) else _Categorical(spec)


# --------------------------------------------------------------------------- profile


class Profile:
    """Mutable accumulator over one :class:`ProfileSpec`.

    ``update`` takes whole columns (numpy arrays), so a caller buffers single rows
    and profiles them in chunks.
    """

    def __init__(self, spec: ProfileSpec) -> None:
        self.spec = spec
        self.reference_hash = spec.reference_hash
        self.rows = 0
        self.inputs = {s.name: _state(s) for s in spec.inputs}
        self.outputs = {s.name: _state(s) for s in spec.outputs}
        numeric = [(k, v) for k, v in self.inputs.items() if isinstance(v, _Numeric)]
        self._numeric_names = tuple(k for k, _ in numeric)
        self._block = _NumericBlock([v for _, v in numeric]) if len(numeric) > 1 else None
        self._all_numeric = len(numeric) == len(self.inputs)

    def update(self, columns: Mapping[str, Any], outputs: Mapping[str, Any] | None = None,
               rows: int | None = None, *, matrix: np.ndarray | None = None) -> None:
        """Add a batch. ``columns`` maps every input feature to its values.

        ``matrix``, for a spec whose inputs are all numeric, is the same data as one
        ``(n, F)`` float64 array in spec order; it saves stacking the columns again.

        Raises:
            SchemaError: a feature of the spec is missing from ``columns``.
        """
        for name in self.inputs:
            if name not in columns:
                raise SchemaError(f"profile update: feature {name!r} missing", field=name)
        if self._block is not None:
            if matrix is None or not self._all_numeric:
                matrix = np.column_stack([np.asarray(columns[n], dtype=np.float64)
                                          for n in self._numeric_names])
            self._block.update(np.asarray(matrix, dtype=np.float64))
        for name, state in self.inputs.items():
            if self._block is None or isinstance(state, _Categorical):
                state.update(columns[name])
        for name, values in (outputs or {}).items():
            if name in self.outputs:
                self.outputs[name].update(values)
        if rows is None:
            first = next(iter(columns.values()), ())
            rows = len(first)
        self.rows += int(rows)

    def merge(self, other: Profile) -> Profile:
        """Add ``other`` into this profile in place and return self.

        Raises:
            ReferenceMismatchError: the two profiles use different reference bins.
        """
        if other.reference_hash != self.reference_hash:
            raise ReferenceMismatchError(
                f"cannot merge profiles over different references "
                f"({self.reference_hash[:12]}… vs {other.reference_hash[:12]}…)")
        for group, theirs in ((self.inputs, other.inputs), (self.outputs, other.outputs)):
            for name, state in group.items():
                state.merge(theirs[name])  # type: ignore[arg-type]
        self.rows += other.rows
        return self

    @classmethod
    def merged(cls, spec: ProfileSpec, profiles: Iterable[Profile]) -> Profile:
        total = cls(spec)
        for p in profiles:
            total.merge(p)
        return total

    def copy(self) -> Profile:
        return Profile.from_dict(self.to_dict(), self.spec)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PROFILE_SCHEMA,
            "reference_hash": self.reference_hash,
            "rows": self.rows,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
        }

    @classmethod
    def from_dict(cls, obj: Any, spec: ProfileSpec, where: str = "profile") -> Profile:
        """Load a profile document for ``spec``.

        Raises:
            ReferenceMismatchError: the document's reference_hash is not the spec's.
            SchemaError: a malformed field, named.
        """
        f = Fields(obj, where)
        if f.int("schema") != PROFILE_SCHEMA:
            raise f.bad("schema", f"unsupported profile schema (expected {PROFILE_SCHEMA})")
        prof = cls(spec)
        ref = f.str("reference_hash", max_len=64)
        if ref != prof.reference_hash:
            raise ReferenceMismatchError(
                f"{where}.reference_hash {ref[:12]}… is not this reference's "
                f"{prof.reference_hash[:12]}…")
        prof.rows = f.int("rows")
        for key, states in (("inputs", prof.inputs), ("outputs", prof.outputs)):
            doc = f.mapping(key)
            if set(doc) != set(states):
                raise f.bad(key, f"features {sorted(doc)} differ from the reference's "
                                 f"{sorted(states)}")
            for name, state in states.items():
                sf = Fields(doc[name], f"{where}.{key}.{name}")
                state.load(sf)
                sf.done()
        f.done()
        return prof

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Profile) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Profile(rows={self.rows}, reference={self.reference_hash[:12]}…)"


# --------------------------------------------------------------------------- wire form


# min and max travel rounded to 6 digits, each from its own edge: one constant value can
# come back as min a hair above max. An inversion this small is rounding, not malformation.
WIRE_ORDER_TOLERANCE = 1e-5


def _r5(x: float) -> float:
    # 5 significant digits (relative error <= 5e-5) for sums and M2: a bin's mean and the
    # std come out to 5e-5 relative, far finer than any drift statistic resolves, in 60 %
    # of the bytes of a float64's shortest repr
    r = float(f"{x:.5g}")
    return r if math.isfinite(r) else x  # rounding up past the float limit: keep x


def _r6(x: float) -> float:
    # min and max bound the outer slots: one more digit, two numbers a feature
    r = float(f"{x:.6g}")
    return r if math.isfinite(r) else x


def to_wire(profile: Profile) -> dict[str, Any]:
    """The compact, positional form a summary message carries.

    Features are in spec order (the reference fixes the order and the names), so the wire
    form holds numbers only: a numeric feature is ``[counts, offsets, missing, min, max,
    m2]`` and a categorical one ``[counts]``. Counts stay exact. A slot's sum travels as
    its offset from ``count x anchor`` (:attr:`NumericSpec.anchors`: the slot's left edge),
    min as ``min - e0`` and max as ``max - eB``: what is rounded (offsets and M2 to 5
    significant digits, min and max to 6) is then the spread within the bins, not the
    feature's level, so a pressure of 101,325 ± 10 Pa keeps its per-bin means as well as
    one around 0. 20 numeric features with 10 bins take under 2 KB once the message is
    deflated (benchmarks/agent.py).
    """

    def one(state: _Numeric | _Categorical) -> list[Any]:
        if isinstance(state, _Categorical):
            return [state.counts.tolist()]
        empty = state.n == 0
        anchors = np.asarray(state.spec.anchors)
        offsets = state.sums - state.counts * anchors
        lo, hi = state.spec.edges[0], state.spec.edges[-1]
        return [state.counts.tolist(), [_r5(x) for x in offsets.tolist()], state.missing,
                None if empty else _r6(state.min - lo), None if empty else _r6(state.max - hi),
                _r5(state.m2)]

    return {"reference_hash": profile.reference_hash, "rows": profile.rows,
            "in": [one(s) for s in profile.inputs.values()],
            "out": [one(s) for s in profile.outputs.values()]}


def from_wire(obj: Any, spec: ProfileSpec, where: str = "profile") -> Profile:
    """Rebuild a profile from :func:`to_wire` output for ``spec``.

    Raises:
        ReferenceMismatchError: the wire form names another reference.
        SchemaError: a malformed or mis-sized field, named.
    """
    f = Fields(obj, where)
    ref = f.str("reference_hash", max_len=64)
    prof = Profile(spec)
    if ref != prof.reference_hash:
        raise ReferenceMismatchError(f"{where}.reference_hash {ref[:12]}… is not this "
                                     f"reference's {prof.reference_hash[:12]}…")
    prof.rows = f.int("rows")
    for key, states in (("in", prof.inputs), ("out", prof.outputs)):
        items = f.list(key, max_len=4096)
        if len(items) != len(states):
            raise f.bad(key, f"{len(items)} features, the reference has {len(states)}")
        for item, (name, state) in zip(items, states.items(), strict=True):
            path = f"{where}.{key}.{name}"
            if not isinstance(item, list):
                raise SchemaError(f"{path}: expected a list", field=path)
            if isinstance(state, _Categorical):
                keys = ("counts",)
            else:
                keys = ("counts", "sums", "missing", "min", "max", "m2")
            if len(item) != len(keys):
                raise SchemaError(f"{path}: expected {len(keys)} items", field=path)
            sf = Fields(dict(zip(keys, item, strict=True)), path)
            if isinstance(state, _Numeric):
                state.load(sf, wire=True)
            else:
                state.load(sf)
            sf.done()
    f.done()
    return prof


# --------------------------------------------------------------------------- reference.json

REFERENCE_SCHEMA = 1
MAX_REFERENCE_BYTES = 16 * 1024 * 1024


def parse_reference(data: bytes, where: str = "reference.json") -> tuple[ProfileSpec, Profile]:
    """Read a bundle's ``reference.json``: the bins and the training data's profile.

    The document is ``{"schema", "reference_hash", "spec", "profile"}`` as the packager
    writes it (``packager.reference.build_reference``). The stated hash must be the
    spec's own, so a reference cannot claim another bundle's bins.

    Raises:
        SchemaError: not JSON, a malformed field (named), or a hash that is not the spec's.
        ReferenceMismatchError: the profile is over other bins than the spec.
    """
    f = Fields(parse_json(data, what=where, max_bytes=MAX_REFERENCE_BYTES), where)
    if f.int("schema") != REFERENCE_SCHEMA:
        raise f.bad("schema", f"unsupported reference schema (expected {REFERENCE_SCHEMA})")
    stated = f.str("reference_hash", max_len=64)
    spec = ProfileSpec.from_dict(f.raw("spec"), f"{where}.spec")
    if spec.reference_hash != stated:
        raise f.bad("reference_hash", f"{stated[:12]}… is not the hash of the spec "
                                      f"({spec.reference_hash[:12]}…)")
    profile = Profile.from_dict(f.raw("profile"), spec, f"{where}.profile")
    f.done()
    return spec, profile
