"""The agent's serving core: predict, record, profile in the background, close windows.

:class:`Agent` serves predictions from the live :class:`~edge_agent.model.LoadedModel`
and keeps, for the current window, what the fleet needs to know: a
:class:`~edgefleet.contract.profile.Profile` of every served input and output, a latency
histogram, error counters and, when a shadow candidate runs, its agreement with the live
model. :meth:`Agent.close_window` turns the window into a :class:`Window`, which the
daemon wraps in a :class:`~edgefleet.contract.messages.Summary` with a sequence number.

Profiling is always on and kept off the request path. A call checks its rows, runs the
model, and appends the checked rows and the raw outputs to the window's buffer (a list
append under a short lock); a full buffer is handed to the worker as it is (the lists, not
concatenated), and the worker thread concatenates the outputs, turns the rows into numpy
columns and profiles them, vectorised. A batch is checked into columns on the request
path (it has to be, to run the model) and handed over as those columns. A single-row call
therefore pays no numpy pass of its own beyond building the model's input tensor.
:meth:`Agent.wait_idle` waits for the profiling worker and the shadow worker. A shadow
candidate runs on its own worker thread on the same checked inputs; its answers are
compared with the live ones and never returned. With a prediction store they are also
kept by prediction id, for outcomes to pair with the live model's
(:mod:`edge_agent.shadow_labels`).

Every served row gets a prediction id (the caller's, or ``<random prefix>-<counter>``).
The same background worker, after profiling a chunk, folds it into the window's
:class:`~edgefleet.contract.performance.Estimated` block (CBPE sums over the calibrated
confidences: the bundle's calibration map when it has one, raw probabilities otherwise)
and writes its predictions to the :class:`~edge_agent.predictions.PredictionStore`, where
outcomes that come later join them (:meth:`Agent.record_outcomes`,
:meth:`Agent.apply_outcome_batch`). The joined rows leave the store as realized blocks
attributed to the bundle that made the predictions (:func:`with_claim`), in the summary
whose sequence number claimed them. Rows served while the model was being switched are
answered (with ids) but neither profiled nor stored.

The window itself (its counters and buffers, what the worker does with a chunk, the
closed value) is :mod:`edge_agent.window`; this module serves, counts and runs the two
workers.

Windows close by time or by rows: :attr:`Agent.window_due` is set when the row bound is
reached, and the owner (the daemon, or a library user) calls :meth:`close_window`.

Thread-safe: ``predict`` may be called from many threads at once.

This module does not talk to the network, write files or decide what to install.
"""

from __future__ import annotations

import bisect
import logging
import queue
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_agent.answers import Result, check_ids, new_ids
from edge_agent.errors import (
    NoModelError,
    OutcomeError,
    PredictionIdError,
    PredictionStoreError,
)
from edge_agent.explain import Explanation, explainer_for
from edge_agent.model import LoadedModel, Outputs, PredictError
from edge_agent.predictions import OutcomeCounts, PredictionStore
from edge_agent.shadow_labels import ShadowLabels, with_paired
from edge_agent.window import (
    CHUNK_ROWS,
    LATENCY_SLOTS,
    OpenWindow,
    Window,
    performance_spec,
    with_claim,
)
from edgefleet.contract.errors import InputError
from edgefleet.contract.inputs import Batch
from edgefleet.contract.messages import ID_RE, LATENCY_EDGES_MS, Outcome, Outcomes

if TYPE_CHECKING:  # data capture is the daemon's (urllib and ssl: 7 MiB resident)
    from edge_agent.capture import Capture

__all__ = ["CHUNK_ROWS", "Agent", "NoModelError", "OutcomeCounts", "Result", "Window",
           "performance_spec", "with_claim"]

log = logging.getLogger(__name__)

RECENT_LATENCIES = 2048  # for the heartbeat's p50/p95
_latency_slot = partial(bisect.bisect_right, LATENCY_EDGES_MS)
_new_tuple = tuple.__new__


