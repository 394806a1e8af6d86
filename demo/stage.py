"""The demo's stage: the fleet and its agents, and the plumbing every act shares.

:class:`Demo` starts (and stops) Mosquitto, the fleet server and the simulated devices
(:class:`SimDevice`: the real agent daemon in this process, fed sensor rows), follows a
rollout's audit log and counts what the devices run; :class:`WebhookLog` is the retraining
webhook's other end and :class:`Labeller` the plant system that uploads labels later.
``wait_for`` is how every act waits (and :mod:`demo.lines` how it talks).

This module tells no part of the story itself: the acts are in :mod:`demo.story` and the
modules it names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from demo.lines import audit_line, say

OUT = Path("demo-out")
SITES = {"a": 10, "b": 10}
WINDOW_S = 2.0
ROWS_PER_S = 15  # per device
PENDING_MAX = 20_000  # per device: prediction ids kept until their labels are uploaded
FRESH_MAX = 2_000  # per device: labelled rows kept for retraining (the newest)
# act 8's concept drift: above this vibration (mm/s) the true label is the opposite of the
# old rule's; the readings themselves do not change
FLIP_VIBRATION = 1.5
FRESH_MIN = 3_000  # labelled rows served under the new rule before the retrain runs
PERFORMANCE_WINDOW_S = 20.0  # the performance alerts judge the labels of the last 20 s
log = logging.getLogger("edgefleet.demo")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def true_label(row: list[float], label: int, flipped: bool) -> int:
    """The label an inspection gives a row: the data set's, or, once the rule has changed
    (act 8), its opposite for machines vibrating above :data:`FLIP_VIBRATION`."""
    from packager.sample_data import FEATURES

    if flipped and row[FEATURES.index("vibration")] > FLIP_VIBRATION:
        return 1 - label
    return label


class StoryFailed(Exception):
    """A step of the story did not happen in time; the fleet stays up to look at why."""


def wait_for(what: str, predicate: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Poll ``predicate`` until it is truthy; show progress after a few seconds (on a
    terminal, one line updated in place; otherwise a line every 15 s)."""
    start = time.monotonic()
    deadline, shown, tty = start + timeout, start, sys.stdout.isatty()
    try:
        while True:
            value = predicate()
            if value:
                return value
            now = time.monotonic()
            if now > deadline:
                raise StoryFailed(f"timed out after {timeout:.0f} s waiting for {what}")
            if now - start > 3 and (tty or now - shown >= 15):
                shown = now
                line = f"  … waiting for {what} ({now - start:.0f} s of at most {timeout:.0f})"
                print(f"\r{line}", end="", flush=True) if tty else print(line, flush=True)
            time.sleep(every)
    finally:
        if tty and time.monotonic() - start > 3:
            print("\r\033[K", end="", flush=True)  # clear the progress line



class WebhookLog:
    """The retraining trigger's other end: a local HTTP receiver that prints each call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    outer.calls.append(json.loads(body))
                except ValueError:
                    outer.calls.append({"raw": body[:200].decode(errors="replace")})
                self.send_response(204)
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/retrain"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Labeller:
    """Labels that arrive later, centrally: every ``every`` seconds, the true labels of the
    predictions the devices made since go up as one CSV (``fleet outcomes upload``), as a
    plant's maintenance system would send its inspection results. The server routes each
    device its own over MQTT."""

    def __init__(self, devices: list[SimDevice], url: str, token: str, out: Path,
                 every: float = 2.0) -> None:
        from fleet_server.cli.client import FleetClient

        self.devices, self.every, self.path = devices, every, out / "labels-latest.csv"
        self.client = FleetClient(url, token)
        self.uploaded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="labeller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            rows = [(d.device, pid, label) for d in self.devices for pid, label in
                    d.take_labels()]
            if not rows:
                continue
            write_labels(self.path, rows)
            try:
                self.uploaded += self.client.upload_outcomes(self.path, "text/csv")["outcomes"]
            except Exception as exc:  # a missed batch is a gap in the labels, not a failure
                log.warning("labeller: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()


def write_labels(path: Path, rows: list[tuple[str, str, int]]) -> None:
    """``fleet outcomes upload``'s CSV: device,id,label."""
    with path.open("w") as fh:
        fh.write("device,id,label\n")
        fh.writelines(f"{device},{pid},{label}\n" for device, pid, label in rows)


