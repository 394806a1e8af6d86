"""Drift statistics and verdicts: one profile (the base) against another (the live one).

The base is the bundle's reference profile (the training data) or, for a rollout gate, a
live profile of the control devices; the live side is a device's or a group's merged
window summaries. Both are :class:`~edgefleet.contract.profile.Profile` objects over the same
spec, and everything here is computed from their summaries (per-slot counts and sums,
missing, min, max, M2), never from raw rows, vectorised over the slots.

Per feature (inputs and outputs alike), with ``p`` live and ``q`` base proportions:

- PSI ``Σ (p−q)·ln(p/q)`` over the slots either side occupies (numeric: the ``B + 2``
  slots, below-range and above-range included; categorical: vocabulary, other, unseen;
  missing is a rate of its own). Empty slots are smoothed additively with the Jeffreys
  pseudo-count ½ (the Krichevsky–Trofimov estimate ``(c + ½) / (n + ½k)`` over those ``k``
  slots). Under no drift ``E[PSI] ≈ (k−1)(1/n_live + 1/n_base)``; ``psi_raw`` is the
  statistic, ``psi`` is ``max(0, psi_raw − psi_bias)`` and is the one judged.
- KS ``D`` from the binned CDFs at the reference edges: ``ks`` is the exact maximum on
  that grid, a lower bound of the raw-data ``D``; ``ks_upper`` adds the largest slot
  mass both sides share, an upper bound (``ks_upper − ks ≤ 1/B`` for equal-mass bins).
- Wasserstein-1 ``∫|F_live − F_base|``, divided by the base std ``sqrt(M2/n)``. The
  integral of a CDF over a slot is exact from its count and sum
  (``∫_a^b F = F(a)(b−a) + (c·b − s)/n``), so ``Σ_slots |∫(F_live − F_base)|`` is an
  exact lower bound (``wasserstein_lower``), equal to the distance wherever the CDFs do
  not cross inside a slot (a shift never makes them cross). Where they may, each side's
  within-slot CDF is modelled by the power law with the slot's mean on the side's own
  support in the slot (``[max(a, min), min(b, max)]``) and the model's ``∫|d| − |∫d|`` is
  added. The outer slots run from the smaller min to ``e0`` and from ``eB`` to the
  larger max. Two samples of one distribution are ``wasserstein_bias`` apart on average
  (``sqrt(2/π)·sqrt(1/n_live + 1/n_base)·∫sqrt(F(1−F))``, a Brownian bridge); the rule
  judges ``wasserstein_excess``, the distance beyond that, so small windows do not
  drift on noise (at the cost of needing ``threshold + bias`` for a borderline effect).
- Categorical: the Jensen–Shannon distance, base 2, in [0, 1].
- Rates, live against base: missing (of all rows), out-of-range (numeric: below and
  above, of the present values), unseen (categorical, of the present values).

Every judged statistic must also pass its no-drift bound at the two sides' sizes
(``psi_noise``, ``ks_noise``, ``wasserstein_noise``, ``js_noise``, and the same for each
rate: the value two samples of one distribution stay under with probability ``1 − alpha``,
see :func:`~fleet_server.profiles.statistics.noise_bounds`). The bounds shrink as
``sqrt(1/n_base + 1/n_live)``: on large samples the effect thresholds decide, on the few
hundred rows of a canary stage the bound does, so one feature's noise does not read as
drift (it was one stage in 50 with the effect thresholds alone). A statistic past its
threshold but within its bound is a warning that says so.

A feature is ``insufficient`` below ``min_rows`` (default ``40·max(B−1, 1)`` with ``B``
the reference bins; a categorical feature's bins are its vocabulary, other and unseen)
on either side; rates are judged on rows, distributions on present values. Any drift
rule gives ``drift`` with the reason; PSI alone also has a ``warn`` level.

This module deliberately does not read or write anything (store, MQTT, reference.json),
look at clocks, merge summaries (:meth:`Profile.merge` does) or send alerts; it does not
judge by p-values either: with 10⁵ rows every shift is "significant", so it judges effect
sizes, and the noise bounds only keep small samples from passing them by chance.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Any

import numpy as np

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.profile import CategoricalSpec, NumericSpec, Profile
from edgefleet.contract.wire import Fields
from fleet_server.profiles.statistics import (
    STAT_KEYS,
    categorical_stats,
    noise_bounds,
    numeric_stats,
    rate_noise,
    rates,
    side_of,
)
from fleet_server.profiles.thresholds import Thresholds

__all__ = [
    "DRIFT_SCHEMA",
    "GROUP_RULES",
    "STAT_KEYS",
    "VERDICTS",
    "DriftReport",
    "FeatureDrift",
    "Thresholds",
    "compare",
    "persistent_verdict",
    "positive_importances",
    "suspect_sensors",
]

DRIFT_SCHEMA = 1
VERDICTS = ("ok", "warn", "drift", "insufficient")
ROLES = ("input", "output")
KINDS = ("numeric", "categorical")
MAX_FEATURES = 4096 + 16


# --------------------------------------------------------------------------- results


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's statistics, verdict and the histograms the dashboard plots."""

    name: str
    role: str  # "input" | "output"
    kind: str  # "numeric" | "categorical"
    n_base: int  # present (non-missing) values the distributions are over
    n_live: int
    verdict: str  # "ok" | "warn" | "drift" | "insufficient"
    stats: dict[str, float | None]  # every key of STAT_KEYS; None when not applicable
    reasons: tuple[str, ...]
    labels: tuple[str, ...]  # one per slot
    base_hist: tuple[float, ...]  # proportions per slot (of present values)
    live_hist: tuple[float, ...]
    min_rows: int = 0  # the rows (and values) this feature needed

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "kind": self.kind,
                "n_base": self.n_base, "n_live": self.n_live, "verdict": self.verdict,
                "stats": {k: _finite(self.stats.get(k)) for k in STAT_KEYS},
                "reasons": list(self.reasons), "labels": list(self.labels),
                "base_hist": [_finite(x) or 0.0 for x in self.base_hist],
                "live_hist": [_finite(x) or 0.0 for x in self.live_hist],
                "min_rows": self.min_rows}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "feature") -> FeatureDrift:
        """Raises: SchemaError naming the field at fault."""
        f = Fields(obj, where)
        name, role = f.str("name", max_len=128), f.choice("role", ROLES)
        kind = f.choice("kind", KINDS)
        n_base, n_live = f.int("n_base"), f.int("n_live")
        verdict = f.choice("verdict", VERDICTS)
        sf = f.obj("stats")
        stats = {k: sf.opt_float(k) for k in STAT_KEYS}
        sf.done()
        texts = {k: f.list(k, max_len=256) for k in ("reasons", "labels")}
        for k, items in texts.items():
            if not all(isinstance(s, str) and len(s) <= 512 for s in items):
                raise f.bad(k, "must be strings")
        hists = {}
        for k in ("base_hist", "live_hist"):
            items = f.list(k, max_len=256)
            if len(items) != len(texts["labels"]) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool)
                    and math.isfinite(x) and 0 <= x <= 1 for x in items):
                raise f.bad(k, "must be one proportion in [0, 1] per label")
            hists[k] = tuple(float(x) for x in items)
        out = cls(name, role, kind, n_base, n_live, verdict, stats, tuple(texts["reasons"]),
                  tuple(texts["labels"]), hists["base_hist"], hists["live_hist"],
                  f.int("min_rows", 0))
        f.done()
        return out