class Agent:
    """Serves the live model, runs a shadow, and keeps the current window.

    Args:
        device_id: the device this agent runs on (goes into every window).
        window_rows: close a window after this many rows (0: only by time).
        clock: wall-clock seconds (window start and end times).
        shadow_queue_rows: most rows waiting for the shadow model; beyond, skipped and
            counted as ``shadow_skipped``.
        shadow_tolerance: a regressor's shadow value agrees within this relative error.
        store: where served predictions are kept for outcomes to join (None: no store;
            :meth:`record_outcomes` then refuses). Its clock times the predictions.
        capture: data capture's sampler (None: off), fed by the profiling worker.
    """

    def __init__(self, device_id: str, *, window_rows: int = 0,
                 clock: Callable[[], float] = time.time, shadow_queue_rows: int = 10_000,
                 shadow_tolerance: float = 0.05, store: PredictionStore | None = None,
                 capture: Capture | None = None) -> None:
        self.device_id = device_id
        self.store = store
        self.capture = capture
        # the shadow's answers by prediction id, judged when outcomes come (needs a store)
        self.shadow_labels = ShadowLabels() if store is not None else None
        # prediction ids: a random prefix per process and a counter, so ids are unique per
        # device across restarts (48 random bits: a clash is a 1 in 2**48 event per pair of
        # runs) and cost one string format per row
        self._id_prefix = secrets.token_hex(6) + "-"
        self._id_next = 0
        self.window_rows = window_rows
        self.window_due = threading.Event()
        self._clock = clock
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._shadow: LoadedModel | None = None
        self._window: OpenWindow | None = None
        self._recent: deque[float] = deque(maxlen=RECENT_LATENCIES)
        self._started = time.monotonic()
        self.predictions = 0  # rows served since start
        self.calls = 0
        self.errors = 0  # refused or failed calls since start
        self._shadow_tolerance = shadow_tolerance
        self._shadow_limit = shadow_queue_rows
        self._shadow_waiting = 0
        self._profile_waiting = 0  # wake-ups queued for the profiling worker
        self._profile_q: queue.SimpleQueue[OpenWindow | None] = queue.SimpleQueue()
        self._shadow_q: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._profile_main, name="agent-profile", daemon=True),
            threading.Thread(target=self._shadow_main, name="agent-shadow", daemon=True),
        ]
        for worker in self._workers:
            worker.start()

    # -- models ------------------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def shadow(self) -> LoadedModel | None:
        return self._shadow

    def activate(self, model: LoadedModel) -> Window | None:
        """Serve ``model`` from now on; return the closed window of the previous one."""
        now = self._clock()
        kept = None
        if self.store is not None:
            try:
                kept = (self.store, self.store.register(model.ref, model.task, model.classes))
            except PredictionStoreError as exc:
                log.error("%s: its predictions will not be kept for outcomes: %s",
                          model.label, exc)
        with self._lock:
            old = self._window
            self._model = model
            self._window = OpenWindow(model, now, kept, self.capture)
        return self._close(old, now)

    def set_shadow(self, model: LoadedModel | None) -> None:
        """Run ``model`` beside the live one (None stops the shadow)."""
        with self._lock:
            self._shadow = model

    # -- serving -------------------------------------------------------------------------

    def predict(self, rows: Any, ids: Sequence[str] | None = None) -> Result:
        """Predict a list of rows (mappings or schema-ordered lists) or a 2-D array.

        Every row gets a prediction id (``Result.ids``): the caller's ``ids`` (one per row,
        each matching :data:`~edgefleet.contract.messages.ID_RE`, none repeated in the
        call), or one the agent makes, unique on this device. An id that the prediction
        store already holds is not stored again (the first prediction keeps it) and is
        counted as ``duplicate_id`` in the window's errors: checking the store would cost
        a disk read on the request path.

        Raises:
            NoModelError: nothing is installed.
            PredictionIdError: ``ids`` is not one valid id per row, or repeats one.
            InputError: a row breaks the schema (names the feature and row).
            PredictError: the model failed at run time.
        """
        t0 = time.perf_counter()
        model = self._model
        if model is None:
            self._count_error(None, "no_model")
            raise NoModelError("no bundle is installed yet")
        if ids is not None:
            try:
                ids = check_ids(ids)
            except PredictionIdError:
                self._count_error(model, "ids")
                raise
        validator = model.validator
        try:
            if type(rows) is list and len(rows) == 1:  # the single-row path, kept short
                inputs: Any = [validator.row(rows[0])]
                outputs = model.run_row(inputs[0])
                n = 1
            elif isinstance(rows, np.ndarray):
                inputs = validator.array(rows).matrix
                outputs = model.run_matrix(inputs)
                n = inputs.shape[0]
            else:
                if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
                    raise InputError("rows: expected a list of rows (objects or lists in "
                                     f"schema order), got {type(rows).__name__}")
                inputs = validator.batch(rows)  # by column (see edgefleet.contract.inputs)
                outputs = model.run_batch(inputs)
                n = inputs.rows
        except InputError:
            self._count_error(model, "input")
            raise
        except PredictError:
            self._count_error(model, "runtime")
            raise
        if ids is not None and len(ids) != n:
            self._count_error(model, "ids")
            raise PredictionIdError(f"ids: {len(ids)} id(s) for {n} row(s); give one per row")
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        ids = self._record(model, inputs, n, outputs, elapsed_ms, ids)
        return _new_tuple(Result, (model.label, *outputs, ids))  # (no Python __new__)

    def predict_one(self, row: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
        """One row in, one plain-Python answer out (``label``/``probabilities``/``value``)."""
        result = self.predict([row])
        model = self._model
        return result.rows(model.classes if model is not None else ())[0]

    def explain(self, row: Mapping[str, Any] | Sequence[Any]) -> Explanation:
        """The contribution of each input to the live model's prediction for ``row``
        (:mod:`edge_agent.explain`: baseline substitution against the bundle's reference,
        exact for linear models). Not served: nothing is profiled or counted.

        Raises:
            NoModelError: nothing is installed.
            InputError: the row breaks the schema (names the feature), as for predict.
            PredictError: the model failed at run time.
        """
        model = self._model
        if model is None:
            raise NoModelError("no bundle is installed yet")
        return explainer_for(model).explain(row)

    def _record(self, model: LoadedModel, inputs: Any, n: int, outputs: Outputs,
                elapsed_ms: float, ids: list[str] | None) -> list[str]:
        """Count the call and buffer what it served for the worker (the request path:
        one append per call, no numpy, the worker woken once per chunk)."""
        slot = _latency_slot(elapsed_ms)
        store = self.store
        now = store.clock() if store is not None else 0.0
        wake = shadow = None
        with self._lock:
            self.calls += 1
            self.predictions += n
            self._recent.append(elapsed_ms)
            if ids is None:
                first = self._id_next
                self._id_next = first + n
                ids = [f"{self._id_prefix}{first:x}"] if n == 1 else \
                    new_ids(self._id_prefix, first, n)
            window = self._window
            if window is None or window.model is not model:
                return ids  # the model was switched while this call ran: served, not profiled
            window.rows += n
            window.latency[slot] += 1
            if type(inputs) is list:  # one row (predict's single-row path)
                singles = window.singles
                singles.append((inputs[0], outputs, ids[0], now))
                if len(singles) >= CHUNK_ROWS and window.hand_over():
                    wake = window  # (the worker concatenates: nothing more here)
            else:
                window.pending.append((inputs, outputs, ids, now))
                wake = window
            if wake is not None:
                self._profile_waiting += 1
            if self.window_rows and window.rows >= self.window_rows:
                self.window_due.set()
            if self._shadow is not None:
                if self._shadow_waiting + n <= self._shadow_limit:
                    self._shadow_waiting += n
                    shadow = self._shadow
                else:
                    window.errors["shadow_skipped"] = window.errors.get("shadow_skipped", 0) + n
        if wake is not None:
            switch_often()  # before the worker wakes (see SWITCH_INTERVAL_S)
            self._profile_q.put(wake)
        if shadow is not None:
            self._shadow_q.put((shadow, model, inputs, n, outputs, ids))
        return ids

    # -- outcomes --------------------------------------------------------------------------

    def record_outcomes(self, outcomes: Iterable[tuple[str, Any] | Outcome], *,
                        timeout: float = 10.0) -> OutcomeCounts:
        """Join true labels ``(id, label)`` (or :class:`Outcome` values) with the
        predictions they belong to, all or nothing; how they fared, by reason.

        The predictions served so far are written to the store first (this waits for the
        profiling worker, at most ``timeout`` seconds). An unknown, expired or
        already-labelled id is counted, never refused.

        Raises:
            OutcomeError: no prediction store, or an id that is not a prediction id.
            OutcomeLabelError: a label outside its bundle's classes (names the id);
                nothing was applied.
            PredictionStoreError: the store's file failed; nothing was applied.
        """
        if self.store is None:
            raise OutcomeError("this agent keeps no prediction store: outcomes cannot join")
        items = []
        for item in outcomes:
            pid, label = (item.id, item.label) if isinstance(item, Outcome) else item
            if not isinstance(pid, str) or not ID_RE.match(pid):
                raise OutcomeError(f"outcome id {str(pid)[:80]!r} is not a prediction id "
                                   "(letters, digits, '_', '.', ':', '-'; at most 64)",
                                   id=str(pid)[:80])
            items.append((pid, label))
        self.flush(timeout)
        counts = self.store.record(items, strict=True)
        if self.capture is not None:  # the labels of captured rows go to the server too
            try:
                self.capture.label(items)
            except Exception:  # a full disk must not refuse outcomes that joined
                log.exception("queueing the labels of captured rows failed")
        if self.shadow_labels is not None:
            self.shadow_labels.join(items)
        return counts

    def apply_outcome_batch(self, batch: Outcomes, *,
                            timeout: float = 10.0) -> tuple[OutcomeCounts | None, int]:
        """Apply a numbered batch from the server exactly once (see
        :meth:`PredictionStore.apply_batch`): ``(counts or None, highest applied batch)``.

        Raises:
            OutcomeError: no prediction store.
            PredictionStoreError: the store's file failed; nothing was applied.
        """
        if self.store is None:
            raise OutcomeError("this agent keeps no prediction store: outcomes cannot join")
        if batch.batch == self.store.applied_batch + 1:
            self.flush(timeout)
        items = [(o.id, o.label) for o in batch.outcomes]
        counts, applied = self.store.apply_batch(batch.batch, items)
        if counts is not None and self.shadow_labels is not None:  # applied now, once
            self.shadow_labels.join(items)
        return counts, applied

    def _count_error(self, model: LoadedModel | None, kind: str) -> None:
        with self._lock:
            self.calls += 1
            self.errors += 1
            window = self._window
            if window is not None and (model is None or window.model is model):
                window.errors[kind] = window.errors.get(kind, 0) + 1

    # -- windows ---------------------------------------------------------------------------

    def close_window(self, now: float | None = None) -> Window | None:
        """Close the current window and start the next; None if it was empty.

        An empty window (no rows, no errors, no shadow rows) is not reported: its start
        moves to ``now``, so the next report covers only time with traffic. A window
        without rows is reported when outcomes wait in the prediction store, to carry them.
        """
        now = self._clock() if now is None else now
        self.window_due.clear()
        with self._lock:
            old = self._window
            if old is None:
                return None
            if old.empty() and (self.store is None or not self.store.waiting):
                old.start = now
                return None
            self._window = OpenWindow(old.model, now, old.store, old.capture)
        return with_paired(self._close(old, now), self.shadow_labels)

    def snapshot(self, now: float | None = None) -> Window | None:
        """The open window so far, left open (the daemon checkpoints it); None if empty.

        Profiles what is buffered first, holding the serving lock meanwhile (a few
        milliseconds every checkpoint interval), so the snapshot's row count, latency and
        profile describe the same rows.
        """
        now = self._clock() if now is None else now
        with self._lock:
            window = self._window
            if window is None or window.empty():
                return None
            with window.lock:
                window.hand_over()  # the single rows not yet handed to the worker
                window.profile_pending()
                return window.value(now)

    def _close(self, old: OpenWindow | None, now: float) -> Window | None:
        if old is None or (old.empty() and (self.store is None or not self.store.waiting)):
            return None
        old.finish()
        return old.value(now)

    @property
    def window_start(self) -> float | None:
        window = self._window
        return None if window is None else window.start

    @property
    def window_rows_so_far(self) -> int:
        window = self._window
        return 0 if window is None else window.rows

    # -- health ----------------------------------------------------------------------------

    def latency_percentiles(self) -> tuple[float | None, float | None]:
        """p50 and p95 of recent calls, in milliseconds (None before the first call)."""
        with self._lock:
            recent = sorted(self._recent)
        if not recent:
            return None, None
        return (recent[int(0.5 * (len(recent) - 1))], recent[int(0.95 * (len(recent) - 1))])

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    # -- workers ---------------------------------------------------------------------------

    def _profile_main(self) -> None:
        while True:
            window = self._profile_q.get()
            if window is None:
                return
            try:
                window.drain()
            finally:
                switch_as_before()  # (the wake-up lowered it; undone before wait_idle sees 0)
                with self._lock:
                    self._profile_waiting -= 1

    def _shadow_main(self) -> None:
        while True:
            item = self._shadow_q.get()
            if item is None:
                return
            shadow, model, inputs, n, live, ids = item
            try:
                got = self._run_shadow(shadow, model, inputs, n, live)
                if got is not None and self.shadow_labels is not None:
                    self.shadow_labels.add(ids, shadow.ref, live.labels, got.labels)
            except Exception:
                log.exception("shadow step failed")
            finally:
                with self._lock:
                    self._shadow_waiting -= n

    def _run_shadow(self, shadow: LoadedModel, model: LoadedModel, inputs: Any, n: int,
                    live: Outputs) -> Outputs | None:
        t0 = time.perf_counter()
        try:
            if shadow.validator.names != model.validator.names:
                # another schema: re-check the rows by feature name against the candidate's
                names = model.validator.names
                rows = (inputs.tolist() if isinstance(inputs, np.ndarray)
                        else [list(r) for r in zip(*(inputs.columns[n].tolist()
                                                     for n in names), strict=True)]
                        if isinstance(inputs, Batch) else inputs)
                inputs = [shadow.validator.row(dict(zip(names, r, strict=True)), i)
                          for i, r in enumerate(rows)]
            got = (shadow.run_matrix(inputs) if isinstance(inputs, np.ndarray)
                   else shadow.run_batch(inputs) if isinstance(inputs, Batch)
                   else shadow.run_cells(inputs))
            error = False
        except (PredictError, InputError):
            got, error = None, True
        elapsed_ms = (time.perf_counter() - t0) * 1000.0
        agreed = 0 if got is None else self._agreement(live, got)
        slot = bisect.bisect_right(LATENCY_EDGES_MS, elapsed_ms)
        with self._lock:
            window = self._window
            if window is None or self._shadow is not shadow:
                return None  # the shadow was replaced meanwhile: this answer counts nowhere
            if window.shadow_ref != shadow.ref:
                window.shadow_ref = shadow.ref
                window.shadow_rows = window.shadow_agreed = window.shadow_errors = 0
                window.shadow_latency = [0] * LATENCY_SLOTS
            window.shadow_latency[slot] += 1
            if error:
                window.shadow_errors += 1
            else:
                window.shadow_rows += n
                window.shadow_agreed += agreed
        return got

    def _agreement(self, live: Outputs, shadow: Outputs) -> int:
        if live.labels is not None and shadow.labels is not None:
            a = np.asarray(live.labels).reshape(-1).astype(str)
            b = np.asarray(shadow.labels).reshape(-1).astype(str)
            return int((a == b).sum())
        if live.values is not None and shadow.values is not None:
            a = np.asarray(live.values, dtype=np.float64).reshape(-1)
            b = np.asarray(shadow.values, dtype=np.float64).reshape(-1)
            tol = self._shadow_tolerance * np.maximum(1.0, np.abs(a))
            return int((np.abs(a - b) <= tol).sum())
        return 0

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until the profiling and shadow workers have caught up with every chunk
        handed to them (tests, benchmarks, clean shutdown); False on timeout. Single rows
        still buffered (fewer than a chunk) stay buffered: :meth:`flush` hands them over."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._shadow_waiting == 0 and self._profile_waiting == 0:
                    return True
            time.sleep(0.002)
        return False

    def flush(self, timeout: float = 5.0) -> bool:
        """Hand the buffered single rows to the profiling worker, then :meth:`wait_idle`."""
        with self._lock:
            window = self._window
            if window is not None and window.hand_over():
                self._profile_waiting += 1
                switch_often()
                self._profile_q.put(window)
        return self.wait_idle(timeout)

    def close(self) -> None:
        """Stop the worker threads. Idempotent; the open window is left as it is."""
        if self._closed:
            return
        self._closed = True
        self._profile_q.put(None)
        self._shadow_q.put(None)
        for worker in self._workers:
            worker.join(5)


# While the profiling worker holds the GIL, a request that wants it back (after
# session.run, which releases it) waits for the interpreter's switch interval (5 ms by
# default) before it asks the worker to let go: one call in a chunk waited for the whole
# chunk (1-3 ms). From the moment the worker is woken until it is done, the interval is
# this short, so a request waits at most about this long for the worker (whose numpy
# steps are short: see edge_agent.window.STEP_CELLS). It is lowered by the thread that
# wakes the worker, before the wake-up: a request that started waiting with the old
# interval would wait out the old interval. The interval is the process's; it is
# restored when no agent's worker has anything queued.
SWITCH_INTERVAL_S = 20e-6
_switching = threading.Lock()
_switching_users = 0
_switching_saved = 0.0


def switch_often() -> None:
    """Lower the interpreter's switch interval to :data:`SWITCH_INTERVAL_S` until the
    matching :func:`switch_as_before` (calls nest, across threads and agents)."""
    global _switching_users, _switching_saved
    with _switching:
        if _switching_users == 0:
            _switching_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switching_saved, SWITCH_INTERVAL_S))
        _switching_users += 1


def switch_as_before() -> None:
    """Undo one :func:`switch_often`; the last one restores the interval."""
    global _switching_users
    with _switching:
        _switching_users -= 1
        if _switching_users == 0:
            sys.setswitchinterval(_switching_saved)


@contextmanager
def prompt_switching() -> Iterator[None]:
    """:func:`switch_often` for the length of a ``with`` block."""
    switch_often()
    try:
        yield
    finally:
        switch_as_before()
