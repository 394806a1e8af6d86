"""The MQTT message contract: round trips, compactness, and refusals that name the field."""

from __future__ import annotations

import contextlib
import json
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.messages import (
    ACK_STREAMS,
    LATENCY_EDGES_MS,
    LATENCY_EDGES_V1_MS,
    MAX_CAPTURE_ROWS,
    MAX_INFLATED,
    MAX_OUTCOMES,
    Ack,
    BundleRef,
    CapturePolicy,
    DesiredState,
    Heartbeat,
    Outcome,
    Outcomes,
    Receipt,
    Report,
    ShadowStats,
    Status,
    Summary,
    decode,
    encode,
    parse_topic,
    topic,
)
from edgefleet.contract.performance import (
    MAX_ENTRIES,
    Estimated,
    PerformanceEntry,
    PerformanceSpec,
    Realized,
)
from edgefleet.contract.profile import (
    CONFIDENCE_EDGES,
    NumericSpec,
    Profile,
    ProfileSpec,
    categorical_spec,
    from_wire,
    numeric_spec,
    to_wire,
)
from edgefleet.contract.wire import canonical_json

devices = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
versions = st.builds(lambda a, b, c: f"{a}.{b}.{c}", *(st.integers(0, 99),) * 3)
names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
hexes = st.text("0123456789abcdef", min_size=64, max_size=64)
finite = st.floats(-1e12, 1e12, allow_nan=False)
bundles = st.builds(BundleRef, names, versions, st.one_of(st.just(""), hexes),
                    st.text(max_size=40), st.integers(0, 2**40))


def counts_over(edges):
    return st.lists(st.integers(0, 10**6), min_size=len(edges) + 1,
                    max_size=len(edges) + 1).map(tuple)


counts = counts_over(LATENCY_EDGES_MS)


def _spec(n_features: int = 20) -> ProfileSpec:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, n_features))
    return ProfileSpec(
        tuple(numeric_spec(f"feature_{i:02d}", ref[:, i]) for i in range(n_features)),
        (categorical_spec("class", ["0", "1"]), NumericSpec("confidence", CONFIDENCE_EDGES)))


def _profile(spec: ProfileSpec, rows: int, seed: int = 1) -> Profile:
    rng = np.random.default_rng(seed)
    p = Profile(spec)
    p.update({s.name: rng.normal(0.2, 1.1, rows) for s in spec.inputs},
             {"class": rng.choice(["0", "1"], rows), "confidence": rng.uniform(0.5, 1, rows)})
    return p


BINARY = PerformanceSpec("classification", ("ok", "fault"))


def _blocks(rows: int, seed: int = 2) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, rows)
    pred = (p > 0.5).astype(np.int64)
    truth = (rng.uniform(0, 1, rows) < p).astype(np.int64)
    realized, estimated = Realized(BINARY), Estimated(BINARY)
    realized.add(pred, truth, np.column_stack([1 - p, p]), rng.exponential(3600, rows))
    estimated.add(p, pred)
    return realized.to_wire(), estimated.to_wire()


def _entries(bundle: BundleRef, seed: int) -> PerformanceEntry:
    realized, estimated = _blocks(seed % 50, seed)
    return PerformanceEntry(bundle, realized if seed % 3 else None, estimated)


@st.composite
def summaries(draw):
    spec = _spec(3)
    start = draw(st.floats(0, 2e9))
    # latency format 2, or format 1 as agents before it sent (still decoded)
    hist = counts_over(draw(st.sampled_from([LATENCY_EDGES_MS, LATENCY_EDGES_V1_MS])))
    shadow = draw(st.one_of(st.none(), st.builds(
        lambda b, r, a, c, e: ShadowStats(b, r, min(a, r), c, e),
        bundles, st.integers(0, 10**6), st.integers(0, 10**6), hist, st.integers(0, 99))))
    return Summary(draw(devices), draw(st.integers(0, 2**53)), draw(bundles), start,
                   start + draw(st.floats(0, 1e6)), to_wire(_profile(spec, 50)),
                   draw(st.one_of(st.just(()), hist)),
                   draw(st.dictionaries(st.sampled_from(["input", "runtime", "shadow"]),
                                        st.integers(0, 10**6))),
                   shadow, draw(st.integers(0, 10**9)), 0,
                   draw(st.lists(st.builds(_entries, bundles, st.integers(0, 10**6)),
                                 max_size=3).map(tuple)))

