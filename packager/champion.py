"""Champion vs challenger (``edgepack build --champion``): does the new model genuinely win?

Both models are run by the device's own runner on the same held-out rows (the build does
that, and times them); this module compares what they answered:

- **Every metric of both**, with the challenger-minus-champion difference and its paired
  95 % interval (a seeded bootstrap of :data:`PAIRED_BOOTSTRAP` resamples, the same rows
  for both models in each): accuracy and macro F1 for classifiers, MAE, RMSE and R² for
  regressors; and for both tasks ``latency_p95`` (milliseconds per single-row call, on the
  build machine: a relative figure) and ``size`` (bytes of ``model.onnx``, what a device
  downloads and loads).
- **A paired significance test** of the primary metric: McNemar's exact test for accuracy
  (a two-sided binomial test on the discordant rows, scipy's ``binomtest``); a paired
  bootstrap interval for every other metric.
- **Promotion rules** in MLflow's spirit (``--promote-if``, repeatable, all must hold):
  ``accuracy>=+0.01`` (a minimum absolute improvement), ``f1_macro>=+2%`` (relative),
  ``mae<=-0.5`` (lower is better), ``latency_p95<=1.2x``, ``size<=1.5x`` (ratios). A rule
  that asks for an *improvement* (a positive change of a higher-is-better metric, a
  negative one of a lower-is-better metric, a ratio past 1 in the better direction) on a
  metric measured on the rows also needs significance: McNemar p < 0.05 for accuracy, the
  paired interval excluding 0 for the rest. Without ``--promote-if`` the default rule is
  that the primary metric (accuracy, or MAE) must not be worse: ``accuracy>=+0`` or
  ``mae<=+0``, on the point values, no significance asked.
- **Non-inferiority per slice** with ``--slice-by``: in no group of a slice column may the
  challenger's primary metric be worse than the champion's by more than ``--max-slice-loss``
  (:data:`MAX_SLICE_LOSS` by default, in the metric's own units: accuracy points, or MAE).
- **Schema changes** (a feature added, removed or retyped, a class added or removed) are
  listed; the build refuses them unless declared.

The verdict is a win when every rule holds (with its significance) and every slice is
non-inferior; the reasons otherwise are listed. This module reads no files and decides
nothing about the build (the build refuses a loss unless ``--force``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgefleet.contract.card import (
    MAX_RULES,
    MAX_SCHEMA_CHANGES,
    Champion,
    Comparison,
    Estimate,
    MetricComparison,
    PairedTest,
    RuleResult,
    SliceComparison,
)
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.manifest import Manifest
from edgefleet.contract.runtime import Prediction
from edgefleet.parsing import Threshold, parse_threshold
from packager import evaluate
from packager.errors import PromotionRuleError

__all__ = ["MAX_SLICE_LOSS", "METRICS", "PAIRED_BOOTSTRAP", "Metric", "Rule", "compare",
           "default_rules", "latency_p95", "parse_rules", "schema_changes", "table"]

PAIRED_BOOTSTRAP = 1000
ALPHA = 0.05
MAX_SLICE_LOSS = 0.02
LATENCY_ROWS = 200
LATENCY_WARMUP = 10
SEED = 0
Columns = dict[str, np.ndarray]


@dataclass(frozen=True)
class Metric:
    name: str
    better: str  # higher | lower
    tasks: tuple[str, ...]
    on_rows: bool  # measured on the evaluation rows (so a paired test applies)


METRICS = {m.name: m for m in (
    Metric("accuracy", "higher", ("classification",), True),
    Metric("f1_macro", "higher", ("classification",), True),
    Metric("mae", "lower", ("regression",), True),
    Metric("rmse", "lower", ("regression",), True),
    Metric("r2", "higher", ("regression",), True),
    Metric("latency_p95", "lower", ("classification", "regression"), False),
    Metric("size", "lower", ("classification", "regression"), False),
)}


def primary(task: str) -> str:
    return "accuracy" if task == "classification" else "mae"


@dataclass(frozen=True)
class Rule:
    """A parsed ``--promote-if`` rule."""

    threshold: Threshold
    metric: Metric

    @property
    def kind(self) -> str:
        return {"": "absolute", "%": "relative", "x": "ratio"}[self.threshold.unit]

    @property
    def improvement(self) -> bool:
        """Whether the rule asks the challenger to be better (not merely not much worse)."""
        v, up = self.threshold.value, self.metric.better == "higher"
        if self.threshold.unit == "x":
            return v > 1 if up else v < 1
        return v > 0 if up else v < 0

    def holds(self, observed: float | None) -> bool:
        if observed is None:
            return False
        v = self.threshold.value
        return observed >= v if self.threshold.op == ">=" else observed <= v


def parse_rules(items: Sequence[str]) -> tuple[Rule, ...]:
    """``--promote-if`` items → rules.

    Raises:
        PromotionRuleError: quoting the rule: malformed, an unknown metric, or a comparison
            the wrong way round for the metric (``accuracy<=…``, ``mae>=…``).
    """
    if len(items) > MAX_RULES:
        raise PromotionRuleError(f"--promote-if: {len(items)} rules; at most {MAX_RULES}")
    out = []
    for item in items:
        try:
            t = parse_threshold(item, "--promote-if")
        except SchemaError as exc:
            raise PromotionRuleError(str(exc)) from exc
        metric = METRICS.get(t.name)
        if metric is None:
            raise PromotionRuleError(f"--promote-if {item!r}: unknown metric {t.name!r} (use "
                                     f"{', '.join(METRICS)})")
        want = ">=" if metric.better == "higher" else "<="
        if t.op != want:
            raise PromotionRuleError(
                f"--promote-if {item!r}: {t.name} is better {metric.better}, so its rule "
                f"reads {t.name}{want}… ({'accuracy>=+0.01' if want == '>=' else 'mae<=-0.5'}"
                " asks for an improvement, a value of the other sign bounds a loss)")
        out.append(Rule(t, metric))
    return tuple(out)


def default_rules(task: str) -> tuple[Rule, ...]:
    """No ``--promote-if``: the primary metric must not be worse."""
    return parse_rules([f"{primary(task)}{'>=' if task == 'classification' else '<='}+0"])


def _check_task(rules: Sequence[Rule], task: str) -> None:
    for r in rules:
        if task not in r.metric.tasks:
            known = [m.name for m in METRICS.values() if task in m.tasks]
            raise PromotionRuleError(f"--promote-if {r.threshold.text!r}: {r.metric.name} is "
                                     f"not a metric of a {task} model (use "
                                     f"{', '.join(known)})")


# --------------------------------------------------------------------------- schema


def schema_changes(champion: Manifest, challenger: Manifest) -> tuple[str, ...]:
    """What differs between the two models' inputs and classes, one sentence each."""
    theirs = {s.name: s for s in champion.inputs}
    ours = {s.name: s for s in challenger.inputs}
    out = [f"feature {n!r} removed" for n in theirs if n not in ours]
    out += [f"feature {n!r} added" for n in ours if n not in theirs]
    out += [f"feature {n!r} retyped {theirs[n].kind} -> {ours[n].kind}" for n in ours
            if n in theirs and theirs[n].kind != ours[n].kind]
    old, new = [str(c) for c in champion.classes], [str(c) for c in challenger.classes]
    out += [f"class {c!r} removed" for c in old if c not in new]
    out += [f"class {c!r} added" for c in new if c not in old]
    if len(out) > MAX_SCHEMA_CHANGES:  # the card holds a bounded list; the count stays exact
        out = [*out[:MAX_SCHEMA_CHANGES - 1],
               f"and {len(out) - MAX_SCHEMA_CHANGES + 1} more changes"]
    return tuple(out)


