"""Pre-aggregated profiles: a flat numeric layout per reference, packed into bytes, merged in bulk.

A drift report over 10,000 devices cannot parse 10,000 x 60 summary documents; it merges
rollups instead. A rollup is the exact merge of the window summaries of one bundle, one
scope (a device, a group, or the whole fleet) and one time bucket, stored as two flat
arrays whose layout is fixed by the bundle's :class:`~edgefleet.contract.profile.ProfileSpec`:

- ``ints`` (int64): ``rows``, ``summaries``, then per feature (inputs, then outputs, in
  spec order) its bin counts and, for a numeric feature, its missing count;
- ``floats`` (float64): per numeric feature its per-bin sums, min, max and M2. An empty
  feature has min = +inf, max = -inf and M2 = 0, the identities of their merges.

Merging K rollups (a ``(K, n)`` stack) adds the ints and the sums, takes min and max, and
combines M2 with the K-way form of Chan's formula, ``M2 = Σ M2_i + Σ n_i (mean_i − mean)²``,
so ``to_profile(merge(pack(a), pack(b))) == Profile.merged([a, b])``: exactly for every count,
min and max; to floating-point rounding for sums and M2 (tested against the profile code).

Bytes are the ints' then the floats' native little-endian buffers; a blob's length is
checked against the layout before it is read, so a rollup of another layout never merges.

This module is pure: no SQL, no clock, no files. It does not judge drift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from edgefleet.contract.accumulate import WIRE_ORDER_TOLERANCE
from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.profile import (
    CategoricalSpec,
    NumericSpec,
    Profile,
    ProfileSpec,
)

__all__ = ["Layout", "Packed", "layout_for"]

_ROWS, _SUMMARIES = 0, 1
_HEAD = 2  # ints before the first feature
_MAX_COUNT = 2**53
_NUMBER = (int, float)
_INT, _NUMBERS = frozenset({int}), frozenset(_NUMBER)


@dataclass(frozen=True)
class _Feature:
    role: str  # "in" | "out"
    name: str
    numeric: bool
    slots: int
    counts_at: int  # into ints
    sums_at: int = -1  # into floats (numeric only); min, max, m2 follow the sums

    @property
    def missing_at(self) -> int:
        return self.counts_at + self.slots


@dataclass(frozen=True)
class Packed:
    """One rollup (or the merge of many): the layout's two arrays."""

    layout: Layout = field(repr=False)
    ints: np.ndarray = field(repr=False)
    floats: np.ndarray = field(repr=False)

    @property
    def rows(self) -> int:
        return int(self.ints[_ROWS])

    @property
    def summaries(self) -> int:
        return int(self.ints[_SUMMARIES])

    def to_bytes(self) -> bytes:
        return self.ints.astype("<i8", copy=False).tobytes() + \
            self.floats.astype("<f8", copy=False).tobytes()

    def merge(self, other: Packed) -> Packed:
        return self.layout.merge([self, other])

    def to_profile(self) -> Profile:
        """The merged :class:`Profile` (what :func:`fleet_server.profiles.drift.compare` takes)."""
        return self.layout.to_profile(self)


