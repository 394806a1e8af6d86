"""Retraining runs: the server's record of the loop (``edgepack retrain``), and its lineage.

A runner (``edgepack retrain``, or its ``--watch`` form) records each run here: it starts
one (``running``), or claims one an operator requested (``fleet retrain start`` makes it
``requested``), reports what it fetched and measured while it runs, and finishes it:
``promoted`` (the challenger won and was rolled out), ``rejected`` (it did not win; nothing
deployed, the reason says why) or ``failed``. Runs of one recipe never overlap (the store
refuses a second running one); a finished run is never changed again. Every start and
finish is in the audit log.

:meth:`Retrains.lineage` is the chain an operator follows: the alert that triggered the
run, the champion it was judged against, the challenger it built, the rollout that took it
to the devices, and where that rollout is now.

This module does not train, package, upload or roll out anything (the runner does, through
the API), and decides no promotion (the packager's comparison does).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from edgefleet.contract.manifest import NAME_RE
from fleet_server.errors import ConflictError, InvalidRequestError, NotFoundError
from fleet_server.models import RETRAIN_FINISHED, RetrainRun
from fleet_server.store import Store

__all__ = ["Retrains"]

TRIGGER_RE = re.compile(r"^(manual|schedule|alert:[1-9][0-9]{0,17})\Z")
RECIPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MAX_DOC_BYTES = 64 * 1024  # data and metrics, each, as JSON


class Retrains:
    def __init__(self, store: Store) -> None:
        self.store = store

    def start(self, *, recipe: str, recipe_hash: str, revision: str, trigger: str,
              group: str, bundle: str, actor: str, now: float,
              requested: bool = False) -> RetrainRun:
        """Record a run: ``running`` (a runner starts it) or ``requested`` (for a runner).

        Raises:
            InvalidRequestError: a bad recipe name, trigger or bundle name (named).
            NotFoundError: the group, or the alert a trigger names, does not exist.
            ConflictError: a run of the recipe is running already.
        """
        if not RECIPE_RE.match(recipe):
            raise InvalidRequestError(f"recipe {recipe!r}: letters, digits, '.', '_', '-'",
                                      field="recipe")
        if not TRIGGER_RE.match(trigger):
            raise InvalidRequestError(f"trigger {trigger!r}: manual, schedule or alert:<id>",
                                      field="trigger")
        if not NAME_RE.match(bundle):
            raise InvalidRequestError(f"bundle {bundle!r} is not a bundle name", field="bundle")
        if self.store.get_group(group) is None:
            raise NotFoundError("group", group)
        alert_id = int(trigger.split(":")[1]) if trigger.startswith("alert:") else None
        if alert_id is not None:
            self.store.get_alert(alert_id)  # raises NotFoundError
        with self.store.transaction():
            run = self.store.add_retrain(
                recipe=recipe, recipe_hash=recipe_hash, revision=revision, trigger=trigger,
                alert_id=alert_id, status="requested" if requested else "running",
                group=group, bundle=bundle, actor=actor, now=now)
            self.store.audit(actor, "retrain.request" if requested else "retrain.start",
                             f"retrain:{run.id}",
                             {"recipe": recipe, "trigger": trigger, "group": group}, now)
        return run

    def claim(self, recipe: str, actor: str, now: float) -> RetrainRun | None:
        """The oldest requested run of ``recipe``, now running (None: nothing to do)."""
        with self.store.transaction():
            run = self.store.claim_retrain(recipe, now)
            if run is not None:
                self.store.audit(actor, "retrain.start", f"retrain:{run.id}",
                                 {"recipe": recipe, "trigger": run.trigger, "claimed": True},
                                 now)
        return run

    def update(self, run_id: int, changes: Mapping[str, Any], actor: str,
               now: float) -> RetrainRun:
        """Report progress (``data``, ``metrics``, ``champion``, ...) or finish a run
        (``status`` promoted, rejected or failed, with a ``reason`` unless promoted).

        Raises:
            NotFoundError: no such run.
            ConflictError: the run is finished, or not running.
            InvalidRequestError: a bad status, a promotion without a challenger and a
                rollout, a refusal without a reason, an oversized document.
        """
        from fleet_server.store._base import dumps

        for key in ("data", "metrics"):
            if key in changes and len(dumps(changes[key])) > MAX_DOC_BYTES:
                raise InvalidRequestError(f"{key}: more than {MAX_DOC_BYTES} bytes of JSON",
                                          field=key)
        with self.store.transaction():
            run = self.store.get_retrain(run_id)
            if run.status in RETRAIN_FINISHED:
                raise ConflictError(f"retrain run {run_id} is {run.status} already; a "
                                    "finished run is never changed")
            if run.status != "running":
                raise ConflictError(f"retrain run {run_id} is {run.status}, not running: "
                                    "a runner claims it first")
            status = changes.get("status", "running")
            if status not in ("running", *RETRAIN_FINISHED):
                raise InvalidRequestError(f"status {status!r}: running, promoted, rejected "
                                          "or failed", field="status")
            merged = {**run.to_dict(), **changes}
            if status == "promoted" and not (merged["challenger"] and merged["rollout"]):
                raise InvalidRequestError("a promoted run names its challenger and the "
                                          "rollout that took it to the devices",
                                          field="status")
            if status in ("rejected", "failed") and not merged["reason"]:
                raise InvalidRequestError(f"a {status} run says why (reason)", field="reason")
            values = dict(changes)
            if status in RETRAIN_FINISHED:
                values["finished"] = now
            run = self.store.update_retrain(run_id, values)
            if status in RETRAIN_FINISHED:
                self.store.audit(actor, f"retrain.{status}", f"retrain:{run_id}",
                                 {"recipe": run.recipe, "champion": run.champion,
                                  "challenger": run.challenger, "rollout": run.rollout,
                                  "reason": run.reason}, now)
        return run

    def get(self, run_id: int) -> RetrainRun:
        """Raises: NotFoundError: no such run."""
        return self.store.get_retrain(run_id)

    def list(self, *, recipe: str | None = None, status: str | None = None,
             alert_id: int | None = None, bundle: str | None = None,
             limit: int = 100) -> list[RetrainRun]:
        return self.store.list_retrains(recipe=recipe, status=status, alert_id=alert_id,
                                        bundle=bundle, limit=limit)

    def lineage(self, run: RetrainRun) -> list[dict[str, Any]]:
        """The chain from the trigger to the devices, one link a step, each with its id
        and state (a link not reached yet is left out)."""
        chain: list[dict[str, Any]] = []
        if run.alert_id is not None:
            try:
                alert = self.store.get_alert(run.alert_id)
                chain.append({"step": "alert", "id": alert.id, "kind": alert.kind,
                              "bundle": alert.bundle, "group": alert.group,
                              "state": alert.state, "message": alert.message})
            except NotFoundError:
                chain.append({"step": "alert", "id": run.alert_id, "state": "gone"})
        else:
            chain.append({"step": "trigger", "id": run.trigger, "state": run.trigger})
        chain.append({"step": "run", "id": run.id, "state": run.status,
                      "reason": run.reason})
        if run.champion:
            chain.append({"step": "champion", "id": run.champion, "state": "judged against"})
        if run.challenger:
            chain.append({"step": "challenger", "id": run.challenger,
                          "state": "won" if run.status == "promoted" else
                          "lost" if run.status == "rejected" else "built"})
        if run.rollout:
            row = self.store.get_rollout(run.rollout)
            chain.append({"step": "rollout", "id": run.rollout,
                          "state": "gone" if row is None else row.status,
                          "group": run.group})
        return chain