# --------------------------------------------------------------------------- latency


def latency_p95(runs: Sequence[Callable[[Columns], Prediction]],
                columns: Sequence[Columns], rows: int = LATENCY_ROWS) -> list[float]:
    """Each model's 95th percentile of single-row call time (ms) on the first ``rows`` rows,
    the models interleaved row by row (alternating which goes first) so that a busy machine
    slows both alike."""
    n = min(rows, min(len(next(iter(c.values()))) for c in columns)) if columns else 0
    if n == 0:
        return [math.nan] * len(runs)
    one = [[{k: v[i:i + 1] for k, v in c.items()} for i in range(n)] for c in columns]
    for run, feeds in zip(runs, one, strict=True):
        for i in range(min(LATENCY_WARMUP, n)):
            run(feeds[i])
    times: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for i in range(n):
        for j in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            runs[j](one[j][i])
            times[j].append(time.perf_counter() - start)
    return [float(np.percentile(t, 95)) * 1000.0 for t in times]


# --------------------------------------------------------------------------- comparison


def _per_row(task: str, target: np.ndarray, pred: Prediction,
             labels: np.ndarray | None) -> dict[str, Callable[[np.ndarray], float]]:
    """Each row metric as a function of resampled row indices."""
    if task == "classification":
        truth = target.astype(str)
        got = np.asarray(pred.labels).astype(str)
        right = (got == truth).astype(np.float64)
        k = len(labels)
        pair = np.searchsorted(labels, truth) * k + np.searchsorted(labels, got)
        return {"accuracy": lambda i: float(right[i].mean()),
                "f1_macro": lambda i: evaluate._f1_macro(
                    np.bincount(pair[i], minlength=k * k).reshape(k, k))}
    y = target.astype(np.float64)
    err = y - np.asarray(pred.values, dtype=np.float64)
    sq = err ** 2
    return {"mae": lambda i: float(np.abs(err[i]).mean()),
            "rmse": lambda i: float(np.sqrt(sq[i].mean())),
            "r2": lambda i: evaluate._r2(y[i], sq[i])}


