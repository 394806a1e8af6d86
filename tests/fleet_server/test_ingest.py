"""Ingest against a real Mosquitto: devices publish through the agent's own outbox and link.

What is asserted is what the store holds afterwards (rows, registry, dead letters) and
what the metrics say, never that a function was called.
"""

from __future__ import annotations

import json
import logging
import random
import time
import zlib
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.contract.messages import BundleRef, Heartbeat, Status, encode, topic
from fleet_server.store import FOLDED
from fleet_server.telemetry.link import Incoming
from tests.fleet_server.conftest import profile_of, summary_of, wait_until

pytestmark = pytest.mark.slow


def test_device_messages_are_stored_and_keep_the_registry(broker, devices, server_factory,
                                                          sensor_bundle, sensor_ref):
    server = server_factory(broker)
    s = server.services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    spec, _ = sensor_ref
    dev = devices("dev1")
    dev.online({"site": "plant-a", "line": "3"}, BundleRef("sensor", "1.0.0"))
    now = time.time()
    for seq in range(3):
        dev.send(summary_of("dev1", seq, profile_of(spec, 50, seq), now - 180 + 60 * seq,
                            now - 120 + 60 * seq))
    dev.heartbeat(predictions=150, errors=2)
    dev.report(seq=100, revision=1, outcome="installed")
    dev.flush()
    wait_until(lambda: s.store.count_summaries() == 3 and s.store.list_reports("dev1"), 10,
               "summaries and the report")
    wait_until(lambda: (s.store.get_device("dev1").health or {}).get("predictions") == 150)
    d = s.store.get_device("dev1")
    assert d.online and d.labels == {"site": "plant-a", "line": "3"}
    assert d.bundle == BundleRef("sensor", "1.0.0") and d.agent_version == "0.1.0"
    assert d.summaries == 3 and d.health["errors"] == 2 and d.health["latency_p95_ms"] == 4.0
    assert d.last_seen is not None and d.last_seen >= now - 5
    assert all(x.folded for x in s.store.list_summaries(device="dev1"))
    (rep,) = s.store.list_reports("dev1")
    assert (rep.seq, rep.revision, rep.outcome) == (100, 1, "installed")
    m = s.metrics
    assert m.value("edgefleet_messages_ingested_total", {"type": "summary"}) == 3
    assert m.value("edgefleet_ingest_lag_seconds_count") == 3
    assert m.value("edgefleet_devices_online") == 1


def test_a_repeated_sequence_number_is_stored_once(broker, devices, server_factory,
                                                   sensor_bundle, sensor_ref):
    server = server_factory(broker)
    s = server.services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    spec, _ = sensor_ref
    dev = devices("dev1")
    dev.online()
    now = time.time()
    first = profile_of(spec, 40, 1)
    dev.send(summary_of("dev1", 7, first, now - 60, now))
    dev.send(summary_of("dev1", 7, first, now - 60, now))  # the outbox re-sent it
    dev.send(summary_of("dev1", 7, profile_of(spec, 99, 2), now - 60, now))  # even if altered
    dev.send(summary_of("dev1", 8, first, now - 60, now))
    dev.report(seq=1, revision=1, outcome="failed")
    dev.report(seq=1, revision=1, outcome="failed")
    dev.flush()
    wait_until(lambda: s.metrics.value("edgefleet_duplicates_total", {"type": "summary"}) == 2
               and s.metrics.value("edgefleet_duplicates_total", {"type": "report"}) == 1, 10,
               "the duplicates")
    assert s.store.count_summaries() == 2
    merged, _, _ = s.drift.merged(s.bundles.reference(1), s.drift.scope(), int(now) - 3600,
                                  int(now) + 3600)
    assert merged.summaries == 2 and merged.rows == 80  # the first 40-row profile, twice
    assert len(s.store.list_reports("dev1")) == 1


def test_the_last_will_marks_a_device_offline(broker, devices, server_factory):
    server = server_factory(broker)
    store = server.services.store
    dev = devices("dev2")
    dev.online({"site": "b"})
    wait_until(lambda: store.get_device("dev2") is not None and store.get_device("dev2").online,
               10, "dev2 online")
    dev.crash()
    wait_until(lambda: not store.get_device("dev2").online, 10, "the last will")
    assert server.services.metrics.value("edgefleet_devices_online") == 0


