"""Explanations on the device: how much each input contributed to one prediction.

For the person a prediction affects, answered where the prediction was made, from the
bundle alone (numpy and onnxruntime; no raw data leaves the device, nothing is fetched).

**Baseline substitution.** The row ``x`` and ``F`` copies of it, copy ``j`` with input ``j``
replaced by its baseline value ``b_j``, go through the model in ONE onnxruntime call
(``F + 1`` rows). The contribution of input ``j`` is ``s(x) - s(x with x_j := b_j)``: how
much the explained score moves because this input is what it is rather than typical.
The baseline comes from the bundle's reference profile (``reference.json``, the training
data's bins): for a numeric input its median, read from the reference histogram by linear
interpolation inside the bin that holds the middle row (the bins are quantiles of the
training data, so that is close to the true median); for a categorical input its mode
(the most frequent category of the reference's vocabulary).

**Exact for linear models** (``method = "linear_exact"``). When the bundle's lineage names
a scikit-learn estimator made only of per-column or linear transforms followed by a linear
model (``Pipeline(StandardScaler, LogisticRegression)``, one-hot encoders, imputers,
``LinearRegression``, ``Ridge``, ...: :data:`ADDITIVE_STEPS`, :data:`LINEAR_MODELS`), the
score is a sum of one term per input column, so the same ``F + 1`` rows give each input's
exact share: ``w_j (x_j - b_j)``, mapped back through the transforms to the input column,
with the numeric baseline the reference *mean* (the issue's "coefficient times the distance
from the reference mean"). The contributions then add up to ``s(x) - s(baseline)`` exactly
(to float32 rounding), and the answer carries ``s(baseline)``. This is read from the
manifest, not from the ONNX graph: a bundle converted from ONNX, a quantised one (dynamic
quantisation scales each batch by its own range, so rows do not stay additive), a
multi-class classifier (the softmax's log-odds are not additive) or any other estimator
gets baseline substitution, and ``why`` says which of these applied.

**The score explained.** A regressor: its value. A classifier: the log-odds of the class
predicted for ``x``, ``log(p / (1 - p))`` (probabilities clipped to ``[1e-7, 1 - 1e-7]``),
in which a logistic regression is linear; a classifier without probabilities: 1 when a
row keeps ``x``'s label, 0 when it does not.

Bad rows get the errors :meth:`edge_agent.agent.Agent.predict` raises
(:class:`~edgefleet.contract.errors.InputError` naming the feature, ``PredictError``).
Explaining does not count as serving: nothing here is profiled or recorded.

This module does not decide which model is live, and does not speak HTTP.
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from edge_agent.model import LoadedModel
from edgefleet.contract.accumulate import Categorical, Numeric
from edgefleet.contract.inputs import Cell

__all__ = ["ADDITIVE_STEPS", "LINEAR_MODELS", "METHODS", "Contribution", "Explainer",
           "Explanation", "explainer_for"]

METHODS = ("linear_exact", "baseline_substitution")
# transforms that act on each column alone (or linearly on all): a linear model after
# them is still a sum of one term per input column
ADDITIVE_STEPS = frozenset({
    "Pipeline", "ColumnTransformer", "StandardScaler", "MinMaxScaler", "MaxAbsScaler",
    "RobustScaler", "OneHotEncoder", "OrdinalEncoder", "SimpleImputer", "MissingIndicator",
    "KBinsDiscretizer", "PowerTransformer", "QuantileTransformer", "Binarizer", "PCA",
    "TruncatedSVD", "VarianceThreshold", "SelectKBest", "SelectPercentile", "passthrough",
    "drop"})
LINEAR_MODELS = frozenset({
    "LogisticRegression", "LogisticRegressionCV", "LinearRegression", "Ridge", "RidgeCV",
    "Lasso", "LassoCV", "ElasticNet", "ElasticNetCV", "SGDClassifier", "SGDRegressor",
    "HuberRegressor", "BayesianRidge", "ARDRegression", "Lars", "LassoLars",
    "TheilSenRegressor", "QuantileRegressor", "LinearSVR"})
_EPS = 1e-7
_STEP_NAME = re.compile(r"[\w.-]+:\s*")  # "num: StandardScaler" in a ColumnTransformer
_WORD = re.compile(r"[A-Za-z_]\w*")


class Contribution(NamedTuple):  # a tuple: twenty of these per answer, made on the call path
    feature: str
    value: Cell  # the row's value
    baseline: Cell  # what it was replaced by
    contribution: float  # s(x) - s(x with this input at its baseline)

    def to_dict(self) -> dict[str, Any]:
        v, b = self.value, self.baseline
        return {"feature": self.feature,
                "value": None if isinstance(v, float) and math.isnan(v) else v,
                "baseline": None if isinstance(b, float) and math.isnan(b) else b,
                "contribution": self.contribution}


@dataclass(frozen=True)
class Explanation:
    """The answer: what was explained, how, and each input's contribution (largest first)."""

    bundle: str
    method: str  # linear_exact | baseline_substitution
    why: str  # why this method
    baseline: str  # how the baseline values were chosen
    score: str  # what the numbers are in, e.g. "log-odds of class 1"
    value: float  # s(x)
    baseline_value: float | None  # s(baseline): exact models only
    prediction: dict[str, Any]  # the model's answer for the row
    contributions: tuple[Contribution, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "method": self.method, "why": self.why,
                "baseline": self.baseline, "score": self.score, "value": self.value,
                "baseline_value": self.baseline_value, "prediction": self.prediction,
                "contributions": [c.to_dict() for c in self.contributions]}