def _paired_intervals(names: Sequence[str], ours: dict, theirs: dict, n: int
                      ) -> dict[str, tuple[float | None, float | None]]:
    if n < 2:
        return {k: (None, None) for k in names}
    rng = np.random.default_rng(SEED)
    draws: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(PAIRED_BOOTSTRAP):
        i = rng.integers(0, n, n)  # the same rows for both models
        for k in names:
            draws[k].append(ours[k](i) - theirs[k](i))
    out = {}
    for k, values in draws.items():
        finite = np.asarray([v for v in values if math.isfinite(v)])
        out[k] = (None, None) if finite.size == 0 else \
            (float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5)))
    return out


def _mcnemar(target: np.ndarray, ours: Prediction, theirs: Prediction) -> PairedTest:
    from scipy.stats import binomtest

    truth = target.astype(str)
    a = np.asarray(ours.labels).astype(str) == truth
    b = np.asarray(theirs.labels).astype(str) == truth
    champion_only, challenger_only = int(np.sum(b & ~a)), int(np.sum(a & ~b))
    discordant = champion_only + challenger_only
    p = float(binomtest(challenger_only, discordant, 0.5).pvalue) if discordant else 1.0
    return PairedTest("mcnemar_exact", "accuracy", p, champion_only, challenger_only)


def _significant(rule: Rule, metric: MetricComparison, test: PairedTest) -> bool | None:
    """Whether an improvement rule's change is real; ``None`` where no test applies."""
    if not rule.improvement or not rule.metric.on_rows:
        return None
    if rule.metric.name == "accuracy" and test.name == "mcnemar_exact":
        return (test.p_value is not None and test.p_value < ALPHA
                and (test.challenger_only or 0) > (test.champion_only or 0))
    if metric.low is None or metric.high is None:
        return False
    return metric.low > 0 if rule.metric.better == "higher" else metric.high < 0


def _observed(rule: Rule, m: MetricComparison) -> float | None:
    if m.champion is None or m.challenger is None:
        return None
    if rule.kind == "absolute":
        return m.challenger - m.champion
    if rule.kind == "relative":
        return (m.challenger - m.champion) / abs(m.champion) if m.champion else None
    return m.challenger / m.champion if m.champion > 0 else None


def _fmt(v: float | None, digits: int = 4, sign: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:+.{digits}g}" if sign else f"{v:.{digits}g}"


@dataclass(frozen=True)
class Identity:
    """Who is compared: the champion bundle and the challenger being built."""

    champion_name: str
    champion_version: str
    champion_bundle_sha256: str
    champion_model_sha256: str
    challenger_name: str
    challenger_version: str
    challenger_model_sha256: str


