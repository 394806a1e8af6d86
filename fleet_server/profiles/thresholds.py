"""The drift rules' thresholds: every statistic's effect size, the no-drift bound's
``alpha``, the minimum rows, the group rule and persistence, with their defaults (the
practitioners' conventions) and their wire form.

A value with its own validity checks and nothing more: the statistics and verdicts that
use it are :mod:`fleet_server.profiles.drift`'s (which re-exports :class:`Thresholds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.wire import Fields

__all__ = ["Thresholds"]

_UNIT = ("ks_drift", "js_drift", "unseen_drift", "rate_drift", "group_share",
         "importance_share")
_INTS = ("min_rows", "group_min", "persistence", "persistence_of")


@dataclass(frozen=True)
class Thresholds:
    """Every rule's threshold; the defaults are the practitioners' conventions."""

    psi_warn: float = 0.1
    psi_drift: float = 0.25
    ks_drift: float = 0.1
    wasserstein_drift: float = 0.1  # in base standard deviations
    js_drift: float = 0.1
    unseen_drift: float = 0.01  # increase of the unseen-category share
    rate_drift: float = 0.05  # absolute increase in missing / out-of-range rate
    # a statistic drifts only past its no-drift bound at the two sides' sizes too: the
    # value two samples of one distribution stay under with probability 1 - alpha
    alpha: float = 0.001
    min_rows: int | None = None  # None: 40 * max(bins - 1, 1) for each feature
    # the group rule: the drifting inputs carry this share of the model's positive
    # permutation importance; without importances, at least max(group_min,
    # ceil(group_share * n)) of the n input features with enough data drift
    importance_share: float = 0.3
    group_share: float = 0.15
    group_min: int = 2
    persistence: int = 2  # drifted windows ...
    persistence_of: int = 3  # ... out of the last this many

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            where = f"thresholds.{f.name}"
            if f.name in _INTS:
                if value is None and f.name == "min_rows":
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or not (
                        1 <= value <= 1_000_000_000):
                    raise SchemaError(f"{where}: must be an integer >= 1, got {value!r}",
                                      field=where)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise SchemaError(f"{where}: must be a finite number > 0, got {value!r}",
                                  field=where)
            if f.name in _UNIT and value > 1:
                raise SchemaError(f"{where}: must be at most 1, got {value!r}", field=where)
            if f.name == "alpha" and value > 0.5:
                raise SchemaError(f"{where}: must be at most 0.5, got {value!r}", field=where)
        if self.psi_warn > self.psi_drift:
            raise SchemaError("thresholds.psi_warn: must not exceed psi_drift",
                              field="thresholds.psi_warn")
        if self.persistence_of < self.persistence:
            raise SchemaError("thresholds.persistence_of: must be >= persistence",
                              field="thresholds.persistence_of")

    def drifted_needed(self, judged: int) -> int:
        """How many of ``judged`` input features must drift under the count rule."""
        # a model with one input drifts when that input does
        return min(judged, max(self.group_min, math.ceil(self.group_share * judged - 1e-9)))

    def rows_needed(self, bins: int) -> int:
        """The minimum rows (and present values) a feature with ``bins`` bins needs."""
        return self.min_rows if self.min_rows is not None else 40 * max(bins - 1, 1)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "thresholds") -> Thresholds:
        """Read thresholds; absent fields keep their defaults.

        Raises:
            SchemaError: an unknown field, or a value of the wrong type or range (named).
        """
        f = Fields(obj, where)
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if not f.has(spec.name):
                continue
            if spec.name == "min_rows" and f.raw("min_rows") is None:
                values["min_rows"] = None
            elif spec.name in _INTS:
                values[spec.name] = f.int(spec.name, minimum=1)
            else:
                values[spec.name] = f.float(spec.name)
        f.done()
        try:
            return cls(**values)
        except SchemaError as exc:
            name = (exc.field or "").rpartition(".")[2]
            raise SchemaError(f"{where}.{name}: {str(exc).partition(': ')[2]}",
                              field=f"{where}.{name}") from exc
