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
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from edge_agent.agent import Agent, Window
from edge_agent.capture import Capture, CaptureQueue, Uploader
from edge_agent.config import AgentConfig, ConfigError
from edge_agent.download import Downloader, DownloadError
from edge_agent.errors import InstallError
from edge_agent.installer import BundleInstaller, reason_of
from edge_agent.model import LoadError
from edge_agent.mqtt import LinkConfig, MqttLink
from edge_agent.outbox import Outbox, OutboxError
from edge_agent.predictions import PredictionStore, PredictionStoreError
from edge_agent.reconcile import LiveStep, Plan, ShadowStep, plan
from edge_agent.reporting import WindowReporter, rss_bytes
from edge_agent.slots import SlotError, Slots, State
from edgefleet import __version__
from edgefleet.contract.bundle import Limits
from edgefleet.contract.errors import BundleError, KeyFileError, SchemaError
from edgefleet.contract.messages import (
    Ack,
    BundleRef,
    DesiredState,
    Outcomes,
    Receipt,
    Report,
    Status,
    decode,
    encode,
    topic,
)
from edgefleet.contract.signing import Policy, TrustStore

__all__ = ["AgentDaemon", "InstallError"]

log = logging.getLogger(__name__)

_OUTCOME_QUEUE = 64  # outcome batches waiting to be applied; beyond, dropped (resent)


class AgentDaemon(BundleInstaller, WindowReporter):
    """One device's agent: serving, reporting and reconciling, from one config.

    Its parts by concept: the bundle installer (:class:`~edge_agent.installer.BundleInstaller`:
    verify, load, download, smoke-test, fall back), the report loop
    (:class:`~edge_agent.reporting.WindowReporter`: windows, checkpoints, heartbeats), and
    here the lifecycle, the MQTT callbacks, the outcome applier, the reconcile driver,
    install reports and health.

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
        self._open_files(config, clock)
        self.agent = Agent(self.device, window_rows=config.window_rows, clock=clock,
                           shadow_queue_rows=config.shadow_queue_rows, store=self.store,
                           capture=self.capture)
        self.downloader = Downloader(config.server_url, config.token,
                                     max_bytes=config.download_max_bytes,
                                     timeout_s=config.download_timeout_s,
                                     ca_file=config.server_ca)
        self.link = self._mqtt_link(config)  # after the agent: its will is a Status
        self.http = None
        if config.http_port:
            from edge_agent.httpapi import LocalServer

            self.http = LocalServer(self.agent, self.health, host=config.http_host,
                                    port=config.http_port, max_body=config.http_max_body)
        self._init_state()

    def _open_files(self, config: AgentConfig, clock: Callable[[], float]) -> None:
        """The outbox, the prediction store and (when enabled) data capture's queue."""
        self.outbox = Outbox(config.data_dir / "outbox.db", config.outbox_max_messages,
                             config.outbox_max_bytes)
        self.store = PredictionStore(config.data_dir / "predictions.db",
                                     horizon_s=config.predictions_horizon_days * 86400.0,
                                     max_rows=config.predictions_max_rows,
                                     max_bytes=config.predictions_max_bytes, clock=clock)
        self.capture: Capture | None = None
        self.uploader: Uploader | None = None
        if config.capture_enabled:
            self.capture = Capture(config.capture_config(), CaptureQueue(
                config.data_dir / "capture.db", max_rows=config.capture_queue_max_rows,
                max_bytes=config.capture_queue_max_bytes), clock=clock)
            self.uploader = Uploader(self.capture.queue, config.server_url, config.token,
                                     batch_rows=config.capture_batch_rows,
                                     batch_bytes=config.capture_batch_bytes,
                                     timeout_s=config.download_timeout_s,
                                     ca_file=config.server_ca)

    def _mqtt_link(self, config: AgentConfig) -> MqttLink:
        """The link: the device's own topics, its last will (offline), the outbox."""
        return MqttLink(LinkConfig(
            host=config.broker_host, port=config.broker_port, client_id=f"{self.device}-agent",
            username=config.username, password=config.broker_password, tls_ca=config.tls_ca,
            keepalive=config.keepalive_s, will_topic=topic(self.device, "status"),
            will_payload=encode(self._status("offline")),
            subscriptions=(topic(self.device, "desired"), topic(self.device, "ack"),
                           topic(self.device, "outcomes")),
            reconnect_max_delay=config.reconnect_max_delay_s,
            confirm_timeout=config.confirm_timeout_s),
            self.outbox, self._on_message, on_connect=self._on_connect)

    def _init_state(self) -> None:
        """The threads' shared state: the desired state handed over, counters, clocks."""
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
        self._apply_capture(desired)
        if step.live is not None:
            self._live(step.live, desired.revision)
        if step.shadow is not None:
            self._shadow(step.shadow, desired.revision)
        if self.slots.state.revision != desired.revision:
            self._commit(replace(self.slots.state, revision=desired.revision))
        return step

    def _apply_capture(self, desired: DesiredState) -> None:
        """The group's data capture, first (an "off" must not wait for a download); the
        device's own config bounds it, and a device that did not enable capture ignores it
        (see :mod:`edge_agent.capture`)."""
        if self.capture is None:
            if desired.capture is not None and desired.capture.enabled:
                log.info("the group asks for data capture (revision %d); this device's "
                         "config does not enable it: nothing is captured", desired.revision)
            return
        try:
            self.capture.apply(desired.capture)
        except Exception:  # a full disk: keep reconciling the bundles
            log.exception("applying the group's data capture (revision %d) failed",
                          desired.revision)

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
            self._fail(revision, live.target, reason_of(exc))
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
            reason = reason_of(exc)
            self._commit(self.slots.state.with_failure(target.sha256, reason)
                         if target.sha256 else self.slots.state)
            self._report("shadow_failed", revision, target, reason)
            return
        self.agent.set_shadow(model)
        self._commit(replace(self.slots.state, shadow=model.ref))
        self._report("shadow_started", revision, model.ref, "")
        self.link.publish_retained(topic(self.device, "status"), encode(self._status("online")))

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
            "revision": self.slots.state.revision, "rss_bytes": rss_bytes(),
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


