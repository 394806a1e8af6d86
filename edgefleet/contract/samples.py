"""``samples.json``: a few rows and what the packaged model answered on them.

The device runs these rows through a freshly installed bundle before switching to it
(the smoke test): same labels, probabilities and values within tolerance, or the
install fails and the old model keeps serving. The expected answers come from the
ONNX model as packaged (after quantisation), so the test checks the device's runtime,
not the conversion (the fidelity gate did that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.contract.runtime import ModelRunner, Prediction
from edgefleet.contract.wire import Fields, canonical_json, parse_json

__all__ = ["Samples", "smoke_test"]

SAMPLES_SCHEMA = 1
MAX_SAMPLE_ROWS = 64
Cell = float | int | str | None


@dataclass(frozen=True)
class Samples:
    features: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    labels: tuple[Any, ...] = ()
    probabilities: tuple[tuple[float, ...], ...] = ()
    values: tuple[float, ...] = ()
    tolerance: float = 1e-4  # absolute, on probabilities; relative on values

    def columns(self, kinds: dict[str, str]) -> dict[str, np.ndarray]:
        """Columns for the runner: numeric as float64 (None → NaN), categorical as object."""
        out = {}
        for j, name in enumerate(self.features):
            cells = [row[j] for row in self.rows]
            if kinds.get(name) == "categorical":
                out[name] = np.array(cells, dtype=object)
            else:
                out[name] = np.array([math.nan if c is None else c for c in cells],
                                     dtype=np.float64)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SAMPLES_SCHEMA, "features": list(self.features),
                "rows": [list(r) for r in self.rows], "labels": list(self.labels),
                "probabilities": [list(p) for p in self.probabilities],
                "values": list(self.values), "tolerance": self.tolerance}

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> Samples:
        """Raises: SchemaError naming the field."""
        f = Fields(parse_json(data, what="samples.json", max_bytes=1 << 20), "samples")
        if f.int("schema") != SAMPLES_SCHEMA:
            raise f.bad("schema", f"unsupported samples schema (expected {SAMPLES_SCHEMA})")
        features = f.list("features", max_len=4096)
        rows = f.list("rows", max_len=MAX_SAMPLE_ROWS)
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(features):
                raise f.bad("rows", f"row {i} does not have {len(features)} cells")
        out = cls(tuple(features), tuple(tuple(r) for r in rows), tuple(f.list("labels")),
                  tuple(tuple(p) for p in f.list("probabilities")),
                  tuple(f.list("values")), f.float("tolerance"))
        f.done()
        return out

    @classmethod
    def from_prediction(cls, features: list[str], rows: list[list[Cell]],
                        prediction: Prediction) -> Samples:
        def label(v: Any) -> Any:
            return v.item() if hasattr(v, "item") else v

        return cls(
            tuple(features), tuple(tuple(r) for r in rows),
            tuple(label(v) for v in prediction.labels) if prediction.labels is not None else (),
            tuple(tuple(float(x) for x in p) for p in prediction.probabilities)
            if prediction.probabilities is not None else (),
            tuple(float(v) for v in prediction.values) if prediction.values is not None else (),
        )


def smoke_test(runner: ModelRunner, samples: Samples) -> list[str]:
    """Run the samples; return what differs (empty when the bundle behaves)."""
    kinds = {s.name: s.kind for s in runner.manifest.inputs}
    pred = runner.run_columns(samples.columns(kinds))
    problems = []
    if samples.labels and pred.labels is not None:
        got = [str(x) for x in pred.labels.tolist()]
        want = [str(x) for x in samples.labels]
        bad = [i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w]
        if bad or len(got) != len(want):
            problems.append(f"labels differ on sample rows {bad[:5]}")
    if samples.probabilities and pred.probabilities is not None:
        diff = np.abs(pred.probabilities - np.asarray(samples.probabilities)).max()
        if not diff <= samples.tolerance:
            problems.append(f"probabilities differ by {diff:.3g} > {samples.tolerance}")
    if samples.values and pred.values is not None:
        want = np.asarray(samples.values)
        diff = np.abs(pred.values - want).max() / max(1.0, float(np.abs(want).max()))
        if not diff <= samples.tolerance:
            problems.append(f"values differ by {diff:.3g} (relative) > {samples.tolerance}")
    return problems
