"""Data capture on the server: the store (SQLite and PostgreSQL), outcome joins both ways,
retention and the disk budget, the REST API's refusals, the export and `fleet dataset
export`, and real agents' uploads (onnxruntime, the durable queue, a real HTTP server)
stored once each across agent restarts and a server outage.
"""

from __future__ import annotations

import csv
import json
import random
import time

import httpx
import pytest
from click.testing import CliRunner

from edge_agent.agent import Agent
from edge_agent.capture import Capture, CaptureConfig, CaptureQueue, Uploader
from edge_agent.errors import CaptureError
from edge_agent.model import LoadedModel
from edgefleet.contract.bundle import verify_bundle
from edgefleet.contract.capture import CaptureBatch, CaptureRow, encode_batch
from edgefleet.contract.signing import TrustStore
from fleet_server.cli.main import main
from fleet_server.config import CaptureConfig as ServerCaptureConfig
from fleet_server.telemetry.capture import CaptureFormatError, UnknownCaptureBundleError
from fleet_server.telemetry.outcomes import parse_json_body
from tests.bundles import FEATURES, sensor_data

NOW = 1_750_000_000.0


def _batch(batch: str, ids, *, bundle: str = "sensor@1.0.0", at: float = NOW,
           features=None) -> bytes:
    return encode_batch(CaptureBatch(batch, tuple(
        CaptureRow(i, at, bundle, dict(features or {"temperature": 20.0, "site": "a"}),
                   label="1", probabilities=(0.2, 0.8)) for i in ids)))


def _labels(services, pairs) -> None:
    body = json.dumps({"outcomes": [{"device": d, "id": i, "label": lab}
                                    for d, i, lab in pairs]}).encode()
    services.outcomes.upload(parse_json_body(body), "operator:test")


def _exported(services, **kw):
    return list(services.capture.export("sensor", "1.0.0", **kw))


@pytest.fixture
def captured(services_on, sensor_bundle):
    s = services_on
    s.bundles.upload(sensor_bundle.read_bytes(), "test", NOW)
    for d in ("dev1", "dev2"):
        s.registry.add_device(d, {"site": "a" if d == "dev1" else "b"}, "test", NOW)
    return s


def test_a_batch_is_stored_once_and_outcomes_join_in_either_order(captured):
    s = captured
    _labels(s, [("dev1", "p-1", 0)])  # before its row arrives
    got = s.capture.ingest("dev1", _batch("b" * 16, ["p-1", "p-2", "p-3"]))
    assert (got.rows, got.stored, got.duplicate) == (3, 3, False)
    again = s.capture.ingest("dev1", _batch("b" * 16, ["p-1", "p-2", "p-3"]))
    assert (again.stored, again.duplicate) == (0, True)
    # the same batch id from another device is that device's batch
    assert s.capture.ingest("dev2", _batch("b" * 16, ["p-1"])).stored == 1
    _labels(s, [("dev1", "p-2", "1"), ("dev2", "p-9", 1)])  # after; p-9 was never captured
    _labels(s, [("dev1", "p-2", "0")])  # a second label: the first stands
    rows = _exported(s)
    assert [(r["device"], r["id"], r["label"]) for r in rows] == [
        ("dev1", "p-1", 0), ("dev1", "p-2", "1"), ("dev1", "p-3", None), ("dev2", "p-1", None)]
    assert rows[0]["temperature"] == 20.0 and rows[0]["predicted"] == "1"
    assert [r["id"] for r in _exported(s, labelled=True)] == ["p-1", "p-2"]
    s.registry.create_group("site-b", {"site": "b"}, "test", NOW)
    assert [(r["device"], r["id"]) for r in _exported(s, group="site-b")] == [("dev2", "p-1")]


def test_export_filters_by_time_and_refuses_an_unknown_bundle(captured):
    s = captured
    s.capture.ingest("dev1", _batch("old" + "x" * 13, ["p-1"], at=NOW - 86400 * 20))
    s.capture.ingest("dev1", _batch("new" + "x" * 13, ["p-2"], at=NOW))
    assert [r["id"] for r in _exported(s, since=NOW - 86400 * 14)] == ["p-2"]
    with pytest.raises(UnknownCaptureBundleError):
        s.capture.export("sensor", "9.9.9")


