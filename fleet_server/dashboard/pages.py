"""The fleet pages: overview, device list, one device, alerts; and the query-string rules.

Each page is a function ``(services, query, now) -> (title, body)`` over the services'
public methods and the store's reads, returning markup rendered from a template of
``templates/`` (autoescaped, see :mod:`.html`). A bad query value raises :class:`BadParam`
naming the parameter; a missing device raises the services' ``NotFoundError``; the router
turns both into HTML error pages.

A device's status is derived for display only: ``offline`` when its last status message
said so (or its will did), ``stale`` when it is online by its last status but the server has
heard nothing from it for :data:`STALE_AFTER_S` (a lost link the broker has not noticed
yet), else ``online``. :func:`device_status` states the rule for one device; the store
applies the same rule in SQL to page and count thousands
(:class:`~fleet_server.store.DeviceQuery`'s ``stale_before``).

Nothing here loads a whole table: counts, filters, sorting and paging are store queries,
so every page stays fast at 10,000 devices.

This module does not speak HTTP, authenticate, or write anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import latency_p95 as edge_latency_p95
from edgefleet.parsing import split_pair
from fleet_server.dashboard import humane
from fleet_server.dashboard.charts import BAD, OK, WARN, Line, bars, series
from fleet_server.dashboard.html import render, url
from fleet_server.dashboard.views import events, rollout_view
from fleet_server.models import FLEET_SCOPE, ROLLOUT_FINISHED, Device, SummaryRecord
from fleet_server.monitoring.alerts import KINDS
from fleet_server.services import Services
from fleet_server.store import DEVICE_SORTS, DeviceQuery

__all__ = ["PAGE_SIZE", "STALE_AFTER_S", "STATUSES", "BadParam", "Query", "alerts", "device",
           "device_list", "device_status", "heard", "latency_p95", "overview", "rollouts_service"]

STALE_AFTER_S = 180.0  # six missed heartbeats at the agent's default 30 s
STATUSES = ("online", "stale", "offline")
STATUS_COLOURS = {"online": OK, "stale": WARN, "offline": BAD}
PAGE_SIZE = 50
MAX_PAGE = 10_000
DAY_S = 86400.0


class BadParam(Exception):
    """A query parameter the page refuses; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"query parameter {param!r}: {message}")
        self.param = param


class Query:
    """The query string of one page: only the parameters it takes, each at most once."""

    def __init__(self, items: Iterable[tuple[str, str]], allowed: Sequence[str]) -> None:
        self.values: dict[str, str] = {}
        for key, value in items:
            if key not in allowed:
                takes = ", ".join(allowed) or "none"
                raise BadParam(key[:64], f"not taken by this page (it takes: {takes})")
            if key in self.values:
                raise BadParam(key, "given more than once")
            if len(value) > 256:
                raise BadParam(key, "longer than 256 characters")
            self.values[key] = value

    def get(self, key: str) -> str | None:
        value = self.values.get(key)
        return value if value else None

    def choice(self, key: str, options: Sequence[str]) -> str | None:
        value = self.get(key)
        if value is not None and value not in options:
            raise BadParam(key, f"{value!r} is not one of {', '.join(options)}")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.get(key)
        if value is None:
            return default
        if not value.isdigit() or not lo <= int(value) <= hi:
            raise BadParam(key, f"{value!r} is not a whole number from {lo} to {hi}")
        return int(value)

    def selector(self, key: str) -> dict[str, str]:
        value = self.get(key)
        if value is None:
            return {}
        try:
            k, v = split_pair(value, key)
        except SchemaError as exc:
            raise BadParam(key, str(exc)) from None
        return {k: v}


def rollouts_service(services: Services) -> Any | None:
    """The rollout service if this server has one (``list``/``get``), else None."""
    return getattr(services, "rollouts", None)


def heard(d: Device) -> float | None:
    """When the server last heard of a device, by any message."""
    return max((t for t in (d.last_seen, d.heartbeat_time, d.status_time) if t), default=None)


def device_status(d: Device, now: float) -> str:
    if not d.online:
        return "offline"
    last = heard(d)
    if last is None or now - last > STALE_AFTER_S:
        return "stale"
    return "online"


