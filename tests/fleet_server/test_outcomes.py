"""Outcomes uploaded centrally: reading uploads, cutting batches, the queue in the store (on
SQLite and PostgreSQL), receipts through ingest, and the REST API and CLI over real HTTP.

Delivery through a real broker to stand-in devices is in ``test_outcomes_e2e.py``.
"""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.contract.messages import (
    MAX_OUTCOMES,
    MAX_PAYLOAD,
    Outcome,
    Outcomes,
    Receipt,
    Status,
    encode,
)
from edgefleet.contract.wire import canonical_json
from fleet_server.cli.main import main
from fleet_server.config import OutcomeConfig
from fleet_server.telemetry.link import Incoming
from fleet_server.telemetry.outcomes import (
    DuplicateOutcomeError,
    OutcomeFormatError,
    OutcomeIdError,
    OutcomeLabelError,
    OutcomeQueueFullError,
    RowReader,
    UnknownOutcomeDeviceError,
    UploadRow,
    csv_label,
    make_batches,
    parse_json_body,
)
from fleet_server.telemetry.routing import OutcomeService

# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize(("text", "want"), [
    ("0", 0), ("7", 7), ("-12", -12), ("0.5", 0.5), ("-1e3", -1000.0), ("2.5E-2", 0.025),
    ("1e400", "1e400"),  # overflows to infinity: not a finite number, kept as written
    ("07", "07"), ("nan", "nan"), ("inf", "inf"), ("1_000", "1_000"), (" 1", " 1"),
    ("+1", "+1"), (".5", ".5"), ("1.", "1."), ("yes", "yes"), ("", ""), ("True", "True"),
], ids=lambda v: repr(v))
def test_csv_label_rule(text, want):
    got = csv_label(text)
    assert got == want and type(got) is type(want)


@given(st.integers(-10**30, 10**30))
def test_csv_integers_are_integers(n):
    assert csv_label(str(n)) == n and type(csv_label(str(n))) is int


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_csv_floats_round_trip(x):
    text = repr(x)
    got = csv_label(text)
    assert got == x and type(got) is float  # a float's repr always has "." or "e"


def _read(form: str, body: bytes, chunk: int) -> list[UploadRow]:
    reader = RowReader(form)
    rows = []
    for i in range(0, len(body), chunk):
        rows += reader.feed(body[i:i + chunk])
    return rows + reader.close()


CSV = ("\ufeffid,Device,label\r\nevt-1,dev1,ok\r\nevt-2,dev1,1\r\n\r\n"
       "evt:3,dev2,\"a, b\"\nevt-4,dev2,é\n").encode()


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_csv_rows_are_the_same_however_the_body_is_cut(chunk):
    rows = _read("csv", CSV, chunk)
    assert [(r.where, r.device, r.outcome) for r in rows] == [
        ("line 2", "dev1", Outcome("evt-1", "ok")), ("line 3", "dev1", Outcome("evt-2", 1)),
        ("line 5", "dev2", Outcome("evt:3", "a, b")), ("line 6", "dev2", Outcome("evt-4", "é"))]


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_json_lines_keep_the_label_type(chunk):
    body = b'{"device": "dev1", "id": "a", "label": "1"}\n\n{"device": "dev1", "id": "b", ' \
           b'"label": 2.5}'
    rows = _read("ndjson", body, chunk)
    assert [r.outcome for r in rows] == [Outcome("a", "1"), Outcome("b", 2.5)]