GROUP_RULES = ("importance", "count", "important", "predictions", "unseen")


@dataclass(frozen=True)
class DriftReport:
    """The features of one comparison (inputs in spec order, then outputs) and a verdict.

    ``rule`` says how the inputs were weighed (``importance`` with the model's permutation
    importances, ``count`` without); ``importance_share`` is the share of the importance
    the drifting inputs carry (None under the count rule); ``rules`` are the group rules
    that fired (:data:`GROUP_RULES`)."""

    features: tuple[FeatureDrift, ...]
    rows_base: int
    rows_live: int
    share_drifted: float  # of the input features with enough data
    verdict: str
    important: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    reference_hash: str = ""
    rule: str = "count"
    importance_share: float | None = None
    rules: tuple[str, ...] = ()

    def feature(self, name: str, role: str = "input") -> FeatureDrift:
        """Raises: KeyError when the report has no such feature."""
        for f in self.features:
            if f.name == name and f.role == role:
                return f
        raise KeyError(f"no {role} feature {name!r} in the drift report")

    @property
    def drifted(self) -> tuple[str, ...]:
        """The input features whose verdict is drift."""
        return tuple(f.name for f in self.features if f.role == "input" and f.verdict == "drift")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": DRIFT_SCHEMA, "reference_hash": self.reference_hash,
                "rows_base": self.rows_base, "rows_live": self.rows_live,
                "share_drifted": _finite(self.share_drifted) or 0.0, "verdict": self.verdict,
                "important": list(self.important), "reasons": list(self.reasons),
                "rule": self.rule, "importance_share": _finite(self.importance_share),
                "rules": list(self.rules),
                "features": [f.to_dict() for f in self.features]}

    @classmethod
    def from_dict(cls, obj: Any, where: str = "drift") -> DriftReport:
        """Raises: SchemaError naming the field at fault."""
        f = Fields(obj, where)
        if f.int("schema") != DRIFT_SCHEMA:
            raise f.bad("schema", f"unsupported drift report schema (expected {DRIFT_SCHEMA})")
        ref = f.str("reference_hash", max_len=64)
        rows_base, rows_live = f.int("rows_base"), f.int("rows_live")
        share = f.float("share_drifted")
        if not 0 <= share <= 1:
            raise f.bad("share_drifted", "must be in [0, 1]")
        verdict = f.choice("verdict", VERDICTS)
        texts = {k: f.list(k, max_len=MAX_FEATURES) for k in ("important", "reasons")}
        for k, items in texts.items():
            if not all(isinstance(s, str) and len(s) <= 512 for s in items):
                raise f.bad(k, "must be strings")
        # reports written before the importance rule have none of these three
        rule = f.choice("rule", ("importance", "count")) if f.has("rule") else "count"
        weight = f.opt_float("importance_share") if f.has("importance_share") else None
        if weight is not None and not 0 <= weight <= 1:
            raise f.bad("importance_share", "must be in [0, 1] or null")
        rules = f.list("rules", max_len=len(GROUP_RULES)) if f.has("rules") else []
        if not all(r in GROUP_RULES for r in rules):
            raise f.bad("rules", f"must be of {', '.join(GROUP_RULES)}")
        feats = tuple(FeatureDrift.from_dict(o, f"{where}.features[{i}]")
                      for i, o in enumerate(f.list("features", max_len=MAX_FEATURES)))
        f.done()
        return cls(feats, rows_base, rows_live, share, verdict, tuple(texts["important"]),
                   tuple(texts["reasons"]), ref, rule, weight, tuple(rules))


