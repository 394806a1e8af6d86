"""The retraining pages: the runs (``/retrains``), and one run's lineage (``/retrains/{id}``).

One run's page shows the chain the loop promises, one link a step: the alert (or the
person, or the schedule) that triggered it → the run (data, recipe, verdict) → the
challenger it built → the champion it was judged against (the comparison on the newest
held-out rows: every metric of both, the paired test, each rule) → the rollout that took
it to the devices → the realized performance it then had on them (its labelled rows in
the run's group since the run finished, beside the champion's in the day before the run
began). The steps up to the rollout are :meth:`~fleet_server.registry.retrains.Retrains.
lineage`'s; the last one is read here from the performance service, which sits above the
registry.

This module does not start, claim or finish runs: that is ``edgepack retrain`` and
``fleet retrain``'s, over the REST API.
"""

from __future__ import annotations

from typing import Any

from fleet_server.dashboard.html import render, url
from fleet_server.dashboard.pages import Query, alert_href
from fleet_server.errors import InvalidRequestError, NotFoundError
from fleet_server.models import FLEET_SCOPE, RETRAIN_STATUSES, RetrainRun
from fleet_server.registry.bundles import parse_label
from fleet_server.services import Services

__all__ = ["performance_after", "retrain", "retrain_list"]

MAX_LISTED = 500
BEFORE_S = 86400.0  # the champion's realized performance: the day before the run began


def retrain_list(services: Services, query: Query, now: float) -> tuple[str, str]:
    """The runs, newest first; ``status``, ``recipe`` and ``bundle`` (``name@version``: runs
    that built it or judged against it) filter them.

    Raises:
        BadParam: an unknown status. InvalidRequestError: a bundle not ``name@version``.
    """
    status = query.choice("status", RETRAIN_STATUSES)
    recipe = query.get("recipe")
    bundle = query.get("bundle")
    if bundle:
        parse_label(bundle)
    runs = services.retrains.list(recipe=recipe, status=status, bundle=bundle,
                                  limit=MAX_LISTED)
    body = render("retrains.html", runs=runs, now=now, statuses=RETRAIN_STATUSES,
                  status=status, recipe=recipe, bundle=bundle, bundle_href=_bundle_href)
    title = "Retraining" + (f" · {bundle}" if bundle else "") + (f" · {status}"
                                                                  if status else "")
    return title, body


def retrain(services: Services, run_id: str, query: Query, now: float) -> tuple[str, str]:
    """Raises: NotFoundError: no such run (or an id that is not a number)."""
    try:
        number = int(run_id)
    except ValueError as exc:
        raise NotFoundError("retrain run", run_id) from exc
    run = services.retrains.get(number)
    chain = _chain(services, run, now)
    comparison = run.metrics.get("comparison") or {}
    body = render("retrain.html", run=run, now=now, chain=chain, comparison=comparison,
                  detail=comparison.get("comparison") or {}, data=run.data,
                  bundle_href=_bundle_href)
    return f"Retrain run {run.id}", body


def _bundle_href(label: str | None) -> str:
    return url(f"/bundles/{label}") if label else ""


def _chain(services: Services, run: RetrainRun, now: float) -> list[dict[str, Any]]:
    """The lineage in the order it happened: trigger, run, challenger, champion, rollout,
    performance after; each link with an ``href`` where a page shows more."""
    links = {link["step"]: link for link in services.retrains.lineage(run)}
    out: list[dict[str, Any]] = []
    if "alert" in links:
        link = dict(links["alert"])
        if link.get("state") != "gone":
            link["href"] = alert_href(_AlertRef(link))
        out.append(link)
    elif "trigger" in links:
        out.append(links["trigger"])
    out.append(links["run"])
    for step in ("challenger", "champion"):
        if step in links:
            out.append({**links[step], "href": _bundle_href(links[step]["id"])})
    if "rollout" in links:
        out.append({**links["rollout"], "href": url(f"/rollouts/{links['rollout']['id']}")})
    after = performance_after(services, run, now)
    if after is not None:
        out.append(after)
    return out


class _AlertRef:
    """The fields :func:`~.pages.alert_href` reads, from a lineage link."""

    def __init__(self, link: dict[str, Any]) -> None:
        self.kind = str(link.get("kind") or "")
        self.bundle = str(link.get("bundle") or "")
        self.group = link.get("group")
        self.device = None


def performance_after(services: Services, run: RetrainRun, now: float
                      ) -> dict[str, Any] | None:
    """The last link of a promoted run: the challenger's realized (and estimated)
    performance in the run's group since the run finished, and the champion's in the day
    before the run began; None before there is a challenger on the devices to judge.
    """
    if run.status != "promoted" or not run.challenger or run.finished is None:
        return None
    group = run.group if run.group and run.group != FLEET_SCOPE else None
    try:
        after = services.performance.report(run.challenger, group=group, since=run.finished,
                                            now=now)
        before = services.performance.report(
            run.champion, group=group, since=run.created - BEFORE_S, until=run.created,
            now=now) if run.champion else None
    except (NotFoundError, InvalidRequestError):  # a group or bundle gone since
        return None
    metric = after.metric
    realized = after.total.realized.get(metric)
    return {"step": "performance", "id": run.challenger, "metric": metric,
            "state": "measured" if realized else "waiting for labels",
            "realized": realized, "estimated": after.total.estimated.get(metric),
            "labelled": after.total.labelled, "served": after.total.served,
            "champion": before.total.realized.get(metric) if before else None,
            "champion_labelled": before.total.labelled if before else 0,
            "href": url("/performance", bundle=run.challenger, group=group, days=2)}