BAD = [
    ("csv-empty", "csv", b"", OutcomeFormatError, "line 1"),
    ("csv-header", "csv", b"device,pid,label\n", OutcomeFormatError, "line 1"),
    ("csv-extra-column", "csv", b"device,id,label\nd,a,1,2\n", OutcomeFormatError, "line 2"),
    ("csv-device", "csv", b"device,id,label\nd/x,a,1\n", UnknownOutcomeDeviceError, "line 2"),
    ("csv-id", "csv", b"device,id,label\nd,a b,1\n", OutcomeIdError, "line 2"),
    ("csv-id-long", "csv", b"device,id,label\nd," + b"a" * 65 + b",1\n", OutcomeIdError,
     "line 2"),
    ("csv-label-long", "csv", b"device,id,label\nd,a," + b"x" * 257 + b"\n",
     OutcomeLabelError, "line 2"),
    ("csv-utf8", "csv", b"device,id,label\nd,a,\xff\n", OutcomeFormatError, "line 2"),
    ("csv-quote", "csv", b'device,id,label\nd,a,"open\n', OutcomeFormatError, "line 2"),
    ("csv-long-line", "csv", b"device,id,label\n" + b"x" * 5000, OutcomeFormatError, "line 2"),
    ("ndjson-json", "ndjson", b'{"device": "d"\n', OutcomeFormatError, "line 1"),
    ("ndjson-bool", "ndjson", b'{"device": "d", "id": "a", "label": true}\n',
     OutcomeLabelError, "line 1"),
    ("ndjson-null", "ndjson", b'{"device": "d", "id": "a", "label": null}\n',
     OutcomeLabelError, "line 1"),
    ("ndjson-list", "ndjson", b'{"device": "d", "id": "a", "label": [1]}\n',
     OutcomeLabelError, "line 1"),
    ("ndjson-nan", "ndjson", b'{"device": "d", "id": "a", "label": NaN}\n',
     OutcomeLabelError, "line 1"),
    ("ndjson-surrogate", "ndjson", b'{"device": "d", "id": "a", "label": "\\ud800"}\n',
     OutcomeLabelError, "line 1"),
    ("ndjson-field", "ndjson", b'{"device": "d", "id": "a", "label": 1, "x": 2}\n',
     OutcomeFormatError, "line 1"),
    ("ndjson-id-type", "ndjson", b'{"device": "d", "id": 5, "label": 1}\n',
     OutcomeIdError, "line 1"),
]