class Layout:
    """Where each feature's numbers sit in a rollup of one :class:`ProfileSpec`."""

    def __init__(self, spec: ProfileSpec) -> None:
        self.spec = spec
        self.reference_hash = spec.reference_hash
        feats: list[_Feature] = []
        ni, nf = _HEAD, 0
        for role, specs in (("in", spec.inputs), ("out", spec.outputs)):
            for s in specs:
                if isinstance(s, NumericSpec):
                    feats.append(_Feature(role, s.name, True, s.slots, ni, nf))
                    ni += s.slots + 1
                    nf += s.slots + 3
                else:
                    assert isinstance(s, CategoricalSpec)
                    feats.append(_Feature(role, s.name, False, s.slots, ni))
                    ni += s.slots
        self.features = tuple(feats)
        self._n_in, self._n_out = len(spec.inputs), len(spec.outputs)
        self.n_ints, self.n_floats = ni, nf
        self.nbytes = 8 * (ni + nf)
        num = [f for f in feats if f.numeric]
        self._num = num
        # column indices for the vectorised M2 merge
        self._count_cols = np.concatenate(
            [np.arange(f.counts_at, f.counts_at + f.slots) for f in num]) if num else \
            np.zeros(0, dtype=np.intp)
        self._sum_cols = np.concatenate(
            [np.arange(f.sums_at, f.sums_at + f.slots) for f in num]) if num else \
            np.zeros(0, dtype=np.intp)
        self._starts = np.cumsum([0] + [f.slots for f in num[:-1]]).astype(np.intp) \
            if num else np.zeros(0, dtype=np.intp)
        self._min_cols = np.array([f.sums_at + f.slots for f in num], dtype=np.intp)
        self._max_cols = self._min_cols + 1
        self._m2_cols = self._min_cols + 2
        # the wire form's sums, min and max are offsets from the bins' edges
        # (edgefleet.contract.profile.to_wire): per numeric feature, its anchors and outer edges
        num_specs = [s for s in (*spec.inputs, *spec.outputs) if isinstance(s, NumericSpec)]
        self._anchors = np.concatenate([np.asarray(s.anchors) for s in num_specs]) \
            if num_specs else np.zeros(0)
        self._lo_edges = np.array([s.edges[0] for s in num_specs])
        self._hi_edges = np.array([s.edges[-1] for s in num_specs])
        self._edges_of = {f.name + "\0" + f.role: (s.edges[0], s.edges[-1])
                          for f, s in zip(num, num_specs, strict=True)}

    # -- building ------------------------------------------------------------------------

    def empty(self) -> Packed:
        ints = np.zeros(self.n_ints, dtype=np.int64)
        floats = np.zeros(self.n_floats, dtype=np.float64)
        floats[self._min_cols] = math.inf
        floats[self._max_cols] = -math.inf
        return Packed(self, ints, floats)

    def pack_wire(self, wire: Any, where: str = "profile") -> Packed:
        """Check one summary's profile in wire form (:func:`edgefleet.contract.profile.to_wire`) and
        pack it.

        The checks are :func:`edgefleet.contract.profile.from_wire`'s, field for field (a property
        test holds them to it), without building a :class:`Profile`: at thousands of
        summaries a second, ``from_wire`` costs more than everything else in ingest. One
        deliberate difference: counts and rows past 2**53 are refused here (no window
        holds that many rows, and sums of such counts would overflow an int64 merge),
        where ``from_wire`` takes them up to 2**63.

        Raises:
            ReferenceMismatchError: the wire form names another reference.
            SchemaError: a malformed or mis-sized field, named.
        """
        rows, items = self._check_envelope(wire, where)
        self._check_shapes(items, where)
        self._check_values(items, where)
        return self._pack_items(rows, items, where)

    def _check_envelope(self, wire: Any, where: str) -> tuple[int, list[Any]]:
        """The wire object's own fields: reference, rows, the feature lists' lengths."""
        if type(wire) is not dict:
            raise SchemaError(f"{where}: expected an object", field=where)
        # the reference first, as from_wire does: a summary of another reference is a
        # mismatch whatever else is wrong with it
        if "reference_hash" not in wire:
            raise SchemaError(f"{where}.reference_hash: missing", field=f"{where}.reference_hash")
        ref = wire["reference_hash"]
        if type(ref) is not str or len(ref) > 64:
            raise SchemaError(f"{where}.reference_hash: expected a string of at most 64",
                              field=f"{where}.reference_hash")
        if ref != self.reference_hash:
            raise ReferenceMismatchError(f"{where}.reference_hash {ref[:12]}… is not this "
                                         f"reference's {self.reference_hash[:12]}…")
        for key in ("rows", "in", "out"):
            if key not in wire:
                raise SchemaError(f"{where}.{key}: missing", field=f"{where}.{key}")
        rows = wire["rows"]
        if type(rows) is not int or not 0 <= rows <= _MAX_COUNT:
            raise SchemaError(f"{where}.rows: expected an integer in 0..2**53",
                              field=f"{where}.rows")
        extra = sorted(set(wire) - {"reference_hash", "rows", "in", "out"})
        if extra:
            raise SchemaError(f"{where}: unknown field(s) {', '.join(map(repr, extra))}",
                              field=f"{where}.{extra[0]}")
        ins, outs = wire["in"], wire["out"]
        for key, items, n in (("in", ins, self._n_in), ("out", outs, self._n_out)):
            if type(items) is not list:
                raise SchemaError(f"{where}.{key}: expected a list", field=f"{where}.{key}")
            if len(items) != n:
                raise SchemaError(f"{where}.{key}: {len(items)} features, the reference has "
                                  f"{n}", field=f"{where}.{key}")
        return rows, [*ins, *outs]

    def _check_shapes(self, items: list[Any], where: str) -> None:
        """Each feature's item: its length, and the length of its counts and sums."""
        for f, item in zip(self.features, items, strict=True):
            want = 6 if f.numeric else 1
            if type(item) is not list or len(item) != want:
                path = f"{where}.{f.role}.{f.name}"
                raise SchemaError(f"{path}: expected a list of {want} items", field=path)
            if type(item[0]) is not list or len(item[0]) != f.slots:
                path = f"{where}.{f.role}.{f.name}.counts"
                raise SchemaError(f"{path}: expected {f.slots} non-negative integers",
                                  field=path)
            if f.numeric and (type(item[1]) is not list or len(item[1]) != f.slots):
                path = f"{where}.{f.role}.{f.name}.sums"
                raise SchemaError(f"{path}: expected {f.slots} finite numbers", field=path)

    def _check_values(self, items: list[Any], where: str) -> None:
        """Every scalar, count and sum, in bulk; only a refusal goes feature by feature."""
        # missing, min, max and M2 of every numeric feature, checked in bulk; only a
        # refusal goes feature by feature (_check_scalars) to name the culprit
        num_items = [item for f, item in zip(self.features, items, strict=True) if f.numeric]
        if num_items and not self._scalars_ok(num_items):
            for f, item in zip(self.features, items, strict=True):
                if f.numeric:
                    self._check_scalars(f"{where}.{f.role}.{f.name}", item,
                                        *self._edges_of[f.name + "\0" + f.role])
        # every count and every sum of the summary checked in one pass each (in C: map,
        # set, min, max); only a refusal goes back feature by feature to name the culprit
        counts = list(chain.from_iterable(item[0] for item in items))
        if not set(map(type, counts)) <= _INT or min(counts) < 0 or max(counts) > _MAX_COUNT:
            self._name_culprit(where, items, "counts")
        sums = list(chain.from_iterable(item[1] for item in num_items))
        if not set(map(type, sums)) <= _NUMBERS or not all(map(math.isfinite, sums)):
            self._name_culprit(where, items, "sums")

    def _pack_items(self, rows: int, items: list[Any], where: str) -> Packed:
        """Checked items into the flat arrays, the wire's offsets turned back into values."""
        int_parts: list[int] = [rows, 1]
        float_parts: list[float] = []
        for f, item in zip(self.features, items, strict=True):
            int_parts += item[0]
            if f.numeric:
                _, sums_f, missing, lo, hi, m2 = item
                if not any(item[0]):
                    lo, hi = math.inf, -math.inf
                int_parts.append(missing)
                float_parts += sums_f
                float_parts += (lo, hi, m2)
        ints = np.array(int_parts, dtype=np.int64)
        floats = np.array(float_parts, dtype=np.float64)
        if self._num:  # offsets back to values (empty features keep their ±inf)
            floats[self._sum_cols] += ints[self._count_cols] * self._anchors
            floats[self._min_cols] += self._lo_edges
            floats[self._max_cols] += self._hi_edges
            # min == max rounded each on its own can come back a hair apart
            lows = floats[self._min_cols]
            floats[self._max_cols] = np.where(np.isfinite(lows),
                                              np.maximum(floats[self._max_cols], lows),
                                              floats[self._max_cols])
            if not np.isfinite(floats[self._sum_cols]).all():
                raise SchemaError(f"{where}: sums overflow when restored from the wire form",
                                  field=where)
        return Packed(self, ints, floats)

    def _scalars_ok(self, items: list[list[Any]]) -> bool:
        missing = [it[2] for it in items]
        m2 = [it[5] for it in items]
        bounds = [x for it in items for x in (it[3], it[4]) if x is not None]
        if not (set(map(type, missing)) <= _INT and min(missing) >= 0
                and max(missing) <= _MAX_COUNT):
            return False
        if not (set(map(type, m2)) <= _NUMBERS and all(map(math.isfinite, m2))
                and min(m2) >= 0):
            return False
        if not (set(map(type, bounds)) <= _NUMBERS and all(map(math.isfinite, bounds))):
            return False
        for it, e0, eb in zip(items, self._lo_edges.tolist(), self._hi_edges.tolist(),
                              strict=True):
            lo, hi = it[3], it[4]  # offsets from e0 and eB: ordered once restored
            if (lo is None or hi is None or _inverted(lo + e0, hi + eb, e0, eb)) and any(
                    c for c in it[0] if type(c) is int):
                return False
        return True

    @staticmethod
    def _check_scalars(path: str, item: list[Any], e0: float, eb: float) -> None:
        """``missing``, ``min``, ``max`` and ``m2`` of one numeric feature (min and max as
        offsets from its outer edges ``e0`` and ``eb``)."""
        counts, _, missing, lo, hi, m2 = item
        if type(missing) is not int or not 0 <= missing <= _MAX_COUNT:
            raise SchemaError(f"{path}.missing: expected a non-negative integer",
                              field=f"{path}.missing")
        for name, x in (("min", lo), ("max", hi)):
            if x is not None and not (type(x) in _NUMBER and math.isfinite(x)):
                raise SchemaError(f"{path}.{name}: expected a finite number or null",
                                  field=f"{path}.{name}")
        if type(m2) not in _NUMBER or not math.isfinite(m2) or m2 < 0:
            raise SchemaError(f"{path}.m2: expected a finite number >= 0", field=f"{path}.m2")
        # counts are checked later (all features at once); here only whether there are any
        if any(c for c in counts if type(c) is int) and (
                lo is None or hi is None or _inverted(lo + e0, hi + eb, e0, eb)):
            raise SchemaError(f"{path}.min: min and max must be set and ordered when there "
                              "are values", field=f"{path}.min")

    def _name_culprit(self, where: str, items: list[Any], key: str) -> None:
        for f, item in zip(self.features, items, strict=True):
            path = f"{where}.{f.role}.{f.name}.{key}"
            if key == "counts":
                values = item[0]
                if not set(map(type, values)) <= _INT or min(values) < 0 or \
                        max(values) > _MAX_COUNT:
                    raise SchemaError(f"{path}: expected {f.slots} non-negative integers",
                                      field=path)
            elif f.numeric:
                values = item[1]
                if not set(map(type, values)) <= _NUMBERS or \
                        not all(map(math.isfinite, values)):
                    raise SchemaError(f"{path}: expected {f.slots} finite numbers", field=path)
        raise AssertionError("unreachable: a culprit was found above")  # pragma: no cover

    def pack_profile(self, profile: Profile, summaries: int = 1) -> Packed:
        """Pack a :class:`Profile` (tests, and references folded in bulk)."""
        if profile.reference_hash != self.reference_hash:
            raise SchemaError("profile: not this layout's reference", field="reference_hash")
        doc = profile.to_dict()
        packed = self.empty()
        ints, floats = packed.ints, packed.floats
        ints[_ROWS], ints[_SUMMARIES] = profile.rows, summaries
        for f in self.features:
            state = doc["inputs" if f.role == "in" else "outputs"][f.name]
            ints[f.counts_at:f.counts_at + f.slots] = state["counts"]
            if f.numeric:
                ints[f.missing_at] = state["missing"]
                floats[f.sums_at:f.sums_at + f.slots] = state["sums"]
                if state["min"] is not None:
                    floats[f.sums_at + f.slots] = state["min"]
                    floats[f.sums_at + f.slots + 1] = state["max"]
                floats[f.sums_at + f.slots + 2] = state["m2"]
        return packed

    def from_bytes(self, data: bytes) -> Packed:
        """Read one rollup.

        Raises:
            SchemaError: the blob's length is not this layout's.
        """
        ints, floats = self._split(self._stack([data]))
        return Packed(self, ints[0].copy(), floats[0].copy())

    # -- merging -------------------------------------------------------------------------

    def _stack(self, blobs: Sequence[bytes]) -> np.ndarray:
        for b in blobs:
            if len(b) != self.nbytes:
                raise SchemaError(f"rollup of {len(b)} bytes; this layout has {self.nbytes}",
                                  field="rollup")
        raw = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        return raw.reshape(len(blobs), self.nbytes)

    def _split(self, stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cut = 8 * self.n_ints
        ints = np.ascontiguousarray(stack[:, :cut]).view("<i8")
        floats = np.ascontiguousarray(stack[:, cut:]).view("<f8")
        return ints, floats

    def merge_bytes(self, blobs: Sequence[bytes]) -> Packed:
        """Merge packed blobs in one vectorised pass (an empty rollup if there are none).

        Raises:
            SchemaError: a blob's length is not this layout's.
        """
        if not blobs:
            return self.empty()
        ints, floats = self._split(self._stack(blobs))
        return self._grouped(ints, floats, np.zeros(len(blobs), dtype=np.intp), 1)[0]

    def merge(self, parts: Sequence[Packed]) -> Packed:
        if not parts:
            return self.empty()
        return self.merge_parts(parts, np.zeros(len(parts), dtype=np.intp), 1)[0]

    def merge_parts(self, parts: Sequence[Packed], groups: np.ndarray, n_groups: int,
                    blobs: Sequence[bytes] = (), blob_groups: Sequence[int] = ()
                    ) -> list[Packed]:
        """Merge ``parts`` (and stored ``blobs``) into ``n_groups`` results; ``groups[i]``
        (``blob_groups[i]``) says where each goes. Ingest merges a whole batch's new
        windows into their stored rollups this way, in one pass.

        Raises:
            SchemaError: a blob's length is not this layout's.
        """
        ints = [p.ints for p in parts]
        floats = [p.floats for p in parts]
        where = np.asarray(groups, dtype=np.intp)
        if blobs:
            bi, bf = self._split(self._stack(blobs))
            ints, floats = [bi, np.stack(ints)] if ints else [bi], \
                [bf, np.stack(floats)] if floats else [bf]
            where = np.concatenate([np.asarray(blob_groups, dtype=np.intp), where])
        elif not parts:
            return [self.empty() for _ in range(n_groups)]
        else:
            ints, floats = [np.stack(ints)], [np.stack(floats)]
        return self._grouped(np.concatenate(ints), np.concatenate(floats), where, n_groups)

    def merge_groups(self, blobs: Sequence[bytes], groups: np.ndarray, n_groups: int
                     ) -> list[Packed]:
        """Merge blobs into ``n_groups`` results; ``groups[i]`` says where blob ``i`` goes.

        One stacking for many merges: the evaluator merges every device's window and then
        each group's members from the same stack.

        Raises:
            SchemaError: a blob's length is not this layout's.
        """
        if not blobs:
            return [self.empty() for _ in range(n_groups)]
        ints, floats = self._split(self._stack(blobs))
        return self._grouped(ints, floats, np.asarray(groups, dtype=np.intp), n_groups)

    def _grouped(self, ints: np.ndarray, floats: np.ndarray, groups: np.ndarray,
                 n_groups: int) -> list[Packed]:
        """Every group's merge: a lone row is its own result, pairs (a stored rollup and one
        new window, the common case in ingest) merge elementwise, larger groups reduce.

        ``reduceat`` over a tall stack is slow on small groups (it touches every column of
        every row once per group boundary), so it is used only for many large groups.
        """
        order = np.argsort(groups, kind="stable")
        present, starts, sizes = np.unique(groups[order], return_index=True,
                                           return_counts=True)
        out: list[Packed | None] = [None] * n_groups
        one = sizes == 1
        for grp, row in zip(present[one].tolist(), order[starts[one]].tolist(), strict=True):
            out[grp] = Packed(self, ints[row], floats[row])
        two = sizes == 2
        if two.any():
            a, b = order[starts[two]], order[starts[two] + 1]
            ti, tf = self._merge_two(ints[a], floats[a], ints[b], floats[b])
            for k, grp in enumerate(present[two].tolist()):
                out[grp] = Packed(self, ti[k], tf[k])
        many = np.flatnonzero(sizes > 2)
        if len(many) > 16:
            rows = np.concatenate([order[starts[k]:starts[k] + sizes[k]] for k in many])
            bounds = np.concatenate([[0], np.cumsum(sizes[many])[:-1]])
            ti, tf = self._reduce_sorted(ints[rows], floats[rows], bounds)
            for k, grp in enumerate(present[many].tolist()):
                out[grp] = Packed(self, ti[k], tf[k])
        else:
            for k in many:
                rows = order[starts[k]:starts[k] + sizes[k]]
                ti, tf = self._reduce_sorted(ints[rows], floats[rows], np.zeros(1, np.intp))
                out[int(present[k])] = Packed(self, ti[0], tf[0])
        return [p if p is not None else self.empty() for p in out]

    def _merge_two(self, ia: np.ndarray, fa: np.ndarray, ib: np.ndarray, fb: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Row ``k`` of ``a`` merged with row ``k`` of ``b``, all rows at once (Chan's pair)."""
        ti, tf = ia + ib, fa + fb
        if self._num:
            tf[:, self._min_cols] = np.minimum(fa[:, self._min_cols], fb[:, self._min_cols])
            tf[:, self._max_cols] = np.maximum(fa[:, self._max_cols], fb[:, self._max_cols])
            na = np.add.reduceat(ia[:, self._count_cols], self._starts, axis=1)
            nb = np.add.reduceat(ib[:, self._count_cols], self._starts, axis=1)
            sa = np.add.reduceat(fa[:, self._sum_cols], self._starts, axis=1)
            sb = np.add.reduceat(fb[:, self._sum_cols], self._starts, axis=1)
            n = na + nb
            mean = (sa + sb) / np.maximum(n, 1)
            mean_a = np.where(na > 0, sa / np.maximum(na, 1), mean)
            mean_b = np.where(nb > 0, sb / np.maximum(nb, 1), mean)
            spread = na * np.square(mean_a - mean) + nb * np.square(mean_b - mean)
            tf[:, self._m2_cols] = fa[:, self._m2_cols] + fb[:, self._m2_cols] + spread
        return ti, tf

    def _reduce_sorted(self, ints: np.ndarray, floats: np.ndarray, starts: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Merge runs of rows (run ``k`` starts at ``starts[k]``): K-way Chan per run."""
        if len(starts) == 1:  # one run: plain reductions, no reduceat
            tot_i = ints.sum(axis=0, keepdims=True)
            tot_f = floats.sum(axis=0, keepdims=True)
            run = np.zeros(len(ints), dtype=np.intp)
        else:
            tot_i = np.add.reduceat(ints, starts, axis=0)
            tot_f = np.add.reduceat(floats, starts, axis=0)
            run = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(ints))))
        if self._num:
            for cols, ufunc in ((self._min_cols, np.minimum), (self._max_cols, np.maximum)):
                tot_f[:, cols] = ufunc.reduceat(floats[:, cols], starts, axis=0)
            # Chan, K-way: M2 = Σ M2_i + Σ n_i (mean_i − mean)², per run and feature
            n_i = np.add.reduceat(ints[:, self._count_cols], self._starts, axis=1)
            s_i = np.add.reduceat(floats[:, self._sum_cols], self._starts, axis=1)
            n = np.add.reduceat(n_i, starts, axis=0)
            mean = np.add.reduceat(s_i, starts, axis=0) / np.maximum(n, 1)
            mean_rows = mean[run]
            mean_i = np.where(n_i > 0, s_i / np.maximum(n_i, 1), mean_rows)
            spread = np.add.reduceat(n_i * np.square(mean_i - mean_rows), starts, axis=0)
            tot_f[:, self._m2_cols] = np.add.reduceat(floats[:, self._m2_cols], starts,
                                                      axis=0) + spread
        return tot_i, tot_f

    # -- reading -------------------------------------------------------------------------

    def to_profile(self, packed: Packed) -> Profile:
        """The :class:`Profile` a packed rollup stands for.

        Raises:
            SchemaError: the numbers break the profile's own rules (a corrupt rollup).
        """
        ints, floats = packed.ints, packed.floats
        doc: dict[str, Any] = {"schema": 1, "reference_hash": self.reference_hash,
                               "rows": int(ints[_ROWS]), "inputs": {}, "outputs": {}}
        for f in self.features:
            counts = ints[f.counts_at:f.counts_at + f.slots]
            state: dict[str, Any] = {"counts": counts.tolist()}
            if f.numeric:
                n = int(counts.sum())
                lo = float(floats[f.sums_at + f.slots])
                hi = float(floats[f.sums_at + f.slots + 1])
                state.update(sums=floats[f.sums_at:f.sums_at + f.slots].tolist(),
                             missing=int(ints[f.missing_at]),
                             min=lo if n else None, max=hi if n else None,
                             m2=max(0.0, float(floats[f.sums_at + f.slots + 2])))
            doc["inputs" if f.role == "in" else "outputs"][f.name] = state
        return Profile.from_dict(doc, self.spec, "rollup")

    def feature_rows(self, packed: Packed) -> dict[tuple[str, str], int]:
        """Non-missing values per ``(role, feature)``: cheap, without building a profile."""
        out = {}
        for f in self.features:
            counts = packed.ints[f.counts_at:f.counts_at + f.slots]
            out[(f.role, f.name)] = int(counts.sum() if f.numeric else counts[:-1].sum())
        return out


_CACHE: dict[str, Layout] = {}


def _inverted(lo: float, hi: float, e0: float, eb: float) -> bool:
    """min above max by more than the wire form's rounding (accumulate.WIRE_ORDER_TOLERANCE)."""
    return lo > hi and lo - hi > WIRE_ORDER_TOLERANCE * (abs(lo) + abs(hi) + abs(e0) + abs(eb))


def layout_for(spec: ProfileSpec) -> Layout:
    """The (cached) layout of ``spec``; layouts are immutable, so sharing them is safe."""
    ref = spec.reference_hash
    found = _CACHE.get(ref)
    if found is None:
        if len(_CACHE) > 1024:  # bounded: a server sees a few hundred bundles at most
            _CACHE.clear()
        found = _CACHE[ref] = Layout(spec)
    return found