def _labels(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "—"


def latency_p95(counts: Sequence[int]) -> str:
    """The p95 of a latency histogram, as the upper edge of the bucket that holds it."""
    bounds = edge_latency_p95(counts) if counts else None
    if bounds is None:
        return "—"
    low, high = bounds
    return f"≤ {high:g} ms" if math.isfinite(high) else f"> {low:g} ms"


def latency_p95_ms(counts: Sequence[int]) -> float | None:
    """The p95 for a chart: the upper edge of its bucket (the lower one for the overflow)."""
    bounds = edge_latency_p95(counts) if counts else None
    if bounds is None:
        return None
    low, high = bounds
    return high if math.isfinite(high) else low


# --------------------------------------------------------------------------- overview


def overview(services: Services, query: Query, now: float) -> tuple[str, str]:
    store = services.store
    status = store.count_device_statuses(now - STALE_AFTER_S)
    total = sum(status.values())
    running = store.count_devices_by_bundle()
    groups = services.registry.groups()
    members = [(g, store.count_selected(g.selector)) for g in groups]
    open_alerts = services.alerts.list(state="open", limit=1000)
    has_rollouts = rollouts_service(services) is not None
    rows = store.rollouts_touched_since(now - DAY_S) if has_rollouts else []
    views = [rollout_view(r) for r in rows]
    active = [v for v in views if v.status not in ROLLOUT_FINISHED]
    recent = [v for v in views if v.status in ROLLOUT_FINISHED and v.finished_at is not None
              and now - v.finished_at <= DAY_S]
    aborted = [v for v in recent if v.status == "aborted"]
    bundles = services.bundles.list()
    troubled = store.device_page(DeviceQuery(now - STALE_AFTER_S, status="offline",
                                             sort="heard", descending=True, limit=10))
    stale = store.device_page(DeviceQuery(now - STALE_AFTER_S, status="stale",
                                          sort="heard", descending=True, limit=10))
    resolved = services.alerts.list(state="resolved", limit=20)
    recent_rows = [r for r in rows if r.updated_at >= now - DAY_S]
    feed = events(store.list_audit(limit=20), [*open_alerts[:20], *resolved], recent_rows,
                  limit=25)
    charts = {
        "status": bars([(s, status.get(s, 0)) for s in STATUSES], title="devices by status",
                       colours=STATUS_COLOURS),
        "bundle": bars(sorted(((b or "none", n) for b, n in running.items()),
                              key=lambda x: -x[1])[:12], title="devices by running bundle"),
        "group": bars([(g.name, n) for g, n in members][:12], title="devices by group")
        if members else None,
    }
    body = render("overview.html", now=now, total=total, status=status, statuses=STATUSES,
                  open_alerts=open_alerts, has_rollouts=has_rollouts, active=active,
                  recent=recent, aborted=aborted, bundles=bundles, running=running,
                  members=members, offline=troubled, stale=stale, events=feed, charts=charts,
                  labels=_labels, alert_href=alert_href, fleet_scope=FLEET_SCOPE)
    return "Fleet", body


def alert_href(a: Any) -> str:
    """The page an alert is about (drift, or performance for a performance drop): its
    bundle, over its group or device."""
    if a.kind.endswith("performance_drop"):
        return url("/performance", bundle=a.bundle,
                   group=a.group if a.group and a.group != FLEET_SCOPE else None, days=2)
    return url("/drift", bundle=a.bundle,
               group=a.group if a.group and a.group != FLEET_SCOPE else None,
               device=a.device or None, hours=24)


# --------------------------------------------------------------------------- devices

SORT_NAMES = tuple(DEVICE_SORTS)


def device_list(services: Services, query: Query, now: float) -> tuple[str, str]:
    status = query.choice("status", STATUSES)
    selector = query.selector("label")
    group_name = query.get("group")
    search = (query.get("q") or "").strip()
    bundle = query.get("bundle")
    sort = query.choice("sort", SORT_NAMES) or "id"
    order = query.choice("order", ("asc", "desc")) or "asc"
    page_no = query.integer("page", 1, 1, MAX_PAGE)
    if bundle is not None and bundle != "none" and "@" not in bundle:
        raise BadParam("bundle", f"{bundle!r} is not name@version (or none)")
    if group_name is not None:
        group = services.registry.group(group_name)
        selector = {**group.selector, **selector}
    services.registry.list(selector, limit=0)  # a bad label key: InvalidRequestError("label")
    found = services.store.device_page(DeviceQuery(
        now - STALE_AFTER_S, search=search, status=status, selector=selector, bundle=bundle,
        sort=sort, descending=order == "desc", limit=PAGE_SIZE,
        offset=(page_no - 1) * PAGE_SIZE))
    pages = max(1, -(-found.total // PAGE_SIZE))
    state = {"q": search or None, "status": status, "group": group_name,
             "label": query.get("label"), "bundle": bundle, "sort": sort, "order": order}

    def link(**change: Any) -> str:
        merged = {**state, **change}
        if merged.get("sort") == "id" and merged.get("order") == "asc":
            merged["sort"] = merged["order"] = None
        return url("/devices", **merged)

    title = "Devices" + "".join(f" · {k} {v}" for k, v in (
        ("group", group_name), ("status", status), ("label", query.get("label")),
        ("bundle", bundle), ("matching", search or None)) if v)
    body = render("devices.html", page=found, statuses=STATUSES, state=state, now=now,
                  page_no=page_no, pages=pages, link=link, labels=_labels, heard=heard,
                  groups=services.registry.groups(),
                  bundles=[b.label for b in services.bundles.list()], size=PAGE_SIZE)
    return title, body


def device(services: Services, device_id: str, query: Query, now: float
           ) -> tuple[str, str]:
    d = services.registry.get(device_id)
    desired = services.desired.record(device_id)
    reports = services.store.list_reports(device_id, limit=20)
    summaries = services.store.list_summaries(device=device_id, limit=30)
    groups = [g for g in services.registry.groups() if g.matches(d.labels)]
    health = d.health or {}
    body = render("device.html", d=d, now=now, status=device_status(d, now),
                  desired=desired, reports=reports, summaries=summaries, groups=groups,
                  health=_health(health, now), labels=_labels,
                  charts=_summary_charts(summaries), p95=latency_p95, agreement=_agreement,
                  errors=lambda s: sum(s.errors.values()))
    return f"Device {d.id}", body


_HEALTH = {  # heartbeat key -> (shown as, how)
    "time": ("sent", "time"), "uptime_s": ("uptime", "duration"),
    "rss_bytes": ("memory (RSS)", "size"), "predictions": ("predictions", "count"),
    "errors": ("requests refused", "count"), "outbox_depth": ("outbox depth", "count"),
    "dropped": ("outbox drops", "count"), "latency_p50_ms": ("latency p50", "ms"),
    "latency_p95_ms": ("latency p95", "ms"),
}


def _health(health: Mapping[str, Any], now: float) -> list[tuple[str, str, str]]:
    """(name, humane value, exact value) per heartbeat field, known ones first."""
    out = []
    for key in [*(k for k in _HEALTH if k in health), *sorted(set(health) - set(_HEALTH))]:
        value = health[key]
        name, how = _HEALTH.get(key, (key, "raw"))
        exact = str(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            shown = "—" if value is None else str(value)
        elif how == "time":
            shown, exact = humane.ago(value, now), humane.when(value)
        elif how == "duration":
            shown, exact = humane.duration(value), f"{value:.0f} s"
        elif how == "size":
            shown, exact = humane.size(value), f"{value} bytes"
        elif how == "ms":
            shown = f"{value:.3g} ms"
        elif how == "count":
            shown = f"{value:,}".replace(",", " ")
        else:
            shown = str(value)
        out.append((name, shown, exact))
    return out


def _agreement(s: SummaryRecord) -> str:
    shadow = s.shadow or {}
    rows, agreed = shadow.get("rows"), shadow.get("agreed")
    if not rows or agreed is None:
        return "—"
    return f"{agreed / rows:.1%}"


def _summary_charts(summaries: Sequence[SummaryRecord]) -> list[Any]:
    if not summaries:
        return []
    ordered = sorted(summaries, key=lambda s: s.window_end)
    rows = Line("rows", [(s.window_end, float(s.rows)) for s in ordered])
    errors = Line("errors", [(s.window_end, float(sum(s.errors.values()))) for s in ordered],
                  colour=BAD)
    latency = Line("p95 latency", [(s.window_end, latency_p95_ms(s.latency_counts))
                                    for s in ordered])
    return [series([rows], title="rows per window", y_label="rows"),
            series([errors], title="errors per window", y_label="errors"),
            series([latency], title="latency p95 per window", y_label="ms")]


# --------------------------------------------------------------------------- alerts


def alerts(services: Services, query: Query, now: float) -> tuple[str, str]:
    state = query.choice("state", ("open", "resolved"))
    kind = query.choice("kind", KINDS)
    bundle = query.get("bundle")
    record = services.bundles.by_label(bundle) if bundle else None
    sections = []
    for name in ("open", "resolved"):
        if state is not None and state != name:
            continue
        found = services.alerts.list(state=name, kind=kind, bundle=record, limit=100)
        sections.append(("Open" if name == "open" else "Recently resolved", found))
    body = render("alerts.html", sections=sections, now=now, alert_href=alert_href,
                  kind=kind, state=state, bundle=bundle)
    return "Alerts", body
