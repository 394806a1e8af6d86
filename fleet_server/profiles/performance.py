"""Performance judged against the packaging: expectations, tolerances, drops, time steps.

A bundle's expectation is what its card measured on the held-out rows at packaging
(``manifest.card.evaluation``): per metric a value and its 95 % interval. The live side is
a merged realized or estimated block's :class:`~edgefleet.contract.performance.Metric`
(value, interval, n). A *drop* is judged on effect size and evidence together:

- realized (or estimated) worse than expected by more than the tolerance: for a rate
  (accuracy, F1) ``value < expected − tolerance``; for an error (MAE, RMSE)
  ``value > expected · (1 + relative tolerance)``;
- and the live interval excludes the expectation (``high < expected``, or for an error
  ``low > expected``): a small window's noise cannot raise an alert;
- and at least ``min_n`` rows behind the live number (labelled rows for realized, served
  rows for the estimate), else the verdict is ``insufficient``.

The blocks themselves, their merge and their metrics are the contract's
(:mod:`edgefleet.contract.performance`); :func:`read_entry` and :func:`merged_blocks` are
the server's two uses of it (check an entry at ingest; merge stored entries), and
:func:`metric_values`, :func:`confusion_of`, :func:`reliability_of` turn a merged block
into plain values for the API. Nothing here reads the store, a clock or a socket.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.performance import (
    Estimated,
    PerformanceEntry,
    PerformanceSpec,
    Realized,
)
from edgefleet.contract.wire import canonical_json

__all__ = ["ERROR_METRICS", "ROLLUP_WIDTHS", "VERDICTS", "Drop", "Expected", "Tolerances",
           "add_blocks", "confusion_of", "entry_bytes", "expectations", "judge_drop",
           "main_metric", "merged_blocks", "metric_values", "read_entry", "reliability_of",
           "step_for"]

# metrics where lower is better; every other one (accuracy, F1, precision, recall, AUC)
# is a rate where higher is better
ERROR_METRICS = frozenset({"mae", "rmse", "brier", "ece"})
VERDICTS = ("ok", "drop", "insufficient", "unknown")
HOUR, DAY = 3600, 86400
# the widths of performance rollups: the steps of a report's series (step_for)
ROLLUP_WIDTHS = (HOUR, DAY)


def main_metric(task: str) -> str:
    """The metric a bundle is watched and gated on: accuracy, or MAE for a regressor."""
    return "mae" if task == "regression" else "accuracy"


def step_for(span_s: float) -> int:
    """The time step of a series over ``span_s`` seconds: hours up to two days, else days."""
    return HOUR if span_s <= 2 * DAY else DAY


@dataclass(frozen=True)
class Tolerances:
    """How far below its packaged expectation performance may fall before an alert.

    ``rate``: absolute, for accuracy-like metrics (0.05 = five points of accuracy);
    ``error``: relative, for MAE-like ones (0.25 = a quarter worse); ``min_labelled`` and
    ``min_served``: the rows a realized and an estimated judgement need.
    """

    rate: float = 0.05
    error: float = 0.25
    min_labelled: int = 200
    min_served: int = 500

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            where = f"performance.{f.name}"
            if f.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise SchemaError(f"{where}: must be an integer >= 1, got {value!r}",
                                      field=where)
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise SchemaError(f"{where}: must be a finite number >= 0, got {value!r}",
                                  field=where)
        if self.rate > 1:
            raise SchemaError("performance.rate: must be at most 1", field="performance.rate")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Expected:
    """One metric as measured at packaging (the card's evaluation)."""

    name: str
    value: float
    low: float | None
    high: float | None
    rows: int
    data: str  # held_out | training

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "low": self.low, "high": self.high,
                "rows": self.rows, "data": self.data}


def expectations(manifest: Mapping[str, Any]) -> dict[str, Expected]:
    """The packaged metrics of a manifest (as the store keeps it), by name; empty when its
    card has no evaluation (built before cards, or without labels)."""
    card = manifest.get("card") or {}
    ev = card.get("evaluation") if isinstance(card, Mapping) else None
    if not isinstance(ev, Mapping):
        return {}
    out = {}
    for m in ev.get("metrics") or ():
        value = m.get("value") if isinstance(m, Mapping) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[str(m["name"])] = Expected(str(m["name"]), float(value), m.get("low"),
                                           m.get("high"), int(ev.get("rows", 0)),
                                           str(ev.get("data", "")))
    return out


@dataclass(frozen=True)
class Drop:
    """A judgement of one live metric against its expectation."""

    verdict: str  # VERDICTS
    metric: str
    value: float | None
    low: float | None
    high: float | None
    n: int
    expected: float | None
    limit: float | None  # the value past which it is a drop
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "metric": self.metric, "value": self.value,
                "low": self.low, "high": self.high, "n": self.n, "expected": self.expected,
                "limit": self.limit, "reason": self.reason}


