"""``make demo``: the whole story on one machine, in about three minutes.

1. **Package.** Train a predictive-maintenance model on a synthetic sensor data set (no
   downloads) in three versions and package each with ``edgepack``: v1 (logistic
   regression), v2 (a small MLP), v3 (a faulty build trained on inverted labels: it passes
   its own smoke test, but its answers disagree with the fleet's).
2. **Start the fleet.** A Mosquitto broker configured by ``fleet broker-config`` (one
   account per device, ACLs), the fleet server (REST API, ingest, drift evaluator, rollout
   engine, dashboard), and 20 edge agents in two sites, each with its own outbox, slots and
   local endpoint, streaming sensor rows through ``Agent.predict``.
3. **Roll out v1** to every device in stages.
4. **Drift.** Site B's humidity sensors start reading 25 points high; the server sees it
   in the summaries, raises an alert and calls the retraining webhook.
5. **Roll out v2** through canary stages to all: the gates pass. v2 carries a model card (a
   slice by temperature, fairness across sites, an approver's signature and review date):
   ``fleet bundle show`` answers the six questions, and one device explains one prediction
   (``POST /explain`` on its local endpoint).
6. **Roll out v3**: the canaries disagree with the control devices, the prediction-drift
   gate fails, the rollout aborts and every touched device goes back to v2.
7. **Ground truth.** The apps keep their prediction ids; the true labels come later, for
   two devices through their local ``POST /outcomes``, for the rest uploaded centrally
   (``fleet outcomes upload``) and routed to each device over MQTT. v2's realized accuracy
   (with its interval and n) is shown beside its label-free estimate and its packaged
   accuracy; from then on labels keep arriving every few seconds.
8. **The model heals itself.** The labelling rule flips for high-vibration machines
   (concept drift: the inputs do not move): v2's realized accuracy falls, a
   ``performance_drop`` alert calls the webhook while the estimate and the drift monitors
   see nothing; one tick of the retraining watcher (``edgepack retrain --watch``) answers
   the alert: it trains on the fresh labelled rows, proves the challenger better than v2 on
   the newest held-out rows (McNemar), uploads it and rolls it out through canaries; every
   device runs it, realized accuracy recovers, and ``fleet retrain show`` prints the
   lineage from the alert to the rollout.

It prints each step and the dashboard URL, then keeps running for you to look around
until Ctrl-C (``--exit`` stops at the end instead). Everything it writes goes to
``demo-out/``. Timings are compressed (2-second windows, seconds-long soaks) so the story
fits in minutes; the defaults of a real deployment are in ``deploy/`` and the README.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

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


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say(f"\n=== {text} " + "=" * max(0, 74 - len(text)))


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


# --------------------------------------------------------------------------- 1. package


def package(out: Path) -> dict[str, Path]:
    """Train and package v1, v2 and the faulty v3; keys in ``out/keys``."""
    import joblib
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from packager.cli import main as edgepack
    from packager.sample_data import FEATURES, sensor_data

    train = sensor_data(3000, seed=1)
    # the site a machine stands in: not a model input, but v2's card reports its
    # fairness across sites (and a deliberate review date)
    train["site"] = np.random.default_rng(1).choice(list(SITES), len(train))
    train.to_csv(out / "train.csv", index=False)
    held = sensor_data(600, seed=2)
    held["site"] = np.random.default_rng(2).choice(list(SITES), len(held))
    held.to_csv(out / "eval.csv", index=False)
    review = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 180 * 86400))
    (out / "card.toml").write_text(
        'owner = "Maintenance analytics"\ncontact = "ml@example.com"\n'
        'intended_use = "Flag machines for an inspection before they fail"\n'
        'out_of_scope = "Stopping a machine without a person deciding"\n'
        'limitations = "Synthetic sensor data; two sites"\n'
        f"review_by = {review}\n")
    x, y = train[list(FEATURES)], train["fault"]
    models = {
        "1.0.0": Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression())]),
        "2.0.0": Pipeline([("scale", StandardScaler()),
                           ("mlp", MLPClassifier((16, 8), max_iter=800, random_state=0))]),
        "3.0.0": Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression())]),
    }
    for args in (("keygen", "build", "--out", str(out / "keys")),
                 ("keygen", "approver", "--out", str(out / "keys"))):
        _edgepack(edgepack, args, quiet=True)
    paths = {}
    for version, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, 1 - y if version == "3.0.0" else y)  # v3: the faulty build
        joblib.dump(model, out / f"model-{version}.joblib")
        card = ("--card", str(out / "card.toml"), "--slice-by", "temperature",
                "--sensitive", "site", "--max-fairness-gap",
                "demographic_parity_difference=0.25") if version == "2.0.0" else ()
        say(f"$ edgepack build model-{version}.joblib --name sensor --version {version} "
            + ("--card card.toml --slice-by temperature --sensitive site ..." if card
               else "..."))
        _edgepack(edgepack, (
            "build", str(out / f"model-{version}.joblib"), "--train-data",
            str(out / "train.csv"), "--target", "fault", "--eval-data", str(out / "eval.csv"),
            "--name", "sensor", "--version", version, "--key", str(out / "keys/build.key"),
            "--out", str(out / "bundles"), "--json", *card), quiet=True)
        paths[version] = out / "bundles" / f"sensor-{version}.edgebundle"
        if card:
            _edgepack(edgepack, ("sign", str(paths[version]), "--key",
                                 str(out / "keys/approver.key"), "--role", "approver",
                                 "--comment", "site gap within bounds", "--review-by",
                                 review), quiet=True)
        manifest = _inspect(paths[version])
        acc = manifest["metrics"].get("eval_accuracy", 0.0)
        say(f"  sensor@{version}: {manifest['lineage']['estimator']}, eval accuracy "
            f"{acc:.1%}, fidelity {manifest['fidelity']['label_agreement']:.1%} label "
            f"agreement, {paths[version].stat().st_size:,} bytes")
        if card:
            _card_lines(paths[version])
    return paths


def _card_lines(path: Path) -> None:
    """v2's model card, as ``edgepack card --format json`` gives it: a slice, a fairness
    line, the approval and the review date."""
    import io

    from packager.cli import main as edgepack

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        edgepack(["card", str(path), "--format", "json"])
    card = json.loads(buffer.getvalue())
    for sl in card["slices"]:
        worst = next(g for g in sl["groups"] if g["value"] == sl["worst"])
        acc = next(m for m in worst["metrics"] if m["name"] == sl["metric"])
        say(f"  card: slice by {sl['column']} ({sl['binning']}): worst {sl['worst']} "
            f"{sl['metric']} {acc['value']:.1%} [{acc['low']:.1%}, {acc['high']:.1%}] "
            f"(n={worst['n']})")
    for report in card["fairness"]:
        rates = ", ".join(f"{g['value']} {g['rates']['selection_rate']:.1%}"
                          for g in report["groups"])
        gap = report["gaps"]["demographic_parity_difference"]
        check = next(c for c in card["checks"] if c["column"] == report["column"])
        say(f"  card: fairness by {report['column']}: selection rate {rates}; demographic "
            f"parity difference {gap:.3f} (bound {check['bound']}: "
            f"{'passed' if check['passed'] else 'FAILED'})")
    for a in card["approvals"]:
        say(f"  card: approved as {a['role']} ({a['comment']!r}), review by {card['review_by']}")


def _edgepack(edgepack: Callable[[list[str]], int], args: tuple[str, ...], *,
              quiet: bool) -> None:
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer) if quiet else contextlib.nullcontext():
        code = edgepack(list(args))
    if code != 0:
        say(buffer.getvalue())
        raise SystemExit(f"demo: `edgepack {args[0]}` failed (exit {code})")


def _inspect(path: Path) -> dict[str, Any]:
    from edgefleet.contract.bundle import read_unverified

    return read_unverified(path.read_bytes()).manifest.to_dict()


# --------------------------------------------------------------------------- 2. the fleet


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

    # One function on purpose: a scene of the demo story, read top to bottom like a script.
    def start_fleet(self, bundles: dict[str, Path]) -> None:
        from fleet_server.cli.client import FleetClient
        from fleet_server.config import (
            BrokerConfig,
            DriftConfig,
            IngestConfig,
            PerformanceConfig,
            ServerConfig,
            WebhookConfig,
        )
        from fleet_server.server import FleetServer
        from fleet_server.telemetry.broker import BrokerSetup, write_broker_config

        keys = (self.out / "keys").resolve()  # agents resolve paths from their own dir
        trust = [f"build={keys / 'build.pub'}", f"approver={keys / 'approver.pub'}"]
        broker_port = free_port()
        server_password = "demo-" + os.urandom(8).hex()
        self.webhook = WebhookLog()
        config = ServerConfig(
            db=self.out / "fleet.db", trust=tuple(trust),
            broker=BrokerConfig(host="127.0.0.1", port=broker_port, password=server_password),
            ingest_config=IngestConfig(levels=(2, 60, 3600)),
            drift=DriftConfig(window_s=6, lateness_s=1.0),
            # realized accuracy judged over the last seconds of labels, not a day: act 8
            performance=PerformanceConfig(window_s=PERFORMANCE_WINDOW_S),
            webhook=WebhookConfig(url=self.webhook.url, backoff_s=0.5),
            port=self.port, rollout_tick_s=1.0)
        self.server = server = FleetServer(config)
        s = server.services
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

        broker_dir = self.out / "broker"
        write_broker_config(BrokerSetup(
            out=broker_dir, port=broker_port, bind="127.0.0.1", server_user="server",
            server_password=server_password, persistence=False), s.store)
        say(f"$ fleet broker-config --out {broker_dir}   (per-device accounts, %u ACLs)")
        self._start_mosquitto(broker_dir / "mosquitto.conf", broker_port)
        say(f"mosquitto listening on 127.0.0.1:{broker_port}")

        server.start()
        url = server.start_http("127.0.0.1", self.port)
        self.client = FleetClient(url, operator.secret)
        say(f"fleet server on {url} (REST API, ingest, drift evaluator, rollout engine)")
        say(f"dashboard: {url}/ (sign in with the token in {self.out / 'operator.token'})")
        for group, selector in (("everyone", {"fleet": "demo"}), ("site-a", {"site": "a"}),
                                ("site-b", {"site": "b"})):
            self.client.post("/api/v1/groups", {"name": group, "selector": selector,
                                                "important_features": ["humidity"]})
        say("groups: everyone (fleet=demo), site-a, site-b")
        for version, path in bundles.items():
            status, _ = self.client.upload(path)
            say(f"uploaded sensor@{version} (verified against the trust store: HTTP {status})")
        for n, (device, (site, secret)) in enumerate(secrets.items()):
            dev = SimDevice(device, site, secret, self.out / "devices" / device, broker_port,
                            url, trust, seed=100 + n)
            dev.start()
            self.devices.append(dev)
        wait_for("the agents to connect", lambda: all(
            d.daemon.link.connected for d in self.devices), 30)
        say(f"{len(self.devices)} agents connected and streaming ~{ROWS_PER_S} rows/s each "
            "(nothing to serve yet: no model is installed)")
        self.url = url

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
                say("  " + _audit_line(entry))
            seen = len(detail["audit"])
            return detail if detail["status"] in ("completed", "aborted") else None

        detail = wait_for(f"the rollout of {version} to finish", finished, 240, every=1.0)
        if detail["status"] != expect:
            raise StoryFailed(f"the rollout of {version} ended {detail['status']}, "
                              f"expected {expect}")
        return detail

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


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# what each gate measures, said the first time it appears
GATE_HELP = {
    "install_failures": "canaries that failed to install the bundle",
    "healthy_devices": "share of the canaries serving on the new bundle (1 = all)",
    "sample": "predictions the canaries served this stage (enough to judge?)",
    "control_sample": "predictions the control devices (still on the old bundle) served",
    "error_rate": "share of the canaries' requests that failed",
    "error_rate_delta": "canary error rate minus the controls'",
    "latency_p95_ratio": "canaries' p95 latency over the controls'",
    "prediction_psi": "PSI of the canaries' predictions against the controls'",
    "prediction_js": "Jensen-Shannon distance of the same",
    "input_drift_share": "share of input features drifting on the canaries",
    "input_drift": "the drift monitor's verdict on the canaries' inputs (0 = none)",
    "shadow_agreement": "share of rows where the shadow agreed with the live model",
    "accuracy": "the controls' accuracy minus the canaries' (realized from labels once both "
                "sides have enough, else estimated; fails only outside the canaries' interval)",
}
_explained: set[str] = set()


def _gate(g: dict[str, Any]) -> str:
    op = {"<=": "≤", ">=": "≥"}.get(g.get("op") or "", g.get("op") or "")
    bound = f" {op} {_fmt(g['threshold'])}" if g.get("threshold") is not None else ""
    return f"{g['name']} {_fmt(g['value'])}{bound} {'✓' if g['outcome'] == 'pass' else '✗'}"


def _audit_line(entry: dict[str, Any]) -> str:
    """One decision of the audit log: when, who, what, why, and the numbers behind it:
    every gate with its value and bound, explained the first time it appears."""
    when = time.strftime("%H:%M:%S", time.localtime(entry["time"]))
    line = (f"[{when}] {entry['actor']}: {entry['action']} {entry['from_status'] or '—'} → "
            f"{entry['to_status']} (stage {entry['stage']})")
    if entry.get("reason"):
        line += f": {entry['reason']}"
    numbers = entry.get("numbers") or {}
    counts = [f"{k} {_fmt(v)}" for k, v in numbers.items()  # zeros say nothing here
              if isinstance(v, int | float) and not isinstance(v, bool) and v]
    gates = [g for g in numbers.get("gates", ())
             if isinstance(g, dict) and g.get("outcome") in ("pass", "fail")
             and g.get("name") != "soak"]
    if counts:
        line += f"\n      {', '.join(counts)}"
    if gates:
        line += f"\n      gates: {', '.join(_gate(g) for g in gates)}"
    new = [g["name"] for g in gates if g["name"] not in _explained and g["name"] in GATE_HELP]
    for name in new:
        _explained.add(name)
        line += f"\n        ({name}: {GATE_HELP[name]})"
    return line


# --------------------------------------------------------------------------- the story


def story(demo: Demo, bundles: dict[str, Path]) -> None:
    stages = [{"fraction": 0.1, "min_devices": 2, "soak_s": 6},
              {"fraction": 0.5, "min_devices": 2, "soak_s": 6},
              {"fraction": 1.0, "min_devices": 1, "soak_s": 4}]

    banner("3. roll out v1 to every device in stages (10 %, 50 %, 100 %)")
    demo.rollout("1.0.0", stages, "completed")
    wait_for("every agent to run v1", lambda: demo.running() == {"sensor@1.0.0": 20}, 60)
    say(f"devices by bundle: {demo.running()}")

    banner("4. site B's humidity sensors drift (+25 %RH); the server notices")
    for d in demo.devices:
        if d.site == "b":
            d.shift = {"humidity": 25.0}
    wait_for("a drift alert", lambda: next(iter(demo.client.get(
        "/api/v1/alerts", state="open")), None), 120, every=1.0)
    for a in demo.client.get("/api/v1/alerts", state="open"):  # every open alert, not one
        say(f"alert #{a['id']} ({a['kind']}, group {a['group'] or '-'}): {a['message']}")
    report = demo.client.get("/api/v1/drift", bundle="sensor@1.0.0", group="site-b",
                             since=time.time() - 20)
    say("  (PSI and W/σ are net of their small-sample bias, so 0 means no more than noise; "
        "KS is raw)")
    for f in report["report"]["features"]:
        if f["role"] == "input":
            s = f["stats"]
            say(f"  site-b {f['name']:<12} {f['verdict']:<6} PSI {_fmt(s.get('psi'))}  KS "
                f"{_fmt(s.get('ks'))}  W/σ {_fmt(s.get('wasserstein'))}")
    wait_for("the retraining webhook", lambda: demo.webhook.calls, 30)
    say(f"webhook called (the retraining trigger): {demo.webhook.url} ← "
        f"{json.dumps(demo.webhook.calls[0])[:160]}…")
    for d in demo.devices:
        d.shift = {}  # the field crew recalibrates site B
    say("site B recalibrated")

    banner("5. roll out v2 (the MLP) through canary stages to all")
    demo.rollout("2.0.0", stages, "completed")
    wait_for("every agent to run v2", lambda: demo.running() == {"sensor@2.0.0": 20}, 60)
    say(f"devices by bundle: {demo.running()}")
    say("$ fleet bundle show sensor@2.0.0")
    show = demo.client.get("/api/v1/bundles/sensor/2.0.0/governance")
    for key, question in (("approved", "who approved it"), ("data", "what data trained it"),
                          ("evaluation", "how it was evaluated"),
                          ("biases", "what biases were tested"),
                          ("review", "when it is reviewed next"),
                          ("explanations", "how it is explained")):
        say(f"  {question + ':':<27} {show[key]['answer']}")
    explain_one(demo)

    banner("6. roll out the faulty v3: the gates catch it and roll back")
    detail = demo.rollout("3.0.0", stages, "aborted")
    wait_for("every agent back on v2", lambda: demo.running() == {"sensor@2.0.0": 20}, 90)
    failed = [g for g in detail["gate_results"] if g["outcome"] == "fail"]
    for g in failed:
        say(f"  gate {g['name']}: {_fmt(g['value'])} against {g['op']} {_fmt(g['threshold'])}"
            f" — {g['reason']}")
    say(f"devices by bundle: {demo.running()} (every touched device rolled back, "
        "from its local slot, no download)")

    ground_truth(demo)
    heal(demo)


def _metric(m: dict[str, Any] | None, n_what: str) -> str:
    """``0.905 [0.893, 0.917] on 2,134 labelled rows`` (the interval when there is one)."""
    if not m or m.get("value") is None:
        return "-"
    band = f" [{m['low']:.3f}, {m['high']:.3f}]" if m.get("low") is not None else ""
    n = f" on {m['n']:,} {n_what}" if m.get("n") else ""
    return f"{m['value']:.3f}{band}{n}"


def _performance_lines(report: dict[str, Any], *, explain: bool) -> None:
    """A bundle's realized accuracy beside its estimate and its packaged value."""
    total, expected = report["total"], report["expected"].get("accuracy")
    notes = ("  (outcomes joined with their predictions on the devices; 95 % Wilson "
             "interval, n = labelled rows)", "  (CBPE: the mean calibrated confidence of "
             "every served row; needs no label)", "  (edgepack build, on its held-out rows)"
             ) if explain else ("", "", "")
    say(f"  realized accuracy  {_metric(total['realized'].get('accuracy'), 'labelled rows')}"
        + notes[0])
    say(f"  estimated accuracy {_metric(total['estimated'].get('accuracy'), 'served rows')}"
        + notes[1])
    if expected:
        say(f"  packaged accuracy  {expected['value']:.3f} [{expected['low']:.3f}, "
            f"{expected['high']:.3f}] on {expected['rows']:,} rows" + notes[2])


