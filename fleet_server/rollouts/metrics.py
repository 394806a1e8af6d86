"""The gate metrics of a rollout's window, read from the summaries stored at ingest.

:meth:`GateMetricsReader.read` turns a :class:`~fleet_server.rollouts.machine.GateWindow`
(which devices are canaries, which are controls, since when) into the
:class:`~fleet_server.rollouts.machine.GateMetrics` the pure core judges: rows and error
counters summed per side, the p95 bounds of the summed latency histograms (the canaries'
lower bound against the controls' upper bound, :func:`p95_gate_inputs`), the canaries'
merged profile against the controls' (prediction PSI and JS of the outputs) and against
the bundle's reference (input drift share and verdict), and in a shadow phase the
shadow's agreement and McNemar's table of the shadow against the live model on the rows
whose outcomes came back. Merged profiles are kept per window and grown by the summaries each
tick adds, so a tick reads only what is new.

Performance (the ``accuracy`` or ``mae`` gate): the performance entries of the window,
canaries' for the rollout's bundle and controls' for any other bundle over the same spec
(same task and classes), merged per side; realized when both sides hold ``min_labels``
labelled rows, else the label-free estimate (a regressor has none: no labels, no gate
value), both sides from the same source.

Deliberately not here: the rules (the core judges the numbers), and any write.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from edgefleet.contract.messages import Paired, latency_p95, merge_latency
from edgefleet.contract.profile import Profile, ProfileSpec
from fleet_server.errors import NotFoundError
from fleet_server.monitoring.drift import DriftService
from fleet_server.profiles.drift import DriftReport, compare
from fleet_server.profiles.performance import merged_blocks, metric_values
from fleet_server.profiles.rollups import Packed
from fleet_server.registry.bundles import Bundles, Reference
from fleet_server.registry.devices import Registry
from fleet_server.rollouts.machine import GateMetrics, GateWindow, RolloutPlan
from fleet_server.store import PerformanceRow, Store, WindowSummary

__all__ = ["P95_Z", "GateMetricsReader", "input_drift_of", "p95_bounds_ms", "p95_gate_inputs"]

log = logging.getLogger(__name__)


# z of a one-sided 97.5 % bound on each side: together, the gate fails a canary only when
# the data put its p95 above the control's with about 95 % confidence
P95_Z = 1.96


def p95_bounds_ms(histograms: Sequence[Sequence[int]], side: str | None = None
                  ) -> tuple[float, float] | None:
    """The merged p95 bounds ``(low, high)`` of some summaries' latency histograms.

    ``side`` ``"low"`` or ``"high"`` reads the p95's confidence bound instead of the p95
    itself: a p95 estimated from n calls is the sample's 95th percentile, whose rank is
    uncertain by about ``z * sqrt(0.95 * 0.05 / n)`` (the normal approximation of the
    binomial count below it), so the canary is read at that much below the 95th
    percentile and the control that much above it. With the 300 calls a small canary
    stage serves, that is the 92.6th and 97.4th percentiles; with 30,000, the p95 itself.
    """
    merged = merge_latency(histograms)
    n = sum(merged)
    if n <= 0:
        return None
    q = 0.95
    if side is not None:
        half = P95_Z * math.sqrt(0.95 * 0.05 / n)
        q = q - half if side == "low" else q + half
    return latency_p95(merged, min(1.0, max(0.0, q)))


def p95_gate_inputs(canary: tuple[float, float] | None, control: tuple[float, float] | None,
                    ) -> tuple[float | None, float | None]:
    """The canary and control p95 the ``latency_p95_ratio`` gate compares.

    A histogram knows only the bucket that holds a p95, so the gate takes the canary's
    lower bound and the control's upper bound: their ratio is the least the true ratio can
    be, and a canary whose p95 lands one or two buckets (1.25-1.28x each) above the
    control's reads as a ratio of at most 1.28, so bucket wobble cannot fail a 1.5 gate
    while a real 2x slowdown still does. A control in the overflow bucket (over 10 s, no
    upper bound) reads as its lower bound. The metrics reader passes each side's p95 at
    its confidence bound (:func:`p95_bounds_ms` with ``side``), so a small canary's
    sampling noise cannot fail the gate either.
    """
    low = None if canary is None else canary[0]
    high = None if control is None else (control[1] if math.isfinite(control[1])
                                         else control[0])
    return low, high


class GateMetricsReader:
    """Reads gate metrics for the rollout service (see the module docstring).

    Args:
        store, registry, bundles, drift: the collaborating services.
        max_summaries: bounds the summaries one side of a gate window reads.
    """

    def __init__(self, store: Store, registry: Registry, bundles: Bundles,
                 drift: DriftService, max_summaries: int) -> None:
        self.store = store
        self.registry = registry
        self.bundles = bundles
        self.drift = drift
        self.max_summaries = max_summaries
        # merged profiles of the current gate windows, grown by the summaries each tick
        # adds: (rollout, window start, side, bundle) -> (devices, last summary id, packed)
        self._packed: dict[tuple[str, float, str, str],
                           tuple[frozenset[str], int, Packed | None]] = {}

    def forget_all_but(self, live: set[str]) -> None:
        """Drop the merged profiles of rollouts no longer live."""
        for key in [k for k in self._packed if k[0] not in live]:
            del self._packed[key]

    def read(self, plan: RolloutPlan, window: GateWindow) -> GateMetrics:
        """The metrics of ``plan``'s gate ``window``."""
        name, version = plan.bundle.name, plan.bundle.version
        canaries, controls = set(window.canaries), set(window.controls)
        rows = self.store.window_summaries(sorted(canaries | controls), window.since,
                                           limit=2 * self.max_summaries)
        if window.phase == "shadow":
            srows = sagreed = serrors = 0
            paired = Paired()
            for s in rows:
                sh = s.shadow or {}
                b = sh.get("bundle") or {}
                if s.device in canaries and b.get("name") == name and \
                        b.get("version") == version:
                    srows += int(sh.get("rows", 0))
                    sagreed += int(sh.get("agreed", 0))
                    serrors += int(sh.get("errors", 0))
                    if sh.get("paired") is not None:  # checked at ingest
                        paired += Paired(**sh["paired"])
            return GateMetrics(window_start=window.since, shadow_rows=srows,
                               shadow_agreed=min(sagreed, srows), shadow_errors=serrors,
                               paired_both=paired.both, paired_live_only=paired.live_only,
                               paired_shadow_only=paired.shadow_only,
                               paired_neither=paired.neither)
        mine = [s for s in rows if s.device in canaries and s.bundle_name == name
                and s.bundle_version == version][:self.max_summaries]
        theirs = [s for s in rows if s.device in controls and not (
            s.bundle_name == name and s.bundle_version == version)][:self.max_summaries]
        counts: dict[str, Any] = {}
        bounds = {}
        for side, items, bound in (("canary", mine, "low"), ("control", theirs, "high")):
            counts[f"{side}_predictions"] = sum(s.rows for s in items)
            counts[f"{side}_errors"] = sum(int(v) for s in items for v in s.errors.values())
            bounds[side] = p95_bounds_ms([s.latency for s in items], bound)
        # canary_p95_ms / control_p95_ms are the bounds the ratio gate compares (see there)
        counts["canary_p95_ms"], counts["control_p95_ms"] = p95_gate_inputs(
            bounds["canary"], bounds["control"])
        extra = self._profiles(plan, window.since, mine, theirs)
        extra.update(self._performance(plan, window, canaries, controls))
        return GateMetrics(window_start=window.since, **counts, **extra)

    def _performance(self, plan: RolloutPlan, window: GateWindow, canaries: set[str],
                     controls: set[str]) -> dict[str, Any]:
        """The performance gate's numbers (see the module docstring); {} when no entry of
        either side is in the window."""
        name, version = plan.bundle.name, plan.bundle.version
        found = self.store.device_performance(sorted(canaries | controls), window.since,
                                              limit=2 * self.max_summaries)
        if not found:
            return {}
        try:
            mine = self.bundles.performance(self.bundles.get(name, version).id)
        except NotFoundError:
            return {}
        sides: dict[str, list[PerformanceRow]] = {"canary": [], "control": []}
        specs: dict[tuple[str, str], Any] = {}
        for bname, bversion, row in found:
            ours = bname == name and bversion == version
            if ours and row.device in canaries:
                sides["canary"].append(row)
            elif not ours and row.device in controls:
                key = (bname, bversion)
                if key not in specs:
                    try:
                        specs[key] = self.bundles.performance(row.bundle_id).spec
                    except NotFoundError:
                        specs[key] = None
                if specs[key] == mine.spec:  # other classes or task: not comparable
                    sides["control"].append(row)
        blocks = {side: merged_blocks(mine.spec, rows) for side, rows in sides.items()}
        labelled = {side: 0 if b[0] is None else b[0].n for side, b in blocks.items()}
        out: dict[str, Any] = {"performance_metric": mine.metric,
                               "canary_labelled": labelled["canary"],
                               "control_labelled": labelled["control"]}
        min_labels = plan.gates.min_labels
        source = "realized" if min(labelled.values()) >= min_labels else "estimated"
        values = {side: metric_values(b[0] if source == "realized" else b[1])
                  .get(mine.metric) for side, b in blocks.items()}
        if source == "estimated" and not any(v and v["value"] is not None
                                             for v in values.values()):
            # no estimate (a regressor): realized with what labels there are, the gate waits
            source = "realized"
            values = {side: metric_values(b[0]).get(mine.metric) for side, b in blocks.items()}
        canary, control = values["canary"], values["control"]
        if canary is not None and canary["value"] is not None:
            out["canary_performance"] = canary["value"]
            bound = canary["low"] if mine.metric == "mae" else canary["high"]
            out["canary_performance_bound"] = bound
        if control is not None and control["value"] is not None:
            out["control_performance"] = control["value"]
        if "canary_performance" in out or "control_performance" in out:
            out["performance_source"] = source
        return out

    def _profiles(self, plan: RolloutPlan, since: float, mine: Sequence[WindowSummary],
                  theirs: Sequence[WindowSummary]) -> dict[str, Any]:
        """Prediction PSI/JS (canaries vs controls) and input drift (canaries vs the
        bundle's reference); keys left out are not computed (their gates wait)."""
        if not mine:
            return {}
        record = self.bundles.get(plan.bundle.name, plan.bundle.version)
        ref = self.bundles.reference(record.id)
        canary = self._merged(plan, since, "canary", ref, mine)
        if canary is None:
            return {}
        out: dict[str, Any] = {}
        profile = canary.to_profile()
        try:
            group = self.registry.group(plan.group)
        except NotFoundError:
            group = None
        # judged as the drift monitor judges the group: its settings, the card's importances
        report = compare(ref.base, profile, self.drift.config_for(group).thresholds,
                         self.drift.important(ref, group), ref.importances)
        out.update(input_drift_of(report))
        control = self._control_outputs(plan, since, ref, theirs)
        if control is not None:
            vs = compare(control, _outputs_only(profile, control.spec), self.drift.thresholds)
            psi = [f.stats.get("psi") for f in vs.features if f.role == "output"]
            js = [f.stats.get("js") for f in vs.features if f.role == "output"]
            psi = [float(x) for x in psi if x is not None and math.isfinite(x)]
            js = [float(x) for x in js if x is not None and math.isfinite(x)]
            if psi:
                out["prediction_psi"] = max(psi)
            if js:
                out["prediction_js"] = max(js)
        return out

    def _control_outputs(self, plan: RolloutPlan, since: float, ref: Reference,
                         theirs: Sequence[WindowSummary]) -> Profile | None:
        """The controls' merged predictions, over the outputs-only spec of the rollout's
        bundle. A control bundle trained on other data has other input bins but, as a
        rule, the same output bins (class vocabulary, fixed confidence edges): its
        summaries count. One whose output bins differ cannot be compared and is left out."""
        by_bundle: dict[tuple[str, str], list[WindowSummary]] = {}
        for item in theirs:
            by_bundle.setdefault((item.bundle_name, item.bundle_version), []).append(item)
        spec = ProfileSpec((), ref.spec.outputs)
        total: Profile | None = None
        for (name, version), items in sorted(by_bundle.items()):
            try:
                theirs_ref = self.bundles.reference(self.bundles.get(name, version).id)
            except NotFoundError:
                continue  # summaries of a bundle this server never stored
            if theirs_ref.spec.outputs != ref.spec.outputs:
                log.info("rollout %s: the controls on %s@%s profile other output bins; "
                         "their predictions are not compared", plan.id, name, version)
                continue
            packed = self._merged(plan, since, f"control:{name}@{version}", theirs_ref,
                                  items)
            if packed is None or packed.rows == 0:
                continue
            part = _outputs_only(packed.to_profile(), spec)
            total = part if total is None else total.merge(part)
        return total


    def _merged(self, plan: RolloutPlan, since: float, side: str, ref: Reference,
                items: Sequence[WindowSummary]) -> Packed | None:
        """The merge of ``items``' profiles, reading only the summaries not merged at an
        earlier tick of the same window (from scratch when a device left the side)."""
        if not items:
            return None
        key = (plan.id, since, side, ref.layout.reference_hash)
        devices = frozenset(i.device for i in items)
        old = self._packed.get(key)
        if old is not None and old[0] <= devices:
            new = [i for i in items if i.id > old[1]]
            base = old[2]
        else:
            new, base = list(items), None
        if not new and old is not None:
            self._packed[key] = (devices, old[1], base)
            return base
        # a summary's profile was checked against its reference and packed once, at ingest
        mine = [i.id for i in new if i.reference_hash == ref.layout.reference_hash]
        blobs = list(self.store.summary_profiles(mine).values())
        merged = base
        if blobs:
            fresh = ref.layout.merge_bytes(blobs)
            merged = fresh if base is None else base.merge(fresh)
        last = max([i.id for i in new] + ([old[1]] if old is not None else []))
        # one window per rollout is live: forget the others
        for k in [k for k in self._packed if k[0] == plan.id and k[1] != since]:
            del self._packed[k]
        self._packed[key] = (devices, last, merged)
        return merged


