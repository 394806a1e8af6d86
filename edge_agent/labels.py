"""How a label is matched with a bundle's classes: a class given as 1, 1.0 or "1" is the
same class, whatever type the outcome or the model's output carried.

One rule for the prediction store (outcomes against the predicting bundle's classes),
the window (predicted labels as class indices) and the shadow's labels. This module does
not judge outcomes (see :mod:`edge_agent.predictions`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["class_indices", "class_keys", "label_key"]


def label_key(label: Any) -> str | None:
    """The label's comparison key: a class given as 1, 1.0 or "1" is the same class."""
    if isinstance(label, bool):
        return None
    if isinstance(label, float):
        if not math.isfinite(label):
            return None
        return str(int(label)) if label.is_integer() else repr(label)
    if isinstance(label, (int, str)):
        return str(label)
    return None


def class_keys(classes: Sequence[Any]) -> dict[str, int]:
    """Label key -> class index, for :func:`class_indices` and the outcome checks."""
    index: dict[str, int] = {}
    for i, c in enumerate(classes):
        key = label_key(c)
        if key is not None:
            index.setdefault(key, i)
    return index


def class_indices(keys: dict[str, int], labels: np.ndarray) -> np.ndarray:
    """The class indices (int64) of predicted labels, vectorised; -1 for a label that is
    not a class."""
    labels = np.asarray(labels).reshape(-1)
    uniques, inverse = np.unique(labels, return_inverse=True)
    mapped = np.array([keys.get(label_key(u.item()) or "", -1) for u in uniques], dtype=np.int64)
    return mapped[inverse.reshape(-1)]