def ground_truth(demo: Demo) -> None:
    """Issue 14's scene: labels come back, by a device's own endpoint and centrally."""
    from edge_agent.httpapi import LocalServer

    banner("7. ground truth arrives: v2's realized accuracy beside its estimate")
    say("the apps keep each prediction's id; whether the machine really failed is known "
        "later, from the inspections")
    started = time.time()
    for d in demo.devices:
        d.keep.set()
    wait_for("2,000 predictions to label", lambda: sum(
        d.waiting_labels() for d in demo.devices) >= 2000, 60)
    # two devices get their labels from an app on the device itself ...
    local = [demo.devices[0], demo.devices[SITES["a"]]]
    joined = 0
    for device in local:
        labels = device.take_labels()
        if not labels:
            continue
        http = LocalServer(device.daemon.agent, lambda: {}, port=0)
        http.start()
        try:
            body = {"outcomes": [{"id": pid, "label": label} for pid, label in labels]}
            counts = _post(f"{http.url}/outcomes", body)["counts"]
        finally:
            http.stop()
        joined += counts["joined"]
        say(f"$ curl -d '{{\"outcomes\": [{{\"id\": \"{labels[0][0]}\", \"label\": "
            f"{labels[0][1]}}}, …]}}' {http.url}/outcomes   (on {device.device})")
        say(f"  {', '.join(f'{k} {v}' for k, v in counts.items())}")
    # ... the rest from the plant's maintenance system, uploaded to the server
    rows = [(d.device, pid, label) for d in demo.devices if d not in local
            for pid, label in d.take_labels()]
    path = demo.out / "labels.csv"
    write_labels(path, rows)
    say(f"$ fleet outcomes upload {path}   (columns device,id,label)")
    done = demo.client.upload_outcomes(path, "text/csv")
    say(f"  {done['outcomes']:,} outcome(s) queued for {len(done['devices'])} device(s); "
        "each gets its own over MQTT (edgefleet/v1/<device>/outcomes, readable by it alone)")
    wait_for("every device's receipt", lambda: all(
        r["queued"] == 0 and r["sent"] == 0 for r in demo.client.get("/api/v1/outcomes")), 60)
    receipted = sum(r["receipted"] for r in demo.client.get("/api/v1/outcomes"))
    say(f"$ fleet outcomes status   → {receipted:,} receipted by their devices, none waiting")
    total = joined + done["outcomes"]

    def report() -> dict[str, Any] | None:
        r = demo.client.get("/api/v1/performance", bundle="sensor@2.0.0", since=str(started))
        return r if r["total"]["labelled"] >= total else None

    result = wait_for("the labelled rows in the summaries", report, 60)
    say("$ fleet performance sensor@2.0.0   (GET /api/v1/performance)")
    _performance_lines(result, explain=True)
    verdicts = result["verdicts"]
    say(f"  verdict: realized {verdicts['realized']['verdict']}, estimated "
        f"{verdicts['estimated']['verdict']} (an alert needs a drop of more than "
        "0.05 with the interval excluding the packaged value)")
    demo.labeller = Labeller(demo.devices, demo.url, demo.token, demo.out)
    demo.labeller.start()
    say("from here on the labels keep coming: every 2 s the newest predictions' labels are "
        "uploaded the same way")