# --------------------------------------------------------------------------- verdicts


def _g(x: float) -> str:
    return f"{x:.3g}"


def _past(drift: list[str], warn: list[str], label: str, value: float | None, limit: float,
          noise: float | None, shown: str | None = None, close: str = "") -> None:
    """Judge one statistic: drift at ``limit`` and past the no-drift bound ``noise``; at
    ``limit`` but within the noise, a warning that says so."""
    if value is None or value < limit:
        return
    text = f"{shown or f'{label} {_g(value)}'} ≥ {_g(limit)}{close}"
    if noise is None or value >= noise:
        drift.append(text + (
            f" and past the no-drift bound {_g(noise)}" if noise is not None and noise > limit
            else ""))
    else:
        warn.append(f"{text} but within the no-drift bound {_g(noise)} "
                    "at these sample sizes (warn)")


def _judge(stats: dict[str, float | None], rows: tuple[int, int], values: tuple[int, int],
           needed: int, t: Thresholds) -> tuple[str, tuple[str, ...]]:
    if min(rows) < needed:
        side = "live" if rows[1] < needed else "base"
        return "insufficient", (f"{side} has {min(rows)} rows, {needed} needed",)
    drift: list[str] = []
    warn: list[str] = []
    enough = min(values) >= needed
    rates = [("missing rate", "missing_rate", t.rate_drift, rows)]
    if enough:
        rates += [("out-of-range rate", "out_of_range_rate", t.rate_drift, values),
                  ("unseen rate", "unseen_rate", t.unseen_drift, values)]
        psi = stats["psi"]
        if psi is not None and psi >= t.psi_drift:
            _past(drift, warn, "psi", psi, t.psi_drift, stats["psi_noise"])
        elif psi is not None and psi >= t.psi_warn:
            warn.append(f"psi {_g(psi)} ≥ {_g(t.psi_warn)} (warn)")
        for key, limit in (("ks", t.ks_drift), ("js", t.js_drift)):
            _past(drift, warn, key, stats[key], limit, stats[f"{key}_noise"])
        excess = stats["wasserstein_excess"]
        _past(drift, warn, "wasserstein", excess, t.wasserstein_drift,
              stats["wasserstein_noise"],
              f"wasserstein {_g(stats['wasserstein'] or 0.0)} − no-drift "
              f"{_g(stats['wasserstein_bias'] or 0.0)} = {_g(excess or 0.0)}")
    for label, key, limit, (n_base, n_live) in rates:
        live, base = stats[key], stats[f"{key}_base"]
        if live is not None and base is not None:
            _past(drift, warn, label, live - base, limit,
                  rate_noise(live, base, n_live, n_base, t.alpha),
                  f"{label} {_g(live)} vs {_g(base)} (+{_g(live - base)}", ")")
    if drift:
        return "drift", tuple(drift)
    if not enough:
        side = "live" if values[1] < needed else "base"
        return "insufficient", (f"{side} has {min(values)} present values, {needed} needed",)
    return ("warn", tuple(warn)) if warn else ("ok", ())


