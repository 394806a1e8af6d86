"""The REST API over real HTTP (uvicorn on a free port, httpx as the client)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from dataclasses import replace

import httpx
import pytest

from edgefleet.contract.bundle import file_entry, pack_bundle, read_unverified, sign_bundle
from edgefleet.contract.errors import BundleFormatError
from edgefleet.contract.messages_base import download_path
from edgefleet.contract.signing import Envelope, generate_key, load_private_key
from tests.hostile import HOSTILE

pytestmark = pytest.mark.slow


def retar(data: bytes, members: dict[str, bytes]) -> bytes:
    """The same bundle with some members' bytes replaced, manifest and signature kept."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as src, \
            tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info in src.getmembers():
            body = members.get(info.name, src.extractfile(info).read())
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return gzip.compress(out.getvalue())


def resigned(data: bytes, key, files: dict[str, bytes] | None = None) -> bytes:
    """Repack with (changed) files and a fresh manifest file list, signed by ``key`` only."""
    bundle = read_unverified(data)
    members = {k: v for k, v in bundle.members.items()
               if k not in ("manifest.json", "signatures.json")}
    members.update(files or {})
    manifest = replace(bundle.manifest, files=tuple(sorted(file_entry(k, v)
                                                           for k, v in members.items())))
    return pack_bundle(manifest, Envelope().signed(key, manifest.to_bytes()), members,
                       bundle.mtime)


@pytest.fixture
def api(broker, server_factory):
    server = server_factory(broker, http=True, max_upload_bytes=200_000)
    s = server.services
    tokens = {role: s.auth.create_token(role, role, "test", time.time()).secret
              for role in ("viewer", "operator", "approver")}
    _, dev = s.registry.add_device("dev1", {"site": "a"}, "test", time.time())
    client = httpx.Client(base_url=server.base_url, timeout=10)

    def call(method: str, path: str, who: str | None = "operator", **kw) -> httpx.Response:
        headers = kw.pop("headers", {})
        if who == "device":
            headers["Authorization"] = f"Bearer {dev.secret}"
        elif who is not None:
            headers["Authorization"] = f"Bearer {tokens[who]}"
        return client.request(method, path, headers=headers, **kw)

    yield call, server
    client.close()