def judge_drop(metric: str, value: float | None, low: float | None, high: float | None,
               n: int, expected: Expected | None, tolerances: Tolerances, min_n: int) -> Drop:
    """Is ``metric`` (live ``value`` with its interval over ``n`` rows) a drop from
    ``expected``? See the module docstring for the rule."""
    if expected is None:
        return Drop("unknown", metric, value, low, high, n, None, None,
                    f"no packaged {metric} to compare with")
    if value is None or not math.isfinite(value) or n < min_n:
        return Drop("insufficient", metric, value, low, high, n, expected.value, None,
                    f"{n} rows of the {min_n} a judgement needs")
    e = expected.value
    if metric in ERROR_METRICS:
        limit = e * (1 + tolerances.error)
        bound = value if low is None else low
        worse, excluded = value > limit, bound > e
        word = "above"
    else:
        limit = e - tolerances.rate
        bound = value if high is None else high
        worse, excluded = value < limit, bound < e
        word = "below"
    if worse and excluded:
        return Drop("drop", metric, value, low, high, n, e, limit,
                    f"{metric} {value:.4g} [{_num(low)}, {_num(high)}] over {n} rows is "
                    f"{word} {limit:.4g} (packaged {e:.4g})")
    return Drop("ok", metric, value, low, high, n, e, limit,
                f"{metric} {value:.4g} within tolerance of the packaged {e:.4g}"
                if not worse else
                f"{metric} {value:.4g} is {word} {limit:.4g} but its interval "
                f"[{_num(low)}, {_num(high)}] holds the packaged {e:.4g}")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


# -- the contract's blocks -------------------------------------------------------------


class Stored(Protocol):
    """What :func:`merged_blocks` reads of a stored entry (the store's PerformanceRow)."""

    realized: dict[str, Any] | None
    estimated: dict[str, Any] | None


def read_entry(spec: PerformanceSpec, entry: PerformanceEntry, where: str) -> tuple[int, int]:
    """Check an entry's blocks against its bundle's spec; ``(labelled, served)`` rows.

    Raises:
        SchemaError: a block whose numbers do not fit the spec (the field named).
    """
    labelled = served = 0
    if entry.realized is not None:
        labelled = Realized.from_wire(spec, entry.realized, f"{where}.realized").n
    if entry.estimated is not None:
        served = Estimated.from_wire(spec, entry.estimated, f"{where}.estimated").n
    return labelled, served


def entry_bytes(entry: PerformanceEntry) -> bytes:
    """An entry as a dead letter keeps it."""
    return canonical_json(entry.to_dict())


def merged_blocks(spec: PerformanceSpec, rows: Iterable[Stored]
                  ) -> tuple[Realized | None, Estimated | None]:
    """The sum of stored entries' realized and estimated blocks (None: no such block).

    Entries were checked at ingest against this very spec, so their wire forms have the
    same shape: they are added field by field in one numpy pass (the contract's merge is
    addition of every counter and sum, and ``calibrated`` holds only if it held for all)
    and the sum is read back once with ``from_wire``, which checks it again. Rebuilding
    and merging each block would cost about a millisecond an entry.
    """
    realized: list[dict[str, Any]] = []
    estimated: list[dict[str, Any]] = []
    for r in rows:
        if r.realized is not None:
            realized.append(r.realized)
        if r.estimated is not None:
            estimated.append(r.estimated)
    return (Realized.from_wire(spec, _add_wires(realized)) if realized else None,
            Estimated.from_wire(spec, _add_wires(estimated)) if estimated else None)


def add_blocks(wires: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The sum of blocks' wire forms of one spec and side (None: there were none), as
    :func:`merged_blocks` adds them: what a performance rollup keeps."""
    present = [w for w in wires if w is not None]
    return _add_wires(present) if present else None


def _add_wires(wires: list[dict[str, Any]]) -> dict[str, Any]:
    """Blocks' wire forms of one shape, added: counts and sums add, flags AND."""
    if len(wires) == 1:
        return wires[0]
    return {key: _add([w[key] for w in wires]) for key in wires[0]}


def _add(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, bool):
        return all(values)
    if isinstance(first, list) and first and isinstance(first[0], list):
        # nested: part by part, so each leaf keeps its own type (counts stay integers)
        return [_add([v[i] for v in values]) for i in range(len(first))]
    return np.asarray(values).sum(axis=0).tolist()


def metric_values(block: Realized | Estimated | None) -> dict[str, dict[str, Any]]:
    """A block's metrics as plain dicts (value, low, high, n, method); {} for none."""
    if block is None:
        return {}
    return {name: m._asdict() for name, m in block.metrics().items()}


def confusion_of(block: Realized | None) -> dict[str, Any] | None:
    """``{"classes", "counts"}`` (``counts[true][predicted]``) of a classifier's block."""
    if block is None or block.spec.task != "classification":
        return None
    return {"classes": [str(c) for c in block.spec.classes],
            "counts": block.confusion().tolist()}


def reliability_of(block: Realized | None) -> list[dict[str, Any]] | None:
    """The reliability diagram's non-empty bins of a classifier's block."""
    if block is None or block.spec.task != "classification":
        return None
    return [{"low": lo, "high": hi, "n": n, "confidence": p, "observed": pos}
            for lo, hi, n, p, pos in block.reliability()]
