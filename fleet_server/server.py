"""The running server: services, MQTT link, ingest worker, evaluator, webhook and HTTP.

:class:`FleetServer` is what ``fleet serve`` (everything in one process) and ``fleet
ingest`` (a worker alone, ``publish_desired=False``, no HTTP, no evaluator) run. Start
order: fold summaries still waiting for a known bundle, then the webhook, the link, the
ingest worker, the evaluator, the rollout engine. Stop order is the reverse of what feeds
what: HTTP first (no new requests), then the rollout engine (it publishes), then ingest
drains and acknowledges what it holds, then the link closes, then the evaluator and
webhook stop, then the store closes.

Roles (``config.role``): ``api`` runs no background part (the CLI serves HTTP), ``ingest``
the link and the ingest worker, ``engine`` the webhook, the evaluator, the rollout
engine and the outcome router (which publishes outcome batches and resends what is not
receipted: one process at a time, so it is an engine part), ``all`` everything. The
engine's parts run only while this process holds the engine lease
(:meth:`Store.engine_lease`: a PostgreSQL advisory lock; always held over a SQLite file):
a standby tries every ``election_s`` and starts them when it wins; a leader checks its
lease as often and, if it cannot confirm it, stops them and is *deposed*
(``on_deposed`` is called; ``fleet serve`` then exits with status 3 for its supervisor
to restart it as a standby). A takeover is recorded in the audit log (``engine.lead``).

:meth:`FleetServer.start_http` runs uvicorn on a thread on an already bound socket (port 0
picks a free one) and returns the base URL; tests and the benchmark use it. This module
holds no rules of its own.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

import uvicorn
from fastapi import APIRouter

from fleet_server.api import create_app
from fleet_server.config import ServerConfig
from fleet_server.monitoring.evaluator import Evaluator
from fleet_server.monitoring.performance import PerformanceWatch
from fleet_server.monitoring.webhook import Webhook
from fleet_server.rollouts.engine import RolloutEngine
from fleet_server.services import build_services
from fleet_server.telemetry.link import ServerLink
from fleet_server.telemetry.routing import OutcomeRouter
from fleet_server.telemetry.worker import IngestWorker

__all__ = ["FleetServer"]

log = logging.getLogger(__name__)
_servers = itertools.count(1)


class FleetServer:
    def __init__(self, config: ServerConfig, *, publish_desired: bool = True,
                 clock: Callable[[], float] = time.time,
                 extra_routers: Sequence[APIRouter] = ()) -> None:
        self.config = config
        runs_ingest = config.ingest and config.role in ("all", "ingest")
        runs_engine = config.role in ("all", "engine")
        self.link: ServerLink | None = None
        # the client id: "fleet-serve" (one server), the ingest worker's stable one (its kept
        # session holds its share while it restarts), or for api and engine processes, which
        # only publish and keep nothing in a session, one per process: replicas never take
        # each other's connection over
        link_role = ("ingest" if not publish_desired else "serve" if config.role == "all"
                     else f"{config.role}-{os.getpid()}")
        if config.broker is not None and (runs_ingest or publish_desired):
            self.link = ServerLink(config.broker, subscribe=runs_ingest,
                                   on_connect=self._on_connect if publish_desired else None,
                                   role=link_role)
        self.services = build_services(config, publisher=self.link if publish_desired else None,
                                       clock=clock)
        s = self.services
        if self.link is not None:
            link = self.link
            s.mqtt_state = lambda: "connected" if link.connected else "disconnected"
            s.metrics.watch_link(lambda: link.queued, lambda: link.dropped)
        self.webhook = Webhook(config.webhook, s.store, s.metrics, clock) \
            if config.webhook.url and runs_engine else None
        s.alerts.notifier = self.webhook
        self.worker = IngestWorker(self.link, s.ingestor, config.ingest_config) \
            if self.link is not None and runs_ingest else None
        self.evaluator = Evaluator(s.store, s.bundles, s.registry, s.alerts, config.drift,
                                   config.ingest_config, clock,
                                   performance=PerformanceWatch(s.performance, s.alerts),
                                   also=(s.governance.review_alerts,
                                         s.capture.housekeeping)) \
            if config.evaluate and runs_engine else None
        # the engine publishes desired states: an ingest-only worker does not run one
        self.rollout_engine = RolloutEngine(s.rollouts, config.rollout_tick_s) \
            if publish_desired and runs_engine else None
        # outcome batches go out over the link, from the engine only (exactly one publisher
        # and resender); in-process uploads, receipts and devices coming online wake it
        self.outcome_router = OutcomeRouter(s.store, self.link, config.outcomes, clock) \
            if self.link is not None and publish_desired and runs_engine else None
        if self.outcome_router is not None:
            s.outcomes.on_queued = self.outcome_router.kick
            s.ingestor.on_outcomes = self.outcome_router.kick
        self._engine_parts = [p for p in (self.webhook, self.evaluator, self.rollout_engine,
                                          self.outcome_router) if p is not None]
        # who holds the lease, as pg_stat_activity shows it: host, process, server in it
        self.lease_name = f"fleet-engine:{socket.gethostname()}:{os.getpid()}:{next(_servers)}"
        self.lease = s.store.engine_lease(self.lease_name) if self._engine_parts else None
        self.leading = False
        self.deposed = False
        self.on_deposed: Callable[[], None] | None = None
        self._elector: threading.Thread | None = None
        self._elector_stop = threading.Event()
        self.app = create_app(s, extra_routers=extra_routers)
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self._started = False

    def _on_connect(self) -> None:
        self.services.desired.republish_all()

    def start(self) -> None:
        """Start the background parts (not HTTP). Returns at once."""
        if self._started:
            return
        self._started = True
        folded = self.services.ingestor.sweep_pending()
        if folded:
            log.info("folded %d summaries that were waiting for their bundle", folded)
        if self.link is not None:
            self.link.start()
        if self.worker is not None:
            self.worker.start()
        if self.lease is not None:
            self._try_to_lead()
            if not self.leading:
                log.warning("engine: standing by (%s); another process leads", self.lease_name)
            if self.services.store.kind != "sqlite":  # a SQLite file's lease is never lost
                self._elector_stop.clear()
                self._elector = threading.Thread(target=self._elect, name="fleet-elector",
                                                 daemon=True)
                self._elector.start()

    # -- the engine's leadership -----------------------------------------------------------

    def _try_to_lead(self) -> None:
        assert self.lease is not None
        if self.leading or not self.lease.acquire():
            return
        log.info("engine: leading (%s)", self.lease_name)
        for part in self._engine_parts:
            part.start()
        if self.services.store.kind != "sqlite":
            try:
                self.services.store.audit(
                    f"engine:{socket.gethostname()}:{os.getpid()}", "engine.lead", "engine",
                    {"host": socket.gethostname(), "pid": os.getpid()}, self.services.clock())
            except Exception:  # the audit line is a record, not a condition of leading
                log.exception("engine: cannot record the takeover")
        self.leading = True

    def _stop_engine(self) -> None:
        if self.outcome_router is not None:
            self.outcome_router.stop()
        if self.rollout_engine is not None:
            self.rollout_engine.stop()
        if self.evaluator is not None:
            self.evaluator.stop()
        if self.webhook is not None:
            self.webhook.stop()

    def _elect(self) -> None:
        assert self.lease is not None
        while not self._elector_stop.wait(self.config.election_s):
            if not self.leading:
                self._try_to_lead()
            elif not self.lease.held():
                log.error("engine: the lease is lost (the database session ended): stopping "
                          "the engine; another process may lead now")
                self._stop_engine()
                self.leading, self.deposed = False, True
                if self.on_deposed is not None:
                    self.on_deposed()
                return

    def stop(self) -> None:
        """Stop everything this server started. Idempotent."""
        self.stop_http()
        self._elector_stop.set()
        if self._elector is not None:
            self._elector.join(10)
            self._elector = None
        if self.rollout_engine is not None:
            self.rollout_engine.stop()
        if self.outcome_router is not None:
            self.outcome_router.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.link is not None:
            self.link.stop()
        if self.evaluator is not None:
            self.evaluator.stop()
        if self.webhook is not None:
            self.webhook.stop()
        if self.lease is not None:
            self.lease.release()
            self.leading = False
        self.services.close()
        self._started = False

    # -- HTTP ----------------------------------------------------------------------------

    def _uvicorn(self, host: str, port: int) -> uvicorn.Server:
        return uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning",
                                             access_log=False, lifespan="off",
                                             timeout_graceful_shutdown=5))

    def serve_http(self) -> None:
        """Serve HTTP in this thread until interrupted (``fleet serve``)."""
        self._http = self._uvicorn(self.config.host, self.config.port)
        self._http.run()

    def start_http(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 10.0) -> str:
        """Serve HTTP on a thread; returns the base URL (``http://host:port``)."""
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
        # accepted sockets inherit it; without it Nagle holds each response's body ~40 ms
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound = sock.getsockname()[1]
        server = self._http = self._uvicorn(host, bound)
        self._http_thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                             name="fleet-http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if time.monotonic() > deadline or not self._http_thread.is_alive():
                raise RuntimeError(f"HTTP server did not start on {host}:{bound}")
            time.sleep(0.01)
        return f"http://{host}:{bound}"

    def stop_http(self, timeout: float = 10.0) -> None:
        if self._http is not None:
            self._http.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(timeout)
            self._http = None
            self._http_thread = None

    def __enter__(self) -> FleetServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