def test_retention_and_the_disk_budget_delete_the_oldest(captured):
    s = captured
    for k in range(5):
        s.store.add_capture_batch("dev1", f"batch-{k:011d}", [
            (f"p-{k}-{i}", NOW, "sensor", "1.0.0", '{"t":1}', '{"label":null}')
            for i in range(10)], NOW + k * 100)
    _, total = s.store.capture_usage()
    per_row = total // 50
    assert s.store.prune_capture(NOW + 50, 10**9) == 10  # received before: gone
    assert s.store.prune_capture(0, 20 * per_row) == 20  # over budget: the oldest first
    assert s.store.capture_usage() == (20, 20 * per_row)
    assert {r["id"].split("-")[1] for r in _exported(s)} == {"3", "4"}
    # a batch id past retention is forgotten: the device would be stored again
    assert s.store.add_capture_batch("dev1", "batch-00000000000", [], NOW) == (0, False)


@pytest.mark.parametrize(("body", "field"), [
    (b"not json", None),
    (json.dumps({"schema": 2, "batch": "b" * 16, "rows": []}).encode(), "capture.schema"),
    (json.dumps({"schema": 1, "batch": "short", "rows": []}).encode(), "capture.batch"),
    (json.dumps({"schema": 1, "batch": "b" * 16, "rows": []}).encode(), "capture.rows"),
    (_batch("b" * 16, ["bad id"]), "capture.rows[0].id"),
    (_batch("b" * 16, ["p-1"], bundle="sensor"), "capture.rows[0].bundle"),
    (_batch("b" * 16, ["p-1"], features={"x": [1, 2]}), "capture.rows[0].features.x"),
    (_batch("b" * 16, ["p-1", "p-1"]), "capture.rows[1].id"),
    (json.dumps({"schema": 1, "batch": "b" * 16, "device": "dev2", "rows": [
        {"id": "p", "time": 1, "bundle": "s@1", "features": {}}]}).encode(),
     "capture.device"),
], ids=["json", "schema", "batch-id", "no-rows", "row-id", "bundle", "feature-value",
        "duplicate-id", "device-in-body"])
def test_bad_batches_are_refused_naming_the_field(captured, body, field):
    with pytest.raises(CaptureFormatError) as err:
        captured.capture.ingest("dev1", body)
    assert err.value.field == field
    assert _exported(captured) == []


# --------------------------------------------------------------------------- REST and CLI


@pytest.fixture
def api(server_factory, sensor_bundle):
    server = server_factory(http=True, capture=ServerCaptureConfig(max_batch_bytes=64 * 1024))
    s = server.services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", NOW)
    tokens = {role: s.auth.create_token(role, role, "test", time.time()).secret
              for role in ("viewer", "operator")}
    for d in ("dev1", "dev2"):
        tokens[d] = s.registry.add_device(d, {}, "test", time.time())[1].secret
    client = httpx.Client(base_url=server.base_url, timeout=30)
    yield client, tokens, server
    client.close()


def _post(client, token, body):
    return client.post("/api/v1/capture", content=body, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})


@pytest.mark.slow
def test_rest_upload_takes_the_device_from_the_credential(api):
    client, tokens, server = api
    r = _post(client, tokens["dev2"], _batch("c" * 16, ["p-1"]))
    assert r.status_code == 201 and r.json()["stored"] == 1
    r = _post(client, tokens["dev2"], _batch("c" * 16, ["p-1"]))
    assert r.status_code == 201 and r.json()["duplicate"] is True
    rows = list(server.services.capture.export("sensor", "1.0.0"))
    assert [r["device"] for r in rows] == ["dev2"]


