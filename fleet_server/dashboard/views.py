"""What the dashboard shows of rollouts and events: typed view records read from the store.

The rollout list and the overview show hundreds of rollouts, so they read the stored rows
(:meth:`~fleet_server.store.Store.list_rollouts`) once and derive, per rollout, only what a
list needs: its progress (``3/3 · 100 %``: the stage reached of the plan's stages and that
stage's share of the group) and, for an aborted or paused one, the reason the last decision
gave. The full picture of one rollout (devices, gates) is the rollout service's ``get``.

The recent-events list merges the audit log with alerts opened and resolved, newest first.

This module does not act on anything and does not render markup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet_server.dashboard.html import scope_name, url
from fleet_server.dashboard.humane import percent
from fleet_server.models import FLEET_SCOPE, Alert, AuditEntry
from fleet_server.store import RolloutRow

__all__ = ["Event", "RolloutView", "events", "progress", "rollout_view"]


@dataclass(frozen=True)
class RolloutView:
    id: str
    bundle: str
    group: str
    status: str
    stage: int  # 0-based index of the stage reached
    stages: int
    fraction: float | None  # the share of the group the stage reached covers
    progress: str  # "2/4 · 10 %"
    created_at: float
    finished_at: float | None
    updated_at: float
    reason: str  # why it was aborted or paused ("" otherwise, or when none was given)
    actor: str  # who (or what) made the last decision


def progress(stage: int, stages: Sequence[Mapping[str, Any]], status: str) -> str:
    """``"3/3 · 100 %"``: stages reached of all, and the share of the group reached.

    A rollout not started has reached no stage (``0/4 · 0 %``); a completed one all of them.
    """
    n = len(stages)
    if n == 0:
        return "0/0"
    if status in ("ready", "pending_approval"):
        return f"0/{n} · 0 %"
    i = n - 1 if status == "completed" else min(max(stage, 0), n - 1)
    fraction = stages[i].get("fraction")
    share = percent(float(fraction)) if isinstance(fraction, (int, float)) else "—"
    return f"{i + 1}/{n} · {share}"


def rollout_view(row: RolloutRow) -> RolloutView:
    stages = row.plan.get("stages") or []
    stage = int(row.state.get("stage") or 0)
    history = row.state.get("history") or []
    last = history[-1] if history else {}
    reason = ""
    if row.status in ("aborted", "paused"):
        reason = next((str(e.get("reason")) for e in reversed(history)
                       if e.get("to_status") == row.status and e.get("reason")), "")
    i = min(stage, len(stages) - 1) if stages else 0
    fraction = stages[i].get("fraction") if stages else None
    return RolloutView(
        id=row.id, bundle=row.bundle, group=row.group, status=row.status, stage=stage,
        stages=len(stages), fraction=float(fraction) if fraction is not None else None,
        progress=progress(stage, stages, row.status), created_at=row.created_at,
        finished_at=row.state.get("finished_at"), updated_at=row.updated_at, reason=reason,
        actor=str(last.get("actor") or ""))


@dataclass(frozen=True)
class Event:
    time: float
    kind: str  # the badge: an audit action, or "alert" / "resolved"
    text: str
    actor: str
    href: str | None = None


def events(audit: Sequence[AuditEntry], alerts: Sequence[Alert],
           rollouts: Sequence[RolloutRow] = (), limit: int = 20) -> list[Event]:
    """The newest ``limit`` events of the audit log, the alerts and the rollouts'
    decisions, newest first."""
    out = [Event(a.time, a.action, _audit_text(a), a.actor, _audit_href(a)) for a in audit]
    logged = {(a.target, round(a.time, 3)) for a in audit}
    for row in rollouts:
        for e in (row.state.get("history") or [])[-limit:]:
            if (f"rollout:{row.id}", round(float(e.get("time") or 0), 3)) in logged:
                continue  # an operator's action: the audit log has it already
            move = f"{e.get('from_status') or '—'} → {e.get('to_status') or '—'}"
            why = f": {e['reason']}" if e.get("reason") else ""
            out.append(Event(float(e.get("time") or 0), str(e.get("action") or ""),
                             f"rollout {row.id} ({row.bundle} to {row.group}) {move}{why}",
                             str(e.get("actor") or ""), f"/rollouts/{row.id}"))
    for al in alerts:
        where = al.device or scope_name(al.group)
        href = _alert_href(al)
        out.append(Event(al.opened, "open", f"{al.kind} alert #{al.id} on {al.bundle} · {where}: "
                         f"{al.message}", "monitor", href))
        if al.resolved is not None:
            out.append(Event(al.resolved, "resolved", f"{al.kind} alert #{al.id} on "
                             f"{al.bundle} · {where} resolved", "monitor", href))
    out.sort(key=lambda e: e.time, reverse=True)
    return out[:limit]


def _audit_text(a: AuditEntry) -> str:
    text = f"{a.action} {a.target}".strip()
    d = a.details or {}
    if d.get("from") or d.get("to"):
        text += f" ({d.get('from') or '—'} → {d.get('to') or '—'})"
    if d.get("reason"):
        text += f": {d['reason']}"
    return text


def _audit_href(a: AuditEntry) -> str | None:
    kind, _, name = a.target.partition(":")
    if kind == "rollout" and name:
        return f"/rollouts/{name}"
    if kind == "device" and name:
        return f"/devices/{name}"
    return None


def _alert_href(a: Alert) -> str:
    if a.kind.endswith("performance_drop"):
        return url("/performance", bundle=a.bundle,
                   group=a.group if a.group and a.group != FLEET_SCOPE else None)
    return url("/drift", bundle=a.bundle, group=a.group if a.group and a.group != FLEET_SCOPE
               else None, device=a.device or None)