class SimDevice:
    """One edge agent (the real daemon, in this process) and the machine it watches."""

    def __init__(self, device: str, site: str, secret: str, workdir: Path, broker_port: int,
                 server_url: str, trust: list[str], seed: int) -> None:
        from edge_agent.config import parse_config
        from edge_agent.daemon import AgentDaemon

        self.device, self.site = device, site
        workdir.mkdir(parents=True, exist_ok=True)
        secret_file = workdir / "secret"
        fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        config = parse_config({
            "device": {"id": device, "labels": {"site": site, "fleet": "demo"}},
            "broker": {"host": "127.0.0.1", "port": broker_port, "password_file": "secret",
                       "reconnect_max_delay": 2.0},
            "server": {"url": server_url},
            "trust": {"keys": trust},
            "window": {"seconds": WINDOW_S},
            "agent": {"data_dir": "data", "http_port": 0, "heartbeat_seconds": 2.0},
        }, base=workdir, source=str(workdir / "agent.toml"))
        self.daemon = AgentDaemon(config)
        self.rng = np.random.default_rng(seed)
        self.shift: dict[str, float] = {}
        # act 7 on: the app keeps each prediction's id with the true label the inspection
        # will give it (uploaded later); act 8: the labelling rule flips for high vibration
        self.keep = threading.Event()
        self.flipped = False
        self._lock = threading.Lock()
        self._pending: deque[tuple[str, int]] = deque(maxlen=PENDING_MAX)
        self.fresh: deque[tuple[float, list[float], int]] = deque(maxlen=FRESH_MAX)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._feed, name=f"feed-{device}", daemon=True)

    def start(self) -> None:
        self.daemon.start()
        self._thread.start()

    def _feed(self) -> None:
        from edge_agent.agent import NoModelError
        from packager.sample_data import FEATURES, sensor_matrix

        period = 1.0 / ROWS_PER_S
        while not self._stop.wait(period * (0.5 + self.rng.random())):
            x, y = sensor_matrix(1, self.rng, self.shift)
            row = x[0].tolist()
            with contextlib.suppress(NoModelError):  # nothing installed yet: the app retries
                result = self.daemon.agent.predict([dict(zip(FEATURES, row, strict=True))])
                if self.keep.is_set():
                    label = true_label(row, int(y[0]), self.flipped)
                    with self._lock:
                        self._pending.append((result.ids[0], label))
                        if self.flipped:
                            self.fresh.append((time.time(), row, label))

    def take_labels(self) -> list[tuple[str, int]]:
        """The (prediction id, true label) pairs kept since the last call."""
        with self._lock:
            out = list(self._pending)
            self._pending.clear()
        return out

    def waiting_labels(self) -> int:
        with self._lock:
            return len(self._pending)

    def fresh_rows(self) -> list[tuple[float, list[float], int]]:
        with self._lock:
            return list(self.fresh)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.daemon.stop(flush_timeout=1.0)


