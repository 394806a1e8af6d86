"""What the prediction store hands out: outcome counters by reason, and the labelled rows
a summary claims, per bundle, as arrays.

Plain values (frozen dataclasses) shared by :mod:`edge_agent.predictions`, which makes
them, and :mod:`edge_agent.window`, which turns them into performance blocks. This module
does not read the store or compute metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from edgefleet.contract.messages import BundleRef

__all__ = ["REASONS", "BundleRows", "Claim", "OutcomeCounts"]

REASONS = ("unknown", "expired", "duplicate", "bad_label")  # the refusals, counted


@dataclass(frozen=True)
class OutcomeCounts:
    """How outcomes fared, by reason (see :mod:`edge_agent.predictions`)."""

    joined: int = 0
    unknown: int = 0
    expired: int = 0
    duplicate: int = 0
    bad_label: int = 0

    def __add__(self, other: OutcomeCounts) -> OutcomeCounts:
        return OutcomeCounts(*(getattr(self, f.name) + getattr(other, f.name)
                               for f in fields(self)))

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class BundleRows:
    """The labelled rows of one bundle claimed for a summary, as arrays (one per row)."""

    bundle: BundleRef
    task: str  # classification | regression
    classes: tuple[Any, ...]
    predicted: np.ndarray  # class index (int64) or value (float64)
    truth: np.ndarray  # class index (int64) or value (float64)
    scores: np.ndarray | None  # (n, classes) float64, the raw probabilities
    delays_s: np.ndarray  # float64, outcome time minus prediction time

    @property
    def rows(self) -> int:
        return int(self.truth.shape[0])


@dataclass(frozen=True)
class Claim:
    """What a summary with sequence ``seq`` carries from the store."""

    seq: int
    bundles: tuple[BundleRows, ...] = ()
    counts: dict[str, int] | None = None  # refusal reason -> outcomes, since the last claim

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.bundles)
