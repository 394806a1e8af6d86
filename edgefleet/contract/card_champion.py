"""The card's comparison with a champion bundle: metrics, the paired test, the rules, the verdict.

:class:`Champion` names the champion and holds the full :class:`Comparison` (every metric
of both, the paired test, the promotion rules, per-slice non-inferiority, schema changes,
the verdict); the packager measures it (:mod:`packager.champion`), this module holds and
checks the values. Import the names from :mod:`edgefleet.contract.card`.

This module reads no files and computes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgefleet.contract.card_base import (
    MAX_COLUMNS,
    MAX_GROUPS,
    MAX_NAME,
    MAX_TEXT,
    Estimate,
    items_of,
)
from edgefleet.contract.wire import Fields

__all__ = ["DIRECTIONS", "MAX_RULES", "MAX_SCHEMA_CHANGES", "VERDICTS", "Champion",
           "Comparison", "MetricComparison", "PairedTest", "RuleResult", "SliceComparison"]

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
            items_of(f, "metrics", MetricComparison, 32),
            PairedTest.from_dict(f.raw("test"), f"{where}.test"),
            items_of(f, "rules", RuleResult, MAX_RULES), f.bool("default_rules"),
            items_of(f, "slices", SliceComparison, MAX_COLUMNS * MAX_GROUPS),
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
                  f.bool("won"), items_of(f, "metrics", Estimate, 32),
                  None if comparison is None else
                  Comparison.from_dict(comparison, f"{where}.comparison"))
        f.done()
        return out
