"""The performance page: is the model still right? (``/performance``).

Without ``bundle``: every bundle with a link per scope (fleet, each group). With
``bundle=name@version`` (and ``group`` or ``device``, ``days``): the report of
:meth:`~fleet_server.monitoring.performance.PerformanceService.report` over the range,

- the watched metric (accuracy, or MAE for a regressor) over time, realized with its 95 %
  band and estimated with its band, against the packaged expectation and the alert limit;
- each side's verdict with its reason, the labelled and served rows;
- the realized reliability diagram and confusion matrix over the range (classifiers).

This module does not speak HTTP.
"""

from __future__ import annotations

from typing import Any

from fleet_server.dashboard.charts import BAD, BASE, LIVE, MUTED
from fleet_server.dashboard.html import render, url
from fleet_server.dashboard.humane import duration
from fleet_server.dashboard.pages import BadParam, Query
from fleet_server.dashboard.performance_charts import Band, band_series, reliability
from fleet_server.profiles.performance import ERROR_METRICS
from fleet_server.services import Services

__all__ = ["MAX_DAYS", "performance"]

MAX_DAYS = 366
RANGES = (1, 2, 7, 30, 90)


def performance(services: Services, query: Query, now: float) -> tuple[str, str]:
    bundle = query.get("bundle")
    group, device = query.get("group"), query.get("device")
    if group and device:
        raise BadParam("device", "give group or device, not both")
    days = query.integer("days", 7, 1, MAX_DAYS)
    if bundle is None:
        return "Performance", render("performance_index.html",
                                     bundles=services.bundles.list(),
                                     groups=services.registry.groups())
    report = services.performance.report(bundle, group=group, device=device,
                                         since=now - days * 86400, until=now, now=now)
    metric = report.metric
    expected = report.expected.get(metric)
    lines = []
    for side, colour in (("realized", LIVE), ("estimated", BASE)):
        pts = []
        for p in report.points:
            m: dict[str, Any] = getattr(p, side).get(metric) or {}
            pts.append((p.start + report.step / 2, m.get("value"), m.get("low"), m.get("high")))
        if any(v is not None for _, v, _, _ in pts):
            lines.append(Band(f"{side} {metric}", pts, colour))
    refs = []
    if expected is not None:
        refs.append(("packaged", expected.value, MUTED))
        limit = report.verdicts["realized"].limit
        if limit is not None:
            refs.append(("alert below" if metric not in ERROR_METRICS else "alert above",
                         limit, BAD))
    chart = band_series(lines, title=f"{report.bundle} · {report.scope}: {metric} over time",
                        since=report.since, until=report.until, references=refs,
                        y_label=metric, unit_range=metric not in ERROR_METRICS)
    diagram = None if report.reliability is None else reliability(
        [(b["confidence"], b["observed"], b["n"]) for b in report.reliability],
        title=f"{report.bundle}: reliability of the labelled rows")
    confusion = report.confusion
    totals = None if confusion is None else [sum(row) for row in confusion["counts"]]
    body = render("performance.html", r=report, metric=metric, expected=expected,
                  chart=chart, diagram=diagram, confusion=confusion, totals=totals,
                  step=duration(report.step), days=days, ranges=RANGES,
                  points=[p for p in report.points if p.entries],
                  link=lambda **q: url("/performance", **{"bundle": bundle, "group": group,
                                                          "device": device, **q}))
    return f"Performance · {report.bundle} · {report.scope}", body
