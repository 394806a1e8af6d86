"""The rollout pages: the list, and one rollout's stages, gates, devices and decisions.

They read ``services.rollouts`` when the server has one, through two calls only:
``list(status=None) -> list[dict]`` and ``get(id) -> dict`` (stages, gate results, devices,
audit, plan). Without the service both pages say there are no rollouts. A rollout the
service does not know is a ``NotFoundError`` (or a ``KeyError``), shown as a 404 page.

This module does not act on rollouts: approving, pausing or aborting is the REST API's
and the CLI's (``fleet rollout …``), which need an operator's or approver's token.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from fleet_server.dashboard.charts import gauge
from fleet_server.dashboard.html import Raw, badge, esc, link, pairs, table, when
from fleet_server.dashboard.pages import Query, rollouts_service
from fleet_server.errors import NotFoundError
from fleet_server.rollouts.values import STATUSES
from fleet_server.services import Services

__all__ = ["rollout", "rollout_list"]

_NONE = Raw('<p class="muted">no rollouts (this server has no rollout service)</p>')


def rollout_list(services: Services, query: Query, now: float) -> tuple[str, str]:
    status = query.choice("status", STATUSES)
    svc = rollouts_service(services)
    if svc is None:
        return "Rollouts", _NONE
    rows = svc.list(status=status)
    filters = " ".join(link("/rollouts", s, status=s) for s in STATUSES)
    body = (f'<p class="muted">Filter: {filters} · {link("/rollouts", "all")}</p>'
            + table(("rollout", "bundle", "group", "status", "stage", "created", "finished"),
                    [(link(f"/rollouts/{r.get('id')}", r.get("id")), r.get("bundle"),
                      r.get("group"), badge(r.get("status")), r.get("stage"),
                      when(r.get("created_at")), when(r.get("finished_at"))) for r in rows],
                    empty="no rollouts" + (f" with status {status}" if status else "")))
    return "Rollouts" + (f" · {status}" if status else ""), body


def rollout(services: Services, rollout_id: str, query: Query, now: float
            ) -> tuple[str, str]:
    svc = rollouts_service(services)
    if svc is None:
        raise NotFoundError("rollout", rollout_id, f"rollout {rollout_id!r} not found: this "
                                                   "server has no rollout service")
    try:
        r = svc.get(rollout_id)
    except KeyError as exc:
        raise NotFoundError("rollout", rollout_id) from exc
    if r is None:
        raise NotFoundError("rollout", rollout_id)
    bundle, group = r.get("bundle"), r.get("group")
    head = pairs([
        ("status", badge(r.get("status"))), ("stage", r.get("stage")),
        ("bundle", link("/drift", bundle, bundle=str(bundle), group=str(group))
         if bundle else "—"),
        ("group", link("/devices", group, group=str(group)) if group else "—"),
        ("created", when(r.get("created_at"))), ("finished", when(r.get("finished_at")))])
    body = [head,
            "<h2>Stages</h2>", _stages(r.get("stages") or []),
            "<h2>Gates</h2>", _gates(r.get("gate_results") or []),
            "<h2>Decisions</h2>", _audit(r.get("audit") or []),
            "<h2>Devices</h2>", _devices(r.get("devices") or []),
            "<h2>Plan</h2>", _plan(r.get("plan") or {})]
    return f"Rollout {r.get('id', rollout_id)}", "".join(body)


def _percent(x: Any) -> str:
    return f"{float(x):.0%}" if isinstance(x, (int, float)) else esc(x)


def _stages(stages: Sequence[Mapping[str, Any]]) -> str:
    cells = []
    for s in stages:
        cells.append(f'<div class="card stage-{esc(s.get("state"))}"><div class="muted small">'
                     f'stage {esc(s.get("index"))}</div><div class="big">'
                     f'{_percent(s.get("fraction"))}</div><div>{badge(s.get("state"))} '
                     f'<span class="small">{esc(s.get("size"))} '
                     f'device{"" if s.get("size") == 1 else "s"}</span></div></div>')
    return (f'<div class="cards">{"".join(cells)}</div>' +
            table(("stage", "fraction", "min devices", "soak (s)", "devices", "state"),
                  [(s.get("index"), _percent(s.get("fraction")), s.get("min_devices"),
                    s.get("soak_s"), s.get("size"), badge(s.get("state"))) for s in stages],
                  numeric=(0, 2, 3, 4), empty="no stages"))


def _gates(gates: Sequence[Mapping[str, Any]]) -> Raw:
    rows = []
    for g in gates:
        value, threshold, op = g.get("value"), g.get("threshold"), g.get("op") or ""
        name = str(g.get("name"))
        chart = Raw(gauge(_float(value), _float(threshold), op=op,
                          outcome=str(g.get("outcome")),
                          title=f"{name}: {_show(value)} {op} {_show(threshold)}"))
        rows.append((name, badge(g.get("outcome")), _show(value), op, _show(threshold), chart,
                     g.get("reason") or "—"))
    return table(("gate", "outcome", "value", "passes if", "threshold", "value against threshold",
                  "reason"), rows, numeric=(2, 4), empty="no gate judged yet")


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _show(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "—" if x is None else str(x)


def _audit(entries: Sequence[Mapping[str, Any]]) -> Raw:
    rows = []
    for e in sorted(entries, key=lambda e: e.get("time") or 0):  # oldest first
        numbers = e.get("numbers") or {}
        move = f"{e.get('from_status') or '—'} → {e.get('to_status') or '—'}"
        rows.append((when(e.get("time")), e.get("actor"), badge(e.get("action")), move,
                     e.get("stage"), e.get("reason") or "—", _numbers(numbers)))
    return table(("time", "actor", "action", "status", "stage", "reason", "numbers"), rows,
                 numeric=(4,), empty="no decisions yet")


def _numbers(numbers: Mapping[str, Any]) -> str:
    """An audit entry's numbers in a line: scalars as they are, gate lists by outcome."""
    parts = []
    for k, v in sorted(numbers.items()):
        if isinstance(v, list) and all(isinstance(x, Mapping) and "outcome" in x for x in v):
            outcomes = Counter(str(x["outcome"]) for x in v)
            parts.append(f"{k}: " + (", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
                                     or "none"))
        elif isinstance(v, (list, tuple, Mapping)):
            parts.append(f"{k}: {len(v)} items")
        else:
            parts.append(f"{k}={_show(v)}")
    return "; ".join(parts) or "—"


def _devices(devices: Sequence[Mapping[str, Any]]) -> Raw:
    return table(("device", "role", "stage", "phase", "running", "online"),
                 [(link(f"/devices/{d.get('device')}", d.get("device")), badge(d.get("role")),
                   d.get("stage"), badge(d.get("phase")) if d.get("phase") else "—",
                   d.get("running") or "—",
                   "yes" if d.get("online") else "no") for d in devices],
                 numeric=(2,), empty="no devices in this rollout")


def _plan(plan: Mapping[str, Any]) -> str:
    text = json.dumps(plan, indent=2, sort_keys=True, default=str)
    return (f'<details><summary>the plan as stored</summary><pre class="panel small">'
            f'{esc(text)}</pre></details>')