def compare(task: str, target: np.ndarray, ours: Prediction, theirs: Prediction, *,
            who: Identity, data_sha256: str, rules: Sequence[Rule],
            latency_ms: tuple[float, float], size: tuple[int, int],
            slice_columns: Columns, slice_kinds: dict[str, str],
            max_slice_loss: float = MAX_SLICE_LOSS, changes: Sequence[str] = (),
            schema_change_allowed: bool = False, forced: bool = False) -> Champion:
    """The whole comparison (see the module docstring); ``latency_ms`` and ``size`` are
    (champion, challenger); ``rules`` empty means the default rule.

    Raises:
        PromotionRuleError: a rule on a metric this task does not have.
        DataError: a slice column with too many groups.
    """
    target = np.asarray(target)
    main = primary(task)
    given = tuple(rules) or default_rules(task)
    _check_task(given, task)
    n = len(target)
    their_estimates = evaluate._metric_estimates(task, target, theirs)
    metrics = _metric_comparisons(task, target, ours, theirs, their_estimates, latency_ms, size)
    by_name = {m.name: m for m in metrics}
    main_m = by_name[main]
    test = _mcnemar(target, ours, theirs) if task == "classification" else \
        PairedTest("paired_bootstrap", main, None)
    results, reasons = _judge_rules(given, by_name, test)
    slices = _slices(task, target, ours, theirs, slice_columns, slice_kinds, max_slice_loss)
    reasons += [f"slice {s.column}={s.value}: {main} worse by {_fmt(s.loss)} (n {s.n}; at "
                f"most {max_slice_loss:g})" for s in slices if not s.passed]
    verdict = "lose" if reasons else "win"
    comparison = Comparison(
        who.challenger_name, who.challenger_version, who.challenger_model_sha256,
        who.champion_model_sha256, n, data_sha256, tuple(metrics), test, tuple(results),
        not rules, slices, float(max_slice_loss), tuple(changes), schema_change_allowed,
        verdict, tuple(reasons), forced)
    main_theirs: tuple[Estimate, ...] = their_estimates
    return Champion(who.champion_name, who.champion_version, who.champion_bundle_sha256, main,
                    main_m.delta, main_m.low, main_m.high, verdict == "win", main_theirs,
                    comparison)


def _metric_comparisons(task: str, target: np.ndarray, ours: Prediction, theirs: Prediction,
                        their_estimates: tuple[Estimate, ...], latency_ms: tuple[float, float],
                        size: tuple[int, int]) -> list[MetricComparison]:
    """Every metric of both models, with the paired interval of the difference; then
    latency and size (no interval)."""
    n = len(target)
    our_estimates = evaluate._metric_estimates(task, target, ours)
    labels = None
    if task == "classification":
        labels = np.unique(np.concatenate([target.astype(str),
                                           np.asarray(ours.labels).astype(str),
                                           np.asarray(theirs.labels).astype(str)]))
    f_ours, f_theirs = (_per_row(task, target, p, labels) for p in (ours, theirs))
    intervals = _paired_intervals(list(f_ours), f_ours, f_theirs, n)
    metrics = []
    for name in f_ours:
        a = next((e.value for e in their_estimates if e.name == name), None)
        b = next((e.value for e in our_estimates if e.name == name), None)
        metrics.append(MetricComparison(name, METRICS[name].better, a, b,
                                        None if a is None or b is None else b - a,
                                        *intervals[name]))
    for name, (a, b) in (("latency_p95", latency_ms), ("size", size)):
        a = None if a is None or not math.isfinite(a) else float(a)
        b = None if b is None or not math.isfinite(b) else float(b)
        metrics.append(MetricComparison(name, "lower", a, b,
                                        None if a is None or b is None else b - a))
    return metrics


def _judge_rules(given: Sequence[Rule], by_name: dict[str, MetricComparison], test: PairedTest
                 ) -> tuple[list[RuleResult], list[str]]:
    """Each promotion rule's result, and why each that failed did."""
    results, reasons = [], []
    for rule in given:
        m = by_name[rule.metric.name]
        observed = _observed(rule, m)
        met = rule.holds(observed)
        significant = _significant(rule, m, test) if met else None  # moot when not met
        passed = met and significant is not False
        results.append(RuleResult(rule.threshold.text, rule.metric.name, rule.kind, observed,
                                  rule.improvement, significant, passed))
        if not met:
            reasons.append(f"rule {rule.threshold.text}: observed "
                           f"{_fmt(observed, sign=rule.kind != 'ratio')}")
        elif significant is False:
            reasons.append(f"rule {rule.threshold.text}: met but not significant ("
                           + (f"McNemar p = {test.p_value:.3g}" if rule.metric.name ==
                              "accuracy" and test.p_value is not None else
                              f"95 % interval [{_fmt(m.low, sign=True)}, "
                              f"{_fmt(m.high, sign=True)}] includes 0")
                           + ")")
    return results, reasons