def _post(url: str, body: dict[str, Any]) -> Any:
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


RECIPE = """\
# the demo's retraining recipe (edgepack retrain): see demo/retraining.py
name = "sensor-retrain"
bundle = "sensor"
group = "everyone"
key = "../keys/build.key"
target = "fault"
data = "demo.retraining:load"
train = "demo.retraining:fit"
time_column = "ts"
holdout = 0.25
promote_if = ["accuracy>=+0.02"]
version = "minor"

[rollout]
stages = "10%,50%,100%"
soak = "6s"
gates = { min_healthy_predictions = 10, min_canary_predictions = 60, \
min_control_predictions = 60, min_labels = 100, max_wait_s = 60 }

[watch]
alerts = ["performance_drop"]
cooldown = "1h"
"""


def heal(demo: Demo) -> None:
    """Issue 15's act: concept drift, the alert, a retrain that must win, its rollout."""
    from packager.retrain import FleetApi, load_recipe
    from packager.sample_data import FEATURES
    from packager.watch import Watcher, policy_of

    banner("8. the rule changes: v2 goes wrong, the fleet retrains itself and heals")
    say(f"new bearings: a machine vibrating above {FLIP_VIBRATION} mm/s now fails where the "
        "old rule said it would not, and the reverse (concept drift: the readings do not "
        "move, what they mean does)")
    changed = time.time()
    for d in demo.devices:
        d.flipped = True

    def drop() -> list[dict[str, Any]] | None:
        found = [a for a in demo.client.get("/api/v1/alerts", state="open")
                 if a["kind"] == "performance_drop" and a["bundle"] == "sensor@2.0.0"]
        # the recipe's group (or the fleet) must have dropped: a site alone does not
        # trigger the retrain; and the retrain wants a few thousand fresh rows
        watched = any(a["group"] in ("everyone", "*") for a in found)
        rows = sum(len(d.fresh_rows()) for d in demo.devices)
        return found if watched and rows >= FRESH_MIN else None

    alerts = sorted(wait_for("v2's realized accuracy to drop", drop, 120, every=1.0),
                    key=lambda a: a["id"])
    first = alerts[0]
    say(f"alert #{first['id']} ({first['kind']}, group {first['group']}): {first['message']}")
    if alerts[1:]:
        say("  and for group " + ", ".join(f"{a['group']} (#{a['id']})" for a in alerts[1:]))
    say(f"  (over the last {PERFORMANCE_WINDOW_S:.0f} s of labels, some still under the old "
        "rule; the limit is the packaged accuracy minus the 0.05 tolerance)")
    estimate = demo.client.get("/api/v1/performance", bundle="sensor@2.0.0",
                               since=str(changed))["total"]["estimated"].get("accuracy")
    say(f"  v2's label-free estimate this hour still says {_metric(estimate, 'served rows')}:"
        " calibrated confidences cannot see concept drift, only labels can")
    drifts = [a for a in demo.client.get("/api/v1/alerts", state="open")
              if a["kind"] == "drift" and a["opened"] >= changed]
    say(f"  drift alerts since the change: {len(drifts)} (every input histogram is where it "
        "was)")
    calls = wait_for("the retraining webhook", lambda: [
        c for c in demo.webhook.calls
        if (c.get("alert") or {}).get("kind") == "performance_drop"], 30)
    say(f"webhook called: {demo.webhook.url} ← {json.dumps(calls[0])[:120]}…")

    # the fresh labelled rows: what the devices served since the change, with its labels
    work = demo.out / "retrain"
    work.mkdir(exist_ok=True)
    fresh = sorted(r for d in demo.devices for r in d.fresh_rows())
    with (work / "fresh.csv").open("w") as fh:
        fh.write(",".join(("ts", *FEATURES, "fault")) + "\n")
        fh.writelines(",".join(map(str, (_iso(t), *row, label))) + "\n"
                      for t, row, label in fresh)
    (work / "recipe.toml").write_text(RECIPE)
    say(f"{len(fresh):,} labelled rows served since the change → {work / 'fresh.csv'}")
    say(f"$ edgepack retrain {work / 'recipe.toml'} --watch --server {demo.url}   "
        "(one tick of the watcher)")
    recipe = load_recipe(work / "recipe.toml")
    api = FleetApi(demo.url, demo.token)
    try:
        outcome = Watcher(recipe, api, policy_of(recipe), work=work / "runs",
                          say=lambda line: say(f"  {line}")).tick()
    finally:
        api.close()
    if outcome is None or outcome.status != "promoted":
        raise StoryFailed(f"the retrain did not promote a challenger: {outcome}")
    run = demo.client.get(f"/api/v1/retrains/{outcome.run_id}")
    _comparison(run["metrics"]["comparison"])
    detail = demo.follow(outcome.rollout, outcome.challenger.split("@")[1], "completed")
    judged = [g for entry in detail["audit"] for g in (entry.get("numbers") or {}).get(
        "gates", ()) if isinstance(g, dict) and g.get("name") == "accuracy"
        and g.get("outcome") == "pass"]
    if judged:
        say(f"  the canaries' accuracy gate at the first stage: {judged[0]['reason']}")
    wait_for(f"every agent to run {outcome.challenger}",
             lambda: demo.running() == {outcome.challenger: 20}, 60)
    say(f"devices by bundle: {demo.running()}")
    healed = time.time()

    def recovered() -> dict[str, Any] | None:
        r = demo.client.get("/api/v1/performance", bundle=outcome.challenger,
                            since=str(healed))
        return r if r["total"]["labelled"] >= 1000 else None

    result = wait_for(f"labels for {outcome.challenger}", recovered, 60)
    say(f"$ fleet performance {outcome.challenger}   (realized accuracy is back; packaged: "
        "on the held-out fresh rows)")
    _performance_lines(result, explain=False)
    say(f"$ fleet retrain show {outcome.run_id}")
    _fleet(demo, "retrain", "show", str(outcome.run_id))