@lru_cache(maxsize=4096)
def _labels(spec: NumericSpec | CategoricalSpec) -> tuple[str, ...]:
    if isinstance(spec, CategoricalSpec):
        return (*spec.vocabulary, "(other)", "(unseen)")
    e = [f"{x:.6g}" for x in spec.edges]
    inner = tuple(f"[{a}, {b})" for a, b in pairwise(e[:-1]))
    return (f"< {e[0]}", *inner, f"[{e[-2]}, {e[-1]}]", f"> {e[-1]}")


def _hist(counts: np.ndarray, n: int) -> tuple[float, ...]:
    return tuple((counts / n).tolist()) if n else (0.0,) * counts.size


def _features(items: list[tuple[Any, str, Any, Any]], t: Thresholds,
              ) -> tuple[FeatureDrift, ...]:
    sides = [(spec, side_of(b), side_of(lv)) for spec, _, b, lv in items]
    stats = [rates(*item) for item in sides]
    for kind, compute in ((NumericSpec, numeric_stats), (CategoricalSpec, categorical_stats)):
        both = [i for i, (spec, b, lv) in enumerate(sides)
                if isinstance(spec, kind) and b.n and lv.n]
        if both:
            compute([sides[i] for i in both], [stats[i] for i in both])
    for (_, b, lv), st in zip(sides, stats, strict=True):
        noise_bounds(st, b.n, lv.n, t.alpha)
    out = []
    for (spec, b, lv), (_, role, _, _), st in zip(sides, items, stats, strict=True):
        numeric = isinstance(spec, NumericSpec)
        needed = t.rows_needed(spec.bins if numeric else len(spec.vocabulary) + 2)
        verdict, reasons = _judge(st, (b.n + b.missing, lv.n + lv.missing), (b.n, lv.n),
                                  needed, t)
        out.append(FeatureDrift(spec.name, role, "numeric" if numeric else "categorical",
                                b.n, lv.n, verdict, st, reasons, _labels(spec),
                                _hist(b.counts, b.n), _hist(lv.counts, lv.n), needed))
    return tuple(out)