def linear_reason(model: LoadedModel) -> tuple[bool, str]:
    """Whether ``model``'s score is exactly additive over its input columns, and why."""
    m = model.manifest
    lineage = m.lineage
    if lineage.source_kind != "sklearn":
        return False, (f"the bundle was converted from {lineage.source_kind}: its estimator "
                       "cannot be identified from the manifest")
    words = _WORD.findall(_STEP_NAME.sub("", lineage.estimator))
    if not words or words[-1] not in LINEAR_MODELS:
        return False, (f"{lineage.estimator} is not a linear model: contributions from "
                       "baseline substitution do not add up to the score")
    odd = sorted({w for w in words[:-1] if w not in ADDITIVE_STEPS})
    if odd:
        return False, (f"{', '.join(odd)} in {lineage.estimator} may mix inputs: treated as "
                       "not linear")
    if m.quantization.applied:
        return False, (f"the model is quantised ({m.quantization.mode}): its rows are not "
                       "exactly additive")
    if m.task == "classification" and len(m.classes) != 2:
        return False, (f"{len(m.classes)} classes: a softmax's log-odds are not additive "
                       "over inputs")
    return True, (f"{lineage.estimator} is linear in the explained score: each "
                  "contribution is the coefficient times the distance from the reference "
                  "mean, and they add up to the score's distance from the baseline's")


