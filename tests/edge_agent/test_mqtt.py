"""The MQTT link against a real Mosquitto: delivery through outages and restarts, and the ACL.

Every test starts its own broker on a free port (``tests/broker.py``) and a second paho
client logged in as the ``server`` account that records what reaches the fleet side.
Delivery is judged the way the server judges it: by the set of distinct payloads
(duplicates are allowed, the server removes them on (device, sequence)); loss is not.

Outbox files live on tmpfs when there is one: these tests are about the link, and an
fsync per put and per ack would only make them slower.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.mqtt import LinkConfig, MqttError, MqttLink
from edge_agent.outbox import Outbox
from tests.broker import SERVER_USER, Mosquitto

pytestmark = pytest.mark.slow

PASSWORDS = {"dev1": "pw-dev1-Xq", "dev2": "pw-dev2-Zr", SERVER_USER: "pw-server-Kt"}
FAST = {"reconnect_min_delay": 0.1, "reconnect_max_delay": 0.5}


def topic(device: str, kind: str) -> str:
    return f"edgefleet/v1/{device}/{kind}"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class Subscriber:
    """The fleet server's side: a paho client as ``server`` recording every message.

    With ``session=True`` it keeps a persistent MQTT 5 session, so a broker with
    persistence queues messages for it while it is reconnecting after a broker restart.
    """

    def __init__(
        self, broker: Mosquitto, pattern: str = "edgefleet/v1/+/#", *, session: bool = False
    ) -> None:
        self.pattern = pattern
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="fleet-ingest",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(SERVER_USER, PASSWORDS[SERVER_USER])
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        props = None
        if session:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=not session, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(5), "subscriber did not subscribe"

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if not reason.is_failure:
            client.subscribe(self.pattern, qos=1)

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), message.retain))

    def payloads(self, on_topic: str | None = None) -> set[bytes]:
        with self._lock:
            return {p for t, p, _ in self.messages if on_topic is None or t == on_topic}

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    fast = "/dev/shm" if Path("/dev/shm").is_dir() else None
    path = Path(tempfile.mkdtemp(prefix="edgefleet-mqtt-", dir=fast))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _broker(request, persistence: bool) -> Mosquitto:
    broker = Mosquitto(persistence=persistence)
    request.addfinalizer(broker.cleanup)
    for user, password in PASSWORDS.items():
        broker.add_user(user, password)
    broker.start()
    return broker


@pytest.fixture
def broker(request) -> Mosquitto:
    return _broker(request, persistence=False)


@pytest.fixture
def persistent_broker(request) -> Mosquitto:
    return _broker(request, persistence=True)


@pytest.fixture
def make_subscriber(request) -> Callable[..., Subscriber]:
    def make(broker: Mosquitto, *args, **kwargs) -> Subscriber:
        sub = Subscriber(broker, *args, **kwargs)
        request.addfinalizer(sub.stop)
        return sub

    return make


@pytest.fixture
def make_outbox(request, workdir) -> Callable[..., Outbox]:
    def make(name: str = "outbox.db", **kwargs) -> Outbox:
        box = Outbox(workdir / name, **kwargs)
        request.addfinalizer(box.close)
        return box

    return make


@pytest.fixture
def make_link(request) -> Callable[..., MqttLink]:
    def make(
        broker: Mosquitto,
        outbox: Outbox,
        device: str = "dev1",
        *,
        password: str | None = None,
        on_message=None,
        subscriptions=(),
        link: dict | None = None,
        **kwargs,
    ) -> MqttLink:
        config = LinkConfig(
            host=broker.host,
            port=broker.port,
            client_id=f"{device}-agent",
            username=device,
            password=PASSWORDS[device] if password is None else password,
            subscriptions=tuple(subscriptions),
            will_topic=topic(device, "status"),
            will_payload=b"offline",
            **{**FAST, **(link or {})},
        )
        link = MqttLink(config, outbox, on_message or (lambda t, p: None), **kwargs)
        request.addfinalizer(link.stop)
        return link

    return make


def put_many(outbox: Outbox, device: str, start: int, count: int, pause: float = 0.0) -> None:
    for seq in range(start, start + count):
        outbox.put(topic(device, "summary"), f"{device}:{seq}".encode())
        if pause:
            time.sleep(pause)


def expected(device: str, start: int, count: int) -> set[bytes]:
    return {f"{device}:{seq}".encode() for seq in range(start, start + count)}


def test_500_messages_arrive_and_the_outbox_drains(broker, make_subscriber, make_outbox, make_link):
    sub = make_subscriber(broker)
    outbox = make_outbox()
    link = make_link(broker, outbox)
    link.start()
    put_many(outbox, "dev1", 0, 500)
    assert link.flush(20), f"outbox still holds {outbox.depth}"
    want = expected("dev1", 0, 500)
    wait_until(lambda: sub.payloads() >= want, 10, "all 500 at the subscriber")
    assert sub.payloads() == want
    assert outbox.depth == 0 and outbox.dropped == 0
    assert link.published >= 500 and link.rejected == 0
    assert link.inflight == 0


def test_nothing_is_published_before_connecting_and_the_backlog_drains(
    broker, make_subscriber, make_outbox, make_link
):
    sub = make_subscriber(broker)
    outbox = make_outbox()
    put_many(outbox, "dev1", 0, 50)  # offline backlog from before the agent started
    link = make_link(broker, outbox, max_inflight=3)
    link.start()
    assert link.flush(10)
    wait_until(lambda: sub.payloads() == expected("dev1", 0, 50), 5, "the backlog")


def test_broker_restart_while_publishing_loses_nothing(
    persistent_broker, make_subscriber, make_outbox, make_link
):
    broker = persistent_broker
    sub = make_subscriber(broker, session=True)
    outbox = make_outbox()
    link = make_link(broker, outbox)
    link.start()
    wait_until(lambda: link.connected, 5, "the link to connect")

    total = 400
    producer = threading.Thread(target=put_many, args=(outbox, "dev1", 0, total, 0.004))
    producer.start()
    try:
        wait_until(lambda: len(sub.payloads()) >= 60, 10, "the first messages")
        broker.stop()
        wait_until(lambda: not link.connected, 5, "the link to notice the outage")
        depth_at_outage = outbox.depth
        time.sleep(0.4)  # the producer keeps putting while the broker is down
        assert outbox.depth > depth_at_outage, "messages put during the outage are kept"
        assert not link.connected
        broker.start()  # same port, same config, state reloaded from its persistence file
    finally:
        producer.join()
    assert link.flush(20), f"outbox still holds {outbox.depth}"
    want = expected("dev1", 0, total)
    summaries = topic("dev1", "summary")
    wait_until(
        lambda: sub.payloads(summaries) >= want,
        15,
        f"all {total} at the subscriber (missing {len(want - sub.payloads())})",
    )
    assert sub.payloads(summaries) == want
    assert outbox.depth == 0 and outbox.dropped == 0


def test_agent_restart_mid_stream_loses_nothing(broker, make_subscriber, workdir, make_link):
    sub = make_subscriber(broker)
    path = workdir / "outbox.db"
    outbox = Outbox(path)
    link = make_link(broker, outbox, max_inflight=10)
    link.start()
    put_many(outbox, "dev1", 0, 300)
    wait_until(lambda: len(sub.payloads()) >= 30, 10, "the first messages")
    link.stop()  # mid-stream: most of the 300 are still in the outbox
    outbox.close()
    summaries = topic("dev1", "summary")
    assert len(sub.payloads(summaries)) < 300, "the stop came too late to test anything"
    # a clean stop sends DISCONNECT: the broker never publishes the last will. Checked
    # before the second link connects: a new connection under the same client id is a
    # session takeover, and if the broker reads its CONNECT before the old socket's
    # DISCONNECT it publishes the old connection's will (seen once on a loaded CI machine).
    time.sleep(0.3)
    assert sub.payloads(topic("dev1", "status")) == set()

    reopened = Outbox(path)  # a new process over the same file
    try:
        assert reopened.depth > 0
        put_many(reopened, "dev1", 300, 20)
        link2 = make_link(broker, reopened, max_inflight=10)
        link2.start()
        assert link2.flush(20), f"outbox still holds {reopened.depth}"
        want = expected("dev1", 0, 320)
        wait_until(lambda: sub.payloads(summaries) >= want, 10, "all 320 at the subscriber")
        assert sub.payloads(summaries) == want
    finally:
        link2.stop()
        reopened.close()


def test_a_device_cannot_publish_as_another(broker, make_subscriber, make_outbox, make_link):
    sub = make_subscriber(broker)
    outbox = make_outbox()
    link = make_link(broker, outbox)
    link.start()
    outbox.put(topic("dev2", "summary"), b"spoofed by dev1")
    outbox.put(topic("dev1", "desired"), b"dev1 writing its own desired state")
    outbox.put(topic("dev1", "summary"), b"honest")
    assert link.flush(10)
    wait_until(lambda: b"honest" in sub.payloads(), 10, "dev1's own message")
    time.sleep(0.2)
    assert sub.payloads(topic("dev1", "summary")) == {b"honest"}
    assert sub.payloads(topic("dev2", "summary")) == set()
    assert sub.payloads(topic("dev1", "desired")) == set()
    # Mosquitto answers PUBACK 0x87 and closes the connection, which also fires the
    # device's last will; the link drops the message (retrying cannot succeed), counts it
    # once and reconnects
    assert sub.payloads(topic("dev1", "status")) <= {b"offline"}
    assert link.rejected == 2
    assert outbox.depth == 0
    wait_until(lambda: link.connected, 5, "the link to reconnect")


@pytest.mark.parametrize("kind", ["desired", "ack"])
def test_a_device_reads_only_its_own_desired_state(broker, make_subscriber, make_outbox, make_link,
                                                   kind):
    server = make_subscriber(broker, pattern="edgefleet/v1/+/status")
    # desired state (and the server's acknowledgement) is retained: published before the
    # devices connect, read on subscribe
    server.client.publish(topic("dev1", kind), b"bundle-for-dev1", qos=1, retain=True)
    server.client.publish(topic("dev2", kind), b"bundle-for-dev2", qos=1, retain=True)
    got: dict[str, list[tuple[str, bytes]]] = {"dev1": [], "dev2": []}
    links = {}
    for device in ("dev1", "dev2"):
        links[device] = make_link(
            broker,
            make_outbox(f"{device}.db"),
            device,
            subscriptions=(topic("dev1", kind), topic("dev2", kind)),
            on_message=lambda t, p, device=device: got[device].append((t, p)),
        )
        links[device].start()
    wait_until(lambda: got["dev1"] and got["dev2"], 10, "each device's desired state")
    time.sleep(0.3)  # time for a wrongly delivered message to show up
    assert got["dev1"] == [(topic("dev1", kind), b"bundle-for-dev1")]
    assert got["dev2"] == [(topic("dev2", kind), b"bundle-for-dev2")]


def test_on_message_errors_do_not_stop_the_link(
    broker, make_subscriber, make_outbox, make_link, caplog
):
    server = make_subscriber(broker, pattern="edgefleet/v1/+/status")
    seen: list[bytes] = []

    def on_message(t: str, payload: bytes) -> None:
        seen.append(payload)
        if payload == b"boom":
            raise RuntimeError("handler bug")

    outbox = make_outbox()
    link = make_link(
        broker, outbox, subscriptions=(topic("dev1", "desired"),), on_message=on_message
    )
    link.start()
    wait_until(lambda: link.connected, 5, "the link to connect")
    time.sleep(0.1)  # the SUBACK
    with caplog.at_level(logging.ERROR, logger="edge_agent.mqtt"):
        server.client.publish(topic("dev1", "desired"), b"boom", qos=1)
        server.client.publish(topic("dev1", "desired"), b"after", qos=1)
        wait_until(lambda: b"after" in seen, 5, "the message after the failing one")
    assert seen == [b"boom", b"after"]
    assert "handler bug" in caplog.text
    outbox.put(topic("dev1", "summary"), b"still publishing")
    assert link.flush(5)


def test_on_connect_publishes_retained_status(broker, make_subscriber, make_outbox, make_link):
    outbox = make_outbox()
    holder: list[MqttLink] = []
    link = make_link(
        broker,
        outbox,
        on_connect=lambda: holder[0].publish_retained(topic("dev1", "status"), b"online"),
    )
    holder.append(link)
    link.start()
    wait_until(lambda: link.connected, 5, "the link to connect")
    time.sleep(0.2)
    late = make_subscriber(broker, pattern="edgefleet/v1/+/status")  # joins afterwards
    wait_until(lambda: late.messages, 5, "the retained status")
    assert late.messages == [(topic("dev1", "status"), b"online", True)]
    with pytest.raises(MqttError):
        link.publish_retained("edgefleet/v1/+/status", b"x")


def test_wrong_password_is_not_connected_and_not_logged(broker, make_outbox, make_link, caplog):
    outbox = make_outbox()
    secret = "not-the-password-0451"
    link = make_link(broker, outbox, password=secret)
    assert secret not in repr(link.config)
    with caplog.at_level(logging.DEBUG):
        link.start()
        outbox.put(topic("dev1", "summary"), b"waits")
        time.sleep(1.0)  # several refused attempts at the test's back-off
        assert not link.connected
        assert outbox.depth == 1
        link.stop()
    assert "refused" in caplog.text
    assert secret not in caplog.text
    assert outbox.depth == 1  # kept for a link with the right password


# -- end-to-end delivery: a PUBACK is flow control, the server's confirmation is delivery ----


def put_numbered(outbox: Outbox, device: str, count: int) -> None:
    for _ in range(count):
        outbox.put_numbered(topic(device, "summary"), lambda seq: f"{device}:{seq}".encode(),
                            "summary")


def test_numbered_rows_stay_until_the_server_confirms_them(
    broker, make_subscriber, make_outbox, make_link
):
    sub = make_subscriber(broker)
    outbox = make_outbox()
    link = make_link(broker, outbox, link={"confirm_timeout": 3600})
    link.start()
    put_numbered(outbox, "dev1", 10)
    wait_until(lambda: sub.payloads() == expected("dev1", 1, 10), 10, "all 10 at the broker")
    wait_until(lambda: link.unconfirmed == 10, 10, "10 PUBACKs")
    assert outbox.depth == 10, "a PUBACK removed a numbered row"
    assert link.flush(1)  # everything is with the broker, waiting for the server
    link.confirm("summary", 6)
    wait_until(lambda: outbox.depth == 4, 10, "rows 1-6 to leave")
    assert [i.seq for i in outbox.pending()] == [7, 8, 9, 10]
    link.confirm("summary", 10)
    wait_until(lambda: outbox.depth == 0, 10, "the rest to leave")
    assert link.confirmed == 10 and link.unconfirmed == 0 and link.resent == 0


def test_unconfirmed_rows_are_sent_again_after_the_timeout(
    broker, make_subscriber, make_outbox, make_link
):
    sub = make_subscriber(broker)
    outbox = make_outbox()
    link = make_link(broker, outbox, link={"confirm_timeout": 0.3})
    link.start()
    put_numbered(outbox, "dev1", 3)

    def copies() -> int:
        with sub._lock:
            return sum(t == topic("dev1", "summary") for t, _, _ in sub.messages)

    wait_until(lambda: copies() >= 6, 20, "each row sent a second time")
    assert link.resent >= 3 and outbox.depth == 3
    assert sub.payloads() == expected("dev1", 1, 3)  # copies, nothing new
    link.confirm("summary", 3)
    wait_until(lambda: outbox.depth == 0, 10, "the confirmed rows to leave")


def test_at_most_max_unconfirmed_rows_wait_for_the_server(
    broker, make_subscriber, make_outbox, make_link
):
    """A server away for hours must not make the agent pour its whole outbox into the
    broker's queue for it."""
    sub = make_subscriber(broker)
    outbox = make_outbox()
    link = make_link(broker, outbox, link={"confirm_timeout": 3600, "max_unconfirmed": 5})
    link.start()
    put_numbered(outbox, "dev1", 12)
    wait_until(lambda: link.unconfirmed == 5, 10, "5 rows with the broker")
    time.sleep(0.5)  # time for a sixth to go out wrongly
    assert sub.payloads() == expected("dev1", 1, 5)
    link.confirm("summary", 5)
    wait_until(lambda: sub.payloads() == expected("dev1", 1, 10), 10, "the next 5")
    link.confirm("summary", 10)
    wait_until(lambda: sub.payloads() == expected("dev1", 1, 12), 10, "the last 2")
    link.confirm("summary", 12)
    wait_until(lambda: outbox.depth == 0, 10, "everything confirmed")
