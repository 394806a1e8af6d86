"""The server's one MQTT connection: receives device messages, publishes desired state.

:class:`ServerLink` wraps paho-mqtt 2.x (callback API 2, MQTT 5, clean start) so that its
threads and return codes stay in this module. The rest of the server sees
:meth:`ServerLink.drain` (messages received, oldest first), :meth:`ServerLink.ack` (after
they are committed), :meth:`ServerLink.publish_retained` and an ``on_connect`` callback.

Sessions are kept (MQTT 5 session expiry, a day by default, under a client id that is
stable across restarts): while the server is down, restarting or being upgraded, the
broker queues every device message for it (Mosquitto must not cap the queue:
``max_queued_messages 0``), and hands over on reconnect what it had delivered and we had
not acknowledged. Shared subscriptions (``$share/<group>/…``, several ingest workers) keep
an absent worker's share queued for it too (measured on Mosquitto 2.0.11). Subscriptions
are made again in every ``on_connect`` anyway, because Mosquitto 2.0.11 loses a kept
session's shared subscriptions on restart. The server subscribes to ``summary``,
``report``, ``heartbeat``, ``status`` and ``receipt`` (outcome batches applied) of every
device, never to ``desired``, ``ack`` or ``outcomes`` (its own messages).

Acknowledgement and its guarantee. QoS 1 messages are acknowledged *manually*, after
the ingest worker's transaction holding them has committed (:meth:`ack`). With MQTT 5's
Receive Maximum the broker never has more than ``receive_maximum`` of them
unacknowledged with us, so the queue between paho's thread and the worker is bounded
without ever blocking paho's thread, and a database that stops accepting writes stalls
ingest (the broker holds the rest) instead of dropping messages. With the kept session a
crash loses nothing either: what was received and not committed was not acknowledged,
and the broker sends it again (duplicates are removed on (device, sequence)). The limits
are the broker's: a broker restart without persistence forgets the session, and a session
absent longer than its expiry is dropped. ``session_expiry_s=0`` gives clean sessions
(then a server restart loses what devices publish meanwhile, which the fault tests
show). :meth:`stop` drains: the worker commits what it holds before the connection
closes. QoS 0 messages (heartbeats) are best effort: past
``receive_maximum`` queued messages they are dropped and counted in
:attr:`ServerLink.dropped`.

An ack names a packet id of one connection: after a reconnect, ids of the old
connection mean nothing (or another message), so messages carry their connection's
generation and acks for an older one are skipped.

This module does not decode payloads (:mod:`edgefleet.contract.messages` does) and never logs
the password.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.contract.messages import TOPIC_PREFIX
from fleet_server.config import BrokerConfig
from fleet_server.errors import UnavailableError

__all__ = ["INGEST_KINDS", "Incoming", "ServerLink"]

log = logging.getLogger(__name__)

INGEST_KINDS = ("summary", "report", "heartbeat", "status", "receipt")


@dataclass(frozen=True)
class Incoming:
    """One received message; ``mid``/``qos``/``generation`` are what :meth:`ack` needs."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int
    received: float
    retained: bool = False


