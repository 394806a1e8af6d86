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

This module is the public face: it holds the statement, the measured sections and the
card itself, and names everything; the champion comparison lives in ``card_champion`` and
the shared bounds and readers in ``card_base``. Import from here.

This module reads no files and computes nothing: the packager measures, this module holds
and checks the values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from edgefleet.contract.card_base import (
    CARD_SCHEMA,
    DATE_RE,
    MAX_COLUMNS,
    MAX_GROUPS,
    MAX_NAME,
    MAX_TEXT,
    METHODS,
    Estimate,
    items_of,
    opt_floats,
    opt_str,
    parse_date,
)
from edgefleet.contract.card_champion import (
    DIRECTIONS,
    MAX_RULES,
    MAX_SCHEMA_CHANGES,
    VERDICTS,
    Champion,
    Comparison,
    MetricComparison,
    PairedTest,
    RuleResult,
    SliceComparison,
)
from edgefleet.contract.wire import Fields

__all__ = [
    "CARD_SCHEMA",
    "DATE_RE",
    "DIRECTIONS",
    "MAX_COLUMNS",
    "MAX_GROUPS",
    "MAX_NAME",
    "MAX_RULES",
    "MAX_SCHEMA_CHANGES",
    "MAX_TEXT",
    "METHODS",
    "STATEMENT_FIELDS",
    "VERDICTS",
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
        review_by = opt_str(f, "review_by", 10)
        if review_by is not None:
            try:
                parse_date(review_by, f"{where}.review_by")
            except ValueError as exc:
                raise f.bad("review_by", str(exc)) from exc
        f.done()
        return cls(**texts, review_by=review_by)


STATEMENT_FIELDS = tuple(k.name for k in fields(Statement))


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
                  f.int("rows"), items_of(f, "metrics", Estimate, 32))
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
                  items_of(f, "metrics", Estimate, 32))
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
                  f.str("metric", max_len=MAX_NAME), items_of(f, "groups", SliceGroup, MAX_GROUPS),
                  opt_str(f, "worst"))
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
        out = cls(f.str("value", max_len=MAX_NAME), f.int("n"), opt_floats(f, "rates"))
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
                  opt_str(f, "positive_label"), items_of(f, "groups", FairnessGroup, MAX_GROUPS),
                  opt_floats(f, "gaps"))
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
                  items_of(f, "features", Importance, 4096))
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
            slices=items_of(f, "slices", Slice, MAX_COLUMNS),
            fairness=items_of(f, "fairness", FairnessReport, MAX_COLUMNS),
            checks=items_of(f, "checks", FairnessCheck, 64),
            forced=f.bool("forced"),
            importances=opt("importances", Importances.from_dict),
            champion=opt("champion", Champion.from_dict),
            schema=schema,
        )
        f.done()
        return out
