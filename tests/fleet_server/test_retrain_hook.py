"""``edgepack retrain --watch --listen HOST:PORT`` (issue 15): the fleet's HMAC-signed alert
webhook as a retraining trigger, over real HTTP.

The pure reader (:func:`packager.hook.read_alert`) checks the signature over the raw bytes
before it parses anything: a table of bad deliveries, each refused with its own type, and
a Hypothesis round-trip of what the server signs. The receiver (:class:`HookServer`)
answers on a real port: 401 with a JSON body for a bad signature, 413 past the body bound
(by ``Content-Length``, unread), 202 for a queued alert, 200 for a duplicate or one that is
not the recipe's. End to end, a real FleetServer's webhook sender, configured with the
same secret, delivers a new alert to a running watcher that would otherwise not poll for an
hour: it wakes and runs, once; a second alert inside the cooldown waits in the inbox.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.config import WebhookConfig
from packager.cli import main as edgepack
from packager.hook import (
    SIGNATURE_HEADER,
    AlertInbox,
    HookBodyError,
    HookError,
    HookServer,
    HookSignatureError,
    parse_listen,
    read_alert,
)
from tests.edge_agent.agent_helpers import wait_until
from tests.fleet_server.test_retrain_loop import _recipe

SECRET = b"hook-secret-4Kq"
ALERT = {"id": 7, "kind": "performance_drop", "bundle": "sensor@1.0.0", "group": "plant-a",
         "device": "", "state": "open", "message": "accuracy fell", "details": {}}


def body_of(alert: dict, kind: str = "edgefleet.alert") -> bytes:
    """What the fleet's webhook sends (fleet_server.monitoring.webhook)."""
    return json.dumps({"type": kind, "alert": alert, "sent": 1.0}, sort_keys=True).encode()


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


GOOD = body_of(ALERT)


@pytest.mark.parametrize(("body", "signature", "error", "field"), [
    (GOOD, None, HookSignatureError, ""),
    (GOOD, "", HookSignatureError, ""),
    (GOOD, "md5=" + "0" * 64, HookSignatureError, ""),
    (GOOD, "sha256=abc", HookSignatureError, ""),
    (GOOD, sign(GOOD, b"another-secret"), HookSignatureError, ""),
    (GOOD.replace(b"plant-a", b"plant-b"), sign(GOOD), HookSignatureError, ""),
    (b"{not json", sign(b"{not json"), HookBodyError, ""),
    (body_of(ALERT, "something.else"), sign(body_of(ALERT, "something.else")),
     HookBodyError, "type"),
    (b'{"type": "edgefleet.alert"}', sign(b'{"type": "edgefleet.alert"}'), HookBodyError,
     "alert"),
    (body_of({**ALERT, "id": True}), sign(body_of({**ALERT, "id": True})), HookBodyError,
     "alert.id"),
    (body_of({**ALERT, "id": "7"}), sign(body_of({**ALERT, "id": "7"})), HookBodyError,
     "alert.id"),
    (body_of({k: v for k, v in ALERT.items() if k != "kind"}),
     sign(body_of({k: v for k, v in ALERT.items() if k != "kind"})), HookBodyError,
     "alert.kind"),
    (body_of({**ALERT, "group": None}), sign(body_of({**ALERT, "group": None})),
     HookBodyError, "alert.group"),
], ids=["no-header", "empty", "md5", "short", "other-secret", "tampered", "not-json",
        "wrong-type", "no-alert", "id-bool", "id-text", "no-kind", "group-null"])
def test_a_bad_delivery_is_refused_by_its_own_type(body, signature, error, field) -> None:
    with pytest.raises(error) as err:
        read_alert(body, signature, SECRET)
    assert SIGNATURE_HEADER in str(err.value) if error is HookSignatureError else \
        err.value.field == field


@settings(max_examples=60, deadline=None)
@given(alert_id=st.integers(min_value=0, max_value=2**53), text=st.text(max_size=40),
       details=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8),
                               max_size=4))
