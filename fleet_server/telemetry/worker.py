"""The ingest worker: the thread that drains a :class:`ServerLink` into an
:class:`~fleet_server.telemetry.ingest.Ingestor`.

It drains the link, processes, acks after the commit, then publishes each such device's
:class:`~edgefleet.contract.messages.Ack` (retained, QoS 1, on the device's own ``ack``
topic): only then may the device forget the messages. On
every (re)connection it publishes every device's acknowledgement again from the store,
so a restarted server (or a broker that lost its retained messages) tells devices what
it holds. If the store fails (disk full, locked past the timeout) the batch is retried
with back-off and not acknowledged, so the broker holds further messages.

This module holds no ingest rule (:mod:`fleet_server.telemetry.ingest`) and does not
connect to the broker (:mod:`fleet_server.telemetry.link`).
"""

from __future__ import annotations

import logging
import threading
import time

from edgefleet.contract.messages import Ack, encode, topic
from fleet_server.config import IngestConfig
from fleet_server.errors import StoreError
from fleet_server.telemetry.ingest import Ingestor
from fleet_server.telemetry.link import Incoming, ServerLink

__all__ = ["IngestWorker"]

log = logging.getLogger(__name__)
_RETRY_S = (0.5, 1.0, 2.0, 5.0)


class IngestWorker:
    """The thread that drains a :class:`ServerLink` into an :class:`Ingestor`."""

    def __init__(self, link: ServerLink, ingestor: Ingestor, config: IngestConfig) -> None:
        self.link = link
        self.ingestor = ingestor
        self.config = config
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.failures = 0
        self.acks_published = 0
        self._acks_connection = 0  # the link's connection count all acks were published on

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="fleet-ingest", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after committing and acknowledging what has been received."""
        if self._thread is None:
            return
        if self.link.config.session_expiry_s == 0:
            # a clean session forgets what it holds: stop the flow, drain what came
            self.link.unsubscribe()
        # (a kept session must keep its subscriptions: the broker queues for them while we
        # are away, and what we received and did not acknowledge comes again)
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("ingest worker did not stop within %.1f s", timeout)
        self._thread = None

    def _main(self) -> None:
        while True:
            stopping = self._stop.is_set()
            if self.link.connects != self._acks_connection and self.link.connected:
                self._republish_acks()
            batch = self.link.drain(self.config.batch_max, 0.0 if stopping else 0.2,
                                    self.config.batch_wait_s)
            if not batch:
                if stopping:
                    return
                continue
            self._commit(batch)

    def _republish_acks(self) -> None:
        """Every device's acknowledgement again, from the store (after each connect)."""
        connects = self.link.connects
        try:
            acks = self.ingestor.store.acks()
        except StoreError:
            log.exception("cannot read the acknowledgements to publish them again")
            return
        if all(self._publish_acks(device, acked) for device, acked in acks.items()):
            self._acks_connection = connects

    def _publish_acks(self, device: str, acked: dict[str, int]) -> bool:
        ok = self.link.publish_retained(topic(device, "ack"),
                                        encode(Ack(device, acked, time.time())))
        self.acks_published += ok
        return ok

    def _commit(self, batch: list[Incoming]) -> None:
        attempt = 0
        acks: dict[str, dict[str, int]] = {}
        while True:
            started = time.monotonic()
            try:
                acks = self.ingestor.process(batch).acks
            except StoreError:
                # not acked: the broker keeps the rest of its window for us
                self.failures += 1
                delay = _RETRY_S[min(attempt, len(_RETRY_S) - 1)]
                log.exception("ingest batch of %d failed; retrying in %.1f s", len(batch), delay)
                attempt += 1
                if self._stop.wait(delay) and attempt > len(_RETRY_S):
                    log.error("stopping with %d uncommitted messages", len(batch))
                    return
                continue
            except Exception:
                # a bug on this batch: process message by message so one bad message
                # cannot hold the rest (or the broker's window) forever
                log.exception("ingest batch failed unexpectedly; retrying one by one")
                for item in batch:
                    try:
                        acks.update(self.ingestor.process([item]).acks)
                    except Exception as exc:
                        log.exception("refusing one message on %r", item.topic[:200])
                        self.ingestor.refuse(item, exc)
            if self.ingestor.metrics is not None:
                self.ingestor.metrics.batch.observe(time.monotonic() - started)
            self.link.ack(batch)
            self.batches += 1
            # after the commit, never before: the device forgets what these cover. One not
            # published (no connection) goes out with all of them on the next connect.
            for device, acked in acks.items():
                self._publish_acks(device, acked)
            return