@pytest.mark.parametrize(("form", "body", "error", "where"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
def test_bad_rows_are_refused_naming_the_line(form, body, error, where):
    with pytest.raises(error) as caught:
        _read(form, body, 3)
    assert caught.value.where == where and str(caught.value).startswith(where)


@pytest.mark.parametrize(("body", "error", "where"), [
    (b"[]", OutcomeFormatError, "body"),
    (b"{", OutcomeFormatError, "body"),
    (b'{"outcomes": [], "more": 1}', OutcomeFormatError, "body"),
    (b'{"outcomes": [{"device": "d", "id": "a", "label": 1}, 5]}', OutcomeFormatError,
     "outcomes[1]"),
    (b'{"outcomes": [{"device": "d", "id": "a", "label": {"x": 1}}]}', OutcomeLabelError,
     "outcomes[0]"),
], ids=["not-object", "not-json", "extra", "not-row", "object-label"])
def test_bad_json_bodies(body, error, where):
    with pytest.raises(error) as caught:
        parse_json_body(body)
    assert caught.value.where == where


# --------------------------------------------------------------------------- batches


def _rows(device: str, n: int, label: object = "ok", id_len: int = 8) -> list[UploadRow]:
    return parse_json_body(json.dumps({"outcomes": [
        {"device": device, "id": f"{i:0{id_len}d}", "label": label} for i in range(n)]}
    ).encode())


def test_batches_keep_upload_order_and_cut_at_max_outcomes():
    rows = _rows("dev2", 2500) + _rows("dev1", 10)
    batches = make_batches(rows)
    assert [(b.device, b.count) for b in batches] == [
        ("dev1", 10), ("dev2", MAX_OUTCOMES), ("dev2", MAX_OUTCOMES), ("dev2", 500)]
    ids = [o["id"] for b in batches if b.device == "dev2" for o in json.loads(b.outcomes)]
    assert ids == [f"{i:08d}" for i in range(2500)]


def test_batches_of_long_rows_stay_under_the_payload_limit():
    rows = _rows("dev1", 1500, label="x" * 256, id_len=64)
    batches = make_batches(rows)
    assert sum(b.count for b in batches) == 1500
    assert all(b.count < MAX_OUTCOMES for b in batches)  # cut by bytes, not count
    for n, b in enumerate(batches, 1):
        msg = Outcomes("d" * 64, 2**62 + n, tuple(Outcome(o["id"], o["label"])
                                                  for o in json.loads(b.outcomes)), time.time())
        assert len(encode(msg)) <= MAX_PAYLOAD


def test_a_duplicate_in_one_upload_names_both_rows():
    rows = _rows("dev1", 3) + _rows("dev1", 1)
    with pytest.raises(DuplicateOutcomeError, match=r"outcomes\[0\]: .*at outcomes\[0\]"):
        make_batches(rows)
    assert len(make_batches(_rows("dev1", 3) + _rows("dev2", 3))) == 2  # per device


# --------------------------------------------------------------------------- the queue


@pytest.fixture
def queue(services_on):
    s = services_on
    now = time.time()
    for d in ("dev1", "dev2"):
        s.registry.add_device(d, {}, "test", now)
    service = OutcomeService(s.store, OutcomeConfig(max_undelivered=2500))
    return s, service


def _online(store, device: str, online: bool = True) -> None:
    with store.transaction():
        store.apply_status(device, online=online, time=time.time(), agent_version="",
                           bundle=None, shadow=None, labels=None)


def test_an_upload_is_numbered_per_device_and_shown(queue):
    s, service = queue
    assert service.upload(_rows("dev1", 1200) + _rows("dev2", 5), "ops") == {
        "dev1": 1200, "dev2": 5}
    assert service.upload(_rows("dev2", 5, label=2), "ops") == {"dev2": 5}  # batch 2
    status = {r.device: r for r in service.status()}
    assert (status["dev1"].batches, status["dev1"].queued, status["dev1"].sent) == (2, 1200, 0)
    assert (status["dev2"].batches, status["dev2"].queued) == (2, 10)
    actions = [a.action for a in s.store.list_audit()]
    assert actions.count("outcomes.upload") == 2


def test_refusals_queue_nothing_at_all(queue):
    _, service = queue
    with pytest.raises(UnknownOutcomeDeviceError, match=r"outcomes\[0\]: device 'dev9'"):
        service.upload(_rows("dev1", 3) + _rows("dev9", 1), "ops")
    service.upload(_rows("dev1", 2000), "ops")
    with pytest.raises(OutcomeQueueFullError, match=r"device 'dev1': 2000 .* 501 more .* "
                                                    r"2500") as caught:
        service.upload(_rows("dev2", 10) + _rows("dev1", 501, id_len=9), "ops")
    assert caught.value.status == 409
    status = {r.device: r.queued for r in service.status()}
    assert status == {"dev1": 2000}  # dev2's part of the refused upload is not queued
    with pytest.raises(OutcomeFormatError):
        service.upload([], "ops")


def test_due_batches_window_receipts_and_resends(queue):
    s, service = queue
    store = s.store
    service.upload(_rows("dev1", 2500), "ops")  # batches 1, 2, 3
    t0 = 1000.0
    assert store.due_outcome_batches(resend_before=t0, window=2, limit=100) == []  # offline
    _online(store, "dev1")
    due = store.due_outcome_batches(resend_before=t0, window=2, limit=100)
    assert [(b.device, b.batch, b.sends) for b in due] == [("dev1", 1, 0), ("dev1", 2, 0)]
    store.mark_outcomes_sent([("dev1", 1), ("dev1", 2)], t0)
    assert store.due_outcome_batches(resend_before=t0, window=2, limit=100) == []
    # a receipt for a batch never sent changes nothing; one for batch 1 frees the window
    with store.transaction():
        assert store.record_outcome_receipts({"dev1": 3, "dev2": 1}, t0) == (
            {}, {"dev1": 3, "dev2": 1})
    with store.transaction():
        assert store.record_outcome_receipts({"dev1": 1}, t0 + 1) == ({"dev1": 1}, {})
        assert store.record_outcome_receipts({"dev1": 1}, t0 + 1) == ({}, {})  # again
    due = store.due_outcome_batches(resend_before=t0, window=2, limit=100)
    assert [b.batch for b in due] == [3]
    # sent long enough ago: due again; the device coming online again: due at once
    assert [b.batch for b in store.due_outcome_batches(resend_before=t0 + 0.5, window=2,
                                                       limit=100)] == [2, 3]
    store.mark_outcomes_sent([("dev1", 3)], t0 + 5)
    with store.transaction():
        store.outcomes_due_again(["dev1"])
    assert [(b.batch, b.sends) for b in store.due_outcome_batches(
        resend_before=0, window=2, limit=100)] == [(2, 1), (3, 1)]
    status = service.status("dev1")[0]
    assert (status.receipt, status.receipted, status.queued, status.sent) == (1, 1000, 0, 1500)


# --------------------------------------------------------------------------- ingest


def _incoming(message, retained: bool = False) -> Incoming:
    return Incoming(message.topic, encode(message), 1, 1, 0, time.time(), retained)


def test_ingest_records_receipts_and_online_makes_batches_due(services, caplog):
    s = services
    s.registry.add_device("dev1", {}, "test", time.time())
    s.outcomes.upload(_rows("dev1", 1500), "ops")
    woken: list[set[str]] = []
    s.ingestor.on_outcomes = woken.append
    s.ingestor.process([_incoming(Status("dev1", "online", time=time.time()))])
    assert woken == [{"dev1"}]
    due = s.store.due_outcome_batches(resend_before=0, window=8, limit=10)
    s.store.mark_outcomes_sent([("dev1", 1)], time.time())
    assert [b.batch for b in due] == [1, 2]
    with caplog.at_level(logging.WARNING):
        result = s.ingestor.process([_incoming(Receipt("dev1", 2))])  # batch 2 never sent
    assert result.stored["receipt"] == 1 and not result.dead
    assert "never sent" in caplog.text
    assert s.store.counters()["outcomes.receipt_ignored"] == 1
    s.ingestor.process([_incoming(Receipt("dev1", 1)), _incoming(Receipt("dev1", 0))])
    assert woken[-1] == {"dev1"}
    assert s.outcomes.status("dev1")[0].receipted == 1000


# --------------------------------------------------------------------------- REST and CLI


@pytest.fixture
def api(server_factory):
    server = server_factory(http=True)
    s = server.services
    tokens = {role: s.auth.create_token(role, role, "test", time.time()).secret
              for role in ("viewer", "operator")}
    for d in ("dev1", "dev2"):
        s.registry.add_device(d, {}, "test", time.time())
    client = httpx.Client(base_url=server.base_url, timeout=30)
    yield client, tokens, server
    client.close()


def _post(client, token, body, ctype):
    return client.post("/api/v1/outcomes", content=body, headers={
        "Authorization": f"Bearer {token}", "Content-Type": ctype})


@pytest.mark.slow
def test_rest_upload_in_three_forms_and_status(api):
    client, tokens, _ = api
    op = tokens["operator"]
    r = _post(client, op, b"device,id,label\ndev1,a,1\ndev2,b,x\n", "text/csv")
    assert r.status_code == 201, r.text
    assert r.json() == {"outcomes": 2, "devices": {"dev1": 1, "dev2": 1}}
    r = _post(client, op, b'{"device": "dev1", "id": "c", "label": 0.5}\n',
              "application/x-ndjson; charset=utf-8")
    assert r.status_code == 201, r.text
    r = _post(client, op, json.dumps({"outcomes": [{"device": "dev2", "id": "d",
                                                    "label": "y"}]}).encode(),
              "application/json")
    assert r.status_code == 201, r.text
    got = client.get("/api/v1/outcomes", headers={"Authorization": f"Bearer {op}"}).json()
    assert [(g["device"], g["queued"], g["batches"]) for g in got] == [("dev1", 2, 2),
                                                                       ("dev2", 2, 2)]
    one = client.get("/api/v1/outcomes", params={"device": "dev2"},
                     headers={"Authorization": f"Bearer {tokens['viewer']}"}).json()
    assert [g["device"] for g in one] == ["dev2"]


@pytest.mark.slow
@pytest.mark.parametrize(("body", "ctype", "status", "kind", "text"), [
    (b"device,id,label\ndev1,a,1\ndevX,b,1\n", "text/csv", 422, "UnknownOutcomeDeviceError",
     "line 3: device 'devX' is not registered"),
    (b"device,id,label\ndev1,a,1\ndev1,b b,1\n", "text/csv", 422, "OutcomeIdError", "line 3"),
    (b"device,id,label\ndev1,a,1\ndev1,a,2\n", "text/csv", 422, "DuplicateOutcomeError",
     "line 3"),
    (b"device,id\ndev1,a\n", "text/csv", 422, "OutcomeFormatError", "line 1"),
    (b"dev1,a,1", "text/plain", 422, "OutcomeFormatError", "content type"),
], ids=["device", "id", "duplicate", "header", "content-type"])
def test_rest_refusals_name_the_row_and_queue_nothing(api, body, ctype, status, kind, text):
    client, tokens, _ = api
    r = _post(client, tokens["operator"], body, ctype)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind and text in r.json()["error"]["message"]
    assert client.get("/api/v1/outcomes", headers={
        "Authorization": f"Bearer {tokens['operator']}"}).json() == []


@pytest.mark.slow
def test_rest_upload_needs_an_operator_and_is_bounded(api, server_factory):
    client, tokens, server = api
    r = _post(client, tokens["viewer"], b"device,id,label\ndev1,a,1\n", "text/csv")
    assert r.status_code == 403
    r = _post(client, None, b"device,id,label\ndev1,a,1\n", "text/csv")
    assert r.status_code == 401
    limit = server.config.outcomes.max_upload_bytes
    big = b"device,id,label\n" + b"dev1,a,1\n" * (limit // 9 + 1)
    r = _post(client, tokens["operator"], big, "text/csv")
    assert r.status_code == 413 and str(limit) in r.json()["error"]["message"]


@pytest.mark.slow
def test_cli_upload_and_status(api, tmp_path):
    _, tokens, server = api
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("device,id,label\n" + "".join(f"dev1,e{i},{i % 2}\n" for i in range(1500))
                        + "dev2,z,ok\n")
    common = ["--server", server.base_url, "--token", tokens["operator"]]
    done = CliRunner().invoke(main, ["outcomes", "upload", str(csv_file), *common])
    assert done.exit_code == 0, done.output
    assert "1501 outcome(s) queued for 2 device(s)" in done.output
    lines = tmp_path / "more.jsonl"
    lines.write_text('{"device": "dev2", "id": "y", "label": "1"}\n')
    done = CliRunner().invoke(main, ["outcomes", "upload", str(lines), "--json", *common])
    assert done.exit_code == 0 and json.loads(done.output)["devices"] == {"dev2": 1}
    shown = CliRunner().invoke(main, ["outcomes", "status", "--json", *common])
    assert {r["device"]: r["queued"] for r in json.loads(shown.output)} == {"dev1": 1500,
                                                                             "dev2": 2}
    bad = tmp_path / "bad.csv"
    bad.write_text("device,id,label\ndev1,ok-id,1\nnobody,x,1\n")
    refused = CliRunner().invoke(main, ["outcomes", "upload", str(bad), *common])
    assert refused.exit_code == 1
    assert "line 3: device 'nobody' is not registered" in refused.output
    table = CliRunner().invoke(main, ["outcomes", "status", *common])
    assert table.exit_code == 0 and "dev1" in table.output and "1500" in table.output


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["dev1", "dev2", "dev3"]),
                          st.text("abcdef0123456789", min_size=1, max_size=64),
                          st.one_of(st.text(max_size=256).filter(lambda t: "\n" not in t
                                                                 and "\r" not in t),
                                    st.integers(-2**63, 2**63),
                                    st.floats(allow_nan=False, allow_infinity=False))),
                unique_by=lambda r: (r[0], r[1]), max_size=40))
def test_json_lines_round_trip_into_batches(rows):
    body = "".join(json.dumps({"device": d, "id": i, "label": lab}) + "\n"
                   for d, i, lab in rows).encode()
    try:
        parsed = _read("ndjson", body, 17)
    except OutcomeLabelError:
        assert any(isinstance(lab, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in lab)
                   for _, _, lab in rows)
        return
    batches = make_batches(parsed)
    for b in batches:  # what the store keeps is the canonical JSON the device is sent
        assert b.outcomes == canonical_json(json.loads(b.outcomes)).decode()
    back = {(b.device, o["id"]): o["label"] for b in batches for o in json.loads(b.outcomes)}
    assert back == {(d, i): lab for d, i, lab in rows}