def _iso(t: float) -> str:
    """A row's time as the recipe's ``time_column`` holds it (ISO 8601 sorts as time)."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _comparison(champion: dict[str, Any]) -> None:
    """The challenger against the champion on the newest held-out rows, as signed into
    the challenger's card."""
    c = champion["comparison"]
    acc = next(m for m in c["metrics"] if m["name"] == "accuracy")
    test = c["test"]
    say(f"  on the newest {c['rows']:,} rows (held out: the challenger never trained on "
        "them), both run through their packaged ONNX:")
    say(f"  accuracy champion "
        f"{champion['name']}@{champion['version']} {acc['champion']:.3f}, challenger "
        f"{c['challenger_name']}@{c['challenger_version']} {acc['challenger']:.3f}, delta "
        f"{acc['delta']:+.3f} [{acc['low']:+.3f}, {acc['high']:+.3f}] (paired 95 % interval)")
    say(f"  McNemar's exact test: {test['challenger_only']} rows only the challenger got "
        f"right, {test['champion_only']} only the champion; p = {test['p_value']:.2g} (the "
        "chance of a split this lopsided if both were equally good)")
    rules = ", ".join(f"{r['rule']} {'pass' if r['passed'] else 'FAIL'}" for r in c["rules"])
    say(f"  rules: {rules}; verdict {c['verdict'].upper()} (signed into the challenger's card)")