capture_policies = st.one_of(
    st.none(), st.just(CapturePolicy(False)),
    st.builds(CapturePolicy, st.just(True), st.floats(0, 1), st.integers(1, MAX_CAPTURE_ROWS),
              st.one_of(st.none(), st.lists(st.text(st.characters(min_codepoint=32),
                                                    min_size=1, max_size=30),
                                            max_size=8, unique=True).map(tuple))))

messages = st.one_of(
    summaries(),
    st.builds(Report, devices, st.integers(0, 2**53), st.integers(0, 2**53),
              st.sampled_from(Report.OUTCOMES), bundles, st.text(max_size=100), finite),
    st.builds(Heartbeat, devices, finite, st.floats(0, 1e9), st.integers(0, 2**40),
              st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**40),
              st.integers(0, 2**40), st.one_of(st.none(), st.floats(0, 1e4)),
              st.one_of(st.none(), st.floats(0, 1e4))),
    st.builds(Status, devices, st.sampled_from(["online", "offline"]), st.text(max_size=20),
              st.one_of(st.none(), bundles), st.one_of(st.none(), bundles),
              st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
                              st.text(max_size=20), max_size=5), finite),
    st.builds(DesiredState, devices, st.integers(0, 2**53), st.one_of(st.none(), bundles),
              st.one_of(st.none(), bundles), st.booleans(), finite, capture_policies),
    st.builds(Ack, devices, st.dictionaries(st.sampled_from(ACK_STREAMS),
                                            st.integers(0, 2**63 - 1)), finite),
    st.builds(Outcomes, devices, st.integers(1, 2**53), st.lists(st.builds(
        Outcome, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True),
        st.one_of(st.text(max_size=30), st.integers(-2**53, 2**53), finite)), max_size=20)
        .map(tuple), finite),
    st.builds(Receipt, devices, st.integers(0, 2**53), finite),
    st.integers(0, 2**53).flatmap(lambda seq: st.builds(
        Report, devices, st.just(seq), st.integers(0, 2**53), st.sampled_from(Report.OUTCOMES),
        bundles, st.text(max_size=100), finite, st.integers(0, seq))),
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_every_message_round_trips(message):
    assert decode(message.topic, encode(message)) == message


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["summary", "report", "heartbeat", "status",
                                                 "desired", "ack", "outcomes", "receipt"]))
def test_random_payloads_raise_only_schema_errors(payload, kind):
    with contextlib.suppress(SchemaError):
        decode(topic("dev-1", kind), payload)


def test_summary_of_20_numeric_features_fits_in_2_kib():
    spec = _spec(20)
    s = Summary("device-0001", 7, BundleRef("cancer-mlp", "1.0.0"), 1.7e9, 1.7e9 + 60,
                to_wire(_profile(spec, 600)), (5,) * (len(LATENCY_EDGES_MS) + 1), {"input": 1})
    assert len(encode(s)) <= 2048


def test_summary_of_20_features_with_a_binary_performance_block_fits_in_3_kb():
    spec = _spec(20)
    realized, estimated = _blocks(600)
    bundle = BundleRef("cancer-mlp", "1.0.0")
    s = Summary("device-0001", 7, bundle, 1.7e9, 1.7e9 + 60, to_wire(_profile(spec, 600)),
                (5,) * (len(LATENCY_EDGES_MS) + 1), {"input": 1},
                performance=(PerformanceEntry(bundle, realized, estimated),))
    assert len(encode(s)) <= 3000
    got = decode(s.topic, encode(s))
    assert Realized.from_wire(BINARY, got.performance[0].realized).to_wire() == realized