def _slices(task: str, target: np.ndarray, ours: Prediction, theirs: Prediction,
            columns: Columns, kinds: dict[str, str], bound: float
            ) -> tuple[SliceComparison, ...]:
    main = primary(task)
    higher = METRICS[main].better == "higher"
    if task == "classification":
        truth = target.astype(str)
        score_ours = (np.asarray(ours.labels).astype(str) == truth).astype(np.float64)
        score_theirs = (np.asarray(theirs.labels).astype(str) == truth).astype(np.float64)
    else:
        y = target.astype(np.float64)
        score_ours = np.abs(y - np.asarray(ours.values, dtype=np.float64))
        score_theirs = np.abs(y - np.asarray(theirs.values, dtype=np.float64))
    out = []
    for name, values in columns.items():
        groups, _, order = evaluate._groups(name, values, kinds[name])
        for value in order:
            mask = groups == value
            n = int(mask.sum())
            a, b = float(score_theirs[mask].mean()), float(score_ours[mask].mean())
            loss = a - b if higher else b - a
            out.append(SliceComparison(name, value, n, a, b, loss, loss <= bound + 1e-12))
    return tuple(out)


# --------------------------------------------------------------------------- table


def table(champion: Champion) -> str:
    """The comparison for a person: the failed build's detail and ``edgepack inspect``."""
    c = champion.comparison
    if c is None:
        return (f"  champion {champion.name} {champion.version}: {champion.metric} difference "
                f"{_fmt(champion.delta, sign=True)} (recorded before full comparisons)")
    lines = [f"  champion   {champion.name} {champion.version} (bundle sha256 "
             f"{champion.bundle_sha256[:16]}…, model {c.champion_model_sha256[:16]}…)",
             f"  challenger {c.challenger_name} {c.challenger_version} (model "
             f"{c.challenger_model_sha256[:16]}…), on {c.rows} held-out rows "
             f"(sha256 {c.data_sha256[:16]}…)",
             f"  {'metric':<14} {'better':<7} {'champion':>11} {'challenger':>11} "
             f"{'delta':>10}  95 % paired interval"]
    for m in c.metrics:
        interval = "" if m.low is None else f"[{_fmt(m.low, sign=True)}, " \
                                            f"{_fmt(m.high, sign=True)}]"
        unit = {"latency_p95": " ms", "size": " B"}.get(m.name, "")
        lines.append(f"  {m.name + unit:<14} {m.better:<7} {_fmt(m.champion, 6):>11} "
                     f"{_fmt(m.challenger, 6):>11} {_fmt(m.delta, sign=True):>10}  {interval}")
    t = c.test
    if t.name == "mcnemar_exact":
        lines.append(f"  test       McNemar exact on accuracy: {t.challenger_only} rows only the "
                     f"challenger got right, {t.champion_only} only the champion; "
                     f"p = {_fmt(t.p_value, 3)}")
    else:
        lines.append(f"  test       paired bootstrap ({PAIRED_BOOTSTRAP} resamples) on {t.metric}")
    lines.append("  rules" + (" (default: the primary metric must not be worse)"
                              if c.default_rules else ""))
    for r in c.rules:
        sig = {None: "", True: ", significant", False: ", NOT significant"}[r.significant]
        lines.append(f"    {r.rule:<24} observed {_fmt(r.observed, sign=r.kind != 'ratio'):>9}"
                     f" ({r.kind}{sig})  {'pass' if r.passed else 'FAIL'}")
    if c.slices:
        lines.append(f"  slices     no group worse by more than {c.max_slice_loss:g} in "
                     f"{champion.metric}")
        for s in c.slices:
            lines.append(f"    {s.column}={s.value:<20} n {s.n:<6} {_fmt(s.champion):>8} -> "
                         f"{_fmt(s.challenger):<8} loss {_fmt(s.loss, sign=True):>9}  "
                         f"{'pass' if s.passed else 'FAIL'}")
    if c.schema_changes:
        lines.append("  schema     " + "; ".join(c.schema_changes)
                     + (" (allowed: --allow-schema-change)" if c.schema_change_allowed
                        else ""))
    else:
        lines.append("  schema     unchanged")
    lines.append(f"  verdict    {c.verdict.upper()}"
                 + (" (FORCED: built with --force)" if c.forced else ""))
    lines += [f"    - {reason}" for reason in c.reasons]
    return "\n".join(lines)