@pytest.mark.slow
@pytest.mark.parametrize(("who", "body", "status", "kind"), [
    ("operator", _batch("d" * 16, ["p-1"]), 403, "PermissionDeniedError"),
    (None, _batch("d" * 16, ["p-1"]), 401, "AuthenticationError"),
    ("dev1", _batch("d" * 16, ["bad id"]), 422, "CaptureFormatError"),
    ("dev1", _batch("d" * 16, [f"p-{i}" for i in range(2000)]), 413, "PayloadTooLargeError"),
], ids=["operator", "no-token", "bad-row", "too-large"])
def test_rest_upload_refusals(api, who, body, status, kind):
    client, tokens, server = api
    r = _post(client, tokens.get(who, "nothing"), body) if who else client.post(
        "/api/v1/capture", content=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind
    assert list(server.services.capture.export("sensor", "1.0.0")) == []


@pytest.mark.slow
@pytest.mark.parametrize(("params", "status", "kind"), [
    ({"bundle": "sensor@9.9.9"}, 404, "UnknownCaptureBundleError"),
    ({"bundle": "sensor"}, 422, None),
    ({"bundle": "sensor@1.0.0", "since": "14 days"}, 422, "InvalidRequestError"),
    ({"bundle": "sensor@1.0.0", "group": "nope"}, 404, "NotFoundError"),
], ids=["unknown-bundle", "not-name-at-version", "since", "unknown-group"])
def test_rest_export_refusals(api, params, status, kind):
    client, tokens, _ = api
    r = client.get("/api/v1/capture/export", params=params,
                   headers={"Authorization": f"Bearer {tokens['viewer']}"})
    assert r.status_code == status, r.text
    if kind:
        assert r.json()["error"]["type"] == kind


@pytest.mark.slow
def test_cli_dataset_export_writes_csv_with_the_labels(api, tmp_path):
    client, tokens, server = api
    assert _post(client, tokens["dev1"], _batch("e" * 16, ["p-1", "p-2"])).status_code == 201
    _labels(server.services, [("dev1", "p-2", "1")])
    out = tmp_path / "fresh.csv"
    args = ["dataset", "export", "sensor@1.0.0", "--since", "1000d", "--out", str(out),
            "--server", server.base_url, "--token", tokens["viewer"]]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["device", "id", "time", "site", "temperature", "predicted",
                             "label"]
    assert [(r["id"], r["label"]) for r in rows] == [("p-1", ""), ("p-2", "1")]
    r = CliRunner().invoke(main, [*args[:-4], "--labelled", *args[-4:]])
    assert r.exit_code == 0 and "1 row(s)" in r.output
    bad = CliRunner().invoke(main, ["dataset", "export", "sensor@1.0.0", "--out",
                                    str(tmp_path / "x.xlsx"), "--server", server.base_url,
                                    "--token", tokens["viewer"]])
    assert bad.exit_code != 0 and ".csv or .parquet" in bad.output


# ----------------------------------------------------- real agents, restarts, an outage


@pytest.mark.slow
def test_rows_are_stored_once_across_agent_restarts_and_a_server_outage(
        server_factory, sensor_bundle, signing_keys, tmp_path):
    server = server_factory(http=True)
    s = server.services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", NOW)
    secret = s.registry.add_device("dev1", {}, "test", time.time())[1].secret
    port = int(server.base_url.rsplit(":", 1)[1])
    trust = TrustStore.from_files(signing_keys.trust_specs())
    model = LoadedModel(verify_bundle(sensor_bundle.read_bytes(), trust))
    allow = ("temperature", "current")
    config = CaptureConfig(features=allow, rate=1.0, max_rows=500, window_s=3600,
                           batch_rows=64, batch_bytes=16 * 1024)
    served: set[str] = set()

    def run_agent(rows: int, seed: int) -> None:
        """One agent process's life: serve, end the window, stop (the queue stays)."""
        queue = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**8)
        capture = Capture(config, queue, rng=random.Random(seed))
        agent = Agent("dev1", capture=capture)
        try:
            agent.activate(model)
            data = sensor_data(rows, seed=seed)[list(FEATURES)].to_dict("records")
            served.update(agent.predict(data).ids)
            assert agent.wait_idle(30)
        finally:
            agent.close()
            capture.roll(force=True)
            queue.close()

    def uploader() -> tuple[CaptureQueue, Uploader]:
        queue = CaptureQueue(tmp_path / "capture.db", max_rows=10_000, max_bytes=10**8)
        return queue, Uploader(queue, f"http://127.0.0.1:{port}", secret,
                               batch_rows=config.batch_rows, batch_bytes=config.batch_bytes)

    run_agent(300, 1)
    # a batch reaches the server but its answer is lost: the agent stops before it came
    queue, up = uploader()
    batch_id, body, _ = queue.next_batch(config.batch_rows, config.batch_bytes)
    assert httpx.post(f"{server.base_url}/api/v1/capture", content=body, headers={
        "Authorization": f"Bearer {secret}"}).status_code == 201
    queue.close()
    run_agent(200, 2)  # a restarted agent serves more
    queue, up = uploader()
    assert queue.next_batch(1, 1)[0] == batch_id  # the same batch goes again first
    assert up.upload_once() > 0  # a duplicate on the server, settled on the device
    # the server goes down: nothing is lost, batches wait with their ids
    server.stop()
    with pytest.raises(CaptureError):
        up.upload_once()
    waiting = queue.depth()
    assert waiting > 0
    queue.close()
    run_agent(100, 3)  # and the agent restarts during the outage
    server = server_factory(http=False)
    server.base_url = server.start_http(port=port)
    queue, up = uploader()
    while up.upload_once():
        pass
    assert queue.depth() == 0 and queue.counter("dropped") == 0
    queue.close()
    stored = list(server.services.capture.export("sensor", "1.0.0"))
    assert len(stored) == len(served) == 600
    assert {r["id"] for r in stored} == served  # every row once, none twice
    # outside the allowlist nothing left the device: the stored columns
    for r in server.services.store._rows("SELECT features FROM captured"):
        assert set(json.loads(r["features"])) == set(allow)
    assert set(stored[0]) == {"device", "id", "time", *allow, "predicted", "label"}


