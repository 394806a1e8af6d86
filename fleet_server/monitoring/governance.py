"""The governance service: what the fleet does with a bundle's card and approvals.

- :meth:`Governance.check_desired`: an operator's desired-state assignment of a bundle new to
  the device is refused (409) when the bundle is past its review date or lacks what a group
  the device belongs to requires (the rules: :mod:`fleet_server.registry.governance`);
- :meth:`Governance.review_alerts`, run on the evaluator's timer: ``review_due`` for a bundle
  running on devices whose review date is at most :data:`REVIEW_DUE_DAYS` days away, and
  ``review_overdue`` for one still running on devices after it; each resolves when its
  condition clears (a renewal by an approver, or no device running the bundle any more).
  Bundles no device runs raise neither: their next rollout is refused anyway;
- :meth:`Governance.show`: one document answering the six questions of a regulator (who
  approved it, what data trained it, how it was evaluated and against what, what biases were
  tested and found, when it is reviewed next, how its decisions are explained), each with its
  evidence, and what the fleet knows of the bundle (where it runs, rollouts, drift, alerts,
  and whether each group's requirements are met). ``fleet bundle show`` and the dashboard's
  bundle page render it.

This module speaks no HTTP and renders nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from edgefleet.contract.approval import CheckedApproval
from edgefleet.contract.card import parse_date
from edgefleet.contract.errors import SchemaError
from fleet_server.models import FLEET_SCOPE, BundleRecord, Group
from fleet_server.monitoring.alerts import Alerts
from fleet_server.registry.bundles import Bundles, parse_label
from fleet_server.registry.desired import BundleSpec
from fleet_server.registry.devices import Registry
from fleet_server.registry.governance import (
    APPROVER,
    REVIEW_DUE_DAYS,
    card_of,
    check_assignment,
    day_of,
    missing_requirements,
    review_by,
)
from fleet_server.store import Store

__all__ = ["EXPLANATION_METHOD", "QUESTIONS", "Governance"]

log = logging.getLogger(__name__)
QUESTIONS = ("approved", "data", "evaluation", "biases", "review", "explanations")
EXPLANATION_METHOD = "baseline_substitution"  # edge_agent.explain: the device's local answer
_DRIFT_WINDOWS = 3  # newest evaluated windows shown per scope
_ROLLOUTS = 20


def _label(spec: BundleSpec) -> str | None:
    if spec is None:
        return None
    return spec if isinstance(spec, str) else spec.label


class Governance:
    def __init__(self, store: Store, bundles: Bundles, registry: Registry,
                 alerts: Alerts) -> None:
        self.store = store
        self.bundles = bundles
        self.registry = registry
        self.alerts = alerts

    # -- enforcement ---------------------------------------------------------------------

    def groups_of(self, device: str) -> list[Group]:
        found = self.store.get_device(device)
        if found is None:
            return []
        return [g for g in self.registry.groups() if g.matches(found.labels)]

    def check_desired(self, device: str, bundle: BundleSpec, shadow: BundleSpec,
                      now: float) -> None:
        """Check each bundle an assignment gives ``device`` that it was not already given.

        Raises:
            InvalidRequestError, NotFoundError: a bad or unknown bundle label.
            ReviewOverdueError, RequirementsMissingError (409): not allowed (names why).
        """
        current = self.store.get_desired(device)
        given = set() if current is None else {
            r.label for r in (current.bundle, current.shadow) if r is not None}
        for label in (_label(bundle), _label(shadow)):
            if label is None or label in given:
                continue
            record = self.bundles.get(*parse_label(label))
            check_assignment(record, self.bundles.approvals(record), self.groups_of(device),
                             now)

    # -- alerts --------------------------------------------------------------------------

    def review_alerts(self, now: float) -> dict[str, int]:
        """Open and resolve the review alerts (see the module docstring); returns how many
        bundles are due and overdue."""
        today = day_of(now)
        counts = {"review_due": 0, "review_overdue": 0}
        open_now = {(a.kind, a.bundle) for kind in counts
                    for a in self.alerts.list(state="open", kind=kind, limit=10_000)}
        for record in self.bundles.list():
            due = review_by(record, self.bundles.approvals(record))
            running = self.store.count_running(record.label) if due else 0
            days = (parse_date(due, "review_by") - today).days if due else None
            wanted = {"review_due": days is not None and running > 0
                      and 0 <= days <= REVIEW_DUE_DAYS,
                      "review_overdue": days is not None and running > 0 and days < 0}
            for kind, on in wanted.items():
                if on:
                    counts[kind] += 1
                    when = f"in {days} day(s)" if kind == "review_due" else \
                        f"{-days} day(s) ago"  # type: ignore[operator]
                    self.alerts.raise_alert(
                        kind, record, now=now,
                        message=f"{record.label} is due for review on {due} ({when}) and "
                                f"runs on {running} device(s)",
                        details={"review_by": due, "days": days, "devices": running})
                elif (kind, record.label) in open_now:
                    self.alerts.resolve(kind, record, now=now)
        return counts

    # -- the six questions ---------------------------------------------------------------

    def show(self, record: BundleRecord, now: float) -> dict[str, Any]:
        """The bundle's governance document (see the module docstring)."""
        approvals = self.bundles.approvals(record)
        try:
            card = card_of(record)
        except SchemaError:
            card = None
        m = record.manifest
        statement = card.statement if card else None
        return {
            "bundle": record.label, "sha256": record.sha256, "uploaded": record.uploaded,
            "uploaded_by": record.uploaded_by, "task": m.get("task"),
            "has_card": statement is not None,
            "statement": None if statement is None else statement.to_dict(),
            "approved": self._approved(record, approvals),
            "data": self._data(m, card),
            "evaluation": self._evaluation(m, card),
            "biases": self._biases(card),
            "review": self._review(record, approvals, statement, now),
            "explanations": self._explanations(card),
            "fleet": self._fleet(record, approvals, now),
        }

    @staticmethod
    def _approved(record: BundleRecord, approvals: Sequence[CheckedApproval]
                  ) -> dict[str, Any]:
        confirmed = [a for a in approvals if a.role_confirmed and a.statement.role == APPROVER]
        signers = [dict(s) for s in record.signers]
        answer = (", ".join(sorted({a.name or a.statement.keyid[:16] for a in confirmed}))
                  or ", ".join(s.get("name") or s["keyid"][:16] for s in signers
                               if s.get("role") == APPROVER) or "nobody")
        return {"answer": f"approved by {answer}" if answer != "nobody" else
                "no approver has approved it",
                "approvals": [a.to_dict() for a in approvals], "signers": signers}

    @staticmethod
    def _data(m: dict[str, Any], card: Any) -> dict[str, Any]:
        lineage = m.get("lineage") or {}
        tr = card.time_range.to_dict() if card and card.time_range else None
        return {"answer": f"{lineage.get('data_rows')} rows, sha256 "
                          f"{str(lineage.get('data_sha256'))[:16]}…"
                          + (f", {tr['start']} to {tr['end']}" if tr else ""),
                "lineage": lineage, "columns": list(card.data_columns) if card else [],
                "time_range": tr, "inputs": [i.get("name") for i in m.get("inputs", [])]}

    @staticmethod
    def _evaluation(m: dict[str, Any], card: Any) -> dict[str, Any]:
        ev = card.evaluation if card else None
        champ = card.champion if card else None
        parts = []
        if ev is not None:
            parts.append(f"{ev.rows} {ev.data.replace('_', '-')} rows: " + ", ".join(
                f"{e.name} {e.value:.4g}" for e in ev.metrics if e.value is not None))
        if champ is not None:
            parts.append(f"against {champ.name}@{champ.version}: {champ.metric} "
                         f"{'won' if champ.won else 'lost'}"
                         + (f" by {champ.delta:+.4g}" if champ.delta is not None else ""))
        worst = [f"{s.column}={s.worst}" for s in (card.slices if card else ()) if s.worst]
        if worst:
            parts.append("worst slice " + ", ".join(worst))
        return {"answer": "; ".join(parts) or "no held-out evaluation in the card",
                "evaluation": ev.to_dict() if ev else None,
                "slices": [s.to_dict() for s in card.slices] if card else [],
                "champion": champ.to_dict() if champ else None,
                "metrics": m.get("metrics") or {}, "fidelity": m.get("fidelity")}

    @staticmethod
    def _biases(card: Any) -> dict[str, Any]:
        if card is None or not card.fairness:
            return {"answer": "no sensitive column was tested", "fairness": [], "checks": [],
                    "forced": False}
        gaps = []
        for r in card.fairness:
            shown = ", ".join(f"{k} {v:.3g}" for k, v in sorted(r.gaps.items())
                              if v is not None)
            gaps.append(f"{r.column}: {shown}")
        failed = [c for c in card.checks if not c.passed]
        verdict = (f"{len(failed)} bound(s) failed" + (" (forced)" if card.forced else "")
                   if failed else f"{len(card.checks)} bound(s) passed" if card.checks
                   else "no bound was set")
        return {"answer": "; ".join(gaps) + f"; {verdict}",
                "fairness": [r.to_dict() for r in card.fairness],
                "checks": [c.to_dict() for c in card.checks], "forced": card.forced}

    @staticmethod
    def _review(record: BundleRecord, approvals: Sequence[CheckedApproval], statement: Any,
                now: float) -> dict[str, Any]:
        due = review_by(record, approvals)
        stated = statement.review_by if statement else None
        source = "none" if due is None else "card" if due == stated and not any(
            a.statement.review_by == due and a.role_confirmed for a in approvals) \
            else "approval"
        if due is None:
            status, answer, days = "none", "no review date", None
        else:
            days = (parse_date(due, "review_by") - day_of(now)).days
            status = "overdue" if days < 0 else "due" if days <= REVIEW_DUE_DAYS else "ok"
            answer = f"{due} ({'overdue by ' + str(-days) if days < 0 else 'in ' + str(days)}" \
                     f" day(s), from the {source})"
        return {"answer": answer, "review_by": due, "card_review_by": stated,
                "source": source, "status": status, "days": days}

    @staticmethod
    def _explanations(card: Any) -> dict[str, Any]:
        imp = card.importances if card else None
        top = [i.to_dict() for i in imp.features[:5]] if imp else []
        return {"answer": ("globally by permutation importance (top: "
                           + ", ".join(t["feature"] for t in top) + "); " if top else "")
                + "per prediction on the device: POST /explain or `edge-agent explain` "
                  "(baseline substitution against the bundle's reference)",
                "importances": imp.to_dict() if imp else None, "top_features": top,
                "on_device": EXPLANATION_METHOD}

    def _fleet(self, record: BundleRecord, approvals: Sequence[CheckedApproval],
               now: float) -> dict[str, Any]:
        groups = []
        for g in self.registry.groups():
            missing = missing_requirements(record, approvals, g.requires)
            groups.append({"group": g.name, "running": self.store.count_running(
                record.label, g.selector), "requires": list(g.requires),
                "missing": [{"requirement": n, "why": why} for n, why in missing]})
        rollouts = [{"id": r.id, "group": r.group, "status": r.status,
                     "created_at": r.created_at}
                    for r in self.store.list_rollouts(limit=1000)
                    if r.bundle == record.label][:_ROLLOUTS]
        drift = []
        for scope in [FLEET_SCOPE, *(g["group"] for g in groups)]:
            windows = self.store.list_windows(record.id, scope, limit=_DRIFT_WINDOWS)
            if windows:
                drift.append({"scope": scope, "verdict": windows[-1].verdict,
                              "window_end": windows[-1].window_end,
                              "history": [w.verdict for w in windows]})
        alerts = [a.to_dict() for a in self.alerts.list(state="open", bundle=record,
                                                        limit=50)]
        return {"devices": self.store.count_running(record.label), "groups": groups,
                "rollouts": rollouts, "drift": drift, "alerts": alerts}
