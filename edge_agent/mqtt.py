"""The agent's one MQTT connection: drains the durable outbox, receives desired state.

:class:`MqttLink` wraps paho-mqtt 2.x so that its threads, callbacks and return codes stay
inside this module. The rest of the agent sees five things: messages it put in the
:class:`~edge_agent.outbox.Outbox` leave it once they are delivered; :meth:`MqttLink.confirm`
to say what the server has committed; ``on_message(topic, payload)`` for what arrives on
the subscriptions; ``on_connect()`` after each (re)connection; and
:attr:`MqttLink.connected`.

Delivery is at least once, end to end, with the outbox as the only durable state:

- a pump thread publishes the oldest pending outbox items while connected, at most
  ``max_inflight`` of them un-acknowledged by the broker at a time;
- paho's ``on_publish`` (PUBACK) maps the packet id back to the outbox row. For a
  *numbered* row (a summary or report, see :meth:`~edge_agent.outbox.Outbox.put_sequenced`)
  the PUBACK is flow control only: the broker holds the message in memory, and a broker
  killed before its autosave loses it. The row waits, unconfirmed, until
  :meth:`MqttLink.confirm` (the server's retained acknowledgement, read by the daemon)
  covers its number; at most ``max_unconfirmed`` rows wait at a time, and a row still
  unconfirmed ``confirm_timeout`` seconds after its PUBACK is published again (the
  timeout doubles, up to 8 times, while no confirmation arrives, so a server that is away
  for hours does not fill the broker's queue for it with copies). An unnumbered row
  leaves on its PUBACK. The pump, not paho's thread, writes to the outbox (an fsync must
  not stall the network loop);
- on a disconnect every in-flight item is forgotten: it is still in the outbox and is
  published again after the reconnect. paho re-sends its own copy too, under the old
  packet id, so the map from packet id to row is kept (bounded) and a PUBACK for either
  copy acks the row. Duplicates are possible; the server removes them on (device,
  sequence). Loss is not: an unnumbered row leaves the outbox only after a PUBACK for a
  packet carrying it, a numbered one only after the server confirmed its number.
- a PUBACK with a permanent refusal (not authorized, bad topic, too large) acks the row
  and counts it in :attr:`MqttLink.rejected`: retrying would never succeed and would block
  every message behind it. (Mosquitto 2.0 also closes the connection after a refused
  QoS 1 publish; the link reconnects.) Transient refusals (quota) are retried later.

Sessions are clean (MQTT 5 ``clean_start``), so the subscriptions are made again in every
``on_connect``; desired state and the server's acknowledgement are retained and arrive on
each subscription.

Nothing here blocks inside a paho callback: callbacks only update state under a short
lock and wake the pump. paho calls ``on_publish`` while holding its own message lock,
which ``publish()`` also takes, so this module never holds its lock across a paho call.
``on_message`` runs on paho's thread; its exceptions are logged and swallowed.

This module deliberately does not know topics or message schemas
(:mod:`edgefleet.contract.messages` does), does not persist anything itself, and never logs the
password.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.errors import MqttError
from edge_agent.outbox import Outbox, OutboxError, OutboxItem

__all__ = ["LinkConfig", "MqttError", "MqttLink"]

log = logging.getLogger(__name__)

# PUBACK reason codes after which sending the same message again cannot succeed
_PERMANENT_REFUSALS = frozenset(
    {
        0x87,  # Not authorized (the broker's ACL)
        0x90,  # Topic Name invalid
        0x95,  # Packet too large
        0x99,  # Payload format invalid
    }
)
_RETRY_AFTER_REFUSAL = 1.0  # seconds the pump waits after a transient refusal
_IDLE_POLL = 1.0  # seconds; the pump re-reads the outbox at least this often


@dataclass(frozen=True)
class LinkConfig:
    """Where and how to connect. The password never appears in ``repr``.

    ``reconnect_min_delay`` / ``reconnect_max_delay`` bound paho's exponential back-off
    between connection attempts, in seconds (paho takes fractions too).
    """

    host: str
    port: int
    client_id: str
    username: str
    password: str = field(repr=False)
    tls_ca: Path | None = None
    keepalive: int = 30
    will_topic: str | None = None
    will_payload: bytes = b""
    subscriptions: tuple[str, ...] = ()
    reconnect_min_delay: float = 1
    reconnect_max_delay: float = 60
    # seconds a numbered row may wait for the server's confirmation after its PUBACK
    # before it is published again (the server may be down for longer: the timeout backs
    # off, see the module docstring); long enough that a live server confirms first
    confirm_timeout: float = 60.0
    max_unconfirmed: int = 200  # numbered rows PUBACKed and awaiting confirmation


class MqttLink:
    """One MQTT 5 connection that drains ``outbox`` and hands arriving messages on.

    Args:
        config: the broker and credentials.
        outbox: the durable queue to drain; the link acks rows, never puts them.
        on_message: called as ``on_message(topic, payload)`` on paho's thread;
            exceptions are logged and swallowed.
        on_connect: called with no arguments after each successful (re)connection, on the
            link's own thread (a good place to publish a retained ``online`` status).
        max_inflight: most outbox messages published and not yet acknowledged.
    """

    def __init__(
        self,
        config: LinkConfig,
        outbox: Outbox,
        on_message: Callable[[str, bytes], None],
        on_connect: Callable[[], None] | None = None,
        max_inflight: int = 20,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.config = config
        self.outbox = outbox
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self.max_inflight = max_inflight

        self._cond = threading.Condition()
        # all of the below are guarded by _cond
        self._connected = False
        self._generation = 0  # bumped on every connect and disconnect
        # paho mid -> (outbox id, numbered); kept across reconnects (paho re-sends under
        # the old mid), the oldest entries pruned past _max_sent
        self._sent: dict[int, tuple[int, bool]] = {}
        self._max_sent = 4 * max_inflight
        self._busy: set[int] = set()  # outbox ids published or awaiting their outbox ack
        # (outbox id, refused for good) answered by the broker, to be acked in the outbox
        self._acked: list[tuple[int, bool]] = []
        self._early: dict[int, ReasonCode] = {}  # PUBACKs that beat publish() returning
        # numbered rows the broker acknowledged, waiting for the server: id -> when (monotonic)
        self._awaiting: dict[int, float] = {}
        self._confirms: list[tuple[str, int]] = []  # (stream, upto) for the pump to apply
        self._backoff = 1  # multiplies confirm_timeout; doubles per re-send without progress
        self._confirmed = 0
        self._resent = 0
        self._publishing = False
        self._connect_pending = False
        self._retry_at = 0.0
        self._dirty = False
        self._stopping = False
        self._rejected = 0
        self._published = 0

        self._pump: threading.Thread | None = None
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        paho_log = logging.getLogger(f"{__name__}.paho")
        paho_log.addFilter(self._quiet_when_stopping)
        client.enable_logger(paho_log)
        client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls_ca is not None:
            client.tls_set(ca_certs=str(cfg.tls_ca))
        if cfg.will_topic is not None:
            client.will_set(cfg.will_topic, cfg.will_payload, qos=1, retain=True)
        client.reconnect_delay_set(cfg.reconnect_min_delay, cfg.reconnect_max_delay)  # type: ignore[arg-type]
        # paho queues past its in-flight window; ours is the same, so it never has to
        client.max_inflight_messages_set(self.max_inflight)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        client.on_message = self._paho_message
        client.on_connect_fail = self._paho_connect_fail
        return client

    def _quiet_when_stopping(self, record: logging.LogRecord) -> bool:
        # paho's loop thread takes one more turn after a clean disconnect closed the socket
        # and logs it as an error ("Client is not connected"): noise, not news
        return not (self._stopping and record.getMessage().startswith("Client is not connected"))

    # -- public ------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (in the background) and draining the outbox. Returns at once.

        Raises:
            MqttError: already started, stopped (make a new link), or the host cannot be
                used.
        """
        if self._pump is not None:
            raise MqttError("link already started")
        if self._stopping:
            raise MqttError("a stopped link cannot start again; make a new MqttLink")
        cfg = self.config
        try:
            self._client.connect_async(
                cfg.host, cfg.port, keepalive=cfg.keepalive, clean_start=True
            )
        except (ValueError, OSError) as exc:
            raise MqttError(f"cannot connect to {cfg.host}:{cfg.port}: {exc}") from exc
        self.outbox.add_listener(self._wake)
        self._pump = threading.Thread(
            target=self._pump_main, name=f"mqtt-pump-{cfg.client_id}", daemon=True
        )
        self._pump.start()
        self._client.loop_start()

    def stop(self, timeout: float = 5) -> None:
        """Disconnect cleanly (no last will), stop paho's thread and the pump. Idempotent.

        Messages still in flight stay in the outbox for the next link.
        """
        pump = self._pump
        if pump is None:
            return
        self.outbox.remove_listener(self._wake)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        pump.join(timeout)
        if pump.is_alive():
            log.warning("mqtt pump did not stop within %.1f s", timeout)
        with self._cond:
            # let the PUBACKs of what is in flight arrive first: closing a socket with
            # unread data sends a TCP reset, and a broker that reads the reset before the
            # DISCONNECT publishes the last will ("offline") of a clean stop
            self._cond.wait_for(lambda: not self._sent or not self._connected,
                                timeout=min(timeout, 2.0))
        self._client.disconnect()
        with self._cond:
            # paho's thread writes the DISCONNECT; stopping it first would close the socket
            # without one, and the broker would publish the last will ("offline")
            self._cond.wait_for(lambda: not self._connected, timeout=timeout)
        self._client.loop_stop()  # joins paho's thread; its loop wakes at least every second
        with self._cond:
            self._connected = False
            self._sent.clear()
            self._busy.clear()
            self._early.clear()
            self._awaiting.clear()
        self._pump = None

    def publish_retained(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Publish a retained message directly, bypassing the outbox (status messages).

        Returns:
            True if it was handed to a live connection; False if not connected (paho
            then sends it after reconnecting).

        Raises:
            MqttError: the topic or qos is invalid.
        """
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=True)
        except ValueError as exc:
            raise MqttError(f"cannot publish to {topic!r}: {exc}") from exc
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish_now(self, topic: str, payload: bytes, qos: int = 0) -> bool:
        """Publish directly if connected, else drop (heartbeats: stale ones are useless).

        Returns:
            True if it was handed to a live connection.

        Raises:
            MqttError: the topic or qos is invalid.
        """
        if not self._connected:
            return False
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=False)
        except ValueError as exc:
            raise MqttError(f"cannot publish to {topic!r}: {exc}") from exc
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def rejected(self) -> int:
        """Outbox messages the broker refused for good (acked and dropped), since start."""
        return self._rejected

    @property
    def published(self) -> int:
        """Outbox messages acknowledged by the broker, since start (duplicates included)."""
        return self._published

    @property
    def inflight(self) -> int:
        with self._cond:
            return len(self._busy)

    @property
    def unconfirmed(self) -> int:
        """Numbered rows the broker acknowledged and the server has not confirmed yet."""
        with self._cond:
            return len(self._awaiting)

    @property
    def confirmed(self) -> int:
        """Numbered rows removed because the server confirmed them, since start."""
        return self._confirmed

    @property
    def resent(self) -> int:
        """Numbered rows published again after ``confirm_timeout``, since start."""
        return self._resent

    def confirm(self, stream: str, upto: int) -> None:
        """The server has committed ``stream`` up to sequence ``upto``: its rows may leave
        the outbox. Any thread (paho's too): the pump does the writing."""
        with self._cond:
            self._confirms.append((stream, int(upto)))
            self._dirty = True
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every outbox row has left or, if numbered, been acknowledged by the
        broker (it then waits for the server); True if so within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.outbox.depth > len(self._awaiting):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        return True

    def __enter__(self) -> MqttLink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- paho callbacks: paho's thread; short, never block, never call paho ---------------

    def _paho_connect(
        self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        if reason.is_failure:
            # paho closes the socket and retries with back-off; nothing for us to undo
            log.warning(
                "MQTT connection to %s:%d as %r refused: %s",
                self.config.host,
                self.config.port,
                self.config.username,
                reason,
            )
            return
        for topic in self.config.subscriptions:
            # queues a SUBSCRIBE packet; does not wait for the SUBACK
            client.subscribe(topic, qos=1)
        with self._cond:
            self._connected = True
            self._generation += 1
            self._busy = {item_id for item_id, _ in self._acked}
            self._connect_pending = True
            self._dirty = True
            self._cond.notify_all()
        log.info("MQTT connected to %s:%d", self.config.host, self.config.port)

    def _paho_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            was_connected = self._connected
            self._connected = False
            self._generation += 1
            # forgotten, not lost: these rows are still in the outbox and go out again
            self._busy = {item_id for item_id, _ in self._acked}
            self._dirty = True
            self._cond.notify_all()
        if was_connected and not self._stopping:
            log.warning("MQTT disconnected: %s", reason)

    def _paho_connect_fail(self, client: Any, userdata: Any) -> None:
        log.debug("MQTT connection to %s:%d failed; retrying", self.config.host, self.config.port)

    def _paho_publish(
        self, client: Any, userdata: Any, mid: int, reason: ReasonCode, properties: Any
    ) -> None:
        with self._cond:
            sent = self._sent.pop(mid, None)
            if sent is None:
                if self._publishing:
                    # the PUBACK arrived before publish() returned the mid to the pump
                    self._early[mid] = reason
                # else: a PUBACK for a retained status message, or for a row whose mid
                # was pruned: not ours to track
                return
            self._settle(*sent, reason)

    def _settle(self, item_id: int, numbered: bool, reason: ReasonCode) -> None:
        """Record the broker's answer for one row (caller holds ``_cond``)."""
        if not reason.is_failure and numbered:
            # flow control only: the row stays until the server confirms it
            self._busy.discard(item_id)
            self._awaiting[item_id] = time.monotonic()
            self._published += 1
        elif not reason.is_failure:
            self._acked.append((item_id, False))
        elif reason.value in _PERMANENT_REFUSALS:
            self._acked.append((item_id, True))
            log.error(
                "broker refused outbox message %d for good (%s); dropping it", item_id, reason
            )
        else:
            self._busy.discard(item_id)
            self._retry_at = time.monotonic() + _RETRY_AFTER_REFUSAL
            log.warning("broker refused outbox message %d (%s); retrying", item_id, reason)
        self._dirty = True
        self._cond.notify_all()

    def _paho_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8")
            return
        try:
            self._on_message_cb(topic, bytes(message.payload))
        except Exception:
            log.exception("on_message failed for %r; message dropped", topic)

    def _wake(self) -> None:
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    # -- the pump: its own thread ------------------------------------------------------

    def _pump_main(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._stopping, timeout=_IDLE_POLL)
                if self._stopping:
                    return
                self._dirty = False
                acked, self._acked = self._acked, []
                confirms, self._confirms = self._confirms, []
                call_connect, self._connect_pending = self._connect_pending, False
            try:
                did = self._pump_once(acked, call_connect, confirms)
            except Exception:  # the pump must outlive any single failure
                log.exception("mqtt pump step failed")
                did = False
                time.sleep(_RETRY_AFTER_REFUSAL)
            if did:
                with self._cond:
                    self._dirty = True

    def _apply_confirms(self, confirms: list[tuple[str, int]]) -> bool:
        """Remove what the server confirmed; re-send what waited too long. True if any."""
        latest: dict[str, int] = {}
        for stream, upto in confirms:
            latest[stream] = max(upto, latest.get(stream, upto))
        removed: list[int] = []
        for stream, upto in latest.items():
            try:
                removed += self.outbox.confirm(stream, upto)
            except OutboxError:
                # the rows stay; the next confirmation (or re-send) covers them again
                log.exception("could not remove the rows of %s confirmed up to %d",
                              stream, upto)
        now = time.monotonic()
        with self._cond:
            for item_id in removed:
                self._awaiting.pop(item_id, None)
                self._busy.discard(item_id)
            if removed:  # a PUBACK still to come for a removed row must not make it wait
                gone = set(removed)
                self._sent = {mid: sent for mid, sent in self._sent.items()
                              if sent[0] not in gone}
            if removed:
                self._confirmed += len(removed)
                self._backoff = 1
                self._cond.notify_all()  # flush() waiters
            limit = self.config.confirm_timeout * self._backoff
            expired = [i for i, t in self._awaiting.items() if now - t >= limit]
            for item_id in expired:
                del self._awaiting[item_id]  # pending again: published again, oldest first
            if expired:
                self._resent += len(expired)
                self._backoff = min(self._backoff * 2, 8)
        if expired:
            log.info("%d message(s) unconfirmed by the server after %.0f s; sending again",
                     len(expired), limit)
        return bool(removed or expired)

    def _pump_once(self, acked: list[tuple[int, bool]], call_connect: bool,
                   confirms: Sequence[tuple[str, int]] = ()) -> bool:
        """Ack what the broker acknowledged, apply what the server confirmed, re-send what
        waited too long, then fill the in-flight window (in this order, which keeps it
        bounded: what is settled leaves before the room is measured). True if busy."""
        progressed = self._apply_confirms(list(confirms))
        self._apply_acks(acked)
        if call_connect and self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                log.exception("on_connect callback failed")
        worked = bool(acked) or progressed
        batch = self._next_batch()
        return worked if batch is None else (self._publish(*batch) > 0 or worked)

    def _apply_acks(self, acked: list[tuple[int, bool]]) -> None:
        """Remove what the broker acknowledged (or refused) from the outbox."""
        for item_id, refused in acked:
            try:
                removed = self.outbox.ack(item_id)
            except OutboxError:
                # the row stays and will be sent again: a duplicate, not a loss
                log.exception("could not ack outbox message %d", item_id)
                removed = False
            with self._cond:
                self._busy.discard(item_id)
                if removed and refused:
                    self._rejected += 1
                elif not refused:
                    self._published += 1
                self._cond.notify_all()  # flush() waiters

    def _next_batch(self) -> tuple[list[OutboxItem], int] | None:
        """The outbox rows that fit the in-flight window now, and the connection generation
        they go out on; None when nothing may be sent now."""
        with self._cond:
            if not self._connected or self._stopping or time.monotonic() < self._retry_at:
                # after a refusal the idle poll (every _IDLE_POLL s) resumes the pump
                return None
            generation = self._generation
            # what is in flight now waits for the server after its PUBACK: count it too
            room = min(self.max_inflight,
                       self.config.max_unconfirmed - len(self._awaiting)) - len(self._busy)
            busy = self._busy | self._awaiting.keys()
        if room <= 0:
            return None
        try:
            return self.outbox.pending(limit=room, exclude=busy), generation
        except OutboxError:
            log.exception("could not read the outbox")
            return None

    def _publish(self, items: Sequence[OutboxItem], generation: int) -> int:
        """Hand ``items`` to paho on connection ``generation``; returns how many went."""
        sent = 0
        for item in items:
            with self._cond:
                if self._generation != generation or self._stopping:
                    break
                self._busy.add(item.id)
                self._publishing = True
            try:
                info = self._client.publish(item.topic, item.payload, qos=item.qos)
            except ValueError:
                # the outbox refuses such topics at put; a row from elsewhere is dropped
                log.exception("outbox message %d cannot be published; dropped", item.id)
                with self._cond:
                    self._publishing = False
                    self._acked.append((item.id, True))
                continue
            with self._cond:
                self._publishing = False
                early, self._early = self._early, {}
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._generation != generation:
                    # not on the wire on this connection: try again after reconnecting
                    self._busy.discard(item.id)
                    break
                numbered = item.stream is not None
                if info.mid in early:
                    self._settle(item.id, numbered, early[info.mid])
                else:
                    # QoS 0 too: paho calls on_publish for it once written to the socket
                    self._sent.pop(info.mid, None)  # a wrapped mid goes to the end
                    self._sent[info.mid] = (item.id, numbered)
                    while len(self._sent) > self._max_sent:
                        del self._sent[next(iter(self._sent))]
            sent += 1
        return sent
