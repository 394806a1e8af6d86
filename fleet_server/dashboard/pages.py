"""The fleet pages: overview, device list, one device, alerts; and the query-string rules.

Each page is a function ``(services, query, now) -> (title, body)`` over the services'
public methods, returning markup built only with :mod:`.html` and :mod:`.charts` helpers
(so every value is escaped). A bad query value raises :class:`BadParam` naming the
parameter; a missing device raises the services' ``NotFoundError``; the router turns both
into HTML error pages.

A device's status is derived here, for display only: ``offline`` when its last status
message said so (or its will did), ``stale`` when it is online by its last status but the
server has heard nothing from it for :data:`STALE_AFTER_S` (a lost link the broker has not
noticed yet), else ``online``.

This module does not speak HTTP, authenticate, or write anything.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import latency_p95 as edge_latency_p95
from edgefleet.parsing import split_pair
from fleet_server.dashboard.charts import bars, series
from fleet_server.dashboard.html import Raw, badge, card, esc, link, pairs, table, when
from fleet_server.models import FLEET_SCOPE, ROLLOUT_FINISHED, Device, SummaryRecord
from fleet_server.services import Services

__all__ = ["STALE_AFTER_S", "STATUSES", "BadParam", "Query", "alerts", "device", "device_list",
           "device_status", "latency_p95", "overview", "rollouts_service"]

STALE_AFTER_S = 180.0  # six missed heartbeats at the agent's default 30 s
STATUSES = ("online", "stale", "offline")
MAX_LIST = 10_000  # devices read for one page; more are counted as "not shown"


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


def device_status(d: Device, now: float) -> str:
    if not d.online:
        return "offline"
    heard = max((t for t in (d.last_seen, d.heartbeat_time, d.status_time) if t), default=None)
    if heard is None or now - heard > STALE_AFTER_S:
        return "stale"
    return "online"


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    s = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def _label(ref: Any) -> str:
    return "none" if ref is None else ref.label


def _labels(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "—"


def latency_p95(counts: Sequence[int]) -> str:
    """The p95 of a latency histogram, as the upper edge of the bucket that holds it."""
    bounds = edge_latency_p95(counts) if counts else None
    if bounds is None:
        return "—"
    low, high = bounds
    return f"≤ {high:g} ms" if math.isfinite(high) else f"> {low:g} ms"


def _devices(services: Services, selector: Mapping[str, str] | None = None) -> list[Device]:
    return services.registry.list(selector or {}, limit=MAX_LIST)


def _active_rollouts(services: Services) -> list[dict[str, Any]] | None:
    svc = rollouts_service(services)
    if svc is None:
        return None
    return [r for r in svc.list() if r.get("status") not in ROLLOUT_FINISHED]


# --------------------------------------------------------------------------- overview


def overview(services: Services, query: Query, now: float) -> tuple[str, str]:
    devices = _devices(services)
    status = Counter(device_status(d, now) for d in devices)
    running = Counter(_label(d.bundle) for d in devices)
    groups = services.registry.groups()
    members = [(g, len(services.registry.members(g))) for g in groups]
    open_alerts = services.alerts.list(state="open", limit=1000)
    active = _active_rollouts(services)
    bundles = services.bundles.list()
    cards = [card("devices", len(devices), href="/devices",
                  sub=f"{services.store.count_devices()} registered"
                  if len(devices) >= MAX_LIST else None)]
    cards += [card(s, status.get(s, 0), href=f"/devices?status={s}") for s in STATUSES]
    cards.append(card("open alerts", len(open_alerts), href="/alerts"))
    cards.append(card("active rollouts", "—" if active is None else len(active),
                      href="/rollouts", sub="no rollout service" if active is None else None))
    cards.append(card("bundles", len(bundles), href="/drift"))
    charts = (
        _panel("Devices by status", bars([(s, status.get(s, 0)) for s in STATUSES],
                                         title="devices by status")),
        _panel("Devices by running bundle", bars(running.most_common(12),
                                                 title="devices by running bundle")),
        _panel("Devices by group", bars([(g.name, n) for g, n in members][:12],
                                        title="devices by group")
               if members else '<p class="muted">no groups</p>'))
    group_rows = [(link("/devices", g.name, group=g.name), _labels(g.selector), n,
                   "yes" if g.requires_approval else "no",
                   ", ".join(g.important_features) or "—") for g, n in members]
    bundle_rows = [(link("/drift", b.label, bundle=b.label), when(b.uploaded), b.uploaded_by,
                    ", ".join(s.get("name") or s.get("keyid", "")[:8] for s in b.signers),
                    running.get(b.label, 0)) for b in bundles]
    body = [f'<div class="cards">{"".join(cards)}</div>',
            f'<h2>Devices</h2><div class="grid">{"".join(charts)}</div>',
            "<h2>Active rollouts</h2>",
            _rollout_table(active) if active is not None else
            '<p class="muted">no rollouts (this server has no rollout service)</p>',
            "<h2>Open alerts</h2>", _alert_table(open_alerts[:10]),
            "<h2>Groups</h2>",
            table(("group", "selector", "devices", "needs approval", "important features"),
                  group_rows, numeric=(2,), empty="no groups"),
            "<h2>Bundles</h2>",
            table(("bundle", "uploaded", "by", "signers", "devices running"), bundle_rows,
                  numeric=(4,), empty="no bundles uploaded")]
    return "Fleet", "".join(body)


def _panel(title: str, content: str) -> str:
    return f'<div class="panel"><h3 class="small">{esc(title)}</h3>{content}</div>'


def _rollout_table(rows: Sequence[Mapping[str, Any]]) -> Raw:
    return table(("rollout", "bundle", "group", "status", "stage", "created", "finished"),
                 [(link(f"/rollouts/{r.get('id')}", r.get("id")), r.get("bundle"),
                   r.get("group"), badge(r.get("status")), r.get("stage"),
                   when(r.get("created_at")), when(r.get("finished_at"))) for r in rows],
                 empty="no rollouts")


def _alert_table(rows: Sequence[Any]) -> Raw:
    return table(("id", "kind", "state", "opened", "resolved", "bundle", "group", "device",
                  "message", "webhook"),
                 [(a.id, badge(a.kind), badge(a.state), when(a.opened), when(a.resolved),
                   link("/drift", a.bundle, bundle=a.bundle,
                        group=a.group if a.group and a.group != FLEET_SCOPE else None),
                   a.group, link(f"/devices/{a.device}", a.device) if a.device else "—",
                   a.message, a.webhook) for a in rows], numeric=(0,), empty="no alerts")


# --------------------------------------------------------------------------- devices


def device_list(services: Services, query: Query, now: float) -> tuple[str, str]:
    status = query.choice("status", STATUSES)
    selector = query.selector("label")
    group_name = query.get("group")
    if group_name is not None:
        group = services.registry.group(group_name)
        selector = {**group.selector, **selector}
    found = _devices(services, selector)  # a bad label key: InvalidRequestError("label")
    rows = [d for d in found if status is None or device_status(d, now) == status]
    title = "Devices" + "".join(f" · {k} {v}" for k, v in (
        ("group", group_name), ("status", status), ("label", query.get("label"))) if v)
    filters = " ".join(link("/devices", s, status=s, group=group_name) for s in STATUSES)
    body = (f'<p class="muted">{len(rows)} shown. Filter: {filters} · '
            f'{link("/devices", "all")}</p>' +
            table(("device", "status", "running", "shadow", "agent", "last seen",
                   "last heartbeat", "summaries", "labels"),
                  [(link(f"/devices/{d.id}", d.id), badge(device_status(d, now)),
                    _label(d.bundle), "—" if d.shadow is None else d.shadow.label,
                    d.agent_version or "—", _ago(d.last_seen, now),
                    _ago(d.heartbeat_time, now), d.summaries, _labels(d.labels))
                   for d in rows], numeric=(7,), empty="no devices match"))
    return title, body


def device(services: Services, device_id: str, query: Query, now: float
           ) -> tuple[str, str]:
    d = services.registry.get(device_id)
    desired = services.desired.record(device_id)
    reports = services.store.list_reports(device_id, limit=20)
    summaries = services.store.list_summaries(device=device_id, limit=30)
    groups = [g for g in services.registry.groups() if g.matches(d.labels)]
    status = device_status(d, now)
    health = d.health or {}
    body = [
        '<div class="grid"><div>', "<h2>Health</h2>", pairs([
            ("status", badge(status)), ("last seen", f"{when(d.last_seen)} "
                                                     f"({_ago(d.last_seen, now)})"),
            ("last heartbeat", f"{when(d.heartbeat_time)} ({_ago(d.heartbeat_time, now)})"),
            ("last status message", when(d.status_time)),
            ("agent version", d.agent_version or "—"),
            ("running bundle", link("/drift", d.bundle.label, bundle=d.bundle.label,
                                    device=d.id) if d.bundle else "none"),
            ("shadow bundle", d.shadow.label if d.shadow else "none"),
            ("summaries received", d.summaries), ("last summary window", when(d.last_summary)),
            ("outbox drops", d.dropped), ("registered", when(d.created)),
            ("has credential", "yes" if d.has_secret else "no")]),
        "<h2>Last heartbeat</h2>",
        pairs([(k, _health(k, health[k])) for k in sorted(health)]) if health else
        Raw('<p class="muted">no heartbeat yet</p>'),
        '</div><div>', "<h2>Desired state</h2>",
        pairs([("revision", desired.revision),
               ("bundle", _label(desired.bundle)),
               ("shadow", "none" if desired.shadow is None else desired.shadow.label),
               ("allow downgrade", "yes" if desired.allow_downgrade else "no"),
               ("updated", when(desired.updated)), ("by", desired.updated_by)])
        if desired else Raw('<p class="muted">no desired state set</p>'),
        "<h2>Labels</h2>",
        table(("label", "effective", "reported by the device", "set by an operator"),
              [(k, v, d.reported_labels.get(k), d.set_labels.get(k))
               for k, v in sorted(d.labels.items())], empty="no labels"),
        "<h2>Groups</h2>",
        table(("group", "selector"), [(link("/devices", g.name, group=g.name),
                                       _labels(g.selector)) for g in groups],
              empty="in no group"),
        "</div></div>",
        "<h2>Install reports</h2>",
        table(("received", "revision", "outcome", "bundle", "reason"),
              [(when(r.received), r.revision, badge(r.outcome), r.bundle.label, r.reason or "—")
               for r in reports], numeric=(1,), empty="no reports yet"),
        "<h2>Recent windows</h2>", _summary_chart(summaries),
        table(("window end", "bundle", "rows", "errors", "latency p95", "shadow agreement",
               "folded"),
              [(when(s.window_end), s.bundle, s.rows, sum(s.errors.values()),
                latency_p95(s.latency_counts), _agreement(s), "yes" if s.folded else "pending")
               for s in summaries], numeric=(2, 3), empty="no summaries yet"),
    ]
    return f"Device {d.id}", "".join(body)


def _health(key: str, value: Any) -> object:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    if key == "time":
        return when(value)
    if key == "rss_bytes":
        return f"{value / 2**20:.1f} MiB"
    if key == "uptime_s":
        return f"{value:.0f} s"
    return value


def _agreement(s: SummaryRecord) -> str:
    shadow = s.shadow or {}
    rows, agreed = shadow.get("rows"), shadow.get("agreed")
    if not rows or agreed is None:
        return "—"
    return f"{agreed / rows:.1%}"


def _summary_chart(summaries: Sequence[SummaryRecord]) -> str:
    if not summaries:
        return ""
    points = sorted((s.window_end, float(s.rows)) for s in summaries)
    errors = sorted((s.window_end, float(sum(s.errors.values()))) for s in summaries)
    return ('<div class="grid">' + _panel("Rows per window", series(points, title="rows per "
                                                                    "window"))
            + _panel("Errors per window", series(errors, title="errors per window"))
            + "</div>")


# --------------------------------------------------------------------------- alerts


def alerts(services: Services, query: Query, now: float) -> tuple[str, str]:
    state = query.choice("state", ("open", "resolved"))
    kind = query.choice("kind", ("drift", "suspect_sensor"))
    bundle = query.get("bundle")
    record = services.bundles.by_label(bundle) if bundle else None
    body = []
    for name in ("open", "resolved"):
        if state is not None and state != name:
            continue
        found = services.alerts.list(state=name, kind=kind, bundle=record, limit=100)
        body.append(f"<h2>{'Open' if name == 'open' else 'Recently resolved'} "
                    f"({len(found)})</h2>")
        body.append(_alert_table(found))
    return "Alerts", "".join(body)

