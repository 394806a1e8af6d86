"""The drift page: one bundle over the fleet, a group or a device, per feature.

For each feature: its verdict and statistics over the whole range (from
:meth:`~fleet_server.monitoring.drift.DriftService.report`, the exactly merged rollup against
the bundle's reference profile), its main statistic over time with the warn and drift
thresholds (from :meth:`~fleet_server.monitoring.drift.DriftService.series`), and the
reference against the live histogram. The main statistic is PSI for a numeric feature and
the Jensen-Shannon distance for a categorical one, the two the verdicts mostly turn on.

Without ``bundle`` the page lists the bundles and scopes to pick from. This module does
not speak HTTP.
"""

from __future__ import annotations

import math
from typing import Any

from fleet_server.dashboard.charts import histogram, series
from fleet_server.dashboard.html import Raw, badge, esc, link, pairs, table, when
from fleet_server.dashboard.pages import Query
from fleet_server.services import Services

__all__ = ["MAX_HOURS", "MAX_POINTS", "drift"]

MAX_HOURS = 24 * 366
MAX_POINTS = 120  # per series plot: the step grows with the range


def drift(services: Services, query: Query, now: float) -> tuple[str, str]:
    bundle = query.get("bundle")
    group = query.get("group")
    device = query.get("device")
    hours = query.integer("hours", 1, 1, MAX_HOURS)
    if bundle is None:
        return "Drift", _picker(services)
    until = now
    since = now - hours * 3600
    svc = services.drift
    result = svc.report(bundle, group=group, device=device, since=since, until=until, now=now)
    fine = svc.levels[0]
    step = max(1, math.ceil((until - since) / MAX_POINTS / fine)) * fine
    over = svc.series(bundle, group=group, device=device, since=since, until=until, step=step,
                      now=now)
    report = result.report
    th = svc.thresholds
    ranges = " ".join(link("/drift", f"{h} h", bundle=bundle, group=group, device=device,
                           hours=str(h)) for h in (1, 6, 24, 168))
    head = pairs([
        ("scope", result.scope), ("verdict", badge(report.verdict)),
        ("range", f"{when(result.since)} – {when(result.until)}"),
        ("devices", result.devices), ("window summaries", result.summaries),
        ("rows (live / reference)", f"{report.rows_live} / {report.rows_base}"),
        ("share of inputs drifted", f"{report.share_drifted:.0%}"),
        ("important features", ", ".join(report.important) or "—"),
        ("reasons", "; ".join(report.reasons) or "—"),
        *([("suspect sensor: drifts alone on",
            ", ".join(result.suspect) or "nothing")] if result.compared_with else []),
        ("verdict per step", " ".join(over.verdicts) if len(over.verdicts) <= 24 else
         f"{sum(v == 'drift' for v in over.verdicts)} of {len(over.verdicts)} steps drift")])
    rows = [(f.name, f.role, badge(f.verdict), f.stats.get("psi"), f.stats.get("ks"),
             f.stats.get("wasserstein"), f.stats.get("js"), f.n_live,
             "; ".join(f.reasons) or "—") for f in report.features]
    panels = []
    for f in report.features:
        key = f.name if f.role == "input" else f"output:{f.name}"
        stat, limit, warn = ("psi", th.psi_drift, th.psi_warn) if f.kind == "numeric" else \
            ("js", th.js_drift, None)
        values = over.features.get(key, {}).get(stat, [])
        points = list(zip(over.starts, values, strict=False))
        title = f"{f.name} ({f.role})"
        panels.append(
            f'<div class="panel" id="feature-{esc(key)}"><h3>{esc(title)} {badge(f.verdict)}'
            f'</h3><p class="small muted">{esc(stat.upper())} every {step // 60} min; drift at '
            f'{limit:g}</p>'
            + series(points, title=f"{title}: {stat} over time", threshold=limit, warn=warn)
            + histogram(list(f.labels), list(f.base_hist), list(f.live_hist),
                        title=f"{title}: reference vs live")
            + "</div>")
    body = [f"<p>Range: {ranges}</p>", head,
            "<h2>Features</h2>",
            table(("feature", "role", "verdict", "PSI", "KS", "W/σ", "JS", "n live", "reasons"),
                  rows, numeric=(3, 4, 5, 6, 7), empty="no features"),
            f'<div class="grid">{"".join(panels)}</div>']
    return f"Drift · {result.bundle} · {result.scope}", "".join(body)


def _picker(services: Services) -> str:
    groups = services.registry.groups()
    rows: list[tuple[Any, ...]] = []
    for b in services.bundles.list():
        scopes = [link("/drift", "fleet", bundle=b.label)]
        scopes += [link("/drift", g.name, bundle=b.label, group=g.name) for g in groups]
        rows.append((b.label, Raw(" · ".join(scopes)), when(b.uploaded)))
    return ('<p>Pick a bundle and a scope.</p>' +
            table(("bundle", "scope", "uploaded"), rows, empty="no bundles uploaded"))