def error(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()["error"]
    return r.status_code, body["type"], body["message"]


def test_an_upload_is_verified_stored_and_downloadable_by_a_device(api, sensor_bundle):
    call, _ = api
    data = sensor_bundle.read_bytes()
    r = call("POST", "/api/v1/bundles", content=data)
    assert r.status_code == 201, r.text
    assert r.json()["signers"][0]["role"] == "build"
    assert call("POST", "/api/v1/bundles", content=data).status_code == 200  # same bytes
    listed = call("GET", "/api/v1/bundles", who="viewer").json()
    assert [(b["name"], b["version"]) for b in listed] == [("sensor", "1.0.0")]
    detail = call("GET", "/api/v1/bundles/sensor/1.0.0", who="viewer").json()
    assert detail["manifest"]["reference_hash"] == detail["reference_hash"]
    url = download_path("sensor", "1.0.0")
    # a device downloads only what is assigned to it
    assert error(call("GET", url, who="device"))[:2] == (403, "PermissionDeniedError")
    assert call("PUT", "/api/v1/devices/dev1/desired",
                json={"bundle": "sensor@1.0.0"}).status_code == 200
    got = call("GET", url, who="device")
    assert got.status_code == 200 and got.content == data
    assert got.headers["x-edgefleet-sha256"] == detail["sha256"]
    assert call("GET", download_path("sensor", "1.0.0"), who=None).status_code == 401
    # an unassigned name@version is 403 to a device whether stored or not (no probing)
    assert call("GET", download_path("sensor", "9.0.0"), who="device").status_code == 403
    assert call("GET", download_path("sensor", "9.0.0"), who="viewer").status_code == 404


def test_refused_uploads_name_their_reason(api, sensor_bundle, signing_keys):
    call, _ = api
    data = sensor_bundle.read_bytes()
    bundle = read_unverified(data)
    model = bundle.member("model.onnx")
    stranger = generate_key()
    build_key = load_private_key(signing_keys.build.private)
    ref = json.loads(bundle.member("reference.json"))
    ref["spec"]["inputs"][0]["edges"][1] += 0.5  # other bins than the hash says
    cases = {
        "tampered": (retar(data, {"model.onnx": bytes([model[0] ^ 1]) + model[1:]}), 422,
                     "DigestMismatchError", "model.onnx"),
        "untrusted": (resigned(data, stranger), 422, "UntrustedSignerError",
                      "no signature by a trusted key"),
        "not-a-bundle": (b"PK\x03\x04 a zip file", 400, "BundleFormatError", "gzip"),
        "reference": (resigned(data, build_key, {"reference.json": json.dumps(ref).encode()}),
                      422, "BundleReferenceError", "reference_hash"),
        "too-large": (data + b"\x00" * 200_000, 413, "PayloadTooLargeError", "limit"),
    }
    for case, (body, status, kind, text) in cases.items():
        got = error(call("POST", "/api/v1/bundles", content=body))
        assert got[:2] == (status, kind), (case, got)
        assert text in got[2], (case, got)
    # other bytes under a stored name@version
    assert call("POST", "/api/v1/bundles", content=data).status_code == 201
    other = sign_bundle(data, load_private_key(signing_keys.approver.private))  # valid, other bytes
    assert other != data
    assert error(call("POST", "/api/v1/bundles", content=other))[:2] == (409, "ConflictError")
    assert call("GET", "/api/v1/bundles", who="viewer").json()[0]["sha256"] == \
        read_unverified(data).sha256


def test_a_streamed_upload_past_the_limit_is_refused_without_content_length(api):
    call, _ = api

    def chunks():
        for _ in range(30):
            yield b"\x1f\x8b" + b"\x00" * 9998

    got = error(call("POST", "/api/v1/bundles", content=chunks()))
    assert got[:2] == (413, "PayloadTooLargeError")


def test_devices_groups_and_desired_state(api, sensor_bundle, devices):
    call, _ = api
    call("POST", "/api/v1/bundles", content=sensor_bundle.read_bytes())
    r = call("POST", "/api/v1/devices", json={"id": "dev2", "labels": {"site": "b"}})
    assert r.status_code == 201 and r.json()["secret"].startswith("efd_")
    assert error(call("POST", "/api/v1/devices", json={"id": "dev2"}))[:2] == \
        (409, "ConflictError")
    assert error(call("POST", "/api/v1/devices", json={"id": "bad/id"}))[:2] == \
        (422, "RequestValidationError")
    devs = call("GET", "/api/v1/devices", who="viewer", params={"label": "site=a"}).json()
    assert [d["id"] for d in devs] == ["dev1"]
    r = call("POST", "/api/v1/groups", json={"name": "plant-a", "selector": {"site": "a"},
                                             "important_features": ["vibration"]})
    assert r.status_code == 201 and r.json()["members"] == 1
    assert [g["name"] for g in call("GET", "/api/v1/groups", who="viewer").json()] == ["plant-a"]
    r = call("PUT", "/api/v1/devices/dev1/desired", json={"bundle": "sensor@1.0.0"})
    assert r.status_code == 200 and r.json()["revision"] == 1
    assert r.json()["bundle"]["url"] == download_path("sensor", "1.0.0")
    # a device reads its own desired state with its secret, never another's
    assert call("GET", "/api/v1/devices/dev1/desired", who="device").json()["revision"] == 1
    assert error(call("GET", "/api/v1/devices/dev2/desired", who="device"))[0] == 403
    # the device installs and reports; the detail shows it, with its last heartbeat
    dev = devices("dev1")
    dev.online({"site": "a"})
    dev.heartbeat(predictions=7)
    dev.report(seq=1, revision=1, outcome="installed")
    dev.flush()
    from tests.fleet_server.conftest import wait_until

    wait_until(lambda: call("GET", "/api/v1/devices/dev1", who="viewer").json()["reports"], 10)
    wait_until(lambda: call("GET", "/api/v1/devices/dev1", who="viewer").json()["health"], 10)
    detail = call("GET", "/api/v1/devices/dev1", who="viewer").json()
    assert detail["online"] and detail["health"]["predictions"] == 7
    assert detail["desired"]["revision"] == 1
    assert detail["reports"][0]["outcome"] == "installed"
    assert call("DELETE", "/api/v1/groups/plant-a").status_code == 204
    assert error(call("DELETE", "/api/v1/groups/plant-a"))[:2] == (404, "NotFoundError")


def test_errors_are_json_with_a_message(api):
    call, _ = api
    assert error(call("GET", "/api/v1/nowhere")) == (404, "NotFound", "Not Found")
    assert error(call("PATCH", "/api/v1/groups"))[:2] == (405, "MethodNotAllowed")
    got = error(call("GET", "/api/v1/drift", who="viewer", params={"bundle": "nope"}))
    assert got[:2] == (422, "RequestValidationError") and got[2].startswith("query.bundle:")
    got = error(call("GET", "/api/v1/drift", who="viewer",
                     params={"bundle": "sensor@1.0.0", "since": 10, "until": 5}))
    assert got == (422, "InvalidRequestError", "until must be after since")
    got = error(call("GET", "/api/v1/devices", who="viewer", params={"lable": "site=a"}))
    assert got[:2] == (422, "InvalidRequestError") and "unknown query parameter 'lable'" in got[2]
    got = error(call("GET", "/api/v1/devices", who="viewer", params={"limit": "lots"}))
    assert got[:2] == (422, "RequestValidationError") and "limit" in got[2]
    r = call("GET", "/api/v1/devices", who=None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_health_and_metrics_need_no_token(api):
    call, _ = api
    health = call("GET", "/health", who=None).json()
    assert health["status"] == "ok" and health["mqtt"] == "connected"
    text = call("GET", "/metrics", who=None).text
    for name in ("edgefleet_devices_online", "edgefleet_ingest_lag_seconds_bucket",
                 "edgefleet_alerts_open", "edgefleet_ingest_queue_depth"):
        assert name in text


def test_a_signed_bundle_with_something_hidden_is_refused_and_not_stored(api, sensor_bundle):
    """The table of hostile bundles (tests/hostile.py): each answered 4xx with its own
    error type (400 for what is not a well-formed bundle, 422 for a member a bundle may
    not hold), and not one byte of it stored: no blob, no temporary file left behind."""
    call, server = api
    valid = sensor_bundle.read_bytes()
    blobs = server.services.bundles.blobs.root
    for case in HOSTILE:
        got = error(call("POST", "/api/v1/bundles", content=case.build(valid)))
        status = 400 if issubclass(case.error, BundleFormatError) else 422
        assert got[:2] == (status, case.error.__name__), (case.id, got)
        assert case.names in got[2], (case.id, got)
    assert call("GET", "/api/v1/bundles", who="viewer").json() == []
    assert sorted(p.name for p in blobs.iterdir()) == []
    r = call("POST", "/api/v1/bundles", content=valid)
    assert r.status_code == 201, r.text
    assert [p.name for p in blobs.iterdir()] == [f"{r.json()['sha256']}.edgebundle"]
    assert call("GET", download_path("sensor", "1.0.0"), who="viewer").content == valid
