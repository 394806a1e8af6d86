"""The shadow's answers kept by prediction id, so outcomes judge it beside the live model.

While a candidate bundle runs as a shadow (a rollout's ``--shadow-first`` phase), the
agent hands every row the candidate answered to :meth:`ShadowLabels.add`: the row's
prediction id, the live model's predicted label and the candidate's. When the row's
outcome comes back, by any route (:meth:`~edge_agent.agent.Agent.record_outcomes`, a
batch from the server), :meth:`ShadowLabels.join` judges the pair and counts it into
McNemar's table per candidate bundle (both right, live only, shadow only, neither);
:func:`with_paired` hands the table to the next closed window as
:attr:`~edgefleet.contract.messages.ShadowStats.paired`, and the server's shadow gate
compares the two accuracies on exactly those rows.

Bounded: at most ``max_rows`` pairs, none older than ``horizon_s`` (the oldest go
first; an outcome for an evicted pair is simply not paired, the prediction store still
joins it for the live model), and at most :data:`MAX_BUNDLES` candidates' tables.
Classifiers only: a regressor's shadow has no right or wrong answer to pair (its
agreement within tolerance is in :class:`ShadowStats` already).

Deliberately kept in memory: a restart forgets the pairs still waiting for outcomes and
the counts not yet in a window (at most once, never twice), and the prediction store's
durable, exactly-once path for the live model stays as it is. A shadow phase is a trial
of hours; the gate waits for fresh pairs after a restart.

This module does not run models, talk to the network or write files.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from edge_agent.predictions import class_keys
from edgefleet.contract.messages import BundleRef, Paired, ShadowStats

__all__ = ["MAX_BUNDLES", "ShadowLabels", "with_paired"]

MAX_BUNDLES = 8  # candidates whose tables wait for a window at once


def _key(label: Any) -> str | None:
    # the prediction store's comparison key (a class given as 1, 1.0 or "1" is one class)
    return next(iter(class_keys([label])), None)


class ShadowLabels:
    """Pairs of (live, shadow) predicted labels by prediction id, and McNemar's tables.

    Args:
        max_rows: most pairs kept waiting for their outcomes.
        horizon_s: a pair older than this is dropped.
        clock: wall-clock seconds.

    Thread-safe: the shadow worker adds, outcome callers join, the window closer takes.
    """

    def __init__(self, max_rows: int = 50_000, horizon_s: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        if max_rows < 1 or horizon_s <= 0:
            raise ValueError("shadow label bounds must be positive")
        self.max_rows = max_rows
        self.horizon_s = float(horizon_s)
        self._clock = clock
        self._lock = threading.Lock()
        # id -> (time, candidate, live key, shadow key), in insertion (serving) order
        self._pairs: OrderedDict[str, tuple[float, BundleRef, str | None, str | None]] = \
            OrderedDict()
        self._tables: dict[BundleRef, Paired] = {}
        self.evicted = 0  # pairs dropped unlabelled (bounds, horizon)

    @property
    def waiting(self) -> int:
        """Pairs waiting for their outcomes."""
        return len(self._pairs)

    def add(self, ids: Sequence[str], candidate: BundleRef, live: Any, shadow: Any) -> None:
        """Keep the live and the candidate's predicted labels of rows ``ids`` (arrays or
        lists of labels, one per id)."""
        live_keys = [_key(x) for x in _items(live)]
        shadow_keys = [_key(x) for x in _items(shadow)]
        if not (len(ids) == len(live_keys) == len(shadow_keys)):
            return  # not one answer per row: nothing to pair
        now = self._clock()
        with self._lock:
            for pid, a, b in zip(ids, live_keys, shadow_keys, strict=True):
                self._pairs.pop(pid, None)
                self._pairs[pid] = (now, candidate, a, b)
            self._evict(now)

    def _evict(self, now: float) -> None:
        pairs = self._pairs
        while pairs and (len(pairs) > self.max_rows
                         or next(iter(pairs.values()))[0] < now - self.horizon_s):
            pairs.popitem(last=False)
            self.evicted += 1

    def join(self, outcomes: Iterable[tuple[str, Any]]) -> int:
        """Judge the pairs these outcomes ``(id, label)`` belong to; how many were paired.
        An id without a pair (not shadowed, evicted, already judged) is skipped."""
        judged = 0
        with self._lock:
            for pid, label in outcomes:
                pair = self._pairs.pop(pid, None)
                if pair is None:
                    continue
                _, candidate, live, shadow = pair
                truth = _key(label)
                if truth is None:
                    continue  # not a class label: the prediction store counts it
                ok_live, ok_shadow = live == truth, shadow == truth
                cell = Paired(int(ok_live and ok_shadow), int(ok_live and not ok_shadow),
                              int(ok_shadow and not ok_live),
                              int(not ok_live and not ok_shadow))
                if candidate not in self._tables and len(self._tables) >= MAX_BUNDLES:
                    continue  # more candidates waiting than a device ever runs: dropped
                self._tables[candidate] = self._tables.get(candidate, Paired()) + cell
                judged += 1
        return judged

    def take(self, candidate: BundleRef | None = None) -> tuple[BundleRef, Paired] | None:
        """Hand over one candidate's table and start it over: ``candidate``'s, or (None)
        the oldest waiting; None when there is none."""
        with self._lock:
            if candidate is None:
                candidate = next(iter(self._tables), None)
            if candidate is None or candidate not in self._tables:
                return None
            return candidate, self._tables.pop(candidate)


def _items(labels: Any) -> list[Any]:
    if labels is None:
        return []
    tolist = getattr(labels, "tolist", None)
    items = tolist() if tolist is not None else list(labels)
    return [x[0] if isinstance(x, list) and len(x) == 1 else x for x in items]


def with_paired(window: Any, labels: ShadowLabels | None) -> Any:
    """A closed window with a candidate's paired table in its ``shadow``: the table of the
    shadow that ran in the window, or, when none did, of a candidate that ran earlier
    (``rows`` 0). ``window`` None stays None."""
    if window is None or labels is None:
        return window
    current = window.shadow
    got = labels.take(None if current is None else current.bundle)
    if got is None:
        return window
    candidate, paired = got
    if current is None:
        return replace(window, shadow=ShadowStats(candidate, 0, 0, (), 0, paired))
    return replace(window, shadow=replace(current, paired=paired))