def test_a_summary_from_a_wrong_clock_or_reference_is_refused(broker, devices, server_factory,
                                                               sensor_bundle, sensor_ref,
                                                               bundles):
    server = server_factory(broker)
    s = server.services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    spec, _ = sensor_ref
    dev = devices("dev1")
    now = time.time()
    future = summary_of("dev1", 1, profile_of(spec, 10, 1), now + 5 * 86400, now + 5 * 86400 + 60)
    wire = summary_of("dev1", 2, profile_of(spec, 10, 2), now - 60, now)
    forged = type(wire)(**{**wire.__dict__, "profile": {**wire.profile,
                                                         "reference_hash": "ab" * 32}})
    dev.send(future)
    dev.send(forged)
    dev.flush()
    wait_until(lambda: s.store.count_dead_letters() == 2, 10, "two dead letters")
    reasons = [d.reason for d in s.store.list_dead_letters()]
    assert any("in the future" in r for r in reasons), reasons
    assert any("is not the reference of sensor@1.0.0" in r for r in reasons), reasons
    assert s.store.count_summaries() == 0


# -- malformed and fuzzed payloads ----------------------------------------------------------


def _valid(spec, device: str, seq: int) -> bytes:
    now = time.time()
    return encode(summary_of(device, seq, profile_of(spec, 5, seq), now - 60, now))


def _mutations(data: bytes, rnd: random.Random) -> bytes:
    raw = bytearray(zlib.decompress(data))
    for _ in range(rnd.randint(1, 4)):
        i = rnd.randrange(len(raw))
        raw[i] = rnd.randrange(256)
    out = bytes(raw)
    return zlib.compress(out) if rnd.random() < 0.7 else out


KINDS = ("summary", "heartbeat", "status", "report")


def _accounted(s) -> float:
    """Messages the server has stored, found duplicate, or dead-lettered."""
    m = s.metrics
    return s.store.count_dead_letters() + sum(
        m.value("edgefleet_messages_ingested_total", {"type": k})
        + m.value("edgefleet_duplicates_total", {"type": k}) for k in KINDS)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(junk=st.lists(st.binary(max_size=300), min_size=1, max_size=15), seed=st.integers(0, 999))
def test_fuzzed_payloads_never_stop_ingest(junk, seed, fuzz_rig):
    """Random bytes and mutated valid summaries: each is stored or dead-lettered, none
    lost, and a good message sent after them still lands."""
    device, server, spec = fuzz_rig
    s = server.services
    rnd = random.Random(seed)
    before_dead, before = s.store.count_dead_letters(), _accounted(s)
    for p in junk:
        device.send_raw(rnd.choice(KINDS), p)
    for i in range(5):
        device.send_raw("summary", _mutations(_valid(spec, "dev3", 10_000 + i), rnd))
    sentinel = int(time.time() * 1000)
    device.send_raw("summary", _valid(spec, "dev3", sentinel))
    device.flush()
    wait_until(lambda: _accounted(s) - before == len(junk) + 6, 10, "every message accounted")
    assert any(x.seq == sentinel for x in s.store.list_summaries(device="dev3", limit=1000))
    assert s.store.count_dead_letters() - before_dead >= len(junk)  # junk is never valid
    assert server.worker is not None and server.worker._thread.is_alive()


@pytest.fixture(scope="module")
def fuzz_rig(tmp_path_factory, signing_keys, bundles):
    """One broker, server and device for all the fuzz examples (module-scoped: fast)."""
    from edgefleet.contract.bundle import read_unverified
    from edgefleet.contract.profile import parse_reference
    from fleet_server.server import FleetServer
    from tests.broker import SERVER_USER, Mosquitto
    from tests.fleet_server.conftest import PASSWORDS, SERVER_PASSWORD, FakeDevice, make_config

    tmp = tmp_path_factory.mktemp("fuzz")
    broker = Mosquitto()
    broker.add_user(SERVER_USER, SERVER_PASSWORD)
    broker.add_user("dev3", PASSWORDS["dev3"])
    broker.start()
    server = FleetServer(make_config(tmp, signing_keys, broker=broker))
    server.start()
    device = None
    try:
        wait_until(lambda: server.link.connected, 10, "the server")
        path = bundles.build("1.0.0")
        server.services.bundles.upload(path.read_bytes(), "test", time.time())
        spec, _ = parse_reference(read_unverified(path.read_bytes()).member("reference.json"))
        device = FakeDevice(broker, tmp, "dev3")
        yield device, server, spec
    finally:
        if device is not None:
            device.stop()
        server.stop()
        broker.cleanup()


_topics = st.one_of(st.text(max_size=80), st.sampled_from([
    "edgefleet/v1/dev1/summary", "edgefleet/v1/dev1/desired", "edgefleet/v1/../summary",
    "edgefleet/v1/dev1/summary/extra", "other/topic"]))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(items=st.lists(st.tuples(_topics, st.binary(max_size=200)), max_size=10))
