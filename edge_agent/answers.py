"""What a predict call returns, and the prediction ids of its rows.

:class:`Result` is the answer (the bundle that answered, its raw outputs, one id per row);
:func:`new_ids` makes the agent's own ids and :func:`check_ids` checks a caller's. Both
run on the request path: one string format per row, one regular-expression match per
given id. This module does not serve or record anything (see :mod:`edge_agent.agent`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from edge_agent.errors import PredictionIdError
from edgefleet.contract.messages import ID_RE

__all__ = ["Result", "check_ids", "new_ids"]


class Result(NamedTuple):
    """What a call returns: the bundle that answered, its raw outputs (numpy) and the
    prediction id of every row (the caller's, or made by the agent)."""

    bundle: str  # name@version
    labels: np.ndarray | None
    probabilities: np.ndarray | None
    values: np.ndarray | None
    ids: Sequence[str] = ()

    def rows(self, classes: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Per-row plain-Python answers, for JSON (``id``, ``label``, ``probabilities``,
        ``value``)."""
        n = len(next(a for a in (self.labels, self.values, self.probabilities)
                     if a is not None))
        out: list[dict[str, Any]] = [{"id": i} for i in self.ids] if self.ids else \
            [{} for _ in range(n)]
        if self.labels is not None:
            for row, v in zip(out, np.asarray(self.labels).reshape(-1).tolist(), strict=True):
                row["label"] = v
        if self.probabilities is not None:
            keys = [str(c) for c in classes]
            for row, p in zip(out, np.asarray(self.probabilities).tolist(), strict=True):
                row["probabilities"] = dict(zip(keys, p, strict=True)) if keys else p
        if self.values is not None:
            for row, v in zip(out, np.asarray(self.values).reshape(-1).tolist(), strict=True):
                row["value"] = v
        return out


def new_ids(prefix: str, first: int, n: int) -> list[str]:
    """Agent-made prediction ids ``<prefix><counter in hex>`` for ``n`` rows from ``first``
    (on the request path: one string format per row)."""
    if n == 1:
        return [f"{prefix}{first:x}"]
    return [f"{prefix}{i:x}" for i in range(first, first + n)]


def check_ids(ids: Any) -> list[str]:
    """Caller prediction ids as a list, each valid and none repeated.

    Raises:
        PredictionIdError: naming the index of the id at fault.
    """
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Sequence):
        raise PredictionIdError(f"ids: expected a list of prediction ids, got "
                                f"{type(ids).__name__}")
    ids = list(ids)
    match = ID_RE.match
    for i, pid in enumerate(ids):
        if type(pid) is not str or not match(pid):
            raise PredictionIdError(f"ids[{i}]: {str(pid)[:80]!r} is not a prediction id "
                                    "(letters, digits, '_', '.', ':', '-'; at most 64)", row=i)
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        for i, pid in enumerate(ids):
            if pid in seen:
                raise PredictionIdError(f"ids[{i}]: {pid!r} is given twice", row=i)
            seen.add(pid)
    return ids