def test_a_summary_without_performance_keeps_its_bytes():
    s = Summary("d", 1, BundleRef("m", "1.0.0"), 0.0, 1.0, to_wire(_profile(_spec(2), 5)))
    assert "performance" not in s.to_dict()
    assert decode(s.topic, encode(s)).performance == ()


def test_a_desired_state_without_capture_keeps_its_bytes():
    # an agent older than capture per group refuses unknown fields: a group that sets no
    # capture must send exactly what it sent before
    d = DesiredState("d", 3, BundleRef("m", "1.0.0"), None, False, 5.0)
    assert set(d.to_dict()) == {"schema", "type", "device", "revision", "bundle", "shadow",
                                "allow_downgrade", "time"}
    assert decode(d.topic, encode(d)).capture is None


@pytest.mark.parametrize(("capture", "field"), [
    pytest.param({"enabled": True, "rate": 1.5, "max_rows": 10}, "desired.capture.rate",
                 id="rate-above-1"),
    pytest.param({"enabled": True, "rate": -0.1, "max_rows": 10}, "desired.capture.rate",
                 id="rate-negative"),
    pytest.param({"enabled": True, "rate": 0.1, "max_rows": 0}, "desired.capture.max_rows",
                 id="cap-zero"),
    pytest.param({"enabled": True, "rate": 0.1, "max_rows": MAX_CAPTURE_ROWS + 1},
                 "desired.capture.max_rows", id="cap-too-large"),
    pytest.param({"enabled": True, "rate": 0.1}, "desired.capture.max_rows", id="cap-missing"),
    pytest.param({"enabled": True, "rate": 0.1, "max_rows": 5, "features": ["a", "a"]},
                 "desired.capture.features", id="feature-twice"),
    pytest.param({"enabled": True, "rate": 0.1, "max_rows": 5, "features": ["a\n"]},
                 "desired.capture.features", id="feature-control-char"),
    pytest.param({"enabled": True, "rate": 0.1, "max_rows": 5, "features": [3]},
                 "desired.capture.features", id="feature-not-a-string"),
    pytest.param({"enabled": False, "rate": 0.1}, "desired.capture.rate", id="off-with-rate"),
    pytest.param({"enabled": "yes"}, "desired.capture.enabled", id="enabled-not-bool"),
    pytest.param({"enabled": True, "rate": 0.1, "max_rows": 5, "spy": 1},
                 "desired.capture.spy", id="unknown-field"),
])
def test_bad_capture_policies_name_the_field(capture, field):
    body = DesiredState("d", 1, None).to_dict()
    body["capture"] = capture
    with pytest.raises(SchemaError) as info:
        decode(topic("d", "desired"), json.dumps(body).encode())
    assert info.value.field == field


def _perf_body(performance):
    return _summary_body(performance=performance)


_ENTRY = {"bundle": {"name": "m", "version": "1.0.0"}, "realized": None, "estimated": {}}


@pytest.mark.parametrize(("performance", "field"), [
    pytest.param([_ENTRY] * (MAX_ENTRIES + 1), "summary.performance", id="too-many"),
    pytest.param({"x": 1}, "summary.performance", id="not-a-list"),
    pytest.param([{**_ENTRY, "estimated": None}], "summary.performance[0].realized",
                 id="neither-block"),
    pytest.param([{**_ENTRY, "estimated": [1]}], "summary.performance[0].estimated",
                 id="block-not-an-object"),
    pytest.param([{**_ENTRY, "bundle": {"name": "M", "version": "1.0.0"}}],
                 "summary.performance[0].bundle.name", id="bad-bundle"),
    pytest.param([{**_ENTRY, "extra": 1}], "summary.performance[0].extra", id="unknown-field"),
])
def test_bad_performance_framing_names_the_field(performance, field):
    with pytest.raises(SchemaError) as info:
        decode(topic("dev-1", "summary"), canonical_json(_perf_body(performance)))
    assert info.value.field == field, str(info.value)


