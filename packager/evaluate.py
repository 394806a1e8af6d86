"""The card's measurements: metrics with intervals, slices, fairness, permutation importance.

Every number describes the model that ships (the ONNX graph run by the device's own
runner), on the evaluation rows (held-out when ``--eval-data`` is given). The measures come
from well-kept libraries, not from hand-written formulas: scikit-learn's metrics and
``inspection.permutation_importance``, fairlearn's ``MetricFrame``,
``demographic_parity_difference`` / ``_ratio`` and ``equalized_odds_difference``.

Intervals are 95 %: Wilson score intervals for proportions (accuracy, per-group rates),
a seeded percentile bootstrap for the rest, and for importances the normal interval of the
mean over the permutation repeats. Seeds are fixed, so the same inputs give the same card.

Slices: a categorical column (or a numeric one with at most :data:`MAX_DISCRETE` distinct
values) by value; any other numeric column by quartiles of the evaluation rows. A column
with more than ``MAX_GROUPS`` values is refused rather than truncated.

A sensitive column need not be a model input: it is read from the evaluation file beside
the features. Missing values form their own group, ``(missing)``.

This module does not read files, convert models or decide whether a build goes on
(:func:`check_gaps` reports; the build refuses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgefleet.contract.card import (
    MAX_COLUMNS,
    MAX_GROUPS,
    Estimate,
    Evaluation,
    FairnessCheck,
    FairnessGroup,
    FairnessReport,
    Importance,
    Importances,
    Slice,
    SliceGroup,
)
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.runtime import Prediction
from edgefleet.parsing import parse_bounds
from packager.errors import BuildError, DataError

__all__ = [
    "GAPS",
    "Gap",
    "check_gaps",
    "evaluation",
    "fairness",
    "gap_table",
    "importances",
    "parse_gaps",
    "slices",
]

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval
BOOTSTRAP = 200
SEED = 0
REPEATS = 10
IMPORTANCE_ROWS = 2000
MAX_DISCRETE = 10
QUANTILES = 4
MISSING = "(missing)"
Columns = dict[str, np.ndarray]
Run = Callable[[Columns], Prediction]


@dataclass(frozen=True)
class Gap:
    """A fairness gap a bound may hold: ``max`` bounds it from above, ``min`` from below."""

    name: str
    kind: str  # max | min
    task: str


GAPS = {g.name: g for g in (
    Gap("demographic_parity_difference", "max", "classification"),
    Gap("demographic_parity_ratio", "min", "classification"),
    Gap("equalized_odds_difference", "max", "classification"),
    Gap("mean_absolute_error_difference", "max", "regression"),
)}


# --------------------------------------------------------------------------- intervals


def wilson(successes: int, n: int) -> tuple[float | None, float | None]:
    """The Wilson score interval of a proportion (``None`` without rows)."""
    if n == 0:
        return None, None
    p = successes / n
    denom = 1 + Z95 * Z95 / n
    centre = (p + Z95 * Z95 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 * Z95 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _bootstrap(fn: Callable[[np.ndarray], float], n: int) -> tuple[float | None, float | None]:
    if n < 2:
        return None, None
    rng = np.random.default_rng(SEED)
    values = [fn(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return None, None
    return float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))


def _num(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- metrics


def _f1_macro(confusion: np.ndarray) -> float:
    """Macro F1 from a confusion matrix (truth x predicted), as scikit-learn's
    ``f1_score(average="macro")`` computes it: over the labels present in either, an F1 of 0
    where a label was never predicted or never true."""
    tp = np.diag(confusion).astype(np.float64)
    predicted, true = confusion.sum(axis=0), confusion.sum(axis=1)
    present = (predicted + true) > 0
    denom = predicted + true
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def _r2(y: np.ndarray, squared_errors: np.ndarray) -> float:
    """R² as scikit-learn's ``r2_score``: 1 - SSE/SST, and for a constant target 1 when
    fitted exactly, else 0."""
    sse = float(squared_errors.sum())
    sst = float(((y - y.mean()) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)


def _metric_estimates(task: str, want: np.ndarray, pred: Prediction) -> tuple[Estimate, ...]:
    """The point values from scikit-learn; the bootstrap resamples, many per metric, from
    counts (a confusion matrix, sums of squares) rather than a library call each."""
    from sklearn import metrics

    n = len(want)
    if task == "classification":
        got = np.asarray(pred.labels).astype(str)
        truth = want.astype(str)
        correct = int(np.sum(got == truth))
        lo, hi = wilson(correct, n)
        acc = Estimate("accuracy", correct / n if n else None, lo, hi, "wilson")
        labels, codes = np.unique(np.concatenate([truth, got]), return_inverse=True)
        k = len(labels)
        pair = codes[:n] * k + codes[n:]  # truth x predicted cell of each row

        def f1(i: np.ndarray) -> float:
            return _f1_macro(np.bincount(pair[i], minlength=k * k).reshape(k, k))

        f1_all = _num(metrics.f1_score(truth, got, average="macro")) if n else None
        return acc, Estimate("f1_macro", f1_all, *_bootstrap(f1, n), "bootstrap")
    y = want.astype(np.float64)
    yhat = np.asarray(pred.values, dtype=np.float64)
    err = np.abs(y - yhat)
    sq = (y - yhat) ** 2
    mae = float(err.mean()) if n else None
    half = Z95 * float(err.std(ddof=1)) / math.sqrt(n) if n > 1 else None
    out = [Estimate("mae", mae, None if half is None else mae - half,
                    None if half is None else mae + half, "normal" if half else "none")]

    def rmse(i: np.ndarray) -> float:
        return float(np.sqrt(sq[i].mean()))

    out.append(Estimate("rmse", float(np.sqrt(metrics.mean_squared_error(y, yhat))) if n
                        else None, *_bootstrap(rmse, n), "bootstrap"))
    if n > 1:
        def r2(i: np.ndarray) -> float:
            return _r2(y[i], sq[i])

        out.append(Estimate("r2", _num(metrics.r2_score(y, yhat)), *_bootstrap(r2, n),
                            "bootstrap"))
    return tuple(out)


def evaluation(task: str, target: np.ndarray, pred: Prediction, *, held_out: bool,
               data_sha256: str) -> Evaluation:
    """The evaluation section: every metric with its 95 % interval."""
    return Evaluation("held_out" if held_out else "training", data_sha256, len(target),
                      _metric_estimates(task, np.asarray(target), pred))


# --------------------------------------------------------------------------- groups


def _groups(name: str, values: np.ndarray, kind: str) -> tuple[np.ndarray, str, list[str]]:
    """Each row's group label, the binning, and the groups in display order.

    Raises:
        DataError: more than ``MAX_GROUPS`` groups.
    """
    if kind == "numeric":
        col = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(col)
        distinct = np.unique(col[finite])
        if distinct.size > MAX_DISCRETE:
            edges = np.unique(np.quantile(col[finite], np.linspace(0, 1, QUANTILES + 1)))
            idx = np.clip(np.searchsorted(edges, col, side="right") - 1, 0, len(edges) - 2)
            names = [f"[{edges[i]:.6g}, {edges[i + 1]:.6g}" + ("]" if i == len(edges) - 2
                                                                 else ")")
                     for i in range(len(edges) - 1)]
            labels = np.asarray([names[i] if ok else MISSING for i, ok in zip(idx, finite,
                                                                             strict=True)],
                                dtype=object)
            order = [n for n in names if n in set(labels.tolist())]
            binning = "quantiles"
        else:
            labels = np.asarray([repr(float(v)) if ok else MISSING
                                 for v, ok in zip(col, finite, strict=True)], dtype=object)
            order = [repr(float(v)) for v in distinct]  # exact: no two values share a name
            binning = "categorical"
    else:
        labels = np.asarray([MISSING if v is None else str(v) for v in values.tolist()],
                            dtype=object)
        order = sorted(set(labels.tolist()) - {MISSING})
        binning = "categorical"
    if MISSING in set(labels.tolist()):
        order.append(MISSING)
    if len(order) > MAX_GROUPS:
        raise DataError(f"column {name!r}: {len(order)} groups; at most {MAX_GROUPS} can be "
                        "sliced (bin it first)")
    return labels, binning, order


def _take(pred: Prediction, mask: np.ndarray) -> Prediction:
    return Prediction(*(None if a is None else a[mask]
                        for a in (pred.labels, pred.probabilities, pred.values)))


def _check_columns(names: Sequence[str], what: str) -> None:
    if len(names) > MAX_COLUMNS:
        raise BuildError(f"{what}: at most {MAX_COLUMNS} columns")
    if len(set(names)) != len(names):
        raise BuildError(f"{what}: a column is given twice")


def slices(task: str, columns: Columns, kinds: dict[str, str], names: Sequence[str],
           target: np.ndarray, pred: Prediction) -> tuple[Slice, ...]:
    """Every metric per group of each ``names`` column; the worst group named.

    Raises:
        BuildError: too many or repeated columns.
        DataError: a column with too many groups.
    """
    _check_columns(names, "--slice-by")
    main = "accuracy" if task == "classification" else "mae"
    target = np.asarray(target)
    out = []
    for name in names:
        labels, binning, order = _groups(name, columns[name], kinds[name])
        groups = []
        for value in order:
            mask = labels == value
            groups.append(SliceGroup(value, int(mask.sum()),
                                     _metric_estimates(task, target[mask], _take(pred, mask))))
        scored = [(g.metric(main).value, g.value) for g in groups
                  if g.metric(main) and g.metric(main).value is not None]
        worst = (min(scored) if task == "classification" else max(scored))[1] if scored \
            else None
        out.append(Slice(name, binning, main, tuple(groups), worst))
    return tuple(out)


# --------------------------------------------------------------------------- fairness


def positive_label(classes: Sequence[object], asked: str | None) -> str:
    """The class whose rates fairness compares: ``asked``, or the second of two classes.

    Raises:
        BuildError: a multi-class model without ``--positive-label``, or an unknown label.
    """
    names = [str(c) for c in classes]
    if asked is not None:
        if asked not in names:
            raise BuildError(f"--positive-label {asked!r} is not a class of the model "
                             f"({', '.join(names[:10])})")
        return asked
    if len(names) != 2:
        raise BuildError(f"--sensitive: the model has {len(names)} classes; name the one "
                         "whose rates are compared with --positive-label")
    return names[1]


def fairness(task: str, columns: Columns, kinds: dict[str, str], names: Sequence[str],
             inputs: Sequence[str], target: np.ndarray, pred: Prediction,
             classes: Sequence[object], positive: str | None) -> tuple[FairnessReport, ...]:
    """Per-group rates and fairlearn's gaps for each sensitive column.

    Raises:
        BuildError: too many or repeated columns, or no positive class to compare.
        DataError: a column with too many groups.
    """
    from fairlearn.metrics import (
        MetricFrame,
        count,
        demographic_parity_difference,
        demographic_parity_ratio,
        equalized_odds_difference,
        false_positive_rate,
        mean_prediction,
        selection_rate,
        true_positive_rate,
    )
    from sklearn.metrics import mean_absolute_error

    _check_columns(names, "--sensitive")
    if not names:
        return ()
    label = positive_label(classes, positive) if task == "classification" else None
    if task == "classification":
        y = (np.asarray(target).astype(str) == label).astype(int)
        yhat = (np.asarray(pred.labels).astype(str) == label).astype(int)
        measures = {"selection_rate": selection_rate, "true_positive_rate": true_positive_rate,
                    "false_positive_rate": false_positive_rate, "n": count}
    else:
        y = np.asarray(target, dtype=np.float64)
        yhat = np.asarray(pred.values, dtype=np.float64)
        measures = {"mean_absolute_error": mean_absolute_error,
                    "mean_prediction": mean_prediction, "n": count}
    out = []
    for name in names:
        labels, _, order = _groups(name, columns[name], kinds[name])
        frame = MetricFrame(metrics=measures, y_true=y, y_pred=yhat,
                            sensitive_features=labels.astype(str))
        table = frame.by_group
        groups = tuple(
            FairnessGroup(value, int(table.loc[value, "n"]),
                          {k: _num(table.loc[value, k]) for k in measures if k != "n"})
            for value in order)
        if task == "classification":
            s = labels.astype(str)
            gaps = {"demographic_parity_difference":
                    _num(demographic_parity_difference(y, yhat, sensitive_features=s)),
                    "demographic_parity_ratio":
                    _num(demographic_parity_ratio(y, yhat, sensitive_features=s)),
                    "equalized_odds_difference":
                    _num(equalized_odds_difference(y, yhat, sensitive_features=s))}
        else:
            gaps = {"mean_absolute_error_difference":
                    _num(frame.difference()["mean_absolute_error"])}
        out.append(FairnessReport(name, name in inputs, label, groups, gaps))
    return tuple(out)


def parse_gaps(items: Sequence[str]) -> dict[str, float]:
    """``NAME=VALUE`` bounds on fairness gaps (names in :data:`GAPS`).

    Raises:
        BuildError: unknown name, or a value that is not a non-negative number.
    """
    try:
        return parse_bounds(items, "--max-fairness-gap", GAPS)
    except SchemaError as exc:
        raise BuildError(str(exc)) from exc


def check_gaps(reports: Sequence[FairnessReport], bounds: dict[str, float], task: str
               ) -> tuple[FairnessCheck, ...]:
    """Hold every report's gaps to ``bounds``; a gap that cannot be computed fails.

    Raises:
        BuildError: a bound on a gap this task does not have.
    """
    out = []
    for name, bound in sorted(bounds.items()):
        gap = GAPS[name]
        if gap.task != task:
            raise BuildError(f"--max-fairness-gap {name}: not a gap of a {task} model")
        for report in reports:
            value = report.gaps.get(name)
            ok = value is not None and (value <= bound if gap.kind == "max" else value >= bound)
            out.append(FairnessCheck(report.column, name, value, bound, gap.kind, ok))
    return tuple(out)


def gap_table(checks: Sequence[FairnessCheck]) -> str:
    """The checks as a table for a person (the refusal's detail)."""
    lines = [f"  {'column':<20} {'gap':<32} {'value':>10} {'bound':>12}  result"]
    for c in checks:
        value = "n/a" if c.value is None else f"{c.value:.4f}"
        bound = f"{'<=' if c.kind == 'max' else '>='} {c.bound:g}"
        lines.append(f"  {c.column:<20} {c.gap:<32} {value:>10} {bound:>12}  "
                     f"{'ok' if c.passed else 'FAILED'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- importance


def _shipped(run: Run, task: str):
    """The packaged model as scikit-learn's ``inspection`` sees an estimator: ``predict`` on
    a DataFrame of the inputs, run through the device's runner."""
    from sklearn.base import BaseEstimator

    class Shipped(BaseEstimator):  # BaseEstimator: the tags inspection's scorers read
        def fit(self, *_: object) -> Shipped:
            return self

        def predict(self, frame) -> np.ndarray:
            pred = run({str(c): frame[c].to_numpy() for c in frame.columns})
            if task == "classification":
                return np.asarray(pred.labels).astype(str)
            return np.asarray(pred.values, dtype=np.float64)

    return Shipped()


def importances(task: str, frame, target: np.ndarray, run: Run) -> Importances:
    """Permutation importance of each input (scikit-learn's ``inspection``) on at most
    :data:`IMPORTANCE_ROWS` of the rows (a seeded sample), with the normal 95 % interval of
    the mean over :data:`REPEATS` repeats; most important first."""
    from sklearn.inspection import permutation_importance

    if len(frame) > IMPORTANCE_ROWS:  # a seeded sample: cost is repeats x inputs x rows
        keep = np.sort(np.random.default_rng(SEED).choice(len(frame), IMPORTANCE_ROWS,
                                                          replace=False))
        frame, target = frame.iloc[keep].reset_index(drop=True), np.asarray(target)[keep]
    scoring = "accuracy" if task == "classification" else "r2"
    y = np.asarray(target).astype(str) if task == "classification" \
        else np.asarray(target, dtype=np.float64)
    result = permutation_importance(_shipped(run, task), frame, y, scoring=scoring,
                                    n_repeats=REPEATS, random_state=SEED, n_jobs=1)
    half = Z95 * result.importances_std / math.sqrt(REPEATS)
    items = [Importance(str(name), float(m), float(s), float(m - h), float(m + h))
             for name, m, s, h in zip(frame.columns, result.importances_mean,
                                      result.importances_std, half, strict=True)]
    items.sort(key=lambda i: (-i.mean, i.feature))
    return Importances(scoring, REPEATS, SEED, tuple(items))