def test_what_the_fleet_signs_reads_back(alert_id, text, details) -> None:
    alert = {**ALERT, "id": alert_id, "message": text, "group": text, "details": details}
    body = body_of(alert)
    assert read_alert(body, sign(body), SECRET) == alert
    assert read_alert(body, sign(body).upper().replace("SHA256=", "sha256="), SECRET) == alert


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9100", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(HookError):
            parse_listen(bad)


def test_the_inbox_dedupes_filters_and_is_bounded() -> None:
    inbox = AlertInbox(lambda a: None if a["group"] == "plant-a" else "another group",
                       max_pending=2, max_seen=3)
    assert inbox.offer(ALERT)[0] == "queued" and inbox.arrived.is_set()
    assert inbox.offer(ALERT)[0] == "duplicate"
    assert inbox.offer({**ALERT, "id": 8, "group": "plant-b"}) == ("ignored", "another group")
    assert inbox.offer({**ALERT, "id": 9})[0] == "queued"
    assert inbox.offer({**ALERT, "id": 10})[0] == "full"  # not remembered: sent again later
    assert [a["id"] for a in inbox.pending()] == [7, 9]
    inbox.done(7)
    assert inbox.offer({**ALERT, "id": 10})[0] == "queued"
    inbox.done(9)
    assert inbox.offer(ALERT)[0] == "queued"  # 7 fell out of the 3 ids remembered
    assert [a["id"] for a in inbox.pending()] == [10, 7]
    with pytest.raises(HookError):
        HookServer(("127.0.0.1", 0), b"", inbox)  # no secret, no receiver


@pytest.fixture
def receiver():
    inbox = AlertInbox(lambda a: None if a["bundle"].startswith("sensor@") else "not sensor")
    server = HookServer(("127.0.0.1", 0), SECRET, inbox, max_body=4096)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}/", inbox
    finally:
        server.stop()


def test_the_receiver_over_http(receiver) -> None:
    url, inbox = receiver
    with httpx.Client(timeout=10) as http:
        bad = http.post(url, content=GOOD, headers={SIGNATURE_HEADER: sign(GOOD, b"x")})
        assert bad.status_code == 401
        assert bad.json()["error"]["kind"] == "signature" and inbox.pending() == []
        unsigned = http.post(url, content=GOOD)
        assert unsigned.status_code == 401 and "missing" in unsigned.json()["error"]["message"]
        huge = b"x" * 5000
        big = http.post(url, content=huge, headers={SIGNATURE_HEADER: sign(huge)})
        assert big.status_code == 413 and big.json()["error"]["kind"] == "size"
        junk = b'{"type": "edgefleet.alert", "alert": []}'
        assert http.post(url, content=junk, headers={SIGNATURE_HEADER: sign(junk)}
                         ).status_code == 400
        ok = http.post(url, content=GOOD, headers={SIGNATURE_HEADER: sign(GOOD)})
        assert (ok.status_code, ok.json()["status"]) == (202, "queued")
        again = http.post(url, content=GOOD, headers={SIGNATURE_HEADER: sign(GOOD)})
        assert (again.status_code, again.json()["status"]) == (200, "duplicate")
        other = body_of({**ALERT, "id": 8, "bundle": "other@1.0.0"})
        ignored = http.post(url, content=other, headers={SIGNATURE_HEADER: sign(other)})
        assert (ignored.status_code, ignored.json()["status"]) == (200, "ignored")
        assert http.get(url).status_code == 405
    assert [a["id"] for a in inbox.pending()] == [7]


