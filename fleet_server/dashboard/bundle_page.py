"""The bundle page: one bundle's model card, approvals, where it runs and how it does.

Everything comes from :meth:`~fleet_server.monitoring.governance.Governance.show` (the six
questions with their evidence, and the fleet's view: devices running it, per group whether
the group's requirements are met, rollouts, drift, open alerts), rendered by
``templates/bundle.html``. Realized and estimated performance have a page of their own
(linked; not built here).

This module does not speak HTTP, authenticate, or write anything.
"""

from __future__ import annotations

from fleet_server.dashboard.html import render, url
from fleet_server.dashboard.pages import Query
from fleet_server.registry.bundles import parse_label
from fleet_server.services import Services

__all__ = ["bundle"]

QUESTIONS = (("approved", "Who approved it"), ("data", "What data trained it"),
             ("evaluation", "How it was evaluated, against what"),
             ("biases", "What biases were tested, what was found"),
             ("review", "When it is reviewed next"),
             ("explanations", "How its decisions are explained"))


def bundle(services: Services, label: str, query: Query, now: float) -> tuple[str, str]:
    """Raises: InvalidRequestError (not name@version), NotFoundError (no such bundle)."""
    record = services.bundles.get(*parse_label(label))
    doc = services.governance.show(record, now)
    body = render("bundle.html", g=doc, now=now, questions=QUESTIONS,
                  drift_href=url("/drift", bundle=record.label),
                  devices_href=url("/devices", bundle=record.label),
                  performance_href=url("/performance", bundle=record.label))
    return record.label, body
