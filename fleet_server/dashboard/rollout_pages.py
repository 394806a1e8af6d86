"""The rollout pages: the list, and one rollout's stages, gates, devices and decisions.

The list reads the stored rollouts once (:func:`.views.rollout_view`: progress as
``3/3 · 100 %`` and the abort reason), so it stays one query at hundreds of rollouts. One
rollout's page asks the rollout service's ``get(id) -> dict`` (stages, gate results,
devices, audit, plan). Without a rollout service both pages say there are no rollouts. A
rollout the service does not know is a ``NotFoundError`` (or a ``KeyError``), shown as a
404 page.

This module does not act on rollouts: approving, pausing or aborting is the REST API's
and the CLI's (``fleet rollout …``), which need an operator's or approver's token.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from markupsafe import Markup

from fleet_server.dashboard.charts import gauge
from fleet_server.dashboard.html import render
from fleet_server.dashboard.humane import duration, percent
from fleet_server.dashboard.pages import Query, rollouts_service
from fleet_server.dashboard.views import progress, rollout_view
from fleet_server.errors import NotFoundError
from fleet_server.rollouts.values import STATUSES
from fleet_server.services import Services

__all__ = ["rollout", "rollout_list"]

MAX_LISTED = 1000
MAX_DEVICE_ROWS = 200  # of one rollout: the counts cover the rest
_ROLES = {"canary": 0, "shadow": 1, "rollback": 2, "control": 3}


def rollout_list(services: Services, query: Query, now: float) -> tuple[str, str]:
    status = query.choice("status", STATUSES)
    has = rollouts_service(services) is not None
    rows = [rollout_view(r) for r in services.store.list_rollouts(status=status,
                                                                  limit=MAX_LISTED)] \
        if has else []
    counts = services.store.count_rollouts() if has else {}
    body = render("rollouts.html", rows=rows, has=has, statuses=STATUSES, status=status,
                  counts=counts, now=now)
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
    audit = sorted(r.get("audit") or [], key=lambda e: e.get("time") or 0)  # oldest first
    status = str(r.get("status"))
    reason = next((str(e.get("reason")) for e in reversed(audit)
                   if e.get("to_status") == status and e.get("reason")), "") \
        if status in ("aborted", "paused") else ""
    stages = r.get("stages") or []
    devices = sorted(r.get("devices") or [], key=lambda d: (
        _ROLES.get(str(d.get("role")), 9), str(d.get("device"))))
    tally = Counter((str(d.get("role")), str(d.get("phase") or "—")) for d in devices)
    body = render(
        "rollout.html", r=r, now=now, reason=reason, audit=audit,
        progress=progress(int(r.get("stage") or 0), stages, status),
        stages=stages, gates=[_gate(g) for g in r.get("gate_results") or []],
        devices=devices[:MAX_DEVICE_ROWS], device_count=len(devices),
        tally=sorted(tally.items(), key=lambda x: (_ROLES.get(x[0][0], 9), x[0])),
        numbers=_numbers, percent=_percent,
        soak=lambda s: duration(s) if isinstance(s, (int, float)) else "—",
        plan=json.dumps(r.get("plan") or {}, indent=2, sort_keys=True, default=str))
    return f"Rollout {r.get('id', rollout_id)}", body


def _percent(x: Any) -> str:
    return percent(float(x)) if isinstance(x, (int, float)) else str(x)


def _gate(g: Mapping[str, Any]) -> dict[str, Any]:
    value, threshold, op = g.get("value"), g.get("threshold"), g.get("op") or ""
    name = str(g.get("name"))
    chart: Markup = gauge(_float(value), _float(threshold), op=op,
                          outcome=str(g.get("outcome")),
                          title=f"{name}: {_show(value)} {op} {_show(threshold)}")
    return {"name": name, "outcome": g.get("outcome"), "value": _show(value), "op": op,
            "threshold": _show(threshold), "chart": chart, "reason": g.get("reason") or "—"}


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _show(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "—" if x is None else str(x)


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