def _summary_body(**changes):
    s = Summary("dev-1", 1, BundleRef("m", "1.0.0"), 1.7e9, 1.7e9 + 60,
                to_wire(_profile(_spec(2), 10)))
    body = s.to_dict()
    body.pop("latency_format", None)
    body.update(changes)
    return body


def test_an_old_agents_summary_with_format_1_latency_still_decodes():
    old = [0] * (len(LATENCY_EDGES_V1_MS) + 1)
    old[3] = 7
    body = _summary_body(latency_counts=old)  # no latency_format field: format 1
    got = decode(topic("dev-1", "summary"), canonical_json(body))
    assert got.latency_counts == tuple(old) and got.latency_format == 1
    assert "latency_format" not in got.to_dict()  # re-encoded as it came


@pytest.mark.parametrize(("changes", "field"), [
    pytest.param({"latency_format": 3}, "latency_format", id="unknown-format"),
    pytest.param({"latency_format": 2, "latency_counts": [1] * (len(LATENCY_EDGES_V1_MS) + 1)},
                 "latency_counts", id="format-2-with-format-1-counters"),
    pytest.param({"latency_counts": [1] * (len(LATENCY_EDGES_MS) + 1)}, "latency_counts",
                 id="format-2-counters-without-the-field"),
])
def test_latency_histograms_that_do_not_match_their_format_are_refused(changes, field):
    with pytest.raises(SchemaError, match=field) as err:
        decode(topic("dev-1", "summary"), canonical_json(_summary_body(**changes)))
    assert err.value.field.endswith(field)


def test_wire_profile_keeps_counts_exact_and_sums_to_6_digits():
    spec = _spec(5)
    p = _profile(spec, 1000)
    q = from_wire(decode(topic("d", "summary"), encode(Summary(
        "d", 1, BundleRef("m", "1.0.0"), 0.0, 1.0, to_wire(p)))).profile, spec)
    for name in p.inputs:
        a, b = p.inputs[name], q.inputs[name]
        assert a.counts.tolist() == b.counts.tolist()
        np.testing.assert_allclose(b.sums, a.sums, rtol=5e-5, atol=1e-5)
        assert b.min == pytest.approx(a.min, rel=1e-5) and b.max == pytest.approx(a.max, rel=1e-5)
    assert q.outputs["class"].counts.tolist() == p.outputs["class"].counts.tolist()
    assert q.rows == p.rows == 1000


def test_wire_profile_for_another_reference_is_refused():
    wire = to_wire(_profile(_spec(3), 10))
    with pytest.raises(ReferenceMismatchError):
        from_wire(wire, _spec(4))


def _desired(**over) -> dict:
    doc = DesiredState("dev-1", 3, BundleRef("m", "1.0.0", "a" * 64, "http://h/b", 10)).to_dict()
    doc.update(over)
    return doc


BAD = [
    ("edgefleet/v1/dev-1/desired", json.dumps(_desired(schema=2)).encode(), "desired.schema"),
    ("edgefleet/v1/dev-1/desired", json.dumps(_desired(type="status")).encode(), "desired.type"),
    ("edgefleet/v1/dev-1/desired", json.dumps(_desired(device="dev-2")).encode(),
     "desired.device"),
    ("edgefleet/v1/dev-1/desired", json.dumps(_desired(revision=-1)).encode(),
     "desired.revision"),
    ("edgefleet/v1/dev-1/desired", json.dumps(_desired(revision=True)).encode(),
     "desired.revision"),
    ("edgefleet/v1/dev-1/desired", json.dumps(_desired(extra=1)).encode(), "desired.extra"),
    ("edgefleet/v1/dev-1/desired",
     json.dumps(_desired(bundle={"name": "m", "version": "1.0"})).encode(),
     "desired.bundle.version"),
    ("edgefleet/v1/dev-1/desired",
     json.dumps(_desired(bundle={"name": "m", "version": "1.0.0", "sha256": "xyz"})).encode(),
     "desired.bundle.sha256"),
    ("edgefleet/v1/dev-1/desired", b"not json", None),
    ("edgefleet/v1/dev-1/desired", b"\x78\x9c garbage", "payload"),
    ("edgefleet/v1/dev-1/desired", zlib.compress(b" " * (MAX_INFLATED + 10)), "payload"),
    ("edgefleet/v1/dev-1/desired", b"{" * 200_000, "payload"),
    ("edgefleet/v2/dev-1/desired", json.dumps(_desired()).encode(), "topic"),
    ("edgefleet/v1/dev+1/desired", json.dumps(_desired()).encode(), "topic"),
    ("edgefleet/v1/dev-1/other", json.dumps(_desired()).encode(), "topic"),
]


