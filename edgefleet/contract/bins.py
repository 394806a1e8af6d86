"""A profile's bins: the reference edges and vocabularies every window is counted into.

:class:`NumericSpec` (edges from the training data's quantiles, an open tail each side)
and :class:`CategoricalSpec` (the training vocabulary, one slot for unseen values), and
:class:`ProfileSpec`, the bins of every input and output of one bundle, whose hash
(``reference_hash``) decides which summaries may ever be merged. Nothing here counts rows:
that is :mod:`edgefleet.contract.accumulate`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from typing import Any

import numpy as np

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.wire import Fields, canonical_json, sha256_hex

__all__ = [
    "CONFIDENCE_EDGES",
    "DEFAULT_BINS",
    "MAX_BINS",
    "MAX_VOCAB",
    "PROFILE_SCHEMA",
    "CategoricalSpec",
    "FeatureBins",
    "NumericSpec",
    "ProfileSpec",
    "categorical_spec",
    "missing_mask",
    "numeric_spec",
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


def missing_mask(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == object:
        # elementwise: None, and NaN (the only value unequal to itself)
        return np.asarray((arr == None) | (arr != arr), dtype=bool)  # noqa: E711
    if arr.dtype.kind == "f":
        return ~np.isfinite(arr)
    return np.zeros(arr.shape, dtype=bool)




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
    present = arr[~missing_mask(arr)].astype(str)
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
