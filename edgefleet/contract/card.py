"""The model card: the ``card`` section of the signed manifest.

Two kinds of facts, kept apart so a reader knows who vouches for each:

- :class:`Statement`: what the engineer knows and a tool cannot (owner, contact, intended
  use, what it must not be used for, limitations, ethical considerations, the next review
  date), read from ``card.toml`` by the packager; ``None`` when no card file was given;
- everything else is measured by the build on held-out rows: metrics with 95 % intervals
  (:class:`Evaluation`), the same metrics per slice with the worst slice named
  (:class:`Slice`), per-group rates and the gaps between groups of each sensitive column
  (:class:`FairnessReport`), the bounds those gaps were held to (:class:`FairnessCheck`,
  and whether the build was forced past one), permutation importances with intervals
  (:class:`Importances`), and the comparison with a champion bundle (:class:`Champion`,
  with the full :class:`Comparison`: every metric of both, the paired test, the promotion
  rules, per-slice non-inferiority, schema changes, the verdict).

The card is part of the manifest, so it is covered by the bundle's signatures: editing any
number breaks verification. Its ``schema`` is versioned on its own; a manifest without a
card (built before cards existed) has ``card = None`` and still verifies.

Numbers that do not exist (a true positive rate in a group without positives, a ratio of
zero to zero) are ``None``, never NaN: canonical JSON has no NaN.

This module reads no files and computes nothing: the packager measures, this module holds
and checks the values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import date
from typing import Any

from edgefleet.contract.wire import Fields

__all__ = [
    "CARD_SCHEMA",
    "STATEMENT_FIELDS",
    "Champion",
    "Comparison",
    "Estimate",
    "Evaluation",
    "FairnessCheck",
    "FairnessGroup",
    "FairnessReport",
    "Importance",
    "Importances",
    "MetricComparison",
    "ModelCard",
    "PairedTest",
    "RuleResult",
    "Slice",
    "SliceComparison",
    "SliceGroup",
    "Statement",
    "TimeRange",
    "parse_date",
]

CARD_SCHEMA = 1
MAX_TEXT = 4096  # one free-text answer of the statement
MAX_GROUPS = 64  # groups of one slice or sensitive column
MAX_COLUMNS = 16  # slice columns, sensitive columns
MAX_NAME = 128
METHODS = ("wilson", "bootstrap", "normal", "none")
DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")


def parse_date(text: str, where: str) -> date:
    """``YYYY-MM-DD`` → a date.

    Raises:
        ValueError: not a calendar date in that form (the message names ``where``).
    """
    if not DATE_RE.match(text):
        raise ValueError(f"{where}: {text!r} is not a date like 2027-06-30")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{where}: {text!r} is not a calendar date") from exc


def _opt_str(f: Fields, key: str, max_len: int = MAX_NAME) -> str | None:
    value = f.raw(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise f.bad(key, f"expected a string of at most {max_len} characters or null")
    return value


def _opt_floats(f: Fields, key: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k, v in f.mapping(key).items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise f.bad(key, f"{k!r} is not a number or null")
        out[k] = None if v is None else float(v)
    return out


def _items(f: Fields, key: str, cls: Any, max_len: int) -> tuple:
    return tuple(cls.from_dict(o, f"{f.where}.{key}[{i}]")
                 for i, o in enumerate(f.list(key, max_len=max_len)))


@dataclass(frozen=True)
class Statement:
    """What the people responsible say about the model (``card.toml``)."""

    owner: str = ""
    contact: str = ""
    intended_use: str = ""
    out_of_scope: str = ""
    limitations: str = ""
    ethical_considerations: str = ""
    review_by: str | None = None  # YYYY-MM-DD

    def to_dict(self) -> dict[str, Any]:
        return {k.name: getattr(self, k.name) for k in fields(self)}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Statement:
        f = Fields(obj, where)
        texts = {k: f.str(k, max_len=MAX_TEXT) for k in STATEMENT_FIELDS if k != "review_by"}
        review_by = _opt_str(f, "review_by", 10)
        if review_by is not None:
            try:
                parse_date(review_by, f"{where}.review_by")
            except ValueError as exc:
                raise f.bad("review_by", str(exc)) from exc
        f.done()
        return cls(**texts, review_by=review_by)


STATEMENT_FIELDS = tuple(k.name for k in fields(Statement))


@dataclass(frozen=True)
class Estimate:
    """A measured value with its 95 % interval and how the interval was found."""

    name: str
    value: float | None
    low: float | None = None
    high: float | None = None
    method: str = "none"  # wilson | bootstrap | normal | none

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "low": self.low, "high": self.high,
                "method": self.method}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Estimate:
        f = Fields(obj, where)
        out = cls(f.str("name", max_len=MAX_NAME), f.opt_float("value"), f.opt_float("low"),
                  f.opt_float("high"), f.choice("method", METHODS))
        f.done()
        return out


@dataclass(frozen=True)
class Evaluation:
    """The metrics of the packaged model on the evaluation rows."""

    data: str  # held_out | training
    data_sha256: str
    rows: int
    metrics: tuple[Estimate, ...]

    def metric(self, name: str) -> Estimate | None:
        return next((m for m in self.metrics if m.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "data_sha256": self.data_sha256, "rows": self.rows,
                "metrics": [m.to_dict() for m in self.metrics]}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Evaluation:
        f = Fields(obj, where)
        out = cls(f.choice("data", ("held_out", "training")), f.str("data_sha256", max_len=64),
                  f.int("rows"), _items(f, "metrics", Estimate, 32))
        f.done()
        return out


@dataclass(frozen=True)
class SliceGroup:
    value: str  # the category, or the bin as "[lo, hi)"
    n: int
    metrics: tuple[Estimate, ...]

    def metric(self, name: str) -> Estimate | None:
        return next((m for m in self.metrics if m.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "n": self.n, "metrics": [m.to_dict() for m in self.metrics]}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> SliceGroup:
        f = Fields(obj, where)
        out = cls(f.str("value", max_len=MAX_NAME), f.int("n"),
                  _items(f, "metrics", Estimate, 32))
        f.done()
        return out


@dataclass(frozen=True)
class Slice:
    """Every metric per group of one column; ``worst`` names the group with the worst
    ``metric``."""

    column: str
    binning: str  # categorical | quantiles
    metric: str
    groups: tuple[SliceGroup, ...]
    worst: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "binning": self.binning, "metric": self.metric,
                "groups": [g.to_dict() for g in self.groups], "worst": self.worst}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Slice:
        f = Fields(obj, where)
        out = cls(f.str("column", max_len=MAX_NAME), f.choice("binning", ("categorical",
                                                                          "quantiles")),
                  f.str("metric", max_len=MAX_NAME), _items(f, "groups", SliceGroup, MAX_GROUPS),
                  _opt_str(f, "worst"))
        f.done()
        return out


@dataclass(frozen=True)
class FairnessGroup:
    value: str
    n: int
    # classifiers: selection_rate, true_positive_rate, false_positive_rate;
    # regressors: mean_absolute_error, mean_prediction
    rates: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "n": self.n, "rates": dict(sorted(self.rates.items()))}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> FairnessGroup:
        f = Fields(obj, where)
        out = cls(f.str("value", max_len=MAX_NAME), f.int("n"), _opt_floats(f, "rates"))
        f.done()
        return out


@dataclass(frozen=True)
class FairnessReport:
    """Per-group rates of one sensitive column and the gaps between its groups."""

    column: str
    model_input: bool  # whether the model also takes this column as an input
    positive_label: str | None  # classifiers: the outcome whose rates are compared
    groups: tuple[FairnessGroup, ...]
    gaps: dict[str, float | None]  # demographic_parity_difference, ... (fairlearn's names)

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "model_input": self.model_input,
                "positive_label": self.positive_label,
                "groups": [g.to_dict() for g in self.groups],
                "gaps": dict(sorted(self.gaps.items()))}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> FairnessReport:
        f = Fields(obj, where)
        out = cls(f.str("column", max_len=MAX_NAME), f.bool("model_input"),
                  _opt_str(f, "positive_label"), _items(f, "groups", FairnessGroup, MAX_GROUPS),
                  _opt_floats(f, "gaps"))
        f.done()
        return out


@dataclass(frozen=True)
class FairnessCheck:
    """One bound on one gap of one sensitive column. ``kind`` ``max`` bounds a difference
    from above, ``min`` a ratio from below."""

    column: str
    gap: str
    value: float | None
    bound: float
    kind: str  # max | min
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "gap": self.gap, "value": self.value,
                "bound": self.bound, "kind": self.kind, "passed": self.passed}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> FairnessCheck:
        f = Fields(obj, where)
        out = cls(f.str("column", max_len=MAX_NAME), f.str("gap", max_len=MAX_NAME),
                  f.opt_float("value"), f.float("bound"), f.choice("kind", ("max", "min")),
                  f.bool("passed"))
        f.done()
        return out


@dataclass(frozen=True)
class Importance:
    feature: str
    mean: float  # mean drop of the score when the feature is permuted
    std: float
    low: float  # 95 % interval of the mean over the repeats
    high: float

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "mean": self.mean, "std": self.std, "low": self.low,
                "high": self.high}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Importance:
        f = Fields(obj, where)
        out = cls(f.str("feature", max_len=MAX_NAME), f.float("mean"), f.float("std"),
                  f.float("low"), f.float("high"))
        f.done()
        return out


@dataclass(frozen=True)
class Importances:
    """Permutation importance of each input on the evaluation rows, most important first."""

    scoring: str
    repeats: int
    seed: int
    features: tuple[Importance, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"scoring": self.scoring, "repeats": self.repeats, "seed": self.seed,
                "features": [i.to_dict() for i in self.features]}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Importances:
        f = Fields(obj, where)
        out = cls(f.str("scoring", max_len=MAX_NAME), f.int("repeats"), f.int("seed"),
                  _items(f, "features", Importance, 4096))
        f.done()
        return out


DIRECTIONS = ("higher", "lower")  # which way a metric is better
VERDICTS = ("win", "lose")
MAX_RULES = 16
MAX_SCHEMA_CHANGES = 64


@dataclass(frozen=True)
class MetricComparison:
    """One metric of both models on the same rows: ``delta`` is the challenger's value minus
    the champion's, ``low``/``high`` its paired 95 % interval (``None`` when not measured on
    the rows: latency, size)."""

    name: str
    better: str  # higher | lower
    champion: float | None
    challenger: float | None
    delta: float | None
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "better": self.better, "champion": self.champion,
                "challenger": self.challenger, "delta": self.delta, "low": self.low,
                "high": self.high}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> MetricComparison:
        f = Fields(obj, where)
        out = cls(f.str("name", max_len=MAX_NAME), f.choice("better", DIRECTIONS),
                  f.opt_float("champion"), f.opt_float("challenger"), f.opt_float("delta"),
                  f.opt_float("low"), f.opt_float("high"))
        f.done()
        return out


@dataclass(frozen=True)
class PairedTest:
    """The paired significance test of the primary metric on the same rows: McNemar's exact
    test for accuracy (``champion_only``/``challenger_only``: the discordant rows only that
    model got right), a paired bootstrap interval otherwise (``p_value`` ``None``)."""

    name: str  # mcnemar_exact | paired_bootstrap
    metric: str
    p_value: float | None
    champion_only: int | None = None
    challenger_only: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "p_value": self.p_value,
                "champion_only": self.champion_only,
                "challenger_only": self.challenger_only}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> PairedTest:
        f = Fields(obj, where)
        name = f.choice("name", ("mcnemar_exact", "paired_bootstrap"))
        metric = f.str("metric", max_len=MAX_NAME)
        p = f.opt_float("p_value")
        counts = []
        for key in ("champion_only", "challenger_only"):
            value = f.raw(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise f.bad(key, "expected a count or null")
            counts.append(value)
        f.done()
        return cls(name, metric, p, *counts)


@dataclass(frozen=True)
class RuleResult:
    """One promotion rule as written (``accuracy>=+0.01``) and how it was judged.
    ``observed`` is the absolute difference, the relative difference or the ratio, as the
    rule's ``kind`` says; an ``improvement`` rule also needs ``significant`` (``None`` where
    it was not judged: no improvement asked, a metric not measured on the rows, or the
    threshold itself not met)."""

    rule: str
    metric: str
    kind: str  # absolute | relative | ratio
    observed: float | None
    improvement: bool
    significant: bool | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "metric": self.metric, "kind": self.kind,
                "observed": self.observed, "improvement": self.improvement,
                "significant": self.significant, "passed": self.passed}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> RuleResult:
        f = Fields(obj, where)
        rule = f.str("rule", max_len=MAX_NAME)
        metric = f.str("metric", max_len=MAX_NAME)
        kind = f.choice("kind", ("absolute", "relative", "ratio"))
        observed = f.opt_float("observed")
        improvement = f.bool("improvement")
        significant = f.raw("significant")
        if significant is not None and not isinstance(significant, bool):
            raise f.bad("significant", "expected true, false or null")
        out = cls(rule, metric, kind, observed, improvement, significant, f.bool("passed"))
        f.done()
        return out


@dataclass(frozen=True)
class SliceComparison:
    """The primary metric of both models in one group of a ``--slice-by`` column; ``loss``
    is how much worse the challenger is there (positive: worse), held to ``bound``."""

    column: str
    value: str
    n: int
    champion: float | None
    challenger: float | None
    loss: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "value": self.value, "n": self.n,
                "champion": self.champion, "challenger": self.challenger, "loss": self.loss,
                "passed": self.passed}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> SliceComparison:
        f = Fields(obj, where)
        out = cls(f.str("column", max_len=MAX_NAME), f.str("value", max_len=MAX_NAME),
                  f.int("n"), f.opt_float("champion"), f.opt_float("challenger"),
                  f.opt_float("loss"), f.bool("passed"))
        f.done()
        return out


@dataclass(frozen=True)
class Comparison:
    """The full champion/challenger comparison behind :class:`Champion` (``edgepack build
    --champion``): the challenger's identity (this bundle's name and version, the sha256 of
    its model), the champion's model, every metric of both, the paired test, each rule, the
    per-slice non-inferiority, the schema changes, the verdict and whether the build was
    forced past a lost comparison."""

    challenger_name: str
    challenger_version: str
    challenger_model_sha256: str
    champion_model_sha256: str
    rows: int
    data_sha256: str
    metrics: tuple[MetricComparison, ...]
    test: PairedTest
    rules: tuple[RuleResult, ...]
    default_rules: bool  # no --promote-if: the primary metric must not be worse
    slices: tuple[SliceComparison, ...]
    max_slice_loss: float
    schema_changes: tuple[str, ...]
    schema_change_allowed: bool
    verdict: str  # win | lose
    reasons: tuple[str, ...]  # why not a win (empty for a win)
    forced: bool

    def metric(self, name: str) -> MetricComparison | None:
        return next((m for m in self.metrics if m.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "challenger_name": self.challenger_name,
            "challenger_version": self.challenger_version,
            "challenger_model_sha256": self.challenger_model_sha256,
            "champion_model_sha256": self.champion_model_sha256,
            "rows": self.rows, "data_sha256": self.data_sha256,
            "metrics": [m.to_dict() for m in self.metrics], "test": self.test.to_dict(),
            "rules": [r.to_dict() for r in self.rules], "default_rules": self.default_rules,
            "slices": [s.to_dict() for s in self.slices],
            "max_slice_loss": self.max_slice_loss,
            "schema_changes": list(self.schema_changes),
            "schema_change_allowed": self.schema_change_allowed,
            "verdict": self.verdict, "reasons": list(self.reasons), "forced": self.forced,
        }

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Comparison:
        f = Fields(obj, where)

        def texts(key: str, max_len: int) -> tuple[str, ...]:
            items = f.list(key, max_len=max_len)
            if not all(isinstance(t, str) and len(t) <= MAX_TEXT for t in items):
                raise f.bad(key, "expected a list of texts")
            return tuple(items)

        out = cls(
            f.str("challenger_name", max_len=64), f.str("challenger_version", max_len=128),
            f.str("challenger_model_sha256", max_len=64),
            f.str("champion_model_sha256", max_len=64), f.int("rows"),
            f.str("data_sha256", max_len=64),
            _items(f, "metrics", MetricComparison, 32),
            PairedTest.from_dict(f.raw("test"), f"{where}.test"),
            _items(f, "rules", RuleResult, MAX_RULES), f.bool("default_rules"),
            _items(f, "slices", SliceComparison, MAX_COLUMNS * MAX_GROUPS),
            f.float("max_slice_loss"), texts("schema_changes", MAX_SCHEMA_CHANGES),
            f.bool("schema_change_allowed"), f.choice("verdict", VERDICTS),
            texts("reasons", MAX_RULES + MAX_COLUMNS * MAX_GROUPS), f.bool("forced"))
        f.done()
        return out


@dataclass(frozen=True)
class Champion:
    """The bundle this one was compared with on the same evaluation rows.

    ``delta`` is this model's ``metric`` minus the champion's, with a paired bootstrap 95 %
    interval (the same resampled rows for both); ``won`` when the comparison's verdict is a
    win (before comparisons were recorded: when it was better outright). ``comparison``
    holds the whole comparison; a card written before it existed has none, and its bytes
    (without the key) are unchanged, so bundles in the field still verify."""

    name: str
    version: str
    bundle_sha256: str
    metric: str
    delta: float | None
    low: float | None
    high: float | None
    won: bool
    metrics: tuple[Estimate, ...]  # the champion's, on the same rows
    comparison: Comparison | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = {"name": self.name, "version": self.version,
               "bundle_sha256": self.bundle_sha256, "metric": self.metric,
               "delta": self.delta, "low": self.low, "high": self.high, "won": self.won,
               "metrics": [m.to_dict() for m in self.metrics]}
        if self.comparison is not None:  # only when present: the old shape keeps its bytes
            doc["comparison"] = self.comparison.to_dict()
        return doc

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Champion:
        f = Fields(obj, where)
        comparison = f.raw("comparison", None)
        if comparison is None and f.has("comparison"):
            raise f.bad("comparison", "leave the field out rather than null")
        out = cls(f.str("name", max_len=64), f.str("version", max_len=128),
                  f.str("bundle_sha256", max_len=64), f.str("metric", max_len=MAX_NAME),
                  f.opt_float("delta"), f.opt_float("low"), f.opt_float("high"),
                  f.bool("won"), _items(f, "metrics", Estimate, 32),
                  None if comparison is None else
                  Comparison.from_dict(comparison, f"{where}.comparison"))
        f.done()
        return out


@dataclass(frozen=True)
class TimeRange:
    column: str
    start: str
    end: str

    def to_dict(self) -> dict[str, Any]:
        return {"column": self.column, "start": self.start, "end": self.end}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> TimeRange:
        f = Fields(obj, where)
        out = cls(f.str("column", max_len=MAX_NAME), f.str("start", max_len=64),
                  f.str("end", max_len=64))
        f.done()
        return out


@dataclass(frozen=True)
class ModelCard:
    """The card section of the manifest (see the module docstring)."""

    statement: Statement | None = None
    data_columns: tuple[str, ...] = ()  # every column of the training file, target included
    time_range: TimeRange | None = None
    evaluation: Evaluation | None = None
    slices: tuple[Slice, ...] = ()
    fairness: tuple[FairnessReport, ...] = ()
    checks: tuple[FairnessCheck, ...] = ()
    forced: bool = False  # built with --force past a failed fairness check
    importances: Importances | None = None
    champion: Champion | None = None
    schema: int = CARD_SCHEMA

    @property
    def checks_passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "statement": None if self.statement is None else self.statement.to_dict(),
            "data_columns": list(self.data_columns),
            "time_range": None if self.time_range is None else self.time_range.to_dict(),
            "evaluation": None if self.evaluation is None else self.evaluation.to_dict(),
            "slices": [s.to_dict() for s in self.slices],
            "fairness": [r.to_dict() for r in self.fairness],
            "checks": [c.to_dict() for c in self.checks],
            "forced": self.forced,
            "importances": None if self.importances is None else self.importances.to_dict(),
            "champion": None if self.champion is None else self.champion.to_dict(),
        }

    @classmethod
    def from_dict(cls, obj: Any, where: str = "manifest.card") -> ModelCard:
        """Parse and check a card section.

        Raises:
            SchemaError: naming the field at fault.
        """
        f = Fields(obj, where)
        schema = f.int("schema")
        if schema != CARD_SCHEMA:
            raise f.bad("schema", f"unsupported card schema {schema} "
                                  f"(this edgefleet reads {CARD_SCHEMA})")

        def opt(key: str, parse: Any) -> Any:
            value = f.raw(key)
            return None if value is None else parse(value, f"{where}.{key}")

        columns = f.list("data_columns", max_len=4096)
        if not all(isinstance(c, str) and len(c) <= MAX_NAME for c in columns):
            raise f.bad("data_columns", "must be column names")
        out = cls(
            statement=opt("statement", Statement.from_dict),
            data_columns=tuple(columns),
            time_range=opt("time_range", TimeRange.from_dict),
            evaluation=opt("evaluation", Evaluation.from_dict),
            slices=_items(f, "slices", Slice, MAX_COLUMNS),
            fairness=_items(f, "fairness", FairnessReport, MAX_COLUMNS),
            checks=_items(f, "checks", FairnessCheck, 64),
            forced=f.bool("forced"),
            importances=opt("importances", Importances.from_dict),
            champion=opt("champion", Champion.from_dict),
            schema=schema,
        )
        f.done()
        return out