def test_any_batch_is_stored_or_dead_lettered(items, services):
    """The ingest rules straight, without the broker: nothing raises, nothing vanishes."""
    before = services.store.count_dead_letters()
    batch = [Incoming(t, p, 1, i + 1, 1, 1000.0) for i, (t, p) in enumerate(items)]
    result = services.ingestor.process(batch, now=2000.0)
    stored = sum(result.stored.values()) + sum(result.duplicates.values())
    assert stored + result.dead_total == len(items)
    assert services.store.count_dead_letters() - before == result.dead_total


@pytest.mark.parametrize(("kind", "payload", "error"), [
    ("summary", b"", "SchemaError"),
    ("summary", b"\x78\x9c\x00", "SchemaError"),
    ("summary", zlib.compress(b"x" * 2_000_000), "SchemaError"),
    ("heartbeat", json.dumps({"schema": 2, "type": "heartbeat"}).encode(), "SchemaError"),
    ("status", encode(Status("dev9", "online")), "SchemaError"),  # another device's body
    ("heartbeat", encode(Heartbeat("dev1", 1.0, 1.0, 1, 1, 1, 1))[:-1], "SchemaError"),
    ("report", json.dumps({"schema": 1, "type": "report", "device": "dev1", "seq": 2**64,
                           "revision": 1, "outcome": "installed", "bundle": {
                               "name": "sensor", "version": "1.0.0"}}).encode(),
     "SchemaError"),  # fits JSON, not SQLite
], ids=["empty", "bad-deflate", "zip-bomb", "schema-2", "device-mismatch", "truncated",
        "seq-past-64-bits"])
def test_each_malformed_payload_is_dead_lettered_with_its_reason(services, kind, payload, error):
    result = services.ingestor.process([Incoming(topic("dev1", kind), payload, 1, 1, 1, 5.0)],
                                       now=10.0)
    assert dict(result.dead) == {error: 1}
    (dl,) = services.store.list_dead_letters()
    assert (dl.topic, dl.device, dl.error, dl.size) == (topic("dev1", kind), "dev1", error,
                                                        len(payload))
    assert len(dl.payload) <= 4096 and dl.reason


# -- scale-out: workers split a shared subscription -----------------------------------------


def test_two_workers_on_a_shared_subscription_store_everything_once(
        broker, devices, server_factory, sensor_bundle, sensor_ref, tmp_path, signing_keys):
    from fleet_server.server import FleetServer
    from tests.fleet_server.conftest import make_config

    api = server_factory(broker, ingest=False)
    api.services.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    workers = []
    for i in range(2):
        cfg = make_config(tmp_path, signing_keys, broker=broker)
        assert cfg.broker is not None
        cfg = replace(cfg, broker=replace(cfg.broker, share="ingest", client_id=f"worker-{i}"))
        w = FleetServer(cfg, publish_desired=False)
        w.start()
        workers.append(w)
    try:
        for w in workers:
            wait_until(lambda w=w: w.link.connected, 10, "workers")
        time.sleep(0.3)  # both SUBACKs in
        spec, _ = sensor_ref
        now = time.time()
        senders = [devices("dev4"), devices("dev5")]
        for d in senders:
            for seq in range(40):
                d.send(summary_of(d.id, seq, profile_of(spec, 3, seq), now - 60, now))
        for d in senders:
            d.flush()
        store = api.services.store
        wait_until(lambda: store.count_summaries(folded=FOLDED) == 80, 15, "80 summaries")
        shares = [w.worker.batches for w in workers]
        assert all(n > 0 for n in shares), shares
        merged, devs, _ = api.services.drift.merged(api.services.bundles.reference(1),
                                                    api.services.drift.scope(),
                                                    int(now) - 3600, int(now) + 3600)
        assert (merged.summaries, merged.rows, devs) == (80, 240, 2)
    finally:
        for w in workers:
            w.stop()


# -- end-to-end acknowledgement ---------------------------------------------------------------


def _report(device: str, seq: int, floor: int = 0) -> Incoming:
    from edgefleet.contract.messages import Report

    msg = Report(device, seq, 1, "installed", BundleRef("sensor", "1.0.0"), floor=floor)
    return Incoming(msg.topic, encode(msg), 1, seq, 1, 5.0)


