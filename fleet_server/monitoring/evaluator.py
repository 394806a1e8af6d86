"""The periodic drift evaluation: every window, per bundle and scope, a verdict and alerts.

Every ``window_s`` seconds, once a window is ``lateness_s`` old, each bundle with data
in it is judged for the whole fleet (scope ``*``) and for every group. Each scope has its
settings (:func:`~fleet_server.monitoring.drift.drift_config`: the server's, with a group's
own thresholds, persistence and lateness over them):

1. the members' device rollups of the window are read once and merged per device and
   for the scope (one stack, :meth:`~fleet_server.profiles.rollups.Layout.merge_groups`);
2. the scope's report (:func:`~fleet_server.profiles.drift.compare`, with the group's important
   features and the bundle's permutation importances) is stored as a
   :class:`~fleet_server.models.DriftWindow`;
3. :func:`~fleet_server.profiles.drift.persistent_verdict` over the last ``persistence_of``
   stored windows decides: ``drift`` opens (or keeps) a ``drift`` alert, ``ok`` resolves
   it (``warn`` and ``insufficient`` leave it as it is);
4. each device with enough rows to be judged is compared alone and
   :func:`~fleet_server.profiles.drift.suspect_sensors` names the devices that drift while the
   scope does not: each opens a ``suspect_sensor`` alert, which resolves once that
   device is judged again and is no longer one.

Missed windows (the server was down) are caught up to ``persistence_of`` windows back, so
the persistence rule has its windows after a restart. A window is evaluated once (its
row in ``drift_windows`` says so); late summaries still count in on-demand reports.

On the same timer, after the drift windows, the performance watch (``performance``, when
given) judges realized and estimated performance
(:class:`~fleet_server.monitoring.performance.PerformanceWatch`).
:meth:`Evaluator.housekeeping` applies the retention bounds; ``also`` are further checks run
on the same timer (the review-date alerts of :mod:`fleet_server.monitoring.governance`). This
module holds no statistics of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgefleet.contract.profile import NumericSpec
from fleet_server.config import DEFAULT_DRIFT, DEFAULT_INGEST, DriftConfig, IngestConfig
from fleet_server.errors import StoreError
from fleet_server.models import FLEET_SCOPE, DriftWindow, Group
from fleet_server.monitoring.alerts import Alerts
from fleet_server.monitoring.drift import drift_config
from fleet_server.monitoring.performance import PerformanceWatch
from fleet_server.profiles.drift import DriftReport, compare, persistent_verdict, suspect_sensors
from fleet_server.profiles.performance import ROLLUP_WIDTHS as PERFORMANCE_WIDTHS
from fleet_server.registry.bundles import Bundles, Reference
from fleet_server.registry.devices import Registry
from fleet_server.store import Store

__all__ = ["Evaluator", "feature_summary"]

log = logging.getLogger(__name__)


def feature_summary(report: DriftReport) -> dict[str, dict[str, Any]]:
    """The per-feature numbers a stored window keeps (the dashboard's time series)."""
    out = {}
    for f in report.features:
        key = f.name if f.role == "input" else f"output:{f.name}"
        out[key] = {"verdict": f.verdict, "n": f.n_live,
                    **{k: f.stats.get(k) for k in ("psi", "ks", "wasserstein", "js",
                                                   "missing_rate", "unseen_rate")}}
    return out


class Evaluator:
    def __init__(self, store: Store, bundles: Bundles, registry: Registry, alerts: Alerts,
                 config: DriftConfig = DEFAULT_DRIFT,
                 ingest_config: IngestConfig = DEFAULT_INGEST,
                 clock: Callable[[], float] = time.time,
                 also: Sequence[Callable[[float], object]] = (),
                 performance: PerformanceWatch | None = None) -> None:
        self.store = store
        self.also = tuple(also)  # run after each evaluation (the review-date alerts)
        self.performance = performance
        self.bundles = bundles
        self.registry = registry
        self.alerts = alerts
        self.config = config
        self.ingest_config = ingest_config
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0

    # -- one pass ------------------------------------------------------------------------

    def evaluate(self, now: float) -> list[DriftWindow]:
        """Evaluate every complete window not yet evaluated; returns the new windows."""
        w = self.config.window_s
        out: list[DriftWindow] = []
        fine = self.ingest_config.levels[0]
        with_data: dict[int, list[int]] = {}
        for group in [None, *self.registry.groups()]:
            config = drift_config(self.config, group)
            scope = FLEET_SCOPE if group is None else group.name
            end = int((now - config.lateness_s) // w) * w
            for k in range(config.thresholds.persistence_of, 0, -1):
                start, stop = end - k * w, end - (k - 1) * w
                if start not in with_data:
                    with_data[start] = self.store.bundles_with_rollups(fine, start, stop)
                for bundle_id in with_data[start]:
                    if self.store.window_evaluated(bundle_id, scope, start):
                        continue
                    ref = self.bundles.reference(bundle_id)
                    out.append(self._evaluate(ref, group, config, start, stop, now))
        self.runs += 1
        return out

    def _min_rows(self, ref: Reference, config: DriftConfig) -> int:
        t = config.thresholds
        # a categorical feature's bins are its vocabulary, other and unseen (as drift counts)
        bins = [s.bins if isinstance(s, NumericSpec) else len(s.vocabulary) + 2
                for s in ref.spec.inputs]
        return min((t.rows_needed(b) for b in bins), default=1)

    def _evaluate(self, ref: Reference, group: Group | None, config: DriftConfig, start: int,
                  stop: int, now: float) -> DriftWindow:
        scope = FLEET_SCOPE if group is None else group.name
        fine = self.ingest_config.levels[0]
        rows = self.store.read_rollups(ref.bundle.id, fine, start, stop,
                                       selector=group.selector if group else None)
        devices = sorted({s for s, _, _ in rows})
        index = {d: i for i, d in enumerate(devices)}
        where = np.array([index[s] for s, _, _ in rows], dtype=np.int64)
        per_device = ref.layout.merge_groups([d for _, _, d in rows], where, len(devices))
        total = ref.layout.merge(per_device)
        important = () if group is None else tuple(
            f for f in group.important_features
            if f in {s.name for s in (*ref.spec.inputs, *ref.spec.outputs)})
        t = config.thresholds
        report = compare(ref.base, total.to_profile(), t, important, ref.importances)
        window = DriftWindow(ref.bundle.label, scope, start, stop, report.verdict,
                             report.share_drifted, total.rows, len(devices),
                             feature_summary(report), now)
        self.store.save_window(ref.bundle.id, window)
        history = [x.verdict for x in self.store.list_windows(
            ref.bundle.id, scope, limit=t.persistence_of)]
        verdict = persistent_verdict(history, t)
        if verdict == "drift":
            self.alerts.raise_alert(
                "drift", ref.bundle, group=scope, now=now,
                message=f"{ref.bundle.label} drifts in {scope if group else 'the fleet'}: "
                        f"{'; '.join(report.reasons) or 'persistent drift'}",
                details={"windows": history, "window_start": start, "window_end": stop,
                         "drifted": list(report.drifted),
                         "share_drifted": report.share_drifted, "devices": len(devices),
                         "rules": list(report.rules), "rule": report.rule,
                         "importance_share": report.importance_share,
                         "reasons": list(report.reasons), "settings": config.settings()})
        elif verdict == "ok":
            self.alerts.resolve("drift", ref.bundle, group=scope, now=now)
        if self.config.suspect_sensors:
            self._suspects(ref, scope, config, report, devices, per_device, start, stop, now)
        return window

    def _suspects(self, ref: Reference, scope: str, config: DriftConfig, report: DriftReport,
                  devices: list[str], per_device: list, start: int, stop: int,
                  now: float) -> None:
        need = self._min_rows(ref, config)
        judged: dict[str, DriftReport] = {}
        for device, packed in zip(devices, per_device, strict=True):
            if packed.rows >= need and len(judged) < self.config.max_device_reports:
                judged[device] = compare(ref.base, packed.to_profile(), config.thresholds)
        suspects = suspect_sensors(report, judged)
        for device, features in suspects.items():
            self.alerts.raise_alert(
                "suspect_sensor", ref.bundle, group=scope, device=device, now=now,
                message=f"{device} drifts alone on {', '.join(features)} while "
                        f"{scope if scope != FLEET_SCOPE else 'the fleet'} does not",
                details={"features": list(features), "window_start": start,
                         "window_end": stop})
        for alert in self.alerts.list(state="open", kind="suspect_sensor", bundle=ref.bundle,
                                      limit=10_000):
            if alert.group == scope and alert.device in judged and \
                    alert.device not in suspects:
                self.alerts.resolve("suspect_sensor", ref.bundle, group=scope,
                                    device=alert.device, now=now)

    def housekeeping(self, now: float) -> dict[str, int]:
        """Apply the retention bounds; returns what was removed."""
        c = self.ingest_config
        out = {"summaries": self.store.prune_summaries(now - c.retention_s),
               "dead_letters": self.store.prune_dead_letters(c.dead_letter_keep),
               "performance": self.store.prune_performance(now - c.retention_s),
               # dashboard sessions past their expiry (a sign-in also sweeps them)
               "sessions": self.store.delete_expired_sessions(now),
               # drift and performance alerts of bundles no device runs any more
               "alerts_retired": self.alerts.resolve_retired(
                   self.store.bundles_in_service(), now)}
        for i, width in enumerate(c.levels):
            keep = c.retention_s if i == 0 else c.coarse_retention_s
            out[f"rollups_{width}"] = self.store.prune_rollups(width, int(now - keep))
        # performance rollups: hours (series up to two days) as the finest drift level, days
        # as the coarser ones
        for i, width in enumerate(PERFORMANCE_WIDTHS):
            keep = c.retention_s if i == 0 else c.coarse_retention_s
            out[f"performance_rollups_{width}"] = self.store.prune_performance_rollups(
                width, int(now - keep))
        return out

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="fleet-evaluator",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _main(self) -> None:
        w = self.config.window_s
        while not self._stop.is_set():
            now = self.clock()
            try:
                self.evaluate(now)
                self.housekeeping(now)
                if self.performance is not None:
                    self.performance.evaluate(now)
            except StoreError:
                log.exception("drift evaluation failed; trying again next window")
            except Exception:
                log.exception("drift evaluation failed unexpectedly")
            for task in self.also:
                try:
                    task(now)
                except Exception:
                    log.exception("%s failed; trying again next window",
                                  getattr(task, "__name__", task))
            now = self.clock()
            due = (int((now - self.config.lateness_s) // w) + 1) * w + self.config.lateness_s
            self._stop.wait(max(1.0, due - now))