@pytest.mark.slow
def test_the_fleets_webhook_wakes_the_watcher_which_runs_once(
        server_factory, bundles, signing_keys, tmp_path) -> None:
    from packager.retrain import FleetApi, load_recipe
    from packager.watch import Watcher, WatchPolicy

    recipe = load_recipe(_recipe(tmp_path, signing_keys.build.private, "fit"))
    said: list[str] = []
    policy = WatchPolicy(poll_s=3600.0, cooldown_s=3600.0, max_per_day=4)
    hook = None
    api = None
    stop = threading.Event()
    thread = None
    try:
        inbox = AlertInbox()
        hook = HookServer(("127.0.0.1", 0), SECRET, inbox, say=said.append)
        hook.start()
        server = server_factory(http=True, webhook=WebhookConfig(
            url=f"http://127.0.0.1:{hook.port}/", secret=SECRET.decode(), backoff_s=0.01,
            backoff_max_s=0.05))
        s = server.services
        now = time.time()
        s.bundles.upload(bundles.build("1.0.0", model="inverted").read_bytes(), "t", now)
        for d in ("dev1", "dev2", "dev3"):
            s.registry.add_device(d, {"site": "a"}, "t", now)
            s.desired.assign(d, "sensor@1.0.0", actor="t", now=now)
        s.registry.create_group("plant-a", {"site": "a"}, "t", now)
        token = s.auth.create_token("ci", "operator", "t", now).secret
        api = FleetApi(server.base_url, token)
        watcher = Watcher(recipe, api, policy, work=tmp_path / "watch", say=said.append,
                          inbox=inbox)
        inbox.accepts = watcher.concerns
        ticks: list[object] = []
        tick = watcher.tick
        watcher.tick = lambda: ticks.append(tick()) or ticks[-1]  # type: ignore[method-assign]
        thread = threading.Thread(target=watcher.serve, args=(stop,), daemon=True)
        thread.start()
        wait_until(lambda: ticks, 30, "the first tick (nothing to do: then an hour's rest)")
        assert ticks == [None] and s.retrains.list() == []
        bundle = s.bundles.get("sensor", "1.0.0")
        alert = s.alerts.raise_alert("performance_drop", bundle, group="plant-a",
                                     message="accuracy fell", details={}, now=time.time())
        wait_until(lambda: [r for r in s.retrains.list() if r.status != "running"], 60,
                   "the pushed alert's run")  # the watcher polls only hourly
        [run] = s.retrains.list()
        assert (run.status, run.trigger) == ("promoted", f"alert:{alert.id}"), run.reason
        assert any(f"alert {alert.id} (performance_drop): queued" in x for x in said), said
        # another alert inside the cooldown: received, queued, waits; never a second run
        fresh = s.alerts.raise_alert("drift", s.bundles.get("sensor", "1.1.0"),
                                     group="plant-a", message="again", details={},
                                     now=time.time())
        wait_until(lambda: any("waits: cooldown" in x for x in said), 30,
                   "the second alert to wait out the cooldown")
        assert [a["id"] for a in inbox.pending()] == [fresh.id]
        assert len(s.retrains.list()) == 1
        # resolved while it waited: dropped from the inbox, never run
        stop.set()
        thread.join(10)
        assert not thread.is_alive()
        s.alerts.resolve_by_id(fresh.id, "t", time.time())
        assert tick() is None
        assert inbox.pending() == [] and len(s.retrains.list()) == 1
    finally:
        stop.set()
        if thread is not None:
            thread.join(10)
        if api is not None:
            api.close()
        if hook is not None:
            hook.stop()


def test_listen_needs_watch_and_a_secret(tmp_path, signing_keys, capsys) -> None:
    recipe = _recipe(tmp_path, signing_keys.build.private, "fit")
    assert edgepack(["retrain", str(recipe), "--server", "http://127.0.0.1:9",
                     "--listen", "127.0.0.1:0"]) == 2
    assert "--watch" in capsys.readouterr().err
    assert edgepack(["retrain", str(recipe), "--server", "http://127.0.0.1:9", "--watch",
                     "--listen", "127.0.0.1:0"]) != 0
    assert "webhook secret" in capsys.readouterr().err