class _QuietWhileStopping(logging.Filter):
    """paho's loop thread takes one more turn after a clean disconnect closed the socket and
    logs it as an error ("Client is not connected"): noise on every clean shutdown, not
    news. Muted while a link of this process is stopping (one filter on the shared logger,
    not one per link)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._count = 0

    def stopping(self, delta: int) -> None:
        with self._lock:
            self._count += delta

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self._count and record.getMessage().startswith("Client is not connected"))


_PAHO_LOG = logging.getLogger(f"{__name__}.paho")
_QUIET = _QuietWhileStopping()
_PAHO_LOG.addFilter(_QUIET)


class ServerLink:
    """One MQTT 5 connection as the ``server`` account.

    Args:
        config: broker address, credentials, shared-subscription group, bounds.
        subscribe: subscribe to device topics (ingest); False publishes only.
        on_connect: called with no arguments after each (re)connection, on a thread of
            its own (never paho's), e.g. to republish every desired state.
        role: goes into the default client id (``fleet-<role>-<pid>``).
    """

    def __init__(self, config: BrokerConfig, *, subscribe: bool = True,
                 on_connect: Callable[[], None] | None = None, role: str = "server") -> None:
        self.config = config
        self.subscribe = subscribe
        self._on_connect_cb = on_connect
        self._cond = threading.Condition()
        self._queue: deque[Incoming] = deque()
        self._generation = 0
        self._connected = False
        self._started = False
        self._stopping = False
        self.dropped = 0  # QoS 0 messages dropped past the bound
        self.connects = 0
        self._callbacks: list[threading.Thread] = []
        client_id = config.client_id or (
            "fleet-serve" if role == "serve" else
            f"fleet-{role}-{socket.gethostname()}-{config.share or 'all'}")
        self.client_id = client_id
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5,
                             manual_ack=True)
        client.enable_logger(_PAHO_LOG)
        client.username_pw_set(config.username, config.password)
        if config.tls_ca is not None:
            client.tls_set(ca_certs=str(config.tls_ca))
        client.reconnect_delay_set(config.reconnect_min_delay,  # type: ignore[arg-type]
                                   config.reconnect_max_delay)  # type: ignore[arg-type]
        client.max_inflight_messages_set(100)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        self._client = client

    @property
    def topics(self) -> list[str]:
        plain = [f"{TOPIC_PREFIX}/+/{kind}" for kind in INGEST_KINDS]
        if self.config.share is None:
            return plain
        return [f"$share/{self.config.share}/{t}" for t in plain]

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (retrying with back-off). Returns at once.

        Raises:
            UnavailableError: the broker address cannot be used at all.
        """
        if self._started:
            return
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = self.config.receive_maximum
        kept = self.config.session_expiry_s > 0
        if kept:
            props.SessionExpiryInterval = self.config.session_expiry_s
        try:
            # a kept session: while we are away the broker queues what we subscribed to,
            # and redelivers what we received and had not acknowledged (committed)
            self._client.connect_async(self.config.host, self.config.port,
                                       keepalive=self.config.keepalive, clean_start=not kept,
                                       properties=props)
        except (ValueError, OSError) as exc:
            raise UnavailableError(f"cannot connect to the broker at {self.config.host}:"
                                   f"{self.config.port}: {exc}") from exc
        self._started = True
        self._client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect and stop paho's thread. Idempotent. Drain and ack first: unacked
        messages come again on the next connection of a kept session (lost with a clean
        one)."""
        if not self._started:
            return
        self._stopping = True
        _QUIET.stopping(+1)
        try:
            self._client.disconnect()
            with self._cond:
                self._cond.wait_for(lambda: not self._connected, timeout=timeout)
            self._client.loop_stop()
        finally:
            _QUIET.stopping(-1)
        for thread in self._callbacks:
            thread.join(timeout)
        self._started = False
        self._stopping = False
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def wait_connected(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._connected, timeout=timeout)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- receiving -----------------------------------------------------------------------

    def drain(self, max_items: int, first_wait: float, batch_wait: float) -> list[Incoming]:
        """Up to ``max_items`` messages: waits ``first_wait`` for the first, then at most
        ``batch_wait`` more for the batch to fill."""
        out: list[Incoming] = []
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue, timeout=first_wait):
                return out
            deadline = time.monotonic() + batch_wait
            while len(out) < max_items:
                if self._queue:
                    out.append(self._queue.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    break
        return out

    def ack(self, messages: Sequence[Incoming]) -> int:
        """Acknowledge committed QoS 1 messages of the current connection; returns how
        many PUBACKs were sent."""
        sent = 0
        with self._cond:
            generation = self._generation
            for m in messages:
                if m.qos == 1 and m.generation == generation:
                    self._client.ack(m.mid, m.qos)
                    sent += 1
        return sent

    # -- publishing ----------------------------------------------------------------------

    def unsubscribe(self) -> None:
        """Stop the inflow (before a graceful stop); messages in flight still arrive."""
        if self.subscribe and self._connected:
            self._client.unsubscribe(self.topics)

    def publish_retained(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Publish a retained message if connected; False (nothing queued) if not.

        Callers republish on the next ``on_connect``, so nothing piles up in paho's
        memory while the broker is away.
        """
        return self._publish(topic, payload, qos, retain=True)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        """Publish a message that is not retained (outcome batches) if connected; False
        (nothing queued) if not: the caller sends it again later."""
        return self._publish(topic, payload, qos, retain=False)

    def _publish(self, topic: str, payload: bytes, qos: int, *, retain: bool) -> bool:
        if not self._connected:
            return False
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            log.error("cannot publish to %r: %s", topic, exc)
            return False
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    # -- paho callbacks: paho's thread; short, never block ---------------------------------

    def _paho_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                      properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connection to %s:%d as %r refused: %s", self.config.host,
                        self.config.port, self.config.username, reason)
            return
        if self.subscribe:
            client.subscribe([(t, 1) for t in self.topics])
        with self._cond:
            self._generation += 1
            self._connected = True
            self.connects += 1
            self._cond.notify_all()
        log.info("MQTT connected to %s:%d", self.config.host, self.config.port)
        if self._on_connect_cb is not None:
            thread = threading.Thread(target=self._run_on_connect, name="mqtt-on-connect",
                                      daemon=True)
            self._callbacks = [t for t in self._callbacks if t.is_alive()] + [thread]
            thread.start()

    def _run_on_connect(self) -> None:
        try:
            assert self._on_connect_cb is not None
            self._on_connect_cb()
        except Exception:
            log.exception("on_connect callback failed")

    def _paho_disconnect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode,
                         properties: Any) -> None:
        with self._cond:
            was = self._connected
            self._connected = False
            self._generation += 1
            self._cond.notify_all()
        if was and not self._stopping:
            log.warning("MQTT disconnected: %s", reason)

    def _paho_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = message._topic.decode("utf-8", errors="replace")  # dead-lettered later
        item = Incoming(topic, bytes(message.payload), message.qos, message.mid,
                        self._generation, time.time(), bool(message.retain))
        with self._cond:
            if item.qos == 0 and len(self._queue) >= self.config.receive_maximum:
                self.dropped += 1
                return
            self._queue.append(item)
            self._cond.notify_all()
