"""The build's measuring steps: the headline metrics, the calibration map, the model card.

:func:`packager.build.build` calls these on the held-out rows (or a sample of the training
rows) once the shipped model has answered them: the metrics the manifest records, the
calibration map of a classifier (:mod:`packager.calibrate`), and the measured card
(:mod:`packager.evaluate`), whose fairness gaps are held to their bounds here.

This module signs nothing and writes no file.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from edgefleet.contract.card import ModelCard, Statement, TimeRange
from edgefleet.contract.runtime import Prediction
from packager import calibrate, evaluate
from packager.convert import Converted
from packager.data import Table
from packager.errors import BuildError, FairnessError

if TYPE_CHECKING:  # build.py imports this module
    from packager.build import BuildOptions

__all__ = ["build_warnings", "card_detail", "fit_calibration", "headline_metrics",
           "measure_card", "time_range"]


def headline_metrics(task: str, pred: Prediction, target: np.ndarray | None, prefix: str
             ) -> dict[str, float]:
    if target is None:
        return {}
    from sklearn import metrics

    if task == "classification":
        got, want = np.asarray(pred.labels).astype(str), np.asarray(target).astype(str)
        return {f"{prefix}accuracy": float(metrics.accuracy_score(want, got)),
                f"{prefix}f1_macro": float(metrics.f1_score(want, got, average="macro"))}
    y = np.asarray(target, dtype=np.float64)
    return {f"{prefix}mae": float(metrics.mean_absolute_error(y, pred.values)),
            f"{prefix}rmse": float(np.sqrt(metrics.mean_squared_error(y, pred.values))),
            f"{prefix}r2": float(metrics.r2_score(y, pred.values))}


def build_warnings(opts: BuildOptions, held_out: bool) -> list[str]:
    if opts.target is None:
        return ["no --target: no metrics are recorded (accuracy, F1, error need the label "
                "column: pass --target NAME)"]
    if not held_out:
        return ["metrics computed on the training rows (optimistic: the model has seen them);"
                " pass --eval-data with held-out rows"]
    return []


def measure_card(opts: BuildOptions, statement: Statement | None, converted: Converted,
          inputs: list[str], data: Table, source: Table, shipped: Prediction,
          run: evaluate.Run) -> ModelCard:
    """The measured part of the card on the evaluation rows (``source``); a fairness gap
    past its bound stops the build unless forced (then the card records it).

    Raises:
        BuildError: a slice, sensitive or time column that is not in the data, or asked for
            without a target.
        FairnessError: a gap past its bound, without ``force``.
    """
    if opts.fairness_bounds and not opts.sensitive:
        raise BuildError("--max-fairness-gap bounds the gaps of --sensitive columns; name one")
    asked = [*opts.slice_by, *opts.sensitive]
    missing = [c for c in asked if c not in source.columns]
    if missing:
        raise BuildError(f"{source.path}: column {missing[0]!r} (--slice-by / --sensitive) is "
                         f"not in the evaluation data")
    task, classes = converted.task, converted.classes
    card = ModelCard(statement=statement, data_columns=tuple(data.names) + ((data.target_name,) if
                                                        data.target_name else ()),
                     time_range=time_range(data, opts.time_column))
    if source.target is None:
        if asked or opts.fairness_bounds or opts.champion:
            raise BuildError("--slice-by, --sensitive and --champion need the labels: "
                             "pass --target")
        return card
    held_out = opts.eval_data is not None
    reports = evaluate.fairness(task, source.columns, source.kinds, opts.sensitive, inputs,
                                source.target, shipped, classes, opts.positive_label)
    checks = evaluate.check_gaps(reports, opts.fairness_bounds, task)
    forced = not all(c.passed for c in checks)
    if forced and not opts.force:
        failed = next(c for c in checks if not c.passed)
        raise FairnessError(f"{source.path}: the {failed.gap} of {failed.column!r} is past its "
                            f"bound (use --force to build anyway)", evaluate.gap_table(checks))
    return replace(
        card,
        evaluation=evaluate.evaluation(task, source.target, shipped, held_out=held_out,
                                       data_sha256=source.sha256),
        slices=evaluate.slices(task, source.columns, source.kinds, opts.slice_by,
                               source.target, shipped),
        fairness=reports, checks=checks, forced=forced,
        importances=evaluate.importances(task, source.select(inputs).frame(), source.target,
                                         run) if opts.importances else None)


def time_range(data: Table, column: str | None) -> TimeRange | None:
    """The first and last value of the training data's time column (ISO text sorts as
    time; numbers as numbers).

    Raises:
        BuildError: the column is not in the training data, or has no values.
    """
    if column is None:
        return None
    if column not in data.columns:
        raise BuildError(f"{data.path}: --time-column {column!r} is not in the training data")
    col = data.columns[column]
    if data.kinds[column] == "numeric":
        finite = col[np.isfinite(col)]
        values = [repr(float(finite.min())), repr(float(finite.max()))] if finite.size else []
    else:
        present = sorted(str(v) for v in col.tolist() if v is not None)
        values = [present[0], present[-1]] if present else []
    if not values:
        raise BuildError(f"{data.path}: --time-column {column!r} has no values")
    return TimeRange(column, values[0], values[1])


def fit_calibration(converted: Converted, shipped: Prediction, target: np.ndarray | None
               ) -> calibrate.Fitted | str:
    """The calibration map of a classifier on the held-out rows, or why there is none."""
    if converted.task != "classification":
        return "a regressor: no calibration map"
    if target is None:
        return "no --target: no calibration map"
    return calibrate.fit(converted.classes, shipped, target)


def card_detail(card: ModelCard, calibrated: calibrate.Fitted | str | None = None) -> str:
    parts = [f"{card.evaluation.rows} {card.evaluation.data.replace('_', '-')} rows"
             if card.evaluation else "no labels: metrics left out"]
    if isinstance(calibrated, calibrate.Fitted):
        c = calibrated.calibration
        parts.append(f"calibration {c.method} (Brier {calibrated.raw_brier:.4f} → "
                     f"{c.score:.4f})")
    elif calibrated is not None:
        parts.append(f"no calibration map ({calibrated})")
    parts += [f"worst {s.column}={s.worst}" for s in card.slices]
    parts += [f"{len(card.checks)} fairness checks"
              + (" FAILED (forced)" if card.forced else " passed")] if card.checks else []
    if card.champion:
        c = card.champion
        parts.append(f"{'beats' if c.won else 'does NOT beat'} {c.name} {c.version} "
                     f"({c.metric} {c.delta:+.4g})" if c.delta is not None else
                     f"champion {c.name} {c.version}: no {c.metric}")
    if card.importances:
        parts.append(f"top feature {card.importances.features[0].feature}"
                     if card.importances.features else "no features")
    return ", ".join(parts)
