"""The fidelity gate: the packaged ONNX model against the original, on real rows.

Classifiers: label agreement, max and mean absolute probability difference.
Regressors: max absolute error, and that error relative to the spread (std) of the
original's predictions, so one bound serves targets of any scale.

The report goes into the manifest whether the gate passed or not; a failed gate
stops the build unless forced. This module does not run either model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.manifest import Fidelity
from edgefleet.contract.runtime import Prediction
from edgefleet.parsing import parse_bounds as parse_named_bounds
from packager.errors import BuildError

__all__ = ["Bounds", "judge", "parse_bounds"]


@dataclass(frozen=True)
class Bounds:
    label_disagreement: float = 0.01  # at most 1 % of labels differ
    prob_diff: float = 0.1  # no probability moves more than 0.1
    mean_prob_diff: float = 0.01
    rel_error: float = 0.02  # regressors: max |error| / std(original predictions)

    def as_dict(self, task: str) -> dict[str, float]:
        if task == "classification":
            return {"label_disagreement": self.label_disagreement, "prob_diff": self.prob_diff,
                    "mean_prob_diff": self.mean_prob_diff}
        return {"rel_error": self.rel_error}


def parse_bounds(items: tuple[str, ...] | list[str], task_hint: str | None = None) -> Bounds:
    """``KEY=VALUE`` items (keys as in :class:`Bounds`); a bare number bounds the main
    measure (label disagreement for classifiers, relative error for regressors).

    Raises:
        BuildError: unknown key or a value that is not a non-negative number.
    """
    try:
        values = parse_named_bounds(items, "--max-fidelity-loss", Bounds.__dataclass_fields__,
                              default_key="_main")
    except SchemaError as exc:
        raise BuildError(str(exc)) from exc
    main = values.pop("_main", None)
    if main is not None:
        values.setdefault("label_disagreement", main)
        values.setdefault("rel_error", main)
    return Bounds(**values)


def judge(original: dict[str, np.ndarray], shipped: Prediction, task: str,
          bounds: Bounds, classes: tuple | None = None,
          ) -> tuple[Fidelity, list[tuple[str, float, float, bool]]]:
    """Compare outputs; return the manifest's report and rows (measure, value, bound, ok)."""
    rows: list[tuple[str, float, float, bool]] = []
    n = len(shipped)
    if task == "classification":
        got = np.asarray(shipped.labels).astype(str)
        want = np.asarray(original["label"]).astype(str)
        same = got == want
        if "probabilities" in original and classes and n:
            # An exact tie among the original's top classes (a forest's 0.5/0.5 vote)
            # has no right answer: scikit-learn and onnxruntime break it differently.
            # The shipped label agrees when it is one of the tied classes.
            p = np.asarray(original["probabilities"])
            tied = np.isclose(p, p.max(axis=1, keepdims=True), rtol=0, atol=1e-12)
            pos = {str(c): i for i, c in enumerate(classes)}
            idx = np.array([pos.get(g, -1) for g in got])
            ok = idx >= 0
            same = same | (ok & tied[np.arange(n), np.where(ok, idx, 0)]
                           & (tied.sum(axis=1) > 1))
        agreement = float(np.mean(same)) if n else 1.0
        rows.append(("label_disagreement", 1.0 - agreement, bounds.label_disagreement,
                     1.0 - agreement <= bounds.label_disagreement + 1e-12))
        max_d = mean_d = None
        if "probabilities" in original and shipped.probabilities is not None:
            d = np.abs(shipped.probabilities - original["probabilities"])
            max_d, mean_d = float(d.max()), float(d.mean())
            rows.append(("prob_diff", max_d, bounds.prob_diff, max_d <= bounds.prob_diff))
            rows.append(("mean_prob_diff", mean_d, bounds.mean_prob_diff,
                         mean_d <= bounds.mean_prob_diff))
        passed = all(ok for *_, ok in rows)
        report = Fidelity(rows=n, passed=passed, label_agreement=agreement,
                          max_abs_prob_diff=max_d, mean_abs_prob_diff=mean_d,
                          bounds=bounds.as_dict(task))
    else:
        want = np.asarray(original["value"], dtype=np.float64)
        err = np.abs(np.asarray(shipped.values, dtype=np.float64) - want)
        max_err = float(err.max()) if n else 0.0
        spread = float(want.std()) or 1.0
        rel = max_err / spread
        rows.append(("rel_error", rel, bounds.rel_error, rel <= bounds.rel_error))
        passed = rel <= bounds.rel_error
        report = Fidelity(rows=n, passed=passed, max_abs_error=max_err, max_rel_error=rel,
                          bounds=bounds.as_dict(task))
    return report, rows


def table(rows: list[tuple[str, float, float, bool]]) -> str:
    lines = [f"{'measure':<20} {'value':>12} {'bound':>10}  result"]
    for name, value, bound, ok in rows:
        lines.append(f"{name:<20} {value:>12.6g} {bound:>10.4g}  {'ok' if ok else 'FAIL'}")
    return "\n".join(lines)