def positive_importances(importances: Mapping[str, float] | None,
                         inputs: Collection[str]) -> dict[str, float] | None:
    """The importances the group rule weighs with: the inputs' positive ones (a negative
    permutation importance is noise: permuting the feature helped), or None when there is
    nothing to weigh with (no importances, or none positive), so the count rule applies."""
    if not importances:
        return None
    out = {k: float(v) for k, v in importances.items()
           if k in inputs and math.isfinite(v) and v > 0}
    return out or None


def _listed(items: Sequence[str], most: int = 8) -> str:
    """Names for a reason, at most ``most`` of them (a reason is at most 512 characters)."""
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _pct(x: float) -> str:
    return f"{x:.0%}" if x >= 0.01 or x == 0 else f"{x:.1%}"


def _group_rules(feats: tuple[FeatureDrift, ...], judged: list[FeatureDrift],
                 drifted: list[FeatureDrift], wanted: tuple[str, ...],
                 weights: dict[str, float] | None, t: Thresholds,
                 ) -> tuple[list[str], list[str], float | None]:
    """(rules fired, their reasons, the importance share the drifting inputs carry)."""
    rules: list[str] = []
    reasons: list[str] = []
    carried: float | None = None
    if weights is not None:
        total = sum(weights.values())
        parts = sorted(((weights.get(f.name, 0.0) / total, f.name) for f in drifted),
                       reverse=True)
        carried = min(1.0, sum(w for w, _ in parts))
        if drifted and carried >= t.importance_share:
            rules.append("importance")
            reasons.append(
                f"drifting inputs carry {_pct(carried)} of the model's importance "
                f"(≥ {_pct(t.importance_share)}): "
                + _listed([f"{name} {_pct(w)}" for w, name in parts]))
    elif judged and len(drifted) >= t.drifted_needed(len(judged)):
        rules.append("count")
        reasons.append(f"{len(drifted)} of {len(judged)} input features drift "
                       f"(≥ {t.drifted_needed(len(judged))}, no importances to weigh them): "
                       + _listed([f.name for f in drifted]))
    key_drift = [f for f in feats if f.name in wanted and f.verdict == "drift"]
    if key_drift:
        rules.append("important")
        reasons += [f"important {f.role} {f.name!r} drifts" for f in key_drift]
    outputs = [f for f in feats if f.role == "output" and f.verdict == "drift"]
    if outputs:
        rules.append("predictions")
        reasons.append("the predictions drift: " + _listed([f.name for f in outputs]))
    unseen = []
    for f in drifted:
        live, base = f.stats.get("unseen_rate"), f.stats.get("unseen_rate_base")
        if f.kind == "categorical" and live is not None and base is not None \
                and live - base >= t.unseen_drift:
            unseen.append(f"{f.name} {_pct(live)}")
    if unseen:
        rules.append("unseen")
        reasons.append(f"unseen category values (≥ +{_pct(t.unseen_drift)}): "
                       + _listed(unseen))
    return rules, reasons, carried