@pytest.mark.parametrize(("topic_name", "payload", "field"), BAD, ids=[
    "schema", "type", "device-mismatch", "negative-revision", "bool-revision", "unknown-field",
    "bad-version", "bad-sha", "not-json", "corrupt-deflate", "deflate-bomb", "oversized",
    "foreign-prefix", "wildcard-device", "unknown-kind"])
def test_bad_payloads_name_the_field(topic_name, payload, field):
    with pytest.raises(SchemaError) as info:
        decode(topic_name, payload)
    if field is not None:
        assert info.value.field == field, str(info.value)


def test_summary_window_must_not_end_before_it_starts():
    s = Summary("d", 1, BundleRef("m", "1.0.0"), 10.0, 5.0, to_wire(_profile(_spec(2), 5)))
    with pytest.raises(SchemaError) as info:
        decode(s.topic, encode(s))
    assert info.value.field == "summary.window_end"


def test_topics_are_at_most_seven_levels_and_parse_back():
    t = topic("pi-kitchen.01", "summary")
    assert t == "edgefleet/v1/pi-kitchen.01/summary" and len(t.split("/")) <= 7
    assert parse_topic(t) == ("pi-kitchen.01", "summary")
    with pytest.raises(SchemaError):
        topic("a/b", "summary")


def test_an_overflowing_float_in_a_summary_profile_is_refused():
    spec = _spec(3)
    s = Summary("d", 1, BundleRef("m", "1.0.0"), 0.0, 1.0, to_wire(_profile(spec, 100)))
    text = canonical_json(s.to_dict()).decode()
    first_sum = json.dumps(s.profile["in"][0][1][1])
    bad = text.replace(first_sum, "1e400", 1).encode()
    assert bad != text.encode()
    with pytest.raises(SchemaError, match=r"profile|infinity"):
        decode(topic("d", "summary"), bad)
    with pytest.raises(SchemaError):  # the other kinds keep the parser's own check
        decode(topic("d", "heartbeat"), b'{"schema":1,"type":"heartbeat","device":"d",'
               b'"time":1e400}')


def test_without_orjson_the_summary_checks_its_own_floats(monkeypatch):
    import edgefleet.contract.messages as messages
    import edgefleet.contract.wire as wire

    monkeypatch.setattr(wire, "orjson", None)
    monkeypatch.setattr(messages, "FAST_CHECKS_FLOATS", False)
    spec = _spec(3)
    s = Summary("d", 1, BundleRef("m", "1.0.0"), 0.0, 1.0, to_wire(_profile(spec, 100)))
    good = encode(s)
    assert decode(topic("d", "summary"), good) == s
    text = canonical_json(s.to_dict()).decode()
    bad = text.replace(json.dumps(s.profile["in"][0][1][1]), "1e400", 1).encode()
    with pytest.raises(SchemaError, match="not finite"):
        decode(topic("d", "summary"), bad)


