"""``edge-agent run``: the daemon that wires the agent's parts together on a device.

Threads, each with one job, none of them blocking another:

- the MQTT link (:mod:`edge_agent.mqtt`): drains the durable outbox, receives the retained
  desired state; its callbacks only hand the message on;
- the ticker: closes windows (by time, or by rows when the agent says so) into summaries
  in the outbox, checkpoints the open window, and sends heartbeats;
- the reconciler: acts on the newest desired state (:func:`edge_agent.reconcile.plan`):
  download, verify, install beside the current model, smoke-test, switch, report;
- the local HTTP endpoint (:mod:`edge_agent.httpapi`), and the agent's own profiling and
  shadow workers;
- the outcome applier: applies the numbered :class:`~edgefleet.contract.messages.Outcomes`
  batches the server routes to this device, exactly once (batch ``n`` only after ``n - 1``,
  the batch number committed with its joins, see :mod:`edge_agent.predictions`), and
  answers each with a :class:`~edgefleet.contract.messages.Receipt` (QoS 1) naming the
  highest batch applied, also for a batch from the past; a batch from the future is
  ignored (the server resends). A receipt is also sent on every (re)connect once a batch
  has been applied.

Every bundle is verified (signatures against the trust store and policy, then every file's
digest) each time it is loaded, also from the device's own disk at start. A bundle that
fails to download, verify, load or smoke-test is reported as ``failed`` with the reason and
the old model keeps serving. A crash at any point leaves the last committed state, so the
old model is active after restart (see :mod:`edge_agent.slots`).

Delivery is end to end: summaries and reports leave the outbox when the server's retained
acknowledgement (:class:`~edgefleet.contract.messages.Ack`, on the device's own ``ack`` topic)
covers their sequence numbers, not on the broker's PUBACK (see :mod:`edge_agent.mqtt`).

Outcomes joined since the last summary, and the outcome counters, travel in the next
summary exactly once, through crashes: the prediction store marks them with the summary's
sequence number inside the outbox transaction that stores it (:meth:`PredictionStore.claim`).

A crash loses seconds, not windows: every ``window.checkpoint_seconds`` the open window is
saved into the outbox file (state ``window``), and every second the rows served in it so
far (state ``served``); the commit that stores a window's summary clears both. After a
SIGKILL or a power cut the checkpointed window is sent as a summary ending at the
checkpoint, and the rows served after it (known to within a second) are reported as
``errors.lost_rows`` in that summary (or, without a checkpoint, in the next one).

This module does not define formats or rules; it carries them out.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_agent.agent import Agent, Window, with_claim
from edge_agent.capture import Capture, CaptureConfig, CaptureQueue, Uploader
from edge_agent.config import AgentConfig, ConfigError
from edge_agent.download import Downloader, DownloadError
from edge_agent.errors import InstallError
from edge_agent.model import LoadedModel, LoadError
from edge_agent.mqtt import LinkConfig, MqttLink
from edge_agent.outbox import Outbox, OutboxError
from edge_agent.predictions import Claim, PredictionStore, PredictionStoreError
from edge_agent.reconcile import LiveStep, Plan, ShadowStep, plan
from edge_agent.slots import SlotError, Slots, State
from edgefleet import __version__
from edgefleet.contract.bundle import Limits, unpack_verified
from edgefleet.contract.errors import BundleError, KeyFileError, SchemaError
from edgefleet.contract.messages import (
    Ack,
    BundleRef,
    DesiredState,
    Heartbeat,
    Outcomes,
    Receipt,
    Report,
    Status,
    Summary,
    decode,
    encode,
    topic,
)
from edgefleet.contract.signing import Policy, TrustStore
from edgefleet.contract.wire import canonical_json, parse_json

__all__ = ["AgentDaemon", "InstallError"]

log = logging.getLogger(__name__)

_TICK_S = 0.25
_SERVED_S = 1.0  # the rows-served counter of the open window is saved this often
_RETRY_MIN_S, _RETRY_MAX_S = 1.0, 60.0
_EVICT_S = 60.0  # the prediction store drops what is past its horizon this often
_OUTCOME_QUEUE = 64  # outcome batches waiting to be applied; beyond, dropped (resent)


class AgentDaemon:
    """One device's agent: serving, reporting and reconciling, from one config.

    Args:
        config: the checked configuration.
        clock: wall-clock seconds (windows, reports, heartbeats).

    Raises:
        ConfigError: a trust key cannot be loaded.
        SlotError: the data directory cannot be used.
        OutboxError: the outbox file cannot be opened.
        PredictionStoreError: the prediction store's file cannot be opened.
    """

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.device = config.device_id
        self._clock = clock
        try:
            self.trust = TrustStore.from_files(config.trust_keys)
        except KeyFileError as exc:
            raise ConfigError(f"trust.keys: {exc}", key="trust.keys") from exc
        self.policy = Policy(config.threshold, frozenset(config.required_roles))
        self.limits = Limits(max_bundle_bytes=config.download_max_bytes)
        self.slots = Slots(config.data_dir)
        self.outbox = Outbox(config.data_dir / "outbox.db", config.outbox_max_messages,
                             config.outbox_max_bytes)
        self.store = PredictionStore(config.data_dir / "predictions.db",
                                     horizon_s=config.predictions_horizon_days * 86400.0,
                                     max_rows=config.predictions_max_rows,
                                     max_bytes=config.predictions_max_bytes, clock=clock)
        self.capture: Capture | None = None
        self.uploader: Uploader | None = None
        if config.capture_enabled:
            self.capture = Capture(CaptureConfig(
                features=config.capture_features, rate=config.capture_rate,
                max_rows=config.capture_max_rows, window_s=config.capture_window_s,
                upload_s=config.capture_upload_s, batch_rows=config.capture_batch_rows,
                batch_bytes=config.capture_batch_bytes,
                queue_max_rows=config.capture_queue_max_rows,
                queue_max_bytes=config.capture_queue_max_bytes),
                CaptureQueue(config.data_dir / "capture.db",
                             max_rows=config.capture_queue_max_rows,
                             max_bytes=config.capture_queue_max_bytes), clock=clock)
            self.uploader = Uploader(self.capture.queue, config.server_url, config.token,
                                     batch_rows=config.capture_batch_rows,
                                     batch_bytes=config.capture_batch_bytes,
                                     timeout_s=config.download_timeout_s,
                                     ca_file=config.server_ca)
        self.agent = Agent(self.device, window_rows=config.window_rows, clock=clock,
                           shadow_queue_rows=config.shadow_queue_rows, store=self.store,
                           capture=self.capture)
        self.downloader = Downloader(config.server_url, config.token,
                                     max_bytes=config.download_max_bytes,
                                     timeout_s=config.download_timeout_s,
                                     ca_file=config.server_ca)
        self.link = MqttLink(LinkConfig(
            host=config.broker_host, port=config.broker_port, client_id=f"{self.device}-agent",
            username=config.username, password=config.broker_password, tls_ca=config.tls_ca,
            keepalive=config.keepalive_s, will_topic=topic(self.device, "status"),
            will_payload=encode(self._status("offline")),
            subscriptions=(topic(self.device, "desired"), topic(self.device, "ack"),
                           topic(self.device, "outcomes")),
            reconnect_max_delay=config.reconnect_max_delay_s,
            confirm_timeout=config.confirm_timeout_s),
            self.outbox, self._on_message, on_connect=self._on_connect)
        self.http = None
        if config.http_port:
            from edge_agent.httpapi import LocalServer

            self.http = LocalServer(self.agent, self.health, host=config.http_host,
                                    port=config.http_port, max_body=config.http_max_body)
        self._stop = threading.Event()
        self._desired_lock = threading.Condition()
        self._desired: DesiredState | None = None
        self._threads: list[threading.Thread] = []
        self._last_heartbeat = 0.0
        self.last_outcome: Report | None = None
        self.desired_errors = 0
        self.lost_windows = 0  # windows a full disk kept out of the outbox, not yet reported
        self.lost_rows = 0  # rows a crash took from the open window, not yet reported
        self.restored: Window | None = None  # the checkpointed window sent after a crash
        # closing (and putting) a window and checkpointing it never interleave: a stale
        # checkpoint of a window already stored would be sent twice after a crash
        self._windows = threading.Lock()
        self._last_checkpoint = self._last_served = 0.0
        self._served_saved: tuple[float, int] | None = None
        self._started = False
        self._outcome_q: queue.Queue[Outcomes | None] = queue.Queue(_OUTCOME_QUEUE)
        self.outcome_batches_dropped = 0  # the queue was full: the server sends them again
        self._last_evict = 0.0

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Load what is installed, then start every thread. Returns at once."""
        if self._started:
            return
        self._started = True
        self._load_installed()
        self._restore_window()
        self.link.start()
        if self.http is not None:
            self.http.start()
        for target, name in ((self._tick_main, "agent-ticker"),
                             (self._reconcile_main, "agent-reconciler"),
                             (self._outcomes_main, "agent-outcomes")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.uploader is not None:
            capture, every = self.capture, self.config.capture_upload_s
            thread = threading.Thread(target=self.uploader.run, name="agent-capture",
                                      args=(self._stop, every, capture.roll), daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("edge-agent %s started as %s (bundle %s)", __version__, self.device,
                 self.agent.model.label if self.agent.model else "none")

    def stop(self, flush_timeout: float = 3.0) -> None:
        """Close the window, say offline, push what can be pushed, stop everything."""
        if not self._started:
            return
        self._started = False
        self._stop.set()
        with self._desired_lock:
            self._desired_lock.notify_all()
        self._outcome_q.put(None)
        for thread in self._threads:
            thread.join(10)
        self._threads.clear()
        self._close_window()
        if self.http is not None:
            self.http.stop()
        if self.link.connected:
            self.link.publish_retained(topic(self.device, "status"),
                                       encode(self._status("offline")))
            self.link.flush(flush_timeout)
        self.link.stop()
        self.agent.close()
        if self.capture is not None:  # the open window's sample is kept for the next run
            self.capture.roll(force=True)
            self.capture.queue.close()
        self.outbox.close()
        self.store.close()

    def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop cleanly."""
        def handler(signum: int, frame: Any) -> None:
            log.info("signal %d: stopping", signum)
            self._stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # -- loading ---------------------------------------------------------------------------

    def _load(self, path: Path, *, installed: BundleRef | None = None,
              allow_downgrade: bool = True) -> LoadedModel:
        """Verify the bundle file into a directory beside the slots, load it from there.

        Verification streams (memory stays flat whatever the file holds); onnxruntime then
        reads model.onnx from its verified file, and the directory goes once it has.
        """
        with unpack_verified(path, self.trust, self.policy, work_dir=self.slots.work_dir,
                             limits=self.limits, allow_downgrade=allow_downgrade,
                             installed_version=None if installed is None
                             else installed.version) as bundle:
            return LoadedModel(bundle, intra_op_threads=self.config.intra_op_threads,
                               max_rows=self.config.max_rows_per_call)

    def _load_installed(self) -> None:
        state = self.slots.state
        if self.slots.recovered:
            self._report("failed", state.revision, BundleRef("unknown", "0.0.0"),
                         self.slots.recovered)
        if state.active is not None:
            try:
                self.agent.activate(self._load(self.slots.file(state.active.sha256)))
            except (BundleError, LoadError, SlotError) as exc:
                reason = f"installed bundle {state.active.label} failed to load: {exc}"
                log.error("%s", reason)
                self._fall_back(state, reason)
        if self.slots.state.shadow is not None:
            shadow = self.slots.state.shadow
            try:
                self.agent.set_shadow(self._load(self.slots.file(shadow.sha256)))
            except (BundleError, LoadError, SlotError) as exc:
                log.error("shadow %s failed to load: %s", shadow.label, exc)
                self._commit(replace(self.slots.state, shadow=None))

    def _fall_back(self, state: State, reason: str) -> None:
        """The active bundle no longer loads (a corrupt disk, a revoked key): go back."""
        previous = state.previous
        if previous is not None:
            try:
                self.agent.activate(self._load(self.slots.file(previous.sha256)))
                self._commit(replace(state, active=previous, previous=None)
                             .with_failure(state.active.sha256, reason))
                self._report("rolled_back", state.revision, previous,
                             f"{reason}; back on {previous.label}")
                return
            except (BundleError, LoadError, SlotError) as exc:
                reason = f"{reason}; the previous {previous.label} failed too: {exc}"
        self._commit(replace(state, active=None, previous=None)
                     .with_failure(state.active.sha256, reason))
        self._report("failed", state.revision, state.active, reason)

    # -- MQTT callbacks (paho's and the link's threads: hand over, never block) --------

    def _on_message(self, topic_name: str, payload: bytes) -> None:
        try:
            message = decode(topic_name, payload)
        except SchemaError as exc:
            self.desired_errors += 1
            log.warning("ignored a malformed message on %s: %s", topic_name[:120], exc)
            return
        if message.device != self.device:
            return
        if isinstance(message, Ack):
            for stream, upto in message.acked.items():
                self.link.confirm(stream, upto)
            return
        if isinstance(message, Outcomes):
            try:
                self._outcome_q.put_nowait(message)
            except queue.Full:
                self.outcome_batches_dropped += 1
                log.warning("outcome batch %d dropped: %d batches wait already (the server "
                            "sends it again)", message.batch, _OUTCOME_QUEUE)
            return
        if not isinstance(message, DesiredState):
            return
        with self._desired_lock:
            self._desired = message
            self._desired_lock.notify_all()

    def _on_connect(self) -> None:
        self.link.publish_retained(topic(self.device, "status"), encode(self._status("online")))
        try:
            applied = self.store.applied_batch
        except PredictionStoreError as exc:
            log.error("could not read the last applied outcome batch: %s", exc)
            return
        # only once outcomes have come: a broker whose ACL predates outcome routing refuses
        # the receipt topic, and Mosquitto closes the connection after a refused publish
        if applied:
            self._receipt(applied)

    # -- outcomes ----------------------------------------------------------------------------

    def _outcomes_main(self) -> None:
        while True:
            batch = self._outcome_q.get()
            if batch is None:
                return
            try:
                counts, applied = self.agent.apply_outcome_batch(batch)
            except Exception:  # a full disk: no receipt, so the server sends it again
                log.exception("could not apply outcome batch %d", batch.batch)
                continue
            if counts is not None:
                log.info("outcome batch %d applied: %s", batch.batch, counts.to_dict())
            elif batch.batch > applied:
                log.info("outcome batch %d ignored: batch %d is the next one", batch.batch,
                         applied + 1)
            self._receipt(applied)

    def _receipt(self, applied: int) -> None:
        receipt = Receipt(self.device, applied, self._clock())
        self.link.publish_now(receipt.topic, encode(receipt), qos=1)

    def _status(self, state: str) -> Status:
        model, shadow = self.agent.model, self.agent.shadow
        return Status(self.device, state, __version__, None if model is None else model.ref,
                      None if shadow is None else shadow.ref, dict(self.config.labels),
                      self._clock())

    # -- ticker ------------------------------------------------------------------------------

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
        beat = Heartbeat(self.device, now, round(self.agent.uptime_s, 3), _rss_bytes(),
                         self.agent.predictions, self.agent.errors, self.outbox.depth,
                         self.outbox.dropped, p50, p95)
        self.link.publish_now(beat.topic, encode(beat), qos=0)

    # -- reconciling ---------------------------------------------------------------------

    def _reconcile_main(self) -> None:
        while not self._stop.is_set():
            with self._desired_lock:
                self._desired_lock.wait_for(lambda: self._desired is not None
                                            or self._stop.is_set(), timeout=1.0)
                desired, self._desired = self._desired, None
            if desired is None:
                continue
            try:
                self.reconcile(desired)
            except Exception:
                log.exception("reconciling toward revision %d failed", desired.revision)

    def _newer(self, revision: int) -> bool:
        with self._desired_lock:
            return self._desired is not None and self._desired.revision > revision

    def reconcile(self, desired: DesiredState) -> Plan:
        """Carry out one plan toward ``desired`` (the reconciler thread; tests call it too)."""
        step = plan(desired, self.slots.state, self.slots.has)
        if step.stale:
            log.info("ignored desired revision %d (acted on %d already)", desired.revision,
                     self.slots.state.revision)
            return step
        if step.live is not None:
            self._live(step.live, desired.revision)
        if step.shadow is not None:
            self._shadow(step.shadow, desired.revision)
        if self.slots.state.revision != desired.revision:
            self._commit(replace(self.slots.state, revision=desired.revision))
        return step

    def _live(self, live: LiveStep, revision: int) -> None:
        state = self.slots.state
        if live.kind == "confirm":
            self._commit(replace(state, revision=revision))
            self._report("installed", revision, state.active, "already running")
            return
        if live.kind == "refuse":
            self._fail(revision, live.target, live.reason)
            return
        try:
            model = self._prepare(live.target, revision, download=live.kind == "install",
                                  installed=state.active,
                                  allow_downgrade=live.allow_downgrade or live.rollback)
        except (DownloadError, BundleError, LoadError, SlotError, InstallError) as exc:
            self._fail(revision, live.target, _reason(exc))
            return
        if model is None:
            return  # a newer desired state arrived during the download
        old = self.agent.model
        promoted = state.shadow is not None and state.shadow.sha256 == model.ref.sha256
        if self.agent.shadow is not None and self.agent.shadow.ref.sha256 == model.ref.sha256:
            self.agent.set_shadow(None)  # the candidate never shadows itself, not even briefly
        with self._windows:
            self._put_window(self.agent.activate(model))
        previous = None if old is None else old.ref
        self._commit(State(model.ref, previous, None if promoted else state.shadow, revision,
                           state.failed))
        outcome = "rolled_back" if live.rollback else "installed"
        self._report(outcome, revision, model.ref,
                     f"from {previous.label}" if previous is not None else "first install")
        self.link.publish_retained(topic(self.device, "status"), encode(self._status("online")))
        log.info("%s %s (revision %d)", outcome, model.label, revision)

    def _shadow(self, step: ShadowStep, revision: int) -> None:
        state = self.slots.state
        if step.kind == "stop":
            self.agent.set_shadow(None)
            self._commit(replace(state, shadow=None))
            return
        target = step.target
        assert target is not None
        try:
            model = self._prepare(target, revision, download=step.download)
            if model is None:
                return
        except (DownloadError, BundleError, LoadError, SlotError, InstallError) as exc:
            reason = _reason(exc)
            self._commit(self.slots.state.with_failure(target.sha256, reason)
                         if target.sha256 else self.slots.state)
            self._report("shadow_failed", revision, target, reason)
            return
        self.agent.set_shadow(model)
        self._commit(replace(self.slots.state, shadow=model.ref))
        self._report("shadow_started", revision, model.ref, "")
        self.link.publish_retained(topic(self.device, "status"), encode(self._status("online")))

    def _prepare(self, target: BundleRef, revision: int, *, download: bool,
                 installed: BundleRef | None = None,
                 allow_downgrade: bool = True) -> LoadedModel | None:
        """Get the bundle's file (download or slot), verify, load, smoke-test, keep.

        The downloaded file becomes the slot file by a rename, only after it verified and
        passed its smoke test; a failure removes it. None if superseded during download.

        Raises:
            DownloadError, BundleError, LoadError, SlotError, InstallError: the reason.
        """
        temp = None
        try:
            if download:
                fetched = self._fetch(target, revision)
                if fetched is None:
                    return None
                temp = path = fetched
            else:
                path = self.slots.file(target.sha256)
            model = self._load(path, installed=installed, allow_downgrade=allow_downgrade)
            problems = model.smoke_test()
            if problems:
                raise InstallError(f"smoke test failed: {'; '.join(problems)}")
            if temp is not None:
                self.slots.store(model.ref.sha256, temp=temp)
                temp = None
            return model
        finally:
            if temp is not None:
                temp.unlink(missing_ok=True)

    def _fetch(self, target: BundleRef, revision: int) -> Path | None:
        """Download with retries for transient failures; None if superseded meanwhile.

        Raises:
            DownloadError: a failure that retrying cannot fix (or the agent is stopping).
            SlotError: the disk refused the file.
        """
        delay = _RETRY_MIN_S
        while True:
            fd, temp = self.slots.temp_file()
            try:
                self.downloader.fetch(target.url or _default_url(target), fd,
                                      sha256=target.sha256, size=target.size)
                return temp
            except DownloadError as exc:
                temp.unlink(missing_ok=True)
                if not exc.retryable or self._stop.is_set():
                    raise
                log.warning("download of %s failed (%s); retrying in %.0f s", target.label,
                            exc, delay)
            if self._stop.wait(delay) or self._newer(revision):
                return None
            delay = min(delay * 2, _RETRY_MAX_S)

    # -- reporting and state -----------------------------------------------------------------

    def _fail(self, revision: int, target: BundleRef, reason: str) -> None:
        state = self.slots.state
        if target.sha256:
            state = state.with_failure(target.sha256, reason)
        self._commit(replace(state, revision=revision))
        self._report("failed", revision, target, reason)
        log.error("install of %s failed: %s", target.label, reason)

    def _commit(self, state: State) -> None:
        try:
            self.slots.commit(state)
        except SlotError as exc:
            log.error("could not record the install state: %s", exc)

    def _report(self, outcome: str, revision: int, bundle: BundleRef, reason: str) -> None:
        def build(seq: int, floor: int) -> bytes:
            self.last_outcome = Report(self.device, seq, revision, outcome,
                                       BundleRef(bundle.name, bundle.version, bundle.sha256),
                                       reason[:2000], self._clock(), floor)
            return encode(self.last_outcome)

        try:
            self.outbox.put_sequenced(topic(self.device, "report"), build, "report")
        except OutboxError as exc:
            log.error("could not store the %s report: %s", outcome, exc)

    # -- health ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` and ``edge-agent status`` show."""
        model, shadow = self.agent.model, self.agent.shadow
        p50, p95 = self.agent.latency_percentiles()
        return {
            "device": self.device, "agent_version": __version__,
            "bundle": None if model is None else model.label,
            "bundle_sha256": None if model is None else model.ref.sha256,
            "shadow": None if shadow is None else shadow.label,
            "uptime_s": round(self.agent.uptime_s, 3), "predictions": self.agent.predictions,
            "errors": self.agent.errors, "latency_p50_ms": p50, "latency_p95_ms": p95,
            "window_rows": self.agent.window_rows_so_far, "outbox_depth": self.outbox.depth,
            "outbox_unconfirmed": self.link.unconfirmed, "lost_rows": self.lost_rows,
            "outbox_dropped": self.outbox.dropped, "connected": self.link.connected,
            "outcomes": self.store.totals.to_dict(), "predictions_stored": self.store.rows,
            "outcome_batch": self._applied_batch(),
            "capture": self._capture_health(),
            "revision": self.slots.state.revision, "rss_bytes": _rss_bytes(),
            "last_report": None if self.last_outcome is None else {
                "outcome": self.last_outcome.outcome,
                "bundle": self.last_outcome.bundle.label,
                "reason": self.last_outcome.reason},
        }


    def _capture_health(self) -> dict[str, int] | None:
        """Data capture's queue and counters (None: capture is off)."""
        if self.capture is None:
            return None
        q = self.capture.queue
        try:
            return {"queued": q.depth(), **{k: q.counter(k) for k in (
                "sampled", "uploaded", "dropped", "refused")}}
        except Exception:  # a closed or broken queue file must not break /health
            return None

    def _applied_batch(self) -> int | None:
        try:
            return self.store.applied_batch
        except PredictionStoreError:
            return None


_CHECKPOINT, _SERVED = "window", "served"  # outbox state names


def _default_url(ref: BundleRef) -> str:
    return f"/api/v1/bundles/{ref.name}/{ref.version}/download"


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
