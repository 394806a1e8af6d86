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
from typing import Any

import numpy as np

from edgefleet.contract.accumulate import (
    Categorical,
    Numeric,
    NumericBlock,
    state_for,
)
from edgefleet.contract.bins import (
    CONFIDENCE_EDGES,
    PROFILE_SCHEMA,
    CategoricalSpec,
    NumericSpec,
    ProfileSpec,
    categorical_spec,
    numeric_spec,
)
from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.wire import Fields, parse_json

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
        self.inputs = {s.name: state_for(s) for s in spec.inputs}
        self.outputs = {s.name: state_for(s) for s in spec.outputs}
        numeric = [(k, v) for k, v in self.inputs.items() if isinstance(v, Numeric)]
        self._numeric_names = tuple(k for k, _ in numeric)
        self._block = NumericBlock([v for _, v in numeric]) if len(numeric) > 1 else None
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
            if self._block is None or isinstance(state, Categorical):
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

    def one(state: Numeric | Categorical) -> list[Any]:
        if isinstance(state, Categorical):
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
            if isinstance(state, Categorical):
                keys = ("counts",)
            else:
                keys = ("counts", "sums", "missing", "min", "max", "m2")
            if len(item) != len(keys):
                raise SchemaError(f"{path}: expected {len(keys)} items", field=path)
            sf = Fields(dict(zip(keys, item, strict=True)), path)
            if isinstance(state, Numeric):
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
