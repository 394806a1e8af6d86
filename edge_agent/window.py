"""The agent's window: what it keeps of the rows one model served, and the closed value.

:class:`OpenWindow` is the current window of one model: its row and latency counts, error
counters, shadow counters, and the rows served but not yet profiled. The agent appends to
it under its own lock on the request path (a tuple per single row, a chunk per batch); the
profiling worker (:meth:`OpenWindow.drain`) turns the chunks into numpy columns, profiles
them, folds them into the window's performance estimate (CBPE sums over calibrated
confidences), writes their predictions to the prediction store and feeds data capture.
:meth:`OpenWindow.value` freezes it into a :class:`Window`, which the daemon wraps in a
:class:`~edgefleet.contract.messages.Summary`; :func:`with_claim` adds what the prediction
store claimed for that summary (realized performance, outcome counters).

This module does not serve, run models, or own threads: :mod:`edge_agent.agent` does.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.claims import BundleRows, Claim
from edge_agent.labels import class_indices, class_keys
from edge_agent.model import LoadedModel, Outputs, concat_outputs
from edge_agent.predictions import PredictionStore
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.inputs import Batch
from edgefleet.contract.messages import LATENCY_EDGES_MS, BundleRef, ShadowStats, Summary
from edgefleet.contract.performance import (
    ERROR_EDGES,
    MAX_ENTRIES,
    Estimated,
    PerformanceEntry,
    PerformanceSpec,
    Realized,
)
from edgefleet.contract.profile import Profile, to_wire

if TYPE_CHECKING:  # data capture is the daemon's (urllib and ssl: 7 MiB resident)
    from edge_agent.capture import Capture

__all__ = ["CHUNK_ROWS", "LATENCY_SLOTS", "MAX_ERROR_KEYS", "OpenWindow", "Window",
           "performance_spec", "with_claim"]

log = logging.getLogger(__name__)

# single rows buffered before the worker profiles them. A chunk costs the worker about
# 0.8 ms whatever its size plus 0.5 us a row (measured: 256 rows 0.9 ms, 1,000 rows
# 1.3 ms), all of it holding the GIL a request may wait for: 1,024 rows a chunk is 1.3 us
# of profiling a row (3.5 us at 256) and one request in a thousand near a chunk. The
# price: about 0.5 MB buffered, and a crash loses up to this many rows' profile and
# stored predictions, or the daemon's checkpoint interval's worth (it hands over then).
CHUNK_ROWS = 1024
# the worker converts a chunk of single rows in steps of about this many values (a column
# of 1,024 floats or 34 rows of 30 features: 20-30 us each, measured), and joins outputs
# this many calls at a time; in between, a request waiting for the GIL gets it
STEP_CELLS = 1024
OUTPUT_STEP = 128
LATENCY_SLOTS = len(LATENCY_EDGES_MS) + 1

@dataclass(frozen=True)
class Window:
    """A closed window: everything a summary carries except its sequence number."""

    bundle: BundleRef
    start: float
    end: float
    rows: int
    profile: dict[str, Any]  # edgefleet.contract.profile.to_wire()
    latency_counts: tuple[int, ...]
    errors: dict[str, int] = field(default_factory=dict)
    shadow: ShadowStats | None = None
    # the window's estimate (live bundle), then realized blocks (see with_claim)
    performance: tuple[PerformanceEntry, ...] = ()

    def summary(self, device: str, seq: int, dropped: int = 0) -> Summary:
        return Summary(device, seq, self.bundle, self.start, self.end, self.profile,
                       self.latency_counts, dict(self.errors), self.shadow, dropped,
                       performance=self.performance)


MAX_ERROR_KEYS = 32  # a summary's errors dict holds at most this many counters


def with_claim(window: Window, claim: Claim) -> Window:
    """``window`` with what the prediction store claimed for its summary: a realized
    performance block per bundle whose predictions got labels (attributed to the bundle
    that made them, merged into the live bundle's entry when it is that one), and the
    outcome counters as ``errors["outcome_<reason>"]``.

    The counters fit in :data:`MAX_ERROR_KEYS` with the window's own: the window's keep
    their place and the outcome counters come first among what would not fit.
    """
    errors = dict(window.errors)
    entries = {e.bundle: e for e in window.performance}
    for rows in claim.bundles:
        try:
            realized = _realized(rows)
        except Exception:  # a bug, not the data: count it, and the summary still goes
            log.exception("the labelled rows of %s cannot be reported", rows.bundle.label)
            errors["performance"] = errors.get("performance", 0) + 1
            continue
        known = entries.get(rows.bundle)
        entries[rows.bundle] = PerformanceEntry(rows.bundle, realized.to_wire(),
                                                None if known is None else known.estimated)
    for reason, n in (claim.counts or {}).items():
        key = f"outcome_{reason}"
        if key in errors or len(errors) < MAX_ERROR_KEYS:
            errors[key] = errors.get(key, 0) + n
    return replace(window, errors=dict(sorted(errors.items())),
                   performance=tuple(entries.values())[:MAX_ENTRIES])


def performance_spec(task: str, classes: Sequence[Any]) -> PerformanceSpec:
    """The spec of a bundle's performance blocks from its task and classes (what the
    prediction store keeps of a bundle the device may no longer have)."""
    if task == "regression":
        return PerformanceSpec("regression", (), ERROR_EDGES)
    return PerformanceSpec("classification", tuple(classes))


def _realized(rows: BundleRows) -> Realized:
    block = Realized(performance_spec(rows.task, rows.classes))
    if rows.task == "regression":
        block.add(rows.predicted, rows.truth, None, rows.delays_s)
        return block
    ok = rows.predicted >= 0  # a predicted label outside the classes has no index
    block.add(rows.predicted[ok], rows.truth[ok],
              None if rows.scores is None else rows.scores[ok], rows.delays_s[ok])
    return block


class OpenWindow:
    """The current window of one model. The agent's lock guards the counters and
    ``singles``; ``lock`` guards the profile, the estimate and ``pending``."""

    def __init__(self, model: LoadedModel, start: float,
                 store: tuple[PredictionStore, int] | None = None,
                 capture: Capture | None = None) -> None:
        self.model = model
        self.capture = capture  # data capture's sampler (None: off)
        self.start = start
        self.rows = 0
        self.profile = Profile(model.spec)
        self.store = store  # where served rows go (the store, this bundle's number in it)
        self.keys = class_keys(model.classes)
        self.calibration = model.manifest.calibration
        try:
            self.estimated: Estimated | None = Estimated(
                PerformanceSpec.from_manifest(model.manifest), self.calibration is not None)
        except SchemaError as exc:  # a classifier without two classes: nothing to estimate
            log.warning("%s: no performance estimate: %s", model.label, exc)
            self.estimated = None
        self.lock = threading.Lock()
        # single rows not yet handed to the worker: (cells, outputs, id, time) per call,
        # one append on the request path
        self.singles: list[tuple[list[Any], Outputs, str, float]] = []
        # chunks for the worker: a list of singles, or one batch call as (a Batch or an
        # array, its outputs, the rows' ids, the serving time)
        self.pending: deque[Any] = deque()
        self.latency = [0] * LATENCY_SLOTS
        self.errors: dict[str, int] = {}
        self.shadow_ref: BundleRef | None = None
        self.shadow_rows = self.shadow_agreed = self.shadow_errors = 0
        self.shadow_latency = [0] * LATENCY_SLOTS
        self.finished = False

    def empty(self) -> bool:
        return self.rows == 0 and not self.errors and self.shadow_rows == 0

    def drain(self) -> None:
        """Profile every pending chunk (the worker, :meth:`finish` and a snapshot; the
        caller does not hold ``lock``)."""
        with self.lock:
            self.profile_pending()

    def profile_pending(self) -> None:
        """Profile every pending chunk; the caller holds ``lock``."""
        while self.pending:
            item = self.pending.popleft()
            if type(item) is list:  # single rows, one tuple per call (see hand_over)
                inputs, outputs = self._assemble(item)
                self._profile(inputs, [outputs], [t[2] for t in item], [t[3] for t in item])
            else:
                inputs, outputs, ids, now = item
                self._profile(inputs, [outputs], ids, now)

    def _assemble(self, item: list[tuple[list[Any], Outputs, str, float]]
                  ) -> tuple[Batch, Outputs]:
        """A chunk of single rows as one checked batch and one set of outputs, built in
        steps of at most about :data:`STEP_CELLS` values: every numpy call here that reads
        Python objects holds the GIL for its whole length, and a request waiting for the
        GIL must not wait for a chunk (the plain-Python loops between the steps let the
        interpreter switch threads; see :mod:`edge_agent.agent`). The result is the same
        arrays as converting the chunk in one call."""
        validator = self.model.validator
        step = max(8, STEP_CELLS // max(1, len(validator.names)))
        n = len(item)
        cells = [t[0] for t in item]
        parts = [t[1] for t in item]
        batches = [validator.from_cells(cells[i:i + step]) for i in range(0, n, step)]
        outputs = [concat_outputs(parts[i:i + OUTPUT_STEP])
                   for i in range(0, n, OUTPUT_STEP)]
        return _join(batches, validator.names), concat_outputs(outputs)

    def hand_over(self) -> bool:
        """Queue the buffered single rows for the worker as they are (no concatenation:
        the caller holds the agent's lock, which guards ``singles``); whether there were
        any."""
        if not self.singles:
            return False
        self.pending.append(self.singles)
        self.singles = []
        return True

    def finish(self) -> None:
        with self.lock:
            self.hand_over()
            self.profile_pending()
            self.finished = True

    def value(self, now: float) -> Window:
        """What the window holds so far, as a closed :class:`Window` ending at ``now``."""
        shadow = None
        if self.shadow_ref is not None:
            shadow = ShadowStats(self.shadow_ref, self.shadow_rows, self.shadow_agreed,
                                 tuple(self.shadow_latency), self.shadow_errors)
        estimate = ()
        if self.estimated is not None and self.estimated.n:
            estimate = (PerformanceEntry(self.model.ref, None, self.estimated.to_wire()),)
        return Window(self.model.ref, self.start, max(now, self.start), self.rows,
                      to_wire(self.profile), tuple(self.latency),
                      dict(sorted(self.errors.items())), shadow, estimate)

    def _profile(self, inputs: Any, parts: list[Outputs], ids: Sequence[str],
                 times: Any) -> None:
        model = self.model
        try:
            outputs = concat_outputs(parts)
            if isinstance(inputs, Batch):
                columns, n = inputs.columns, inputs.rows
            elif isinstance(inputs, np.ndarray):
                columns = {n: inputs[:, j] for j, n in enumerate(model.validator.names)}
                n = inputs.shape[0]
            else:  # (a snapshot's or a test's cells)
                batch = model.validator.from_cells(inputs)
                columns, n = batch.columns, batch.rows
            matrix = inputs.matrix if isinstance(inputs, Batch) else \
                inputs if isinstance(inputs, np.ndarray) else None
            self.profile.update(columns, model.profile_outputs(outputs), rows=n, matrix=matrix)
        except Exception:  # a profiling bug must never take serving down
            log.exception("profiling a chunk of %s failed; its rows are not profiled",
                          model.label)
            self.errors["profile"] = self.errors.get("profile", 0) + 1
            return
        try:
            if self.model.task == "regression":
                predicted = np.asarray(outputs.values, dtype=np.float64).reshape(-1)
            elif outputs.labels is not None:
                predicted = class_indices(self.keys, outputs.labels)
            else:
                predicted = np.asarray(outputs.probabilities).argmax(axis=1)
            if self.estimated is not None:
                self._estimate(outputs.probabilities, predicted)
        except Exception:  # an estimation bug must never take serving down
            log.exception("estimating the performance of %s failed", model.label)
            self.errors["estimate"] = self.errors.get("estimate", 0) + 1
            return
        if self.store is not None:
            self._keep(outputs, ids, times, predicted)
        if self.capture is not None:
            try:
                self.capture.observe(model.label, columns, n, ids, times, outputs.labels,
                                     outputs.probabilities, outputs.values)
            except Exception:  # a full disk must never take serving down
                log.exception("capturing rows of %s failed", model.label)
                self.errors["capture"] = self.errors.get("capture", 0) + 1

    def _estimate(self, proba: np.ndarray | None, predicted: np.ndarray) -> None:
        """Fold the chunk into the window's CBPE sums (see edgefleet.contract.performance):
        calibrated P(classes[1]) (binary) or top-class probability, with the bundle's
        calibration map when it has one, else the raw probabilities."""
        estimated = self.estimated
        spec = estimated.spec
        if spec.task == "regression":
            estimated.add(None, predicted)
            return
        if proba is None:
            return  # a classifier without probabilities: nothing to estimate from
        ok = predicted >= 0
        proba = np.asarray(proba, dtype=np.float64)
        pred = predicted
        if not ok.all():
            proba, pred = proba[ok], predicted[ok]
        cal = self.calibration
        if spec.binary:
            if cal is None or cal.target == "positive":
                p = proba[:, 1] if cal is None else cal.apply(proba[:, 1])
            else:  # the top class calibrated: back to P(classes[1])
                q = cal.apply(proba.max(axis=1))
                p = np.where(pred == 1, q, 1.0 - q)
        else:
            top = proba.max(axis=1)
            p = cal.apply(top) if cal is not None and cal.target == "top" else top
        estimated.add(np.clip(p, 0.0, 1.0), pred)

    def _keep(self, outputs: Outputs, ids: Sequence[str], times: Any,
              predicted: np.ndarray) -> None:
        """Write the chunk's predictions to the prediction store (the worker's job)."""
        store, bundle = self.store
        try:
            repeated = store.add(bundle, ids, times if isinstance(times, float)
                                 else np.asarray(times), predicted, outputs.probabilities)
            if repeated:
                self.errors["duplicate_id"] = self.errors.get("duplicate_id", 0) + repeated
        except Exception:  # a full disk must never take serving down
            log.exception("storing %d prediction(s) of %s failed", len(ids), self.model.label)
            self.errors["prediction_store"] = self.errors.get("prediction_store", 0) + 1


def _join(batches: list[Batch], names: Sequence[str]) -> Batch:
    """One batch from consecutive ones (the same arrays one conversion would give)."""
    if len(batches) == 1:
        return batches[0]
    rows = sum(b.rows for b in batches)
    if batches[0].matrix is not None:
        matrix = np.concatenate([b.matrix for b in batches])
        return Batch(rows, {name: matrix[:, j] for j, name in enumerate(names)}, matrix)
    return Batch(rows, {name: np.concatenate([b.columns[name] for b in batches])
                        for name in names})