class Demo:
    def __init__(self, out: Path, port: int) -> None:
        self.out = out
        self.port = port
        self.processes: list[subprocess.Popen[bytes]] = []
        self.devices: list[SimDevice] = []
        self.server = None
        self.webhook: WebhookLog | None = None
        self.labeller: Labeller | None = None
        self.client = None
        self.token = ""

    # -- start ---------------------------------------------------------------------------

    def start_fleet(self, bundles: dict[str, Path]) -> None:
        """Act 2: register the devices, start the broker, the server and the agents."""
        from fleet_server.cli.client import FleetClient

        keys = (self.out / "keys").resolve()  # agents resolve paths from their own dir
        trust = [f"build={keys / 'build.pub'}", f"approver={keys / 'approver.pub'}"]
        broker_port = free_port()
        server_password = "demo-" + os.urandom(8).hex()
        self.webhook = WebhookLog()
        self.server = server = self._server(trust, broker_port, server_password)
        secrets = self._register()
        self._broker(broker_port, server_password)
        server.start()
        url = server.start_http("127.0.0.1", self.port)
        self.client = FleetClient(url, self.token)
        say(f"fleet server on {url} (REST API, ingest, drift evaluator, rollout engine)")
        say(f"dashboard: {url}/ (sign in with the token in {self.out / 'operator.token'})")
        self._groups_and_bundles(bundles)
        self._agents(secrets, broker_port, url, trust)
        self.url = url

    def _server(self, trust: list[str], broker_port: int, server_password: str) -> Any:
        """The fleet server, configured for the story's compressed timings (not started)."""
        from fleet_server.config import (
            BrokerConfig,
            DriftConfig,
            IngestConfig,
            PerformanceConfig,
            ServerConfig,
            WebhookConfig,
        )
        from fleet_server.server import FleetServer

        assert self.webhook is not None
        return FleetServer(ServerConfig(
            db=self.out / "fleet.db", trust=tuple(trust),
            broker=BrokerConfig(host="127.0.0.1", port=broker_port, password=server_password),
            ingest_config=IngestConfig(levels=(2, 60, 3600)),
            drift=DriftConfig(window_s=6, lateness_s=1.0),
            # realized accuracy judged over the last seconds of labels, not a day: act 8
            performance=PerformanceConfig(window_s=PERFORMANCE_WINDOW_S),
            webhook=WebhookConfig(url=self.webhook.url, backoff_s=0.5),
            port=self.port, rollout_tick_s=1.0))

    def _register(self) -> dict[str, tuple[str, str]]:
        """The operator's token (in ``operator.token``) and one secret per device."""
        s = self.server.services
        now = time.time()
        operator = s.auth.create_token("demo-operator", "approver", "demo", now)
        self.token = operator.secret
        (self.out / "operator.token").write_text(operator.secret + "\n")
        os.chmod(self.out / "operator.token", 0o600)
        secrets = {}
        for site, count in SITES.items():
            for i in range(count):
                device = f"press-{site}{i:02d}"
                _, issued = s.registry.add_device(device, {"site": site, "fleet": "demo"},
                                                  "demo", now)
                secrets[device] = (site, issued.secret)
        say(f"registered {len(secrets)} devices (one secret each: MQTT password and "
            "download token)")
        return secrets

    def _broker(self, broker_port: int, server_password: str) -> None:
        """``fleet broker-config``, then Mosquitto on that configuration."""
        from fleet_server.telemetry.broker import BrokerSetup, write_broker_config

        broker_dir = self.out / "broker"
        write_broker_config(BrokerSetup(
            out=broker_dir, port=broker_port, bind="127.0.0.1", server_user="server",
            server_password=server_password, persistence=False), self.server.services.store)
        say(f"$ fleet broker-config --out {broker_dir}   (per-device accounts, %u ACLs)")
        self._start_mosquitto(broker_dir / "mosquitto.conf", broker_port)
        say(f"mosquitto listening on 127.0.0.1:{broker_port}")

    def _groups_and_bundles(self, bundles: dict[str, Path]) -> None:
        for group, selector in (("everyone", {"fleet": "demo"}), ("site-a", {"site": "a"}),
                                ("site-b", {"site": "b"})):
            self.client.post("/api/v1/groups", {"name": group, "selector": selector,
                                                "important_features": ["humidity"]})
        say("groups: everyone (fleet=demo), site-a, site-b")
        for version, path in bundles.items():
            status, _ = self.client.upload(path)
            say(f"uploaded sensor@{version} (verified against the trust store: HTTP {status})")

    def _agents(self, secrets: dict[str, tuple[str, str]], broker_port: int, url: str,
                trust: list[str]) -> None:
        for n, (device, (site, secret)) in enumerate(secrets.items()):
            dev = SimDevice(device, site, secret, self.out / "devices" / device, broker_port,
                            url, trust, seed=100 + n)
            dev.start()
            self.devices.append(dev)
        wait_for("the agents to connect", lambda: all(
            d.daemon.link.connected for d in self.devices), 30)
        say(f"{len(self.devices)} agents connected and streaming ~{ROWS_PER_S} rows/s each "
            "(nothing to serve yet: no model is installed)")

    def _start_mosquitto(self, conf: Path, port: int) -> None:
        from fleet_server.telemetry.broker import BrokerStartError, start_broker

        try:  # its own session: Ctrl-C stops the agents first, then the broker
            self.processes.append(start_broker(conf, port, conf.parent / "mosquitto.log",
                                               new_session=True))
        except BrokerStartError as exc:
            raise SystemExit(f"demo: {exc} (`make demo` installs it as root)") from exc

    # -- rollouts --------------------------------------------------------------------------

    def rollout(self, version: str, stages: list[dict[str, Any]], expect: str) -> dict:
        body = {"bundle": f"sensor@{version}", "group": "everyone", "stages": stages,
                "install_timeout_s": 30, "start": True,
                "gates": {"min_healthy_predictions": 10, "min_canary_predictions": 60,
                          "min_control_predictions": 60, "max_wait_s": 60}}
        say(f"$ fleet rollout create sensor@{version} --group everyone --stages "
            + ",".join(f"{int(s['fraction'] * 100)}%" for s in stages) + " --start")
        created = self.client.post("/api/v1/rollouts", body)
        return self.follow(created["id"], version, expect)

    def follow(self, rid: str, version: str, expect: str) -> dict:
        """Print a rollout's audit log as it happens, until it completes or aborts."""
        seen = 0

        def finished() -> dict | None:
            nonlocal seen
            detail = self.client.get(f"/api/v1/rollouts/{rid}")
            for entry in detail["audit"][seen:]:
                say("  " + audit_line(entry))
            seen = len(detail["audit"])
            return detail if detail["status"] in ("completed", "aborted") else None

        detail = wait_for(f"the rollout of {version} to finish", finished, 240, every=1.0)
        if detail["status"] != expect:
            raise StoryFailed(f"the rollout of {version} ended {detail['status']}, "
                              f"expected {expect}")
        return detail

    def fleet(self, *args: str) -> None:
        """One ``fleet`` command, in this process, against the demo's server."""
        from fleet_server.cli.main import main as fleet

        try:
            fleet.main([*args, "--server", self.url, "--token", self.token],
                       standalone_mode=False)
        except SystemExit as exc:
            if exc.code:
                raise StoryFailed(f"`fleet {' '.join(args)}` failed (exit {exc.code})") from exc

    def running(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.devices:
            model = d.daemon.agent.model
            label = model.label if model else "none"
            counts[label] = counts.get(label, 0) + 1
        return counts

    # -- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.labeller is not None:
            self.labeller.stop()
        for d in self.devices:
            try:
                d.stop()
            except Exception:  # stop everything even if one part failed
                log.exception("stopping %s", d.device)
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()
        from fleet_server.telemetry.broker import stop_broker

        for proc in self.processes:
            stop_broker(proc)
        if self.webhook is not None:
            self.webhook.stop()