# ------------------------------------------------------- a recipe's data = "fleet"


def _recipe(tmp_path, data: str):
    from packager.retrain import load_recipe

    path = tmp_path / "recipe.toml"
    path.write_text('name = "r"\nbundle = "sensor"\ngroup = "plant"\nkey = "k"\n'
                    'target = "fault"\ntrain = "m:fit"\ntime_column = "ts"\n' + data)
    return load_recipe(path)


@pytest.mark.parametrize(("data", "want"), [
    ('data = "fleet"\n', ("fleet", "14d", True)),
    ('[data]\nsource = "fleet"\nsince = "30d"\nlabelled = false\n', ("fleet", "30d", False)),
    ('data = "mine.data:load"\n', ("mine.data:load", "14d", True)),
], ids=["text", "table", "own"])
def test_a_recipe_reads_the_fleet_as_its_data(tmp_path, data, want):
    r = _recipe(tmp_path, data)
    assert (r.data, r.data_since, r.data_labelled) == want


@pytest.mark.parametrize(("data", "field"), [
    ('data = "warehouse"\n', "data"),
    ('[data]\nsource = "fleet"\nsince = "two weeks"\n', "data.since"),
    ('[data]\nsource = "fleet"\nlabelled = "yes"\n', "data.labelled"),
    ('[data]\nsource = "fleet"\nfrom = "x"\n', "data"),
], ids=["not-an-entry-point", "since", "labelled", "unknown-key"])
def test_bad_fleet_data_in_a_recipe_is_named(tmp_path, data, field):
    from packager.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        _recipe(tmp_path, data)
    assert err.value.field == field


@pytest.mark.slow
def test_fleet_data_is_the_champions_labelled_capture_of_the_group(api, tmp_path):
    from packager.retrain import FleetApi, fleet_frame

    client, tokens, server = api
    s = server.services
    now = time.time()
    s.registry.create_group("plant", {}, "test", now)
    for d in ("dev1", "dev2"):
        s.desired.assign(d, "sensor@1.0.0", actor="t", now=now)
    recipe = _recipe(tmp_path, 'data = "fleet"\n')
    fleet = FleetApi(server.base_url, tokens["operator"])
    try:
        from packager.errors import RecipeError

        with pytest.raises(RecipeError, match="no captured rows"):
            fleet_frame(fleet, recipe)
        body = encode_batch(CaptureBatch("f" * 16, tuple(
            CaptureRow(f"p-{i}", now - i, "sensor@1.0.0", {"temperature": 20.0 + i},
                       label="1") for i in range(4))))
        assert _post(client, tokens["dev1"], body).status_code == 201
        _labels(s, [("dev1", "p-1", 0), ("dev1", "p-3", 1)])
        frame = fleet_frame(fleet, recipe)
    finally:
        fleet.close()
    assert sorted(frame.columns) == ["fault", "temperature", "ts"]
    assert sorted(zip(frame["temperature"], frame["fault"], strict=True)) == \
        [(21.0, 0), (23.0, 1)]


