"""The drift pages: the index (every bundle and scope at a glance) and one bundle's page.

The index (``/drift`` without ``bundle``) is a heatmap of the evaluated drift windows the
periodic evaluator stored (bundle · scope × time, coloured by verdict), with each row's
current verdict (its newest window) beside the verdict over the range; drifting rows first.

One bundle's page (``/drift?bundle=…``) is computed from the rollups over the range:

- a heatmap of features × time steps, coloured by each step's verdict
  (:meth:`~fleet_server.monitoring.drift.DriftService.series`), drifting features first;
- the feature table: the verdict **now** (the newest step with data) beside the verdict
  over the whole range (:meth:`~fleet_server.monitoring.drift.DriftService.report`, the
  exactly merged rollup against the bundle's reference profile), so a feature whose drift
  has passed no longer reads only ``drift``;
- how the inputs were weighed (the card's permutation importance, or a count), the group
  rules that fired, and every drift setting in force (the group's own marked);
- per feature, its main statistic over time with the warn and drift thresholds named in
  the legend, and the reference against the live histogram. The main statistic is PSI for
  a numeric feature and the Jensen-Shannon distance for a categorical one.

This module does not speak HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleet_server.dashboard.charts import BAD, WARN, Line, heatmap, histogram, series
from fleet_server.dashboard.html import render, url
from fleet_server.dashboard.humane import duration
from fleet_server.dashboard.pages import Query
from fleet_server.models import FLEET_SCOPE
from fleet_server.services import Services

__all__ = ["MAX_HOURS", "MAX_POINTS", "SEVERITY", "current", "drift", "pick_step", "worst"]

MAX_HOURS = 24 * 366
MAX_POINTS = 96  # per series plot and heatmap row: the step grows with the range
# round steps, so the points fall on round times; each point is one drift comparison
STEPS = (60, 120, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
         7 * 86400)
INDEX_COLUMNS = 48
SEVERITY = {"drift": 0, "warn": 1, "ok": 2, "insufficient": 3, None: 4}
RANGES = (1, 6, 24, 168, 720)


def pick_step(span: float, fine: int) -> int:
    """The smallest round step (a multiple of the finest rollup level) giving at most
    :data:`MAX_POINTS` points over ``span`` seconds."""
    for step in STEPS:
        if step % fine == 0 and span / step <= MAX_POINTS:
            return step
    return max(1, math.ceil(span / MAX_POINTS / fine)) * fine


def current(verdicts: Sequence[str | None]) -> str | None:
    """The verdict now: the newest step that had data (``insufficient`` counts as data)."""
    return next((v for v in reversed(verdicts) if v is not None), None)


def worst(verdicts: Sequence[str | None]) -> str | None:
    """The most severe verdict of a row (drift, then warn, ok, insufficient)."""
    return min(verdicts, key=lambda v: SEVERITY.get(v, 4), default=None)


def drift(services: Services, query: Query, now: float) -> tuple[str, str]:
    bundle = query.get("bundle")
    group = query.get("group")
    device = query.get("device")
    hours = query.integer("hours", 24 if bundle is None else 1, 1, MAX_HOURS)
    if bundle is None:
        return "Drift", _index(services, now, hours)
    until = now
    since = now - hours * 3600
    svc = services.drift
    result = svc.report(bundle, group=group, device=device, since=since, until=until, now=now)
    step = pick_step(until - since, svc.levels[0])
    over = svc.series(bundle, group=group, device=device, since=since, until=until, step=step,
                      now=now)
    report = result.report
    # the lines drawn are the thresholds in force here (a group may set its own)
    th = svc.config_for(services.registry.group(group) if group else None).thresholds
    features = []
    for f in report.features:
        key = f.name if f.role == "input" else f"output:{f.name}"
        verdicts = [v if n else None for v, n in zip(
            over.features.get(key, {}).get("verdict", []),
            over.features.get(key, {}).get("n", []), strict=False)]
        features.append(_Feature(f, key, verdicts, current(verdicts)))
    features.sort(key=lambda x: (SEVERITY.get(x.now, 4), SEVERITY.get(x.f.verdict, 4),
                                 x.f.role != "input", x.f.name))
    starts = list(over.starts)
    heat = heatmap([(x.title, x.verdicts) for x in features], starts, step,
                   title=f"{result.bundle} · {result.scope}: verdict per feature over time",
                   links={x.title: f"#feature-{x.key}" for x in features})
    panels = []
    for x in features:
        f = x.f
        stat, limit, warn = ("psi", th.psi_drift, th.psi_warn) if f.kind == "numeric" else \
            ("js", th.js_drift, None)
        values = over.features.get(x.key, {}).get(stat, [])
        points = list(zip(starts, values, strict=False))
        lines = [Line(f"{stat.upper()} per {duration(step)}", points)]
        marks = [("drift at", limit, BAD)] + ([("warn at", warn, WARN)] if warn else [])
        panels.append((x, stat, series(lines, title=f"{x.title}: {stat} over time",
                                       thresholds=marks, since=since, until=until,
                                       y_label=stat.upper()),
                       histogram(list(f.labels), list(f.base_hist), list(f.live_hist),
                                 title=f"{x.title}: reference vs live")))
    now_verdict = current([v if n else None for v, n in zip(over.verdicts, over.rows,
                                                              strict=False)])
    body = render(
        "drift.html", result=result, report=report, features=features, heat=heat,
        panels=panels, step=duration(step), hours=hours, ranges=RANGES, now_verdict=now_verdict,
        link=lambda **q: url("/drift", **{"bundle": bundle, "group": group, "device": device,
                                          **q}),
        steps_drift=sum(v == "drift" for v in over.verdicts), steps=len(over.verdicts))
    return f"Drift · {result.bundle} · {result.scope}", body


@dataclass(frozen=True)
class _Feature:
    f: Any  # FeatureDrift
    key: str
    verdicts: list[str | None]
    now: str | None

    @property
    def title(self) -> str:
        return f"{self.f.name} ({self.f.role})"


@dataclass(frozen=True)
class _Row:
    bundle: str
    scope: str
    href: str
    verdicts: list[str | None]
    now: str | None
    worst: str | None
    windows: int


def _index(services: Services, now: float, hours: int) -> str:
    since = now - hours * 3600
    width = max(1, math.ceil(hours * 3600 / INDEX_COLUMNS))
    starts = [since + i * width for i in range(INDEX_COLUMNS)]
    groups = services.registry.groups()
    bundles = services.bundles.list()
    labels = {b.id: b.label for b in bundles}
    cells: dict[tuple[int, str], list[str | None]] = {}
    for bundle_id, scope, col, verdict in services.store.drift_grid(since, width,
                                                                    INDEX_COLUMNS):
        cells.setdefault((bundle_id, scope), [None] * INDEX_COLUMNS)[col] = verdict
    rows = []
    for (bundle_id, scope), (verdict, worst_, n) in services.store.drift_latest(since).items():
        if bundle_id not in labels or (bundle_id, scope) not in cells:
            continue
        group = None if scope == FLEET_SCOPE else scope
        rows.append(_Row(labels[bundle_id], "fleet" if group is None else group,
                         url("/drift", bundle=labels[bundle_id], group=group,
                             hours=min(hours, 24)),
                         cells[(bundle_id, scope)], verdict, worst_, n))
    rows.sort(key=lambda r: (SEVERITY.get(r.now, 4), SEVERITY.get(r.worst, 4), r.bundle,
                             r.scope != "fleet", r.scope))
    names = [f"{r.bundle} · {r.scope}" for r in rows]
    heat = heatmap(list(zip(names, [r.verdicts for r in rows], strict=True)), starts, width,
                   title="drift verdict per bundle and scope over time",
                   links=dict(zip(names, [r.href for r in rows], strict=True))) if rows else None
    return render("drift_index.html", rows=rows, heat=heat, groups=groups, hours=hours,
                  ranges=RANGES, bundles=bundles, url=url)
