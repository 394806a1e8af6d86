"""The alert webhook (the retraining trigger): POST each new alert, retrying with back-off.

:meth:`Webhook.submit` only puts the alert on a bounded queue and returns: the evaluator
(and through it, nothing on the ingest path) ever waits for a remote server. One thread
delivers, in order, each alert up to ``max_attempts`` times with exponential back-off
(``backoff_s``, doubling, capped at ``backoff_max_s``), retrying connection errors,
timeouts, 408, 429 and 5xx; any other answer is final. Every attempt is recorded in the
store (time, status, error) and the alert's ``webhook`` field ends ``delivered`` or
``failed``. Alerts still ``pending`` when the server stopped are submitted again at start.

The body is JSON ``{"type": "edgefleet.alert", "alert": {...}, "sent": <unix time>}``;
with a secret configured, ``X-Edgefleet-Signature: sha256=<hex HMAC of the body>`` lets
the receiver check it came from this server. A full queue marks the alert ``failed``
(counted) rather than blocking.

This module decides nothing about alerts (:mod:`fleet_server.monitoring.alerts` does).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Callable

import httpx

from fleet_server.config import WebhookConfig
from fleet_server.errors import ConfigError, StoreError
from fleet_server.metrics import Metrics
from fleet_server.models import Alert
from fleet_server.store import Store

__all__ = ["Webhook"]

log = logging.getLogger(__name__)
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class Webhook:
    def __init__(self, config: WebhookConfig, store: Store, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time,
                 transport: httpx.BaseTransport | None = None) -> None:
        if config.url is None:
            raise ConfigError("webhook: a webhook needs a URL")
        self.config = config
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self._queue: queue.Queue[Alert] = queue.Queue(config.queue_max)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(timeout=config.timeout_s, transport=transport,
                                    follow_redirects=False)
        self.delivered = 0
        self.failed = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name="fleet-webhook", daemon=True)
        self._thread.start()
        try:
            for alert in self.store.undelivered_alerts():
                self.submit(alert)
        except StoreError:
            log.exception("cannot read undelivered alerts")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the current attempt; queued alerts stay ``pending`` for next time."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._client.close()

    def submit(self, alert: Alert) -> bool:
        """Queue an alert for delivery; False (and the alert marked failed) if full."""
        try:
            self._queue.put_nowait(alert)
            return True
        except queue.Full:
            log.error("webhook queue full; alert %d not delivered", alert.id)
            self._record(alert, 0, None, "webhook queue full", "failed")
            return False

    @property
    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.idle:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                alert = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._deliver(alert)
            except Exception:
                log.exception("webhook delivery of alert %d failed unexpectedly", alert.id)
            finally:
                self._queue.task_done()

    def _body(self, alert: Alert) -> bytes:
        return json.dumps({"type": "edgefleet.alert", "alert": alert.to_dict(),
                           "sent": self.clock()}, sort_keys=True).encode("utf-8")

    def _deliver(self, alert: Alert) -> None:
        cfg = self.config
        assert cfg.url is not None
        for attempt in range(1, cfg.max_attempts + 1):
            body = self._body(alert)
            headers = {"Content-Type": "application/json", "User-Agent": "edgefleet-server"}
            if cfg.secret:
                digest = hmac.new(cfg.secret.encode(), body, hashlib.sha256).hexdigest()
                headers["X-Edgefleet-Signature"] = f"sha256={digest}"
            status, error = None, ""
            try:
                response = self._client.post(cfg.url, content=body, headers=headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if status is not None and 200 <= status < 300:
                self._record(alert, attempt, status, "", "delivered")
                self.delivered += 1
                log.info("webhook delivered alert %d (%s) on attempt %d: HTTP %d", alert.id,
                         alert.kind, attempt, status)
                if self.metrics is not None:
                    self.metrics.webhook_deliveries.inc()
                return
            if self.metrics is not None:
                self.metrics.webhook_failures.inc()
            retry = status is None or status in _RETRY_STATUS
            last = attempt == cfg.max_attempts or not retry
            self._record(alert, attempt, status, error or f"HTTP {status}",
                         "failed" if last else "pending")
            if last:
                self.failed += 1
                log.warning("webhook gave up on alert %d after %d attempt(s): %s", alert.id,
                            attempt, error or f"HTTP {status}")
                return
            delay = min(cfg.backoff_s * 2 ** (attempt - 1), cfg.backoff_max_s)
            if self._stop.wait(delay):
                return

    def _record(self, alert: Alert, attempt: int, status: int | None, error: str,
                state: str) -> None:
        try:
            self.store.record_attempt(alert.id, attempt, self.clock(), status, error, state)
        except StoreError:
            log.exception("cannot record webhook attempt %d of alert %d", attempt, alert.id)
