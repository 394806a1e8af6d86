"""The bundle's ``reference.json`` and ``samples.json``, from the training data.

The reference profile is computed with the device's own profile code
(:mod:`edgefleet.contract.profile`) on the training inputs and on the *packaged* model's
predictions for them, so live windows are compared with exactly what the shipped
model did on the data it was trained on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgefleet.contract.profile import (
    CONFIDENCE_EDGES,
    CategoricalSpec,
    NumericSpec,
    Profile,
    ProfileSpec,
    categorical_spec,
    numeric_spec,
)
from edgefleet.contract.runtime import Prediction
from edgefleet.contract.samples import Samples
from edgefleet.contract.wire import canonical_json
from packager.data import Table

__all__ = ["REFERENCE_SCHEMA", "build_reference", "pick_samples"]

REFERENCE_SCHEMA = 1
SAMPLE_ROWS = 8


def output_specs(task: str, classes: tuple[Any, ...], prediction: Prediction,
                 bins: int) -> tuple:
    if task == "classification":
        names = tuple(str(c) for c in classes)
        specs: list = [CategoricalSpec("class", names[:64], tuple(sorted(names[64:])), True)]
        if prediction.probabilities is not None:
            specs.append(NumericSpec("confidence", CONFIDENCE_EDGES))
        return tuple(specs)
    return (numeric_spec("value", prediction.values, bins),)


def build_reference(table: Table, prediction: Prediction, task: str,
                    classes: tuple[Any, ...], bins: int) -> tuple[ProfileSpec, bytes]:
    """The spec (bins) and ``reference.json`` bytes for the training data."""
    inputs = tuple(
        numeric_spec(n, table.columns[n], bins) if table.kinds[n] == "numeric"
        else categorical_spec(n, table.columns[n])
        for n in table.names
    )
    spec = ProfileSpec(inputs, output_specs(task, classes, prediction, bins))
    profile = Profile(spec)
    profile.update({n: table.columns[n] for n in table.names}, prediction.profile_outputs(),
                   rows=table.rows)
    doc = {"schema": REFERENCE_SCHEMA, "reference_hash": spec.reference_hash,
           "spec": spec.to_dict(), "profile": profile.to_dict()}
    return spec, canonical_json(doc)


def _cell(value: Any, kind: str) -> Any:
    if kind == "categorical":
        return None if value is None else str(value)
    v = float(value)
    if not math.isfinite(v):
        return None
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def pick_samples(table: Table, prediction_for: Any, n: int = SAMPLE_ROWS) -> Samples:
    """Evenly spaced rows (deterministic) and the packaged model's answers on them."""
    index = np.unique(np.linspace(0, table.rows - 1, num=min(n, table.rows)).astype(int))
    part = table.take(index)
    rows = [[_cell(part.columns[name][i], part.kinds[name]) for name in part.names]
            for i in range(len(index))]
    return Samples.from_prediction(part.names, rows, prediction_for(part))