def _median(state: Numeric) -> float:
    counts = np.asarray(state.counts, dtype=np.float64)
    edges = np.asarray(state.spec.edges, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return float((edges[0] + edges[-1]) / 2)
    cum = np.cumsum(counts)
    k = int(np.searchsorted(cum, total / 2.0))  # the slot holding the middle row
    if k == 0:
        return float(edges[0])
    if k > len(edges) - 1:
        return float(edges[-1])
    lo, hi = edges[k - 1], edges[k]
    before = cum[k] - counts[k]
    share = (total / 2.0 - before) / counts[k] if counts[k] else 0.0
    return float(lo + share * (hi - lo))


def _mean(state: Numeric) -> float:
    n = float(np.asarray(state.counts).sum())
    return float(np.asarray(state.sums).sum() / n) if n else _median(state)


def _mode(state: Categorical) -> str | None:
    vocab = state.spec.vocabulary
    if not vocab:
        return None
    counts = np.asarray(state.counts)[:len(vocab)]
    return vocab[int(np.argmax(counts))]


class Explainer:
    """Explanations for one loaded model (its baseline row is computed once)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.exact, self.why = linear_reason(model)
        self.method = METHODS[0] if self.exact else METHODS[1]
        baseline: list[Cell] = []
        for spec in model.manifest.inputs:
            state = model.reference.inputs[spec.name]
            if isinstance(state, Numeric):
                value = _mean(state) if self.exact else _median(state)
                baseline.append(float(round(value)) if spec.dtype == "int64" else value)
            else:
                baseline.append(_mode(state))  # type: ignore[arg-type]
        self.baseline_cells = baseline
        # a numeric-only model: the F + 1 rows as one array, the baselines on its diagonal
        self._numeric = model.validator.numeric_only
        f = len(baseline)
        self._diagonal = (np.arange(1, f + 1), np.arange(f))
        self._baseline_array = np.asarray(baseline if self._numeric else [], dtype=np.float64)
        self.baseline_text = ("numeric inputs at their reference mean, categorical at their "
                              "mode" if self.exact else
                              "numeric inputs at their reference median (interpolated in "
                              "the reference bins), categorical at their mode")

    def rows(self, cells: list[Cell]) -> list[list[Cell]]:
        """The ``F + 1`` rows one explanation runs: the row, then one substitution each."""
        out = [cells]
        for j, b in enumerate(self.baseline_cells):
            row = cells.copy()
            row[j] = b
            out.append(row)
        return out

    def _scores(self, outputs: Any) -> tuple[np.ndarray, str, dict[str, Any]]:
        m = self.model
        if outputs.values is not None:
            values = np.asarray(outputs.values, dtype=np.float64).reshape(-1)
            return values, "value", {"value": float(values[0])}
        labels = None if outputs.labels is None else np.asarray(outputs.labels).reshape(-1)
        classes = list(m.classes)
        if outputs.probabilities is not None:
            proba = np.asarray(outputs.probabilities, dtype=np.float64)
            c = int(np.argmax(proba[0]))
            p = np.clip(proba[:, c], _EPS, 1 - _EPS)
            name = classes[c] if c < len(classes) else c
            answer: dict[str, Any] = {
                "label": labels[0].item() if labels is not None else name,
                "probabilities": dict(zip([str(k) for k in classes], proba[0].tolist(),
                                          strict=False))}
            return np.log(p) - np.log1p(-p), f"log-odds of class {name}", answer
        assert labels is not None
        same = (labels == labels[0]).astype(np.float64)
        return same, f"keeps label {labels[0].item()}", {"label": labels[0].item()}

    def explain(self, row: Mapping[str, Any] | Sequence[Any]) -> Explanation:
        """Explain one row (a mapping, or a list in schema order).

        Raises:
            InputError: the row breaks the schema (names the feature), as predict does.
            PredictError: the model failed at run time.
        """
        m = self.model
        cells = m.validator.row(row)
        if self._numeric:
            matrix = np.tile(np.asarray(cells, dtype=np.float64), (len(cells) + 1, 1))
            matrix[self._diagonal] = self._baseline_array
            outputs = m.run_matrix(matrix)  # one onnxruntime call, F + 1 rows
        else:
            outputs = m.run_cells(self.rows(cells))  # the same, by cells
        scores, score_name, answer = self._scores(outputs)
        value = float(scores[0])
        deltas = value - scores[1:]
        order = np.argsort(-np.abs(deltas), kind="stable").tolist()
        names, base, shares = m.validator.names, self.baseline_cells, deltas.tolist()
        contributions = [Contribution(names[j], cells[j], base[j], shares[j]) for j in order]
        base_value = value - math.fsum(shares) if self.exact else None
        return Explanation(m.label, self.method, self.why, self.baseline_text, score_name,
                           value, base_value, answer, tuple(contributions))


_cache: weakref.WeakKeyDictionary[LoadedModel, Explainer] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def explainer_for(model: LoadedModel) -> Explainer:
    """The model's explainer, made on first use and kept while the model is."""
    with _cache_lock:
        found = _cache.get(model)
        if found is None:
            found = _cache[model] = Explainer(model)
        return found