def _fleet(demo: Demo, *args: str) -> None:
    """One ``fleet`` command, in this process, against the demo's server."""
    from fleet_server.cli.main import main as fleet

    try:
        fleet.main([*args, "--server", demo.url, "--token", demo.token],
                   standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise StoryFailed(f"`fleet {' '.join(args)}` failed (exit {exc.code})") from exc


def explain_one(demo: Demo) -> None:
    """One prediction on one device, explained by its agent's local endpoint."""
    import urllib.request

    from edge_agent.httpapi import LocalServer
    from packager.sample_data import FEATURES, sensor_matrix

    device = demo.devices[0]
    x, _ = sensor_matrix(1, np.random.default_rng(7), {"temperature": 12.0})
    row = dict(zip(FEATURES, [round(v, 2) for v in x[0].tolist()], strict=True))
    # the demo's agents run without their local endpoint (20 in one process): this one
    # opens it for the question, as an app on the device would find it
    http = LocalServer(device.daemon.agent, lambda: {}, port=0)
    http.start()
    try:
        say(f"$ curl -d '{{\"row\": {json.dumps(row)}}}' {http.url}/explain   "
            f"(on {device.device})")
        request = urllib.request.Request(f"{http.url}/explain",
                                         json.dumps({"row": row}).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    finally:
        http.stop()
    p = answer["prediction"]
    say(f"  prediction: fault={p['label']} (p={max(p['probabilities'].values()):.2f}); "
        f"{answer['score']} {answer['value']:.2f}; method {answer['method']}")
    for c in answer["contributions"]:
        say(f"  {c['feature']:<12} {c['contribution']:+.2f}  (value {c['value']}, baseline "
            f"{c['baseline']:.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exit", action="store_true",
                        help="stop when the story is told (default: keep serving until Ctrl-C)")
    parser.add_argument("--port", type=int, default=8000,
                        help="dashboard and API port (a free one if it is taken; 0: any)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # the story prints alerts itself
    logging.getLogger("fleet_server.monitoring.alerts").setLevel(logging.ERROR)
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")  # reproducible bundles
    np.seterr(all="ignore")
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "bundles").mkdir(parents=True)

    banner("1. package v1, v2 and a faulty v3 of a predictive-maintenance model")
    bundles = package(OUT)
    port = args.port
    if port:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                say(f"port {port} is in use: the dashboard takes a free port instead")
                port = 0
    demo = Demo(OUT, port)

    def interrupt(*_: object) -> None:
        # Ctrl-C or SIGTERM: unwind to the cleanup below, once; a second signal during the
        # cleanup is ignored so that every process still gets stopped
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    failed = None
    try:
        banner("2. start the fleet: Mosquitto, the fleet server, 20 agents")
        try:
            demo.start_fleet(bundles)
            story(demo, bundles)
            banner("done")
        except StoryFailed as exc:  # keep the fleet up: the dashboard and logs say why
            failed = str(exc)
            banner("the story stopped")
            say(f"demo: {failed}")
            say("the fleet is still up so you can look at why (dashboard, fleet CLI); "
                f"logs in {OUT}")
        say(f"dashboard: {demo.url}/  (sign in with the operator token in "
            f"{OUT / 'operator.token'})")
        say(f"CLI:       FLEET_SERVER={demo.url} FLEET_TOKEN=$(cat {OUT}/operator.token) "
            ".venv/bin/fleet rollout status")
        if not args.exit:
            say("the fleet keeps running; Ctrl-C stops everything")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        say("\ninterrupted")
    finally:
        say("stopping: agents, fleet server, broker ...")
        demo.stop()
        say("stopped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