def input_drift_of(report: DriftReport) -> dict[str, Any]:
    """The input gates' numbers from the canaries' drift report against the bundle's
    reference: ``input_drift_share`` and ``input_drift`` (the inputs' group rules only:
    the predictions are the prediction gates' to judge) once an input feature has enough
    rows to be judged; before that, ``input_rows_needed``, the fewest rows one needs, so
    the gate can say what it waits for. Each feature's verdict is sample-size aware (a
    statistic drifts only past its no-drift bound at the two sides' sizes, see
    :func:`~fleet_server.profiles.statistics.noise_bounds`), which is what keeps a small
    canary stage from failing on noise."""
    out: dict[str, Any] = {"input_rows": int(report.rows_live)}
    inputs = [f for f in report.features if f.role == "input"]
    if any(f.verdict != "insufficient" for f in inputs):
        out["input_drift_share"] = float(report.share_drifted)
        out["input_drift"] = bool({"importance", "count", "unseen"} & set(report.rules)) \
            or any(name in report.important for name in report.drifted)
    elif inputs:
        out["input_rows_needed"] = min(f.min_rows for f in inputs)
    return out


def _outputs_only(profile: Profile, spec: ProfileSpec) -> Profile:
    """``profile``'s predictions alone, over ``spec`` (no inputs, the same outputs)."""
    out = Profile(spec)
    for name in out.outputs:
        out.outputs[name] = profile.outputs[name]
    out.rows = profile.rows
    return out
