"""The daemon's report loop: windows closed into summaries, checkpoints, heartbeats.

:class:`WindowReporter` is a part of :class:`~edge_agent.daemon.AgentDaemon` (a mixin: its
methods run on the daemon and use the attributes it declares, set by the daemon's
``__init__``). The ticker thread (:meth:`WindowReporter._tick_main`) closes the open window
by time (or by rows when the agent says so) into a summary in the outbox, checkpoints the
open window every ``window.checkpoint_seconds`` and its served-rows counter every second,
sends heartbeats and evicts the prediction store; after a crash
:meth:`WindowReporter._restore_window` sends the checkpointed window and counts the rows
lost after it (see the daemon's docstring for the guarantees).

This module does not decide what a summary holds (:mod:`edge_agent.agent` and the
contracts do) nor how the outbox delivers it (:mod:`edge_agent.mqtt`).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from dataclasses import replace

from edge_agent.agent import Agent, Window, with_claim
from edge_agent.config import AgentConfig
from edge_agent.mqtt import MqttLink
from edge_agent.outbox import Outbox, OutboxError
from edge_agent.predictions import Claim, PredictionStore, PredictionStoreError
from edgefleet.contract.errors import SchemaError
from edgefleet.contract.messages import Heartbeat, Summary, decode, encode, topic
from edgefleet.contract.wire import canonical_json, parse_json

__all__ = ["WindowReporter"]

log = logging.getLogger("edge_agent.daemon")

_TICK_S = 0.25
_SERVED_S = 1.0  # the rows-served counter of the open window is saved this often
_EVICT_S = 60.0  # the prediction store drops what is past its horizon this often
_CHECKPOINT, _SERVED = "window", "served"  # outbox state names


class WindowReporter:
    """The report loop's half of the daemon (see the module docstring)."""

    # set by AgentDaemon.__init__
    config: AgentConfig
    device: str
    agent: Agent
    outbox: Outbox
    store: PredictionStore
    link: MqttLink
    _stop: threading.Event
    _windows: threading.Lock
    _last_checkpoint: float
    _last_served: float
    _last_heartbeat: float
    _last_evict: float
    _served_saved: tuple[float, int] | None
    lost_windows: int
    lost_rows: int
    restored: Window | None

    def _tick_main(self) -> None:
        while not self._stop.is_set():
            due = self.agent.window_due.wait(_TICK_S)
            try:
                now = self._clock()
                start = self.agent.window_start
                if due or (start is not None and now - start >= self.config.window_s):
                    self._close_window(now)
                else:
                    if now - self._last_checkpoint >= self.config.checkpoint_s:
                        self._last_checkpoint = now
                        self._checkpoint(now)
                    if now - self._last_served >= _SERVED_S:
                        self._last_served = now
                        self._save_served()  # nothing written if the checkpoint just did
                if now - self._last_heartbeat >= self.config.heartbeat_s:
                    self._last_heartbeat = now
                    self._heartbeat(now)
                if now - self._last_evict >= _EVICT_S:
                    self._last_evict = now
                    self.store.evict(now)
            except Exception:  # the ticker must outlive any one failure
                log.exception("ticker step failed")
                time.sleep(_TICK_S)

    def _close_window(self, now: float | None = None) -> None:
        with self._windows:
            self._put_window(self.agent.close_window(now))

    def _checkpoint(self, now: float) -> None:
        """Save the open window so far (and its row count), so a crash loses seconds."""
        with self._windows:
            window = self.agent.snapshot(now)
            if window is None:
                return
            try:
                self.outbox.set_state(_CHECKPOINT, encode(window.summary(self.device, 0)))
                self._write_served(window.start, window.rows)
            except (OutboxError, SchemaError) as exc:
                log.warning("could not checkpoint the open window: %s", exc)

    def _save_served(self) -> None:
        with self._windows:
            start, rows = self.agent.window_start, self.agent.window_rows_so_far
            if start is None or rows == 0 or self._served_saved == (start, rows):
                return
            try:
                self._write_served(start, rows)
            except OutboxError as exc:
                log.warning("could not save the served-rows counter: %s", exc)

    def _write_served(self, start: float, rows: int) -> None:
        self.outbox.set_state(_SERVED, canonical_json({"start": start, "rows": rows}))
        self._served_saved = (start, rows)

    def _restore_window(self) -> None:
        """After a crash: send the checkpointed window, count the rows served after it."""
        try:
            blob, served = self.outbox.get_state(_CHECKPOINT), self.outbox.get_state(_SERVED)
        except OutboxError as exc:
            log.error("could not read the window checkpoint: %s", exc)
            return
        if blob is None and served is None:
            return
        served_start, served_rows = None, 0
        if served is not None:
            try:
                obj = parse_json(served, what="served counter", max_bytes=4096)
                served_start, served_rows = float(obj["start"]), int(obj["rows"])
            except (SchemaError, KeyError, TypeError, ValueError) as exc:
                log.error("ignored a corrupt served-rows counter: %s", exc)
        checkpoint = None
        if blob is not None:
            try:
                checkpoint = decode(topic(self.device, "summary"), blob)
            except SchemaError as exc:
                log.error("ignored a corrupt window checkpoint: %s", exc)
        if isinstance(checkpoint, Summary):
            lost = max(0, served_rows - checkpoint.rows) \
                if served_start == checkpoint.window_start else 0
            window = Window(checkpoint.bundle, checkpoint.window_start, checkpoint.window_end,
                            checkpoint.rows, checkpoint.profile, checkpoint.latency_counts,
                            dict(checkpoint.errors), checkpoint.shadow,
                            checkpoint.performance)
            self.lost_rows += lost
            self.restored = window
            log.warning("restored the window checkpointed at %.0f (%d rows); %d row(s) served "
                        "after it were lost", window.end, window.rows, lost)
            self._put_window(window)
            return
        self.lost_rows += served_rows  # a window that crashed before its first checkpoint
        log.warning("the last window was lost before its first checkpoint: %d row(s)",
                    served_rows)
        try:
            self.outbox.set_state(_CHECKPOINT, None)
            self.outbox.set_state(_SERVED, None)
        except OutboxError as exc:
            log.error("could not clear the window checkpoint: %s", exc)

    def _put_window(self, window: Window | None) -> None:
        if window is None:
            return
        extra = {}
        if self.lost_windows:  # said in the next summary that could be stored
            extra["lost_windows"] = self.lost_windows
        if self.lost_rows:
            extra["lost_rows"] = window.errors.get("lost_rows", 0) + self.lost_rows
        if extra:
            window = replace(window, errors={**window.errors, **extra})
        claims: dict[int, Claim | None] = {}

        def build(seq: int, floor: int) -> bytes:
            # inside the outbox's transaction that stores summary `seq`: the outcomes joined
            # since the last summary are marked with `seq` (see edge_agent.predictions)
            if seq not in claims:
                try:
                    claims[seq] = self.store.claim(seq)
                except PredictionStoreError as exc:
                    log.error("outcomes wait for a later summary: %s", exc)
                    claims[seq] = None
            claim = claims[seq]
            full = window if claim is None else with_claim(window, claim)
            return encode(replace(full.summary(self.device, seq, self.outbox.dropped),
                                  floor=floor))

        try:
            self.outbox.put_sequenced(topic(self.device, "summary"), build, "summary",
                                      clear_state=(_CHECKPOINT, _SERVED))
        except (OutboxError, SchemaError) as exc:
            # a full disk: the window is lost and takes no sequence number (so the server's
            # ledger has no gap for it); the loss is counted and reported once it can be
            self.lost_windows += 1
            log.error("could not store the window summary (%d lost so far): %s",
                      self.lost_windows, exc)
        else:
            self.lost_windows = self.lost_rows = 0
            self._served_saved = None

    def _heartbeat(self, now: float) -> None:
        p50, p95 = self.agent.latency_percentiles()
        beat = Heartbeat(self.device, now, round(self.agent.uptime_s, 3), rss_bytes(),
                         self.agent.predictions, self.agent.errors, self.outbox.depth,
                         self.outbox.dropped, p50, p95)
        self.link.publish_now(beat.topic, encode(beat), qos=0)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
