"""Outcome routing: uploads queued per device, batches published until receipted.

:class:`OutcomeService` (what the API calls) checks an upload's rows
(:mod:`fleet_server.telemetry.outcomes`), refuses rows naming unregistered devices, and in
one transaction checks each device's cap and appends the upload's batches, numbered on
from the device's last one: an upload is queued whole or not at all.

:class:`OutcomeRouter` is the thread that delivers them, over the server's MQTT link:
each online device's batches above its last receipt, at most ``window`` of them ahead,
in order, QoS 1, on ``edgefleet/v1/{device}/outcomes``. A batch is published when it is
new, again when its device comes online (ingest marks its unreceipted batches due when an
``online`` status arrives: what was sent before may have gone with the old connection),
and again when it was sent ``resend_s`` ago without a receipt. (A restarted server with a
plain subscription gets every device's retained ``online`` status again, so it resends at
once; shared subscriptions never get retained messages, so behind ``fleet ingest``
workers a restart resends at the timer.) Receipts are stored by
ingest (:meth:`Store.record_outcome_receipts`, in the transaction of the batch that
carried them) and free the window. The device applies batch ``n`` only after ``n - 1``
and re-receipts what it has (see :mod:`edgefleet.contract.messages`), so a resend is
harmless and each outcome is applied exactly once.

Who resends: the router is part of the engine (:mod:`fleet_server.server`), so it runs
only in the process holding the engine lease (a PostgreSQL advisory lock; always the one
``fleet serve`` over a SQLite file), like the rollout engine: with several API replicas
and ingest workers, exactly one process publishes outcomes. An upload, a receipt or a
device coming online in that same process wakes the router at once (:meth:`kick`); from
other processes it is seen at the next tick (``tick_s``), from the database.

This module does not parse MQTT (the link and ingest do) and decides nothing about a
label's meaning (the device checks it against the bundle's classes).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import Outcome, Outcomes, encode
from fleet_server.config import DEFAULT_OUTCOMES, OutcomeConfig
from fleet_server.store import OutcomeQueueRow, Store
from fleet_server.telemetry.outcomes import (
    OutcomeFormatError,
    OutcomeQueueFullError,
    UnknownOutcomeDeviceError,
    UploadRow,
    make_batches,
)

__all__ = ["OutcomePublisher", "OutcomeRouter", "OutcomeService"]

log = logging.getLogger(__name__)


class OutcomePublisher(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 1) -> bool: ...


class OutcomeService:
    """Uploads and status of the outcomes queue."""

    def __init__(self, store: Store, config: OutcomeConfig = DEFAULT_OUTCOMES,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        # called with the devices of a committed upload (the router's kick, in-process)
        self.on_queued: Callable[[set[str]], None] | None = None

    def upload(self, rows: Sequence[UploadRow], actor: str) -> dict[str, int]:
        """Queue ``rows`` for their devices, all or nothing; returns outcomes queued per
        device.

        Raises:
            OutcomeFormatError: no rows.
            UnknownOutcomeDeviceError: the first row naming a device not registered.
            DuplicateOutcomeError: a (device, id) given twice.
            OutcomeQueueFullError: a device's cap would be passed (names the device).
            StoreError: the database failed; nothing was queued.
        """
        if not rows:
            raise OutcomeFormatError("body", "no outcomes in the upload")
        batches = make_batches(rows)
        devices = {b.device for b in batches}
        known = self.store.existing_devices(devices)
        for row in rows:
            if row.device not in known:
                raise UnknownOutcomeDeviceError(row.where, f"device {row.device!r} is not "
                                                           "registered", field="device")
        adding: dict[str, int] = {}
        for b in batches:
            adding[b.device] = adding.get(b.device, 0) + b.count
        now = self.clock()
        with self.store.transaction():
            state = self.store.undelivered_outcomes(devices)
            for device in sorted(devices):
                undelivered, _ = state[device]
                if undelivered + adding[device] > self.config.max_undelivered:
                    raise OutcomeQueueFullError(device, undelivered, adding[device],
                                                self.config.max_undelivered)
            numbers = {d: top for d, (_, top) in state.items()}
            rows_out = []
            for b in batches:
                numbers[b.device] += 1
                rows_out.append((b.device, numbers[b.device], b.outcomes, b.count))
            self.store.add_outcome_batches(rows_out, now)
            # data capture: the label beside the captured row too (and kept for a row
            # captured later), for `fleet dataset export`
            self.store.record_capture_labels(
                [(r.device, r.outcome.id, json.dumps(r.outcome.label)) for r in rows], now)
            self.store.audit(actor, "outcomes.upload", "outcomes",
                             {"outcomes": sum(adding.values()), "devices": len(devices),
                              "batches": len(rows_out)}, now)
            if self.on_queued is not None:
                kick = self.on_queued
                self.store.after_commit(lambda: kick(devices))
        return dict(sorted(adding.items()))

    def status(self, device: str | None = None, *, limit: int = 1000) -> list[OutcomeQueueRow]:
        """Queued, sent and receipted outcomes per device (of one device, or of all)."""
        return self.store.outcome_queues(device, limit=limit)


class OutcomeRouter:
    """The thread that publishes due batches (see the module docstring)."""

    def __init__(self, store: Store, publisher: OutcomePublisher,
                 config: OutcomeConfig = DEFAULT_OUTCOMES,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.publisher = publisher
        self.config = config
        self.clock = clock
        self.published = 0  # batches published since start (resends included)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def kick(self, devices: Iterable[str] = ()) -> None:
        """Look for due batches now (an upload, a receipt, a device online)."""
        self._wake.set()

    def run_once(self, now: float | None = None) -> int:
        """Publish what is due now; returns how many batches were published.

        Raises:
            StoreError: the database failed.
        """
        now = self.clock() if now is None else now
        due = self.store.due_outcome_batches(resend_before=now - self.config.resend_s,
                                             window=self.config.window,
                                             limit=self.config.max_per_tick)
        ready: list[tuple[str, int, str, bytes, int]] = []
        for row in due:
            try:
                message = Outcomes(row.device, row.batch,
                                   tuple(Outcome(o["id"], o["label"])
                                         for o in json.loads(row.outcomes)), now)
                ready.append((row.device, row.batch, message.topic, encode(message),
                              row.sends))
            except (SchemaError, ValueError, KeyError, TypeError):
                # checked at upload; a row that fails here was written by something else
                log.exception("outcomes batch %d of %r cannot be encoded; skipped",
                              row.batch, row.device)
        if not ready:
            return 0
        # recorded as sent *before* publishing: a device's receipt can come back faster
        # than a commit after the publish would, and a receipt for a batch not recorded
        # as sent is ignored. A crash in between leaves a batch recorded and not sent: it
        # goes at the next resend (or when its device comes online again).
        self.store.mark_outcomes_sent([(d, b) for d, b, _, _, _ in ready], now)
        published = 0
        for device, batch, name, payload, sends in ready:
            if not self.publisher.publish(name, payload, 1):
                break  # not connected: the next tick (or the next connection) sends it
            published += 1
            if sends:
                log.info("outcomes batch %d of %r sent again (send %d)", batch, device,
                         sends + 1)
        if published < len(ready):
            self.store.unmark_outcomes_sent([(d, b) for d, b, _, _, _ in ready[published:]])
        self.published += published
        return published

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._main, name="fleet-outcomes",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def _main(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                while self.run_once() >= self.config.max_per_tick and not self._stop.is_set():
                    pass
            except Exception:
                log.exception("routing outcomes failed; trying again in %.1f s",
                              self.config.tick_s)
