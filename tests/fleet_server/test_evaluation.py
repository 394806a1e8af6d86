"""Periodic drift evaluation, alerts and the webhook, over a real store and a real HTTP hook.

Summaries go through the real ingest rules (``Ingestor.process``) without a broker: the
broker path is covered in test_ingest; here the subject is what happens per window.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgefleet.contract.messages import encode, topic
from fleet_server.config import DriftConfig, WebhookConfig
from fleet_server.models import FLEET_SCOPE
from fleet_server.monitoring.alerts import Alerts
from fleet_server.monitoring.drift import DriftService
from fleet_server.monitoring.evaluator import Evaluator
from fleet_server.monitoring.webhook import Webhook
from fleet_server.profiles.drift import Thresholds
from fleet_server.telemetry.link import Incoming
from tests.fleet_server.conftest import profile_of, summary_of

W = 60
T0 = 1_800_000_000 // 3600 * 3600  # an hour boundary, far from the real clock


def feed(services, device: str, seq: int, start: float, rows: int = 400,
         shift: dict | None = None) -> None:
    ref = services.bundles.reference(1)
    msg = summary_of(device, seq, profile_of(ref.spec, rows, seq * 31 + int(device[3:]), shift,
                                             ref.base), start, start + W)
    result = services.ingestor.process(
        [Incoming(topic(device, "summary"), encode(msg), 1, 1, 1, start + W)], now=start + W)
    assert result.stored["summary"] == 1, dict(result.dead)


@pytest.fixture
def fleet(services, sensor_bundle):
    s = services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", T0)
    for d, site in (("dev1", "a"), ("dev2", "a"), ("dev3", "a"), ("dev4", "b")):
        s.registry.add_device(d, {"site": site}, "test", T0)
    s.registry.create_group("plant-a", {"site": "a"}, "test", T0,
                            important_features=["vibration", "no-such-feature"])
    return s


def evaluator(services, alerts=None, **drift) -> Evaluator:
    return Evaluator(services.store, services.bundles, services.registry,
                     alerts or services.alerts, DriftConfig(window_s=W, lateness_s=0, **drift),
                     services.config.ingest_config, clock=time.time)


def test_persistent_drift_opens_one_alert_and_ok_resolves_it(fleet):
    s = fleet
    ev = evaluator(s)
    shift = {"temperature": 15.0, "humidity": 25.0, "current": 3.0}
    for k in range(3):  # windows 0, 1, 2: plant-a drifts; dev4 (site b) does not
        for d in ("dev1", "dev2", "dev3"):
            feed(s, d, k, T0 + k * W, shift=shift)
        feed(s, "dev4", k, T0 + k * W)
    first = ev.evaluate(T0 + W)  # window 0 is complete
    assert {(w.scope, w.window_start) for w in first} >= {(FLEET_SCOPE, T0), ("plant-a", T0)}
    assert s.store.list_alerts(kind="drift") == []  # one drifted window is not persistence
    ev.evaluate(T0 + 2 * W)  # two of the last three: persistent (3 of 4 devices drift)
    opened = s.store.list_alerts(kind="drift", state="open")
    assert sorted(a.group for a in opened) == [FLEET_SCOPE, "plant-a"]
    ev.evaluate(T0 + 3 * W)  # still drifting: the same alerts, no new ones
    assert sorted(a.id for a in s.store.list_alerts(kind="drift")) == sorted(a.id for a in opened)
    assert opened[0].details["windows"] == ["drift", "drift"]
    windows = s.store.list_windows(1, "plant-a")
    assert [w.verdict for w in windows] == ["drift"] * 3
    assert windows[0].devices == 3 and windows[0].rows == 1200
    assert windows[0].features["temperature"]["verdict"] == "drift"
    # evaluating again does not judge a window twice
    assert ev.evaluate(T0 + 3 * W) == []
    # drift clears: two ok windows later the persistent verdict is ok and the alert resolves
    for k in range(3, 6):
        for d in ("dev1", "dev2", "dev3", "dev4"):
            feed(s, d, k, T0 + k * W)
    for k in range(4, 7):
        ev.evaluate(T0 + k * W)
    assert not [a for a in s.store.list_alerts(kind="drift", state="open")
                if a.group == "plant-a"]
    assert s.metrics.value("edgefleet_alerts_raised_total", {"kind": "drift"}) >= 1


def test_a_device_that_drifts_alone_is_a_suspect_sensor(fleet):
    s = fleet
    ev = evaluator(s)
    crowd = [f"dev{i}" for i in range(5, 13)]
    for d in crowd:
        s.registry.add_device(d, {"site": "a"}, "test", T0)
    everyone = ["dev1", "dev2", "dev3", "dev4", *crowd]
    for d in everyone:  # dev3's vibration reads 0.6 high: alone, diluted among 11
        feed(s, d, 0, T0, shift={"vibration": 0.6} if d == "dev3" else None)
    ev.evaluate(T0 + W)
    suspects = s.store.list_alerts(kind="suspect_sensor", state="open")
    assert {(a.device, a.group) for a in suspects} == {("dev3", "plant-a"), ("dev3", FLEET_SCOPE)}
    assert suspects[0].details["features"] == ["vibration"]
    # the on-demand device report says the same
    result = s.drift.report("sensor@1.0.0", device="dev3", group="plant-a", since=T0,
                            until=T0 + W, now=T0 + W)
    assert result.suspect == ("vibration",) and result.compared_with == "group:plant-a"
    # next window dev3 is fine again: resolved
    for d in everyone:
        feed(s, d, 1, T0 + W)
    ev.evaluate(T0 + 2 * W)
    assert s.store.list_alerts(kind="suspect_sensor", state="open") == []


def test_an_important_feature_drifting_makes_the_group_drift(fleet):
    s = fleet
    for d in ("dev1", "dev2", "dev3"):
        feed(s, d, 0, T0, shift={"vibration": 9.0})
    result = s.drift.report("sensor@1.0.0", group="plant-a", since=T0, until=T0 + W, now=T0)
    assert result.report.important == ("vibration",)  # the unknown name is ignored
    assert result.report.verdict == "drift"
    assert result.report.feature("vibration").verdict == "drift"


def test_the_series_is_one_report_per_step(fleet):
    s = fleet
    for k in range(4):
        for d in ("dev1", "dev4"):
            feed(s, d, k, T0 + k * W, shift={"temperature": 10.0 * (k >= 2)})
    series = s.drift.series("sensor@1.0.0", since=T0, until=T0 + 4 * W, step=W, now=T0)
    assert series.starts == tuple(T0 + k * W for k in range(4))
    assert series.rows == (800, 800, 800, 800)
    for k in range(4):
        one = s.drift.report("sensor@1.0.0", since=T0 + k * W, until=T0 + (k + 1) * W, now=T0)
        f = one.report.feature("temperature")
        assert series.features["temperature"]["psi"][k] == pytest.approx(f.stats["psi"])
        assert series.features["temperature"]["verdict"][k] == f.verdict
    assert series.features["temperature"]["verdict"][3] == "drift"


# -- the webhook, against a real HTTP receiver -----------------------------------------------


class Receiver:
    """A local HTTP server answering with the given statuses, in turn (then 200)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[tuple[dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bodies.append((json.loads(body), dict(self.headers)))
                outer.raw = body
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(statuses: list[int]) -> Receiver:
        r = Receiver(statuses)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _hooked(services, url: str, **kw) -> tuple[Webhook, Alerts]:
    hook = Webhook(WebhookConfig(url=url, backoff_s=0.01, backoff_max_s=0.05, **kw),
                   services.store, services.metrics)
    hook.start()
    return hook, Alerts(services.store, services.metrics, hook)


def _raise(alerts: Alerts, services, device: str = ""):
    bundle = services.bundles.get("sensor", "1.0.0")
    return alerts.raise_alert("drift", bundle, group="plant-a", device=device, message="m",
                              details={"x": 1}, now=T0)


def test_the_webhook_retries_with_backoff_and_signs_its_body(fleet, receiver, caplog):
    caplog.set_level(logging.INFO, logger="fleet_server.monitoring")
    r = receiver([503, 500])
    hook, alerts = _hooked(fleet, r.url, secret="s3cret")
    try:
        alert = _raise(alerts, fleet)
        assert hook.wait_idle(10)
    finally:
        hook.stop()
    got = fleet.alerts.get(alert.id)
    assert (got.webhook, got.attempts) == ("delivered", 3)
    assert [a["status"] for a in fleet.store.list_attempts(alert.id)] == [503, 500, 200]
    body, headers = r.bodies[-1]
    assert body["type"] == "edgefleet.alert" and body["alert"]["id"] == alert.id
    want = hmac.new(b"s3cret", r.raw, hashlib.sha256).hexdigest()
    assert headers["X-Edgefleet-Signature"] == f"sha256={want}"
    assert fleet.metrics.value("edgefleet_webhook_failures_total") == 2
    # an operator reading `fleet serve`'s log (INFO by default) sees the alert and its delivery
    logged = [r.getMessage() for r in caplog.records]
    assert f"alert {alert.id} (drift): m" in logged
    assert f"webhook delivered alert {alert.id} (drift) on attempt 3: HTTP 200" in logged


@pytest.mark.parametrize(("statuses", "attempts"), [([400], 1), ([503] * 10, 3)],
                         ids=["final-4xx", "retries-run-out"])
def test_the_webhook_gives_up(fleet, receiver, statuses, attempts):
    r = receiver(statuses)
    hook, alerts = _hooked(fleet, r.url, max_attempts=3)
    try:
        alert = _raise(alerts, fleet)
        assert hook.wait_idle(10)
    finally:
        hook.stop()
    got = fleet.alerts.get(alert.id)
    assert (got.webhook, got.attempts) == ("failed", attempts)


def test_an_unreachable_webhook_never_blocks_the_caller(fleet, receiver):
    r = receiver([])
    dead_url = r.url
    r.close()  # nothing listens there any more
    hook, alerts = _hooked(fleet, dead_url, max_attempts=2, timeout_s=0.5)
    try:
        started = time.monotonic()
        alert = _raise(alerts, fleet)
        assert time.monotonic() - started < 0.2  # raising only queues
        assert hook.wait_idle(10)
    finally:
        hook.stop()
    got = fleet.alerts.get(alert.id)
    assert (got.webhook, got.attempts) == ("failed", 2)
    assert "ConnectError" in fleet.store.list_attempts(alert.id)[0]["error"]


def test_thresholds_are_the_evaluators(fleet):
    """A stricter threshold set judges the same data otherwise: the config is used."""
    s = fleet
    for d in ("dev1", "dev2", "dev3", "dev4"):
        feed(s, d, 0, T0, shift={"temperature": 2.0})
    lenient = s.drift.report("sensor@1.0.0", since=T0, until=T0 + W, now=T0)
    strict_service = DriftService(s.store, s.bundles, s.registry, DriftConfig(
        thresholds=Thresholds(psi_warn=0.001, psi_drift=0.002, ks_drift=0.001,
                              wasserstein_drift=0.001)), s.drift.levels)
    strict = strict_service.report("sensor@1.0.0", since=T0, until=T0 + W, now=T0)
    assert strict.report.feature("temperature").verdict == "drift"
    assert lenient.report.feature("temperature").stats["psi"] == pytest.approx(
        strict.report.feature("temperature").stats["psi"])