def compare(base: Profile, live: Profile, thresholds: Thresholds = Thresholds(),
            important: Collection[str] = (),
            importances: Mapping[str, float] | None = None) -> DriftReport:
    """Compare ``live`` with ``base`` feature by feature and judge the whole.

    The report drifts when any of these group rules fires (``reasons`` says which, naming
    the features):

    - ``importance``: the drifting inputs carry at least ``importance_share`` of the
      model's positive permutation ``importances`` (input name → mean importance);
    - ``count``, only without usable importances: at least ``max(group_min,
      ceil(group_share · n))`` of the ``n`` input features with enough data drift;
    - ``important``: an ``important`` feature (input or output) drifts;
    - ``predictions``: an output feature drifts;
    - ``unseen``: a categorical input's unseen-category share rose by ``unseen_drift``.

    Otherwise it warns when any feature warns or drifts; it is insufficient when no input
    feature has enough data.

    Raises:
        ReferenceMismatchError: the two profiles are over different references.
        SchemaError: an ``important`` name is not a feature of the reference.
    """
    if base.reference_hash != live.reference_hash:
        raise ReferenceMismatchError(
            f"cannot compare profiles over different references "
            f"({base.reference_hash[:12]}… vs {live.reference_hash[:12]}…)")
    spec = base.spec
    names = {s.name for s in (*spec.inputs, *spec.outputs)}
    wanted = tuple(sorted(set(important)))
    for name in wanted:
        if name not in names:
            raise SchemaError(f"important feature {name!r} is not in the reference",
                              field="important")
    t = thresholds
    feats = _features(
        [(s, "input", base.inputs[s.name], live.inputs[s.name]) for s in spec.inputs]
        + [(s, "output", base.outputs[s.name], live.outputs[s.name]) for s in spec.outputs], t)
    inputs = [f for f in feats if f.role == "input"]
    judged = [f for f in inputs if f.verdict != "insufficient"]
    drifted = [f for f in judged if f.verdict == "drift"]
    share = len(drifted) / len(judged) if judged else 0.0
    weights = positive_importances(importances, {s.name for s in spec.inputs})
    rules, reasons, carried = _group_rules(feats, judged, drifted, wanted, weights, t)
    if rules:
        verdict = "drift"
    elif any(f.verdict in ("warn", "drift") for f in feats):
        verdict = "warn"
        reasons = [f"{f.role} {f.name!r}: {f.verdict}" for f in feats
                   if f.verdict in ("warn", "drift")]
        if carried is not None:
            reasons.append(f"drifting inputs carry {_pct(carried)} of the model's importance "
                           f"(< {_pct(t.importance_share)})")
    elif not judged:
        verdict, reasons = "insufficient", ["no input feature has enough data"]
    else:
        verdict = "ok"
    return DriftReport(feats, base.rows, live.rows, share, verdict, wanted, tuple(reasons),
                       base.reference_hash, "count" if weights is None else "importance",
                       carried, tuple(rules))


def persistent_verdict(window_verdicts: Sequence[str | DriftReport],
                       thresholds: Thresholds = Thresholds()) -> str:
    """The group's verdict over its windows (oldest first).

    ``drift`` when at least ``persistence`` of the last ``persistence_of`` windows drift;
    otherwise the latest window's verdict, a lone unconfirmed drift counting as ``warn``;
    ``insufficient`` when there is no window.

    Raises:
        SchemaError: an item is not a verdict (named by its index).
    """
    verdicts = [v.verdict if isinstance(v, DriftReport) else v for v in window_verdicts]
    for i, v in enumerate(verdicts):
        if v not in VERDICTS:
            raise SchemaError(f"window_verdicts[{i}]: {v!r} is not one of {', '.join(VERDICTS)}",
                              field=f"window_verdicts[{i}]")
    if not verdicts:
        return "insufficient"
    if verdicts[-thresholds.persistence_of:].count("drift") >= thresholds.persistence:
        return "drift"
    return "warn" if verdicts[-1] == "drift" else verdicts[-1]


def suspect_sensors(group: DriftReport, devices: Mapping[str, DriftReport],
                    ) -> dict[str, tuple[str, ...]]:
    """Devices whose input features drift while the group's same features do not.

    Only features a device had enough data to judge can drift, so a device with too
    few rows is never a suspect. Devices are listed in id order, features in spec order.

    Raises:
        ReferenceMismatchError: a device report is over another reference than the group's.
    """
    group_drift = {f.name: f.verdict == "drift" for f in group.features if f.role == "input"}
    out: dict[str, tuple[str, ...]] = {}
    for device in sorted(devices):
        report = devices[device]
        if report.reference_hash != group.reference_hash or any(
                f.role == "input" and f.name not in group_drift for f in report.features):
            raise ReferenceMismatchError(
                f"device {device!r}: its drift report is over another reference than the "
                "group's")
        alone = tuple(f.name for f in report.features if f.role == "input"
                      and f.verdict == "drift" and not group_drift[f.name])
        if alone:
            out[device] = alone
    return out