# ------------------------------------------- a real daemon: broker, server, HTTP upload


@pytest.mark.slow
def test_a_running_agent_captures_and_uploads_through_its_daemon(
        tmp_path, signing_keys, sensor_bundle):
    from dataclasses import replace

    from edge_agent.config import load_config
    from edge_agent.daemon import AgentDaemon
    from fleet_server.server import FleetServer
    from fleet_server.services import build_services
    from tests.broker import SERVER_USER, Mosquitto
    from tests.edge_agent.agent_helpers import wait_until, write_config
    from tests.fleet_server.conftest import SERVER_PASSWORD, make_config

    now = time.time()
    s = build_services(make_config(tmp_path, signing_keys))
    secret = s.registry.add_device("dev1", {"site": "test"}, "test", now)[1].secret
    s.bundles.upload(sensor_bundle.read_bytes(), "test", now)
    users = s.store.mosquitto_users()
    s.close()
    broker = Mosquitto()
    server = daemon = None
    try:
        broker.add_user(SERVER_USER, SERVER_PASSWORD)
        for device, hashed in users:
            broker.add_hashed_user(device, hashed)
        broker.start()
        server = FleetServer(replace(make_config(tmp_path, signing_keys, broker=broker)))
        server.start()
        url = server.start_http()
        wait_until(lambda: server.link.connected, 10, "the server to connect")
        server.services.desired.assign("dev1", "sensor@1.0.0", actor="t", now=now)
        path = write_config(tmp_path / "dev1", device="dev1", broker=broker, password=secret,
                            trust=signing_keys.trust_specs(), server_url=url, http_port=0)
        with path.open("a") as fh:
            fh.write('[capture]\nenabled = true\nfeatures = ["temperature"]\nrate = 1\n'
                     "max_rows = 1000\nwindow_seconds = 0.5\nupload_seconds = 0.2\n")
        daemon = AgentDaemon(load_config(path))
        daemon.start()
        agent = daemon.agent
        wait_until(lambda: agent.model is not None, 30, "the bundle to install")
        data = sensor_data(40, seed=9)[list(FEATURES)].to_dict("records")
        served = set(agent.predict(data).ids)

        def stored() -> list[dict]:
            return list(server.services.capture.export("sensor", "1.0.0"))

        wait_until(lambda: len(stored()) >= 40, 30, "the captured rows on the server")
        rows = stored()
        assert {r["id"] for r in rows} == served and len(rows) == 40
        assert all(set(r) == {"device", "id", "time", "temperature", "predicted", "label"}
                   for r in rows)
        wait_until(lambda: daemon.health()["capture"]["uploaded"] == 40, 10, "the counters")
        assert daemon.health()["capture"]["queued"] == 0
    finally:
        if daemon is not None:
            daemon.stop(flush_timeout=0.5)
        if server is not None:
            server.stop()
        broker.cleanup()


@pytest.mark.slow
def test_the_uploader_drops_a_refused_batch_and_keeps_one_it_may_send_again(api, tmp_path):
    _, tokens, server = api
    queue = CaptureQueue(tmp_path / "capture.db", max_rows=100, max_bytes=10**6)
    try:
        bad = json.dumps({"id": "bad id", "time": 1.0, "bundle": "sensor@1.0.0",
                          "features": {}, "label": None, "probabilities": None,
                          "value": None}).encode()
        queue.put([bad], batch_bytes=10_000)
        stranger = Uploader(queue, server.base_url, "efd_not-a-device", batch_rows=10,
                            batch_bytes=10_000)
        with pytest.raises(CaptureError, match="401"):
            stranger.upload_once()
        assert queue.depth() == 1  # an unknown credential may be a rotation: kept
        device = Uploader(queue, server.base_url, tokens["dev1"], batch_rows=10,
                          batch_bytes=10_000)
        assert device.upload_once() == 1  # 422: the batch itself is refused
        assert queue.depth() == 0 and queue.counter("refused") == 1
        assert device.upload_once() == 0
    finally:
        queue.close()