def test_the_ack_is_the_highest_contiguous_stored_sequence(services_on):
    services = services_on
    ingest = services.ingestor
    assert ingest.process([_report("dev1", 1), _report("dev1", 2), _report("dev1", 4)],
                          now=10.0).acks == {"dev1": {"report": 2}}
    # a re-send of what is stored changes nothing but is acknowledged again
    again = ingest.process([_report("dev1", 2)], now=10.0)
    assert again.duplicates["report"] == 1 and again.acks == {"dev1": {"report": 2}}
    assert ingest.process([_report("dev1", 3)], now=10.0).acks == {"dev1": {"report": 4}}
    assert len(services.store.list_reports("dev1")) == 4  # each stored once
    # another device is acknowledged on its own; every batch names only its devices
    assert ingest.process([_report("dev2", 1)], now=10.0).acks == {"dev2": {"report": 1}}
    assert services.store.acks() == {"dev1": {"report": 4}, "dev2": {"report": 1}}


def test_the_ack_passes_what_the_device_dropped_never_what_may_still_come(services_on):
    """Rows 1-2 were stored, 3-5 dropped from a full outbox (counted there): the next
    message's floor 6 says no number below it will ever come."""
    services = services_on
    ingest = services.ingestor
    ingest.process([_report("dev1", 1), _report("dev1", 2)], now=10.0)
    assert ingest.process([_report("dev1", 7, floor=6)], now=10.0).acks["dev1"] == \
        {"report": 5}  # passes 3-5, waits for 6
    assert ingest.process([_report("dev1", 6, floor=6)], now=10.0).acks["dev1"] == \
        {"report": 7}
    # an older floor arriving late (a re-send) never moves the ack back
    assert ingest.process([_report("dev1", 2, floor=1)], now=10.0).acks["dev1"] == \
        {"report": 7}


def test_a_summary_refused_for_good_is_settled_so_the_device_stops_sending_it(
        services_on, sensor_ref):
    services = services_on
    spec, _ = sensor_ref
    now = time.time()
    ingest = services.ingestor
    ok = summary_of("dev1", 1, profile_of(spec, 10, 1), now - 60, now)
    future = summary_of("dev1", 2, profile_of(spec, 10, 2), now + 5 * 86400, now + 5 * 86400 + 1)
    later = summary_of("dev1", 3, profile_of(spec, 10, 3), now - 30, now)
    batch = [Incoming(m.topic, encode(m), 1, m.seq, 1, now) for m in (ok, later, future)]
    result = ingest.process(batch, now=now)
    assert result.dead == {"SchemaError": 1}
    assert result.acks == {"dev1": {"summary": 3}}


def test_the_worker_publishes_acks_after_the_commit_and_again_after_a_restart(
        broker, server_factory, tmp_path):
    """Through the real broker and server: numbered rows leave the device's outbox only
    on the server's acknowledgement, which a restarted server publishes again."""
    from edge_agent.mqtt import LinkConfig, MqttLink
    from edge_agent.outbox import Outbox
    from edgefleet.contract.messages import Ack, Report, decode
    from tests.fleet_server.conftest import PASSWORDS

    server = server_factory(broker)
    got: list[Ack] = []
    outbox = Outbox(tmp_path / "dev1-outbox.db")

    def on_message(t: str, p: bytes) -> None:
        ack = decode(t, p)
        got.append(ack)
        for stream, upto in ack.acked.items():
            link.confirm(stream, upto)

    link = MqttLink(LinkConfig(broker.host, broker.port, "dev1", "dev1", PASSWORDS["dev1"],
                               subscriptions=(topic("dev1", "ack"),), reconnect_min_delay=0.05,
                               reconnect_max_delay=0.3), outbox, on_message)
    link.start()
    try:
        for _ in range(3):
            outbox.put_sequenced(topic("dev1", "report"), lambda seq, floor: encode(Report(
                "dev1", seq, 1, "installed", BundleRef("sensor", "1.0.0"), floor=floor)),
                "report")
        wait_until(lambda: outbox.depth == 0, 15, "the server to acknowledge 1-3")
        assert got[-1] == Ack("dev1", {"report": 3}, got[-1].time)
        assert link.confirmed == 3
        server.stop()
        got.clear()
        server_factory(broker)  # a restarted server publishes what its store holds
        wait_until(lambda: any(a.acked == {"report": 3} for a in got), 15, "the ack again")
    finally:
        link.stop()
        outbox.close()


def test_a_clean_stop_logs_no_paho_error(broker, server_factory, caplog):
    """paho's loop takes one more turn after a clean disconnect and logs "Client is not
    connected" as an ERROR: noise on every shutdown of `fleet serve`, muted while stopping."""
    caplog.set_level(logging.DEBUG, logger="fleet_server.telemetry.link.paho")
    for _ in range(3):
        server = server_factory(broker)
        wait_until(lambda s=server: s.link.connected, 10, "the server")
        server.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
