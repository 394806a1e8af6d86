"""``edgepack retrain --watch RECIPE``: a long-running runner that starts runs of the loop
on the triggers its recipe names, within guardrails.

Each tick (every ``poll`` seconds):

1. a run an operator asked for (``fleet retrain start``) is claimed and run: a person's
   request passes the cooldown and the daily cap, never the one-run-at-a-time rule;
2. else, an open alert of a kind the recipe watches (``drift``, ``performance_drop``,
   ``estimated_performance_drop`` by default) on the recipe's bundle and group (or
   fleet-wide) that no run answered yet starts a run with trigger ``alert:<id>``;
3. else, with ``schedule`` set, a run starts once that long has passed since the last one.

Automatic runs (2 and 3) respect a cooldown after the last run of the recipe, a maximum
number a day and, with ``min_new_rows``, a minimum number of labelled rows gained since the
last run that got that far (the data is read to count them: retraining on the same rows
would only re-learn the champion); runs of one recipe never overlap (the server refuses a
second).
Alerts are read by polling ``/api/v1/alerts``: the runner needs no inbound port, so it can
live in CI or behind a firewall. With an :class:`~packager.hook.AlertInbox` (``--listen
HOST:PORT``: the fleet's HMAC-signed alert webhook, :mod:`packager.hook`), an alert the
server pushed is taken first, and the runner wakes as it arrives rather than at the next
poll; pushed or polled, an alert passes the same filter and the same guardrails, and one
a run answered already (the server knows) is dropped.

The recipe's ``[watch]`` table::

    [watch]
    poll = "30s"
    cooldown = "6h"
    max_per_day = 4
    min_new_rows = 500           # labelled rows gained since the last run (default 0)
    schedule = "7d"              # optional
    alerts = ["drift", "performance_drop", "estimated_performance_drop"]
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.contract.errors import SchemaError
from edgefleet.parsing import parse_duration
from packager.errors import FleetApiError, RecipeError
from packager.hook import AlertInbox
from packager.retrain import FleetApi, Recipe, RunOutcome, labelled_rows, load_frame, run

__all__ = ["WatchPolicy", "Watcher", "policy_of"]

log = logging.getLogger(__name__)

DEFAULT_ALERTS = ("drift", "performance_drop", "estimated_performance_drop")
_WATCH_KEYS = {"poll", "cooldown", "max_per_day", "schedule", "alerts", "min_new_rows"}


@dataclass(frozen=True)
class WatchPolicy:
    poll_s: float = 30.0
    cooldown_s: float = 6 * 3600.0
    max_per_day: int = 4
    schedule_s: float | None = None
    alerts: tuple[str, ...] = DEFAULT_ALERTS
    min_new_rows: int = 0


def policy_of(recipe: Recipe) -> WatchPolicy:
    """The recipe's ``[watch]`` table as a policy (defaults for what it leaves out).

    Raises:
        RecipeError: an unknown key, a duration without a unit, a bad count (named).
    """
    doc = recipe.watch
    unknown = sorted(set(doc) - _WATCH_KEYS)
    if unknown:
        raise RecipeError(f"{recipe.path}: watch.{unknown[0]}: unknown key (the keys: "
                          f"{', '.join(sorted(_WATCH_KEYS))})", field=f"watch.{unknown[0]}")

    def seconds(key: str, default: float | None) -> float | None:
        if key not in doc:
            return default
        try:
            return parse_duration(str(doc[key]), f"watch.{key}")
        except SchemaError as exc:
            raise RecipeError(f"{recipe.path}: {exc}", field=f"watch.{key}") from exc

    cap = doc.get("max_per_day", 4)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise RecipeError(f"{recipe.path}: watch.max_per_day: a whole number >= 1",
                          field="watch.max_per_day")
    fresh = doc.get("min_new_rows", 0)
    if isinstance(fresh, bool) or not isinstance(fresh, int) or fresh < 0:
        raise RecipeError(f"{recipe.path}: watch.min_new_rows: a whole number >= 0",
                          field="watch.min_new_rows")
    alerts = doc.get("alerts", list(DEFAULT_ALERTS))
    if not isinstance(alerts, list) or not all(isinstance(a, str) for a in alerts):
        raise RecipeError(f"{recipe.path}: watch.alerts: a list of alert kinds",
                          field="watch.alerts")
    return WatchPolicy(poll_s=seconds("poll", 30.0) or 30.0,
                       cooldown_s=seconds("cooldown", 6 * 3600.0) or 0.0, max_per_day=cap,
                       schedule_s=seconds("schedule", None), alerts=tuple(alerts),
                       min_new_rows=fresh)


class Watcher:
    """Ticks (see the module docstring); :meth:`tick` is one decision, testable alone."""

    def __init__(self, recipe: Recipe, api: FleetApi, policy: WatchPolicy, *, work: Path,
                 clock: Callable[[], float] = time.time,
                 say: Callable[[str], None] = lambda _: None,
                 inbox: AlertInbox | None = None) -> None:
        self.recipe, self.api, self.policy = recipe, api, policy
        self.work, self.clock, self.say = work, clock, say
        self.inbox = inbox

    def concerns(self, alert: dict[str, Any]) -> str | None:
        """Why an alert is not this recipe's to answer (its kind is not watched, another
        bundle, another group), or None: it is."""
        if alert["kind"] not in self.policy.alerts:
            return f"kind {alert['kind']} is not watched ({', '.join(self.policy.alerts)})"
        if not str(alert["bundle"]).startswith(self.recipe.bundle + "@"):
            return f"bundle {alert['bundle']} is not {self.recipe.bundle}"
        if alert["group"] not in (self.recipe.group, "", "*"):
            return f"group {alert['group']} is not {self.recipe.group} (nor the fleet)"
        return None

    def _answered(self, alert_id: int) -> bool:
        return bool(self.api.call("GET", "/api/v1/retrains", params={"alert": alert_id}))

    def _open_alerts(self) -> list[dict[str, Any]]:
        return self.api.call("GET", "/api/v1/alerts", params={"state": "open"})

    def _pushed(self) -> dict[str, Any] | None:
        """The oldest alert the webhook brought that is still open and no run answered yet
        (one that resolved while the guardrails held it back is dropped)."""
        pending = [] if self.inbox is None else self.inbox.pending()
        if not pending:
            return None
        still_open = {a["id"] for a in self._open_alerts()}
        for alert in pending:
            if alert["id"] not in still_open or self.concerns(alert) is not None \
                    or self._answered(alert["id"]):
                self.inbox.done(alert["id"])
                continue
            return alert
        return None

    def _runs(self) -> list[dict[str, Any]]:
        return self.api.call("GET", "/api/v1/retrains",
                             params={"recipe": self.recipe.name, "limit": 100})

    def _run(self, trigger: str, run_id: int | None = None) -> RunOutcome | None:
        n = len(self._runs()) + 1
        try:
            return run(self.recipe, self.api, trigger=trigger, run_id=run_id,
                       work=self.work / f"run-{n}", say=self.say)
        except FleetApiError as exc:
            if exc.status == 409:  # another runner started one first: not an error
                self.say(f"not started: {exc}")
                return None
            raise

    def blocked(self, now: float) -> str | None:
        """Why an automatic run may not start now (cooldown, daily cap), or None."""
        runs = [r for r in self._runs() if r["status"] != "requested"]
        if runs:
            last = max(r["created"] for r in runs)
            if self.policy.cooldown_s > 0 and now - last < self.policy.cooldown_s:
                return (f"cooldown: the last run began {now - last:.0f} s ago "
                        f"(< {self.policy.cooldown_s:.0f} s)")
        today = [r for r in runs if now - r["created"] < 86400]
        if len(today) >= self.policy.max_per_day:
            return f"{len(today)} runs in the last day (max_per_day {self.policy.max_per_day})"
        return self._too_few_new_rows(runs)

    def _too_few_new_rows(self, runs: list[dict[str, Any]]) -> str | None:
        """Why the data has not grown enough since the last run that read it, or None."""
        need = self.policy.min_new_rows
        before = [r["data"].get("labelled_rows", r["data"].get("rows"))
                  for r in runs if r.get("data")]
        before = [n for n in before if isinstance(n, int)]
        if not need or not before:
            return None
        now = labelled_rows(load_frame(self.recipe, self.api), self.recipe.target)
        last = before[0]  # runs come newest first
        if now - last < need:
            return (f"{now - last} new labelled rows since the last run "
                    f"(min_new_rows {need}; {now} now, {last} then)")
        return None

    def _alert(self) -> dict[str, Any] | None:
        pushed = self._pushed()
        if pushed is not None:
            return pushed
        for alert in sorted(self._open_alerts(), key=lambda a: a["id"]):
            if self.concerns(alert) is None and not self._answered(alert["id"]):
                return alert
        return None

    def tick(self) -> RunOutcome | None:
        """One decision: run what a person asked for, else what an alert or the schedule
        calls for (within the guardrails), else nothing."""
        claimed = self.api.call("POST", "/api/v1/retrains/claim",
                                json={"recipe": self.recipe.name})
        if claimed:
            self.say(f"claimed requested run {claimed['id']}")
            return self._run(claimed["trigger"], run_id=claimed["id"])
        now = self.clock()
        alert = self._alert()
        due = alert is not None or (
            self.policy.schedule_s is not None and
            all(now - r["created"] >= self.policy.schedule_s for r in self._runs()))
        if not due:
            return None
        why = self.blocked(now)
        if why is not None:
            self.say(f"{'alert ' + str(alert['id']) if alert else 'schedule'} waits: {why}")
            return None
        if alert is not None:
            self.say(f"alert {alert['id']} ({alert['kind']}): {alert.get('message', '')}")
            if self.inbox is not None:
                self.inbox.done(alert["id"])  # answered by this run, whatever its outcome
            return self._run(f"alert:{alert['id']}")
        return self._run("schedule")

    def serve(self, stop: threading.Event) -> None:
        """Tick every ``poll`` seconds until ``stop`` is set; a failed run or an unreachable
        server is logged and the next tick tries again."""
        while not stop.is_set():
            try:
                outcome = self.tick()
                if outcome is not None:
                    self.say(f"run {outcome.run_id}: {outcome.status}")
            except Exception as exc:  # keep watching: the run is recorded as failed
                log.warning("retrain watcher: %s", exc)
                self.say(f"error: {exc}")
            self._rest(stop)

    def _rest(self, stop: threading.Event) -> None:
        """Until the next poll, or sooner: stopped, or an alert pushed by the webhook."""
        if self.inbox is None:
            stop.wait(self.policy.poll_s)
            return
        deadline = time.monotonic() + self.policy.poll_s
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if self.inbox.arrived.wait(min(0.2, left)):
                break
        self.inbox.arrived.clear()