@pytest.mark.parametrize("fast", [True, False], ids=["orjson", "without-orjson"])
def test_an_overflowing_float_in_a_performance_block_is_refused(monkeypatch, fast):
    import edgefleet.contract.performance as performance
    import edgefleet.contract.wire as wire

    if not fast:
        monkeypatch.setattr(wire, "orjson", None)
        monkeypatch.setattr(performance, "FAST_CHECKS_FLOATS", False)
    elif wire.orjson is None:
        pytest.skip("orjson is not installed")
    bundle = BundleRef("m", "1.0.0")
    estimated = {"calibrated": True, "n": [3, 4], "q": [1.25, 2.5], "v": [0.5, 0.75]}
    s = Summary("d", 1, bundle, 0.0, 1.0, to_wire(_profile(_spec(2), 5)),
                performance=(PerformanceEntry(bundle, None, estimated),))
    assert decode(s.topic, encode(s)) == s
    bad = canonical_json(s.to_dict()).replace(b"1.25", b"1e400", 1)
    with pytest.raises(SchemaError, match=r"finite|JSON"):
        decode(s.topic, bad)


@pytest.mark.parametrize("device", ["dev1\n", "dev 1", "", "a/b", "x" * 65])
def test_bad_device_ids(device):
    from edgefleet.contract.messages import valid_device_id

    assert not valid_device_id(device)


def test_sequence_numbers_beyond_64_bits_are_refused():
    payload = canonical_json({"schema": 1, "type": "report", "device": "d", "seq": 2**64,
                              "revision": 1, "outcome": "installed",
                              "bundle": {"name": "m", "version": "1.0.0", "sha256": "",
                                         "url": "", "size": 0}, "reason": "", "time": 0.0})
    with pytest.raises(SchemaError, match="seq"):
        decode(topic("d", "report"), payload)


@pytest.mark.parametrize(("body", "field"), [
    ({"acked": {"heartbeat": 3}}, "acked"),
    ({"acked": {"summary": -1}}, "acked"),
    ({"acked": {"summary": True}}, "acked"),
    ({"acked": {"summary": 2**63}}, "acked"),
    ({"acked": []}, "acked"),
    ({"acked": {}, "extra": 1}, "extra"),
], ids=["unknown-stream", "negative", "bool", "past-64-bits", "not-a-mapping", "unknown-field"])
def test_bad_acks_name_the_field(body, field):
    payload = json.dumps({"schema": 1, "type": "ack", "device": "dev1", **body}).encode()
    with pytest.raises(SchemaError) as info:
        decode(topic("dev1", "ack"), payload)
    assert field in str(info.value)


def test_a_floor_above_the_messages_own_sequence_is_refused():
    report = Report("dev1", 4, 1, "installed", BundleRef("sensor", "1.0.0"), floor=4)
    assert decode(report.topic, encode(report)) == report
    body = {**report.to_dict(), "floor": 5}
    with pytest.raises(SchemaError, match="floor"):
        decode(report.topic, json.dumps(body).encode())


@pytest.mark.parametrize(("outcome", "field"), [
    ({"id": "a/b", "label": 1}, "outcomes[0].id"),
    ({"id": "", "label": 1}, "outcomes[0].id"),
    ({"id": "p1", "label": True}, "outcomes[0].label"),
    ({"id": "p1", "label": None}, "outcomes[0].label"),
    ({"id": "p1", "label": [1]}, "outcomes[0].label"),
    ({"id": "p1"}, "outcomes[0].label"),
    ({"id": "p1", "label": 1, "extra": 2}, "outcomes[0].extra"),
])
def test_bad_outcomes_name_the_field(outcome, field):
    body = {"schema": 1, "type": "outcomes", "device": "dev-1", "batch": 1,
            "outcomes": [outcome], "time": 0.0}
    with pytest.raises(SchemaError) as err:
        decode(topic("dev-1", "outcomes"), canonical_json(body))
    assert err.value.field == f"outcomes.{field}"


def test_an_outcome_batch_is_bounded_and_numbered_from_one():
    many = [{"id": f"p{i}", "label": 0} for i in range(MAX_OUTCOMES + 1)]
    for batch, items, field in ((1, many, "outcomes.outcomes"), (0, [], "outcomes.batch")):
        body = {"schema": 1, "type": "outcomes", "device": "dev-1", "batch": batch,
                "outcomes": items, "time": 0.0}
        with pytest.raises(SchemaError) as err:
            decode(topic("dev-1", "outcomes"), canonical_json(body))
        assert err.value.field == field
