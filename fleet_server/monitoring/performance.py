"""Realized and estimated performance: reports over a scope and range, and their alerts.

A report is over one bundle version (entries are stored attributed to the bundle whose
predictions they count), one scope — the whole fleet, a group or one device — and a time
range of whole steps (an hour for ranges up to two days, else a day): the performance
rollups of that width, which ingest keeps per device, group and the fleet (the entries
whose window's middle falls in the bucket, added: the blocks add,
:mod:`edgefleet.contract.performance`), are read and added again, in total and per step.
That is exactly the merge of the entries whose middle falls in the range (every count;
sums to rounding), at 30 rollups for a 30-day fleet report. A group's rollups hold the
windows of the devices that were its members when they were stored, from where they are
complete (:meth:`~fleet_server.monitoring.drift.DriftService.group_from`; its members'
device rollups before); the device counts are of its current members. Each point carries
the realized metrics with their 95 % intervals and n (labelled rows), the estimated ones
(every served row), and the report the bundle's packaged metrics (its card's evaluation)
with the verdict of each side (:func:`~fleet_server.profiles.performance.judge_drop`).

:class:`PerformanceWatch` is what the periodic evaluator runs: every bundle with entries
in the last ``window_s`` is judged for the fleet and every group, and a ``performance_drop``
(realized) or ``estimated_performance_drop`` alert is raised while the verdict is ``drop``
(judged with the group's own tolerances over the server's, ``fleet group create|update
--performance KEY=VALUE``)
(deduplicated while open: one alert per bundle and scope) and resolved once it is ``ok``;
``insufficient`` leaves it as it is. The alert's details hold the numbers behind it. Its
sliding window is not whole steps: it reads the entries that overlap it (at most
``max_entries``).

This module reads the store and writes only alerts; the statistics are the contract's and
the rule is :mod:`fleet_server.profiles.performance`'s.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.performance import Realized
from edgefleet.parsing import parse_duration
from fleet_server.config import DEFAULT_PERFORMANCE, PerformanceConfig
from fleet_server.errors import ConfigError, InvalidRequestError
from fleet_server.models import FLEET_SCOPE, Group
from fleet_server.monitoring.alerts import Alerts
from fleet_server.monitoring.drift import Scope, whole_steps
from fleet_server.profiles.performance import (
    ROLLUP_WIDTHS,
    Drop,
    Expected,
    Tolerances,
    confusion_of,
    judge_drop,
    merged_blocks,
    metric_values,
    reliability_of,
    step_for,
)
from fleet_server.registry.bundles import BundlePerformance, Bundles
from fleet_server.registry.devices import Registry
from fleet_server.store import PerformanceRollup, PerformanceRow, Store, group_scope

__all__ = ["PerformancePoint", "PerformanceReport", "PerformanceService", "PerformanceWatch",
           "parse_since"]

log = logging.getLogger(__name__)
DEFAULT_RANGE_S = 7 * 86400
KIND = {"realized": "performance_drop", "estimated": "estimated_performance_drop"}


def parse_since(text: str | float | None, now: float) -> float | None:
    """A range start as the API takes it: ``7d``/``12h`` ago, or unix seconds.

    Raises:
        InvalidRequestError: neither.
    """
    if text is None or isinstance(text, (int, float)):
        return text
    try:
        return now - parse_duration(text, "since")
    except SchemaError:  # not a duration: a number, then
        pass
    try:
        return float(text)
    except ValueError:
        raise InvalidRequestError(f"since {text[:40]!r}: a duration (7d, 12h) or unix seconds",
                                  field="since") from None


@dataclass(frozen=True)
class PerformancePoint:
    """The merged entries of one step (or of the whole range)."""

    start: int
    end: int
    devices: int
    entries: int
    labelled: int  # realized n
    served: int  # estimated n
    realized: dict[str, dict[str, Any]]  # metric -> value, low, high, n, method
    estimated: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "devices": self.devices,
                "entries": self.entries, "labelled": self.labelled, "served": self.served,
                "realized": self.realized, "estimated": self.estimated}


@dataclass(frozen=True)
class PerformanceReport:
    bundle: str
    scope: str
    since: int
    until: int
    step: int
    task: str
    metric: str  # the one watched: accuracy, or mae for a regressor
    expected: dict[str, Expected]
    total: PerformancePoint
    points: tuple[PerformancePoint, ...]
    confusion: dict[str, Any] | None  # {"classes": [...], "counts": [[...]]}, realized
    reliability: list[dict[str, Any]] | None  # realized calibration bins
    verdicts: dict[str, Drop]  # "realized", "estimated"
    truncated: bool  # more entries than max_entries: the newest were left out
    tolerances: dict[str, float | int] = field(default_factory=dict)  # those applied
    overrides: tuple[str, ...] = ()  # the tolerances the scope's group set for itself

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "scope": self.scope, "since": self.since,
                "until": self.until, "step": self.step, "task": self.task,
                "metric": self.metric,
                "expected": {k: v.to_dict() for k, v in self.expected.items()},
                "total": self.total.to_dict(), "points": [p.to_dict() for p in self.points],
                "confusion": self.confusion, "reliability": self.reliability,
                "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()},
                "truncated": self.truncated, "tolerances": dict(self.tolerances),
                "overrides": list(self.overrides)}


class PerformanceService:
    def __init__(self, store: Store, bundles: Bundles, registry: Registry,
                 config: PerformanceConfig = DEFAULT_PERFORMANCE) -> None:
        self.store = store
        self.bundles = bundles
        self.registry = registry
        self.config = config

    def scope(self, group: str | None = None, device: str | None = None) -> Scope:
        """Raises: NotFoundError: no such group or device."""
        if device is not None:
            self.registry.get(device)
            return Scope("device", device)
        if group is not None:
            g = self.registry.group(group)
            return Scope("group", g.name, g)
        return Scope("fleet")

    def window(self, since: float | None, until: float | None, now: float
               ) -> tuple[int, int, int]:
        """``(lo, hi, step)``: the range widened to whole steps.

        Raises:
            InvalidRequestError: until before since, or a range over a year.
        """
        until = now if until is None else until
        since = until - DEFAULT_RANGE_S if since is None else since
        step = step_for(until - since)  # a bad range: whole_steps refuses it
        return (*whole_steps(since, until, now, DEFAULT_RANGE_S, step), step)

    def report(self, bundle: str, *, group: str | None = None, device: str | None = None,
               since: str | float | None = None, until: float | None = None,
               now: float) -> PerformanceReport:
        """The performance of a bundle (``name@version``) over a scope and range.

        Raises:
            InvalidRequestError: a bad label or range. NotFoundError: no such bundle,
                group or device.
        """
        lo, hi, step = self.window(parse_since(since, now), until, now)
        record = self.bundles.by_label(bundle)
        perf = self.bundles.performance(record.id)
        return self.judge(perf, self.scope(group, device), lo, hi, step, rollups=True)

    def read(self, perf: BundlePerformance, scope: Scope, lo: float, hi: float
             ) -> tuple[list[PerformanceRow], bool]:
        """The entries of a scope over ``[lo, hi)``, and whether there were more."""
        limit = self.config.max_entries
        rows = self.store.read_performance(
            perf.bundle.id, lo, hi, device=scope.name if scope.kind == "device" else None,
            selector=scope.group.selector if scope.kind == "group" and scope.group else None,
            limit=limit + 1)
        return rows[:limit], len(rows) > limit

    def tolerances(self, scope: Scope) -> tuple[Tolerances, tuple[str, ...]]:
        """The tolerances a scope is judged with: a group's own over the server's (a group
        setting the server's configuration makes invalid is logged and left out)."""
        group = scope.group if scope.kind == "group" else None
        if group is None or not group.performance:
            return self.config.tolerances, ()
        try:
            return (self.config.tolerances_for(group.performance,
                                               f"group {group.name} performance"),
                    tuple(sorted(group.performance)))
        except ConfigError as exc:
            log.warning("%s; the server's tolerances apply", exc)
            return self.config.tolerances, ()

    def judge(self, perf: BundlePerformance, scope: Scope, lo: int, hi: int, step: int,
              *, rollups: bool = False) -> PerformanceReport:
        """The report of ``perf``'s bundle over ``scope`` and ``[lo, hi)`` by ``step``:
        with ``rollups``, from the rollups of width ``step`` (a report: whole steps of a
        rollup width, entries counted by their middle), else from the entries that
        overlap the range (the alerts' sliding window)."""
        if rollups:
            if step not in ROLLUP_WIDTHS or lo % step or hi % step:
                raise InvalidRequestError(f"a report from rollups is whole steps of "
                                          f"{ROLLUP_WIDTHS} s", field="step")
            return self._judged(perf, scope, lo, hi, step, *self._from_rollups(
                perf, scope, lo, hi, step), truncated=False)
        rows, truncated = self.read(perf, scope, lo, hi)
        buckets: dict[int, list[PerformanceRow]] = defaultdict(list)
        for r in rows:
            k = min(max(int((r.middle - lo) // step), 0), (hi - lo) // step - 1)
            buckets[k].append(r)
        points = tuple(point(perf, lo + k * step, lo + (k + 1) * step, buckets.get(k, []))
                       for k in range((hi - lo) // step))
        realized, estimated = merged_blocks(perf.spec, rows)
        total = _point(perf, lo, hi, rows, realized, estimated)
        return self._judged(perf, scope, lo, hi, step, total, points, realized,
                            truncated=truncated)

    def _from_rollups(self, perf: BundlePerformance, scope: Scope, lo: int, hi: int,
                      step: int) -> tuple[PerformancePoint, tuple[PerformancePoint, ...],
                                          Realized | None]:
        """The total, the points and the realized block of a report, from the rollups of
        width ``step``: one per step for the fleet, a device, or a group from where its
        own are complete (its members' device rollups before, as drift reports do)."""
        store, bundle_id = self.store, perf.bundle.id
        selector = None
        if scope.kind == "group":
            assert scope.group is not None
            selector = scope.group.selector or None
            start = store.group_rollups_from(scope.group.name, scope.group.created)
            cut = hi if start is None else min(max(lo, -(-start // step) * step), hi)
            rollups = store.read_performance_rollups(bundle_id, step, lo, cut,
                                                     selector=selector)
            rollups += store.read_performance_rollups(bundle_id, step, cut, hi,
                                                      scope=group_scope(scope.group.name))
        else:
            rollups = store.read_performance_rollups(
                bundle_id, step, lo, hi,
                scope=scope.name if scope.kind == "device" else FLEET_SCOPE)
        if scope.kind == "device":
            devices = min(len(rollups), 1)
        else:
            devices = store.performance_devices(bundle_id, step, lo, hi, selector=selector)
        buckets: dict[int, list[PerformanceRollup]] = defaultdict(list)
        for r in rollups:
            buckets[r.bucket].append(r)
        # a step's devices: its rollups' (a device's own counts one, a scope's its devices)
        points = tuple(_summed(perf, t, t + step, sum(r.devices for r in buckets.get(t, [])),
                               buckets.get(t, []))[0] for t in range(lo, hi, step))
        total, realized = _summed(perf, lo, hi, devices, rollups)
        return total, points, realized

    def _judged(self, perf: BundlePerformance, scope: Scope, lo: int, hi: int, step: int,
                total: PerformancePoint, points: tuple[PerformancePoint, ...],
                realized: Realized | None, *, truncated: bool) -> PerformanceReport:
        tol, overrides = self.tolerances(scope)
        verdicts = {}
        for side, values, min_n in (("realized", total.realized, tol.min_labelled),
                                    ("estimated", total.estimated, tol.min_served)):
            m = values.get(perf.metric) or {}
            verdicts[side] = judge_drop(perf.metric, m.get("value"), m.get("low"),
                                        m.get("high"), int(m.get("n") or 0),
                                        perf.expected.get(perf.metric), tol, min_n)
        return PerformanceReport(
            perf.bundle.label, scope.label, lo, hi, step, perf.task, perf.metric,
            perf.expected, total, points,
            confusion_of(realized), reliability_of(realized), verdicts, truncated,
            tol.to_dict(), overrides)


def point(perf: BundlePerformance, start: int, end: int, rows: Sequence[PerformanceRow]
          ) -> PerformancePoint:
    """The merged entries ``rows`` as one point of a series."""
    realized, estimated = merged_blocks(perf.spec, rows)
    return _point(perf, start, end, rows, realized, estimated)


def _summed(perf: BundlePerformance, start: int, end: int, devices: int,
            rollups: Sequence[PerformanceRollup]) -> tuple[PerformancePoint, Realized | None]:
    """Rollups as one point (and its realized block)."""
    realized, estimated = merged_blocks(perf.spec, rollups)
    return PerformancePoint(start, end, devices, sum(r.entries for r in rollups),
                            sum(r.labelled for r in rollups), sum(r.served for r in rollups),
                            metric_values(realized), metric_values(estimated)), realized


def _point(perf: BundlePerformance, start: int, end: int, rows: Sequence[PerformanceRow],
           realized: Any, estimated: Any) -> PerformancePoint:
    return PerformancePoint(start, end, len({r.device for r in rows}), len(rows),
                            sum(r.labelled for r in rows), sum(r.served for r in rows),
                            metric_values(realized), metric_values(estimated))


class PerformanceWatch:
    """The performance alerts, judged on the drift evaluator's timer (see the top)."""

    def __init__(self, service: PerformanceService, alerts: Alerts) -> None:
        self.service = service
        self.alerts = alerts
        self.runs = 0

    def evaluate(self, now: float) -> list[tuple[str, str, str]]:
        """Judge every bundle with recent entries; ``(bundle, scope, alert kind)`` raised."""
        config = self.service.config
        if not config.alerts:
            return []
        lo, hi = now - config.window_s, now
        raised = []
        groups: list[Group | None] = [None, *self.service.registry.groups()]
        for bundle_id in self.service.store.performance_bundles(lo, hi):
            perf = self.service.bundles.performance(bundle_id)
            for group in groups:
                scope = Scope("fleet") if group is None else Scope("group", group.name, group)
                # whole seconds around [lo, hi]: ending at int(lo) + ceil(hi - lo) left out
                # entries of the last fraction of a second that performance_bundles counts
                start, stop = math.floor(lo), math.ceil(hi)
                report = self.service.judge(perf, scope, start, stop, stop - start)
                if report.total.entries:
                    raised += self._act(perf, group, report, now)
        self.runs += 1
        return raised

    def _act(self, perf: BundlePerformance, group: Group | None, report: PerformanceReport,
             now: float) -> list[tuple[str, str, str]]:
        scope = FLEET_SCOPE if group is None else group.name
        where = "the fleet" if group is None else f"group {group.name}"
        out = []
        for side, drop in report.verdicts.items():
            kind = KIND[side]
            if drop.verdict == "drop":
                alert = self.alerts.raise_alert(
                    kind, perf.bundle, group=scope, now=now,
                    message=f"{perf.bundle.label} {side} {drop.metric} drops in {where}: "
                            f"{drop.reason}",
                    details={"side": side, **drop.to_dict(), "window_start": report.since,
                             "window_end": report.until, "devices": report.total.devices,
                             "labelled": report.total.labelled,
                             "served": report.total.served,
                             "expected_from": (perf.expected[drop.metric].data
                                               if drop.metric in perf.expected else None)})
                if alert is not None:
                    out.append((perf.bundle.label, scope, kind))
            elif drop.verdict == "ok":
                self.alerts.resolve(kind, perf.bundle, group=scope, now=now)
        return out
