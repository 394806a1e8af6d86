"""The agent daemon against a real Mosquitto (password file, ACL), real HTTP downloads, real
onnxruntime and real SQLite: installs, windows, reports, rollbacks, shadow, outages.

The fleet side is played by :class:`~tests.edge_agent.agent_helpers.Recorder` (a paho
client on the server account, as the fleet server's ingest is) and
:class:`~tests.edge_agent.agent_helpers.BundleServer` (the download endpoint).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_agent.config import load_config
from edge_agent.daemon import AgentDaemon
from edge_agent.model import Outputs
from edgefleet.contract.bundle import pack_bundle, read_unverified
from edgefleet.contract.messages import Heartbeat, Report, Status, Summary, decode
from edgefleet.contract.profile import Profile, from_wire
from edgefleet.contract.signing import Envelope, generate_key
from tests.broker import SERVER_USER, Mosquitto
from tests.bundles import FEATURES, sensor_data
from tests.edge_agent.agent_helpers import BundleServer, Recorder, wait_until, write_config
from tests.hostile import HOSTILE

pytestmark = pytest.mark.slow

PASSWORDS = {"dev1": "pw-dev1-Lm", "dev2": "pw-dev2-Qp", SERVER_USER: "pw-server-Hs"}


@pytest.fixture
def broker(request):
    broker = Mosquitto()
    request.addfinalizer(broker.cleanup)
    for user, password in PASSWORDS.items():
        broker.add_user(user, password)
    broker.start()
    return broker


@pytest.fixture
def fleet(broker, request):
    recorder = Recorder(broker, PASSWORDS[SERVER_USER])
    request.addfinalizer(recorder.stop)
    return recorder


@pytest.fixture
def downloads(request):
    server = BundleServer(PASSWORDS["dev1"])
    request.addfinalizer(server.stop)
    return server


@pytest.fixture
def make_daemon(broker, downloads, signing_keys, tmp_path, request):
    def make(device: str = "dev1", **agent) -> AgentDaemon:
        agent.setdefault("seconds", 1)
        agent.setdefault("http_port", 0)
        agent.setdefault("heartbeat_seconds", 0.5)
        path = write_config(tmp_path / device, device=device, broker=broker,
                            password=PASSWORDS[device], trust=signing_keys.trust_specs(),
                            server_url=downloads.url, **agent)
        daemon = AgentDaemon(load_config(path))
        request.addfinalizer(daemon.stop)
        daemon.start()
        wait_until(lambda: daemon.link.connected, 10, f"{device} to connect")
        return daemon

    return make


def rows(n: int, seed: int = 3, **shift) -> list[dict]:
    return sensor_data(n, seed=seed, shift=shift)[list(FEATURES)].to_dict("records")


def reports(fleet: Recorder, device: str = "dev1") -> list[Report]:
    return [r for r in fleet.of(Report) if r.device == device]


def install(fleet, daemon, ref, revision, outcome="installed") -> Report:
    fleet.desire(daemon.device, revision, ref)
    wait_until(lambda: any(r.revision == revision for r in reports(fleet, daemon.device)), 15,
               f"the report for revision {revision}")
    report = [r for r in reports(fleet, daemon.device) if r.revision == revision][-1]
    assert report.outcome == outcome, report.reason
    return report


def test_install_serve_and_report_windows(fleet, downloads, make_daemon, bundles):
    daemon = make_daemon()
    ref = downloads.add(bundles.build("1.0.0"))
    report = install(fleet, daemon, ref, 1)
    assert report.bundle.sha256 == ref.sha256 and daemon.agent.model.ref == \
        ref.__class__(ref.name, ref.version, ref.sha256)
    data = rows(300)
    for row in data[:120]:
        daemon.agent.predict([row])
    daemon.agent.predict(data[120:])
    wait_until(lambda: sum(s.rows for s in fleet.of(Summary)) >= 300, 10, "the window summary")
    summaries = fleet.of(Summary)
    assert [s.seq for s in summaries] == list(range(1, len(summaries) + 1))
    assert sum(s.rows for s in summaries) == 300
    merged = Profile.merged(daemon.agent.model.spec,
                            (from_wire(s.profile, daemon.agent.model.spec) for s in summaries))
    model = daemon.agent.model
    batch = model.validator.batch(data)
    want = Profile(model.spec)
    pred = model.runner.run_columns(batch.columns)
    want.update(batch.columns, model.profile_outputs(Outputs(pred.labels, pred.probabilities,
                                                             None)), rows=300)
    for name in FEATURES:
        assert merged.inputs[name].counts.tolist() == want.inputs[name].counts.tolist()
    assert merged.outputs["class"].counts.tolist() == want.outputs["class"].counts.tolist()
    assert all(s.bundle.sha256 == ref.sha256 and s.reference_hash == model.spec.reference_hash
               for s in summaries)
    # retained status online with the bundle and labels, heartbeats with health
    status = [s for s in fleet.of(Status) if s.state == "online"][-1]
    assert status.bundle.sha256 == ref.sha256 and status.labels == {"site": "test", "line": "1"}
    wait_until(lambda: fleet.of(Heartbeat), 5, "a heartbeat")
    beat = fleet.of(Heartbeat)[-1]
    assert beat.predictions == 300 and beat.rss_bytes > 10_000_000
    assert beat.latency_p50_ms is not None


def test_a_bundle_failing_its_smoke_test_keeps_the_old_model(fleet, downloads, make_daemon,
                                                             bundles):
    daemon = make_daemon()
    install(fleet, daemon, downloads.add(bundles.build("1.0.0")), 1)
    broken = downloads.add(bundles.broken_smoke("1.5.0"))
    report = install(fleet, daemon, broken, 2, outcome="failed")
    assert "smoke test failed" in report.reason
    assert daemon.agent.model.ref.version == "1.0.0"
    assert daemon.agent.predict(rows(2)).bundle == "sensor@1.0.0"
    assert daemon.slots.state.active.version == "1.0.0"
    assert not daemon.slots.has(broken.sha256)  # the failed download is not kept
    # the same revision again (a retained message re-delivered) does not retry
    n = downloads.downloads()
    daemon.reconcile(_desired(2, broken))
    assert downloads.downloads() == n


def _desired(revision, bundle, shadow=None, allow_downgrade=False):
    from edgefleet.contract.messages import DesiredState

    return DesiredState("dev1", revision, bundle, shadow, allow_downgrade)


def test_a_tampered_download_is_refused(fleet, downloads, make_daemon, bundles):
    daemon = make_daemon()
    path = bundles.build("1.0.0")
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0x01
    ref = downloads.add(path, body=bytes(body))
    report = install(fleet, daemon, ref, 1, outcome="failed")
    assert "DownloadDigestError" in report.reason
    assert daemon.agent.model is None


def test_a_bundle_from_an_untrusted_signer_is_refused(fleet, downloads, make_daemon, bundles,
                                                      tmp_path):
    daemon = make_daemon()
    good = read_unverified(bundles.build("1.0.0").read_bytes())
    files = {k: v for k, v in good.members.items()
             if k not in ("manifest.json", "signatures.json")}
    forged = pack_bundle(good.manifest, Envelope().signed(generate_key(),
                                                          good.manifest.to_bytes()),
                         files, good.mtime)
    path = tmp_path / "forged.edgebundle"
    path.write_bytes(forged)
    report = install(fleet, daemon, downloads.add(path), 1, outcome="failed")
    assert "UntrustedSignerError" in report.reason


def test_a_signed_bundle_with_something_hidden_is_refused(fleet, downloads, make_daemon,
                                                          bundles):
    """The table of hostile bundles (tests/hostile.py), each downloaded intact (its digest
    is the desired state's) and refused at install with its own error type; nothing is
    kept, no verification directory is left, and the running model keeps serving."""
    daemon = make_daemon()
    install(fleet, daemon, downloads.add(bundles.build("1.0.0")), 1)
    valid = bundles.build("1.0.0").read_bytes()
    for i, case in enumerate(HOSTILE):
        ref = downloads.add_bytes("sensor", f"2.0.{i}", case.build(valid))
        report = install(fleet, daemon, ref, 2 + i, outcome="failed")
        assert report.reason.startswith(f"{case.error.__name__}: "), (case.id, report.reason)
        assert case.names in report.reason, (case.id, report.reason)
        assert not daemon.slots.has(ref.sha256), case.id
    assert daemon.agent.model.ref.version == "1.0.0"
    assert daemon.agent.predict(rows(2)).bundle == "sensor@1.0.0"
    assert not list(daemon.slots.root.glob(".verify-*"))
    assert not list(daemon.slots.bundles.glob(".tmp-*"))


def test_downgrade_refused_rollback_served_locally(fleet, downloads, make_daemon, bundles):
    daemon = make_daemon()
    v1, v2 = downloads.add(bundles.build("1.0.0")), downloads.add(bundles.build("1.1.0"))
    v0 = downloads.add(bundles.build("0.9.0"))
    install(fleet, daemon, v1, 1)
    install(fleet, daemon, v2, 2)
    assert downloads.downloads() == 2
    report = install(fleet, daemon, v0, 3, outcome="failed")
    assert "downgrade" in report.reason and daemon.agent.model.ref.version == "1.1.0"
    assert downloads.downloads() == 2  # refused before downloading
    install(fleet, daemon, v1, 4, outcome="rolled_back")
    assert daemon.agent.model.ref.version == "1.0.0"
    assert downloads.downloads() == 2  # from the previous slot, no download
    assert daemon.slots.state.previous.version == "1.1.0"


def test_shadow_agreement_goes_into_the_summary(fleet, downloads, make_daemon, bundles):
    daemon = make_daemon()
    live = downloads.add(bundles.build("1.0.0"))
    candidate = downloads.add(bundles.build("2.0.0", model="inverted"))
    install(fleet, daemon, live, 1)
    fleet.desire("dev1", 2, live, candidate)
    wait_until(lambda: any(r.outcome == "shadow_started" for r in reports(fleet)), 15,
               "the shadow to start")
    for row in rows(200):
        answer = daemon.agent.predict([row])
        assert answer.bundle == "sensor@1.0.0"  # the candidate never answers
    assert daemon.agent.wait_idle()
    wait_until(lambda: any(s.shadow is not None for s in fleet.of(Summary)), 10,
               "a summary with shadow stats")
    stats = [s.shadow for s in fleet.of(Summary) if s.shadow is not None]
    rows_seen = sum(s.rows for s in stats)
    assert rows_seen == 200 and stats[0].bundle.sha256 == candidate.sha256
    assert sum(s.agreed for s in stats) / rows_seen < 0.1  # the inverted model disagrees
    # promoting the candidate stops the shadow
    fleet.desire("dev1", 3, candidate, allow_downgrade=False)
    wait_until(lambda: daemon.slots.state.active.version == "2.0.0", 15,
               "the candidate to go live")  # the state is committed after the switch
    assert daemon.agent.model.ref.version == "2.0.0"
    assert daemon.agent.shadow is None and daemon.slots.state.shadow is None


def test_every_summary_arrives_once_through_a_broker_outage(broker, fleet, downloads,
                                                            make_daemon, bundles):
    daemon = make_daemon()
    install(fleet, daemon, downloads.add(bundles.build("1.0.0")), 1)
    data = rows(400)
    served = 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # traffic, then the broker goes away
        daemon.agent.predict(data[served % 400: served % 400 + 5])
        served += 5
        time.sleep(0.01)
    broker.stop()
    wait_until(lambda: not daemon.link.connected, 5, "the agent to notice the outage")
    deadline = time.monotonic() + 3.0  # 3 windows while offline
    while time.monotonic() < deadline:
        daemon.agent.predict(data[:5])
        served += 5
        time.sleep(0.01)
    assert daemon.outbox.depth >= 2, "summaries wait in the outbox while offline"
    broker.start()
    time.sleep(1.2)
    daemon._close_window()
    wait_until(lambda: daemon.link.connected and daemon.outbox.depth == 0, 15,
               "the outbox to drain")
    wait_until(lambda: sum(s.rows for s in {s.seq: s for s in fleet.of(Summary)}.values())
               >= served, 10, "every row to be summarised")
    by_seq = {s.seq: s for s in fleet.of(Summary)}
    assert sorted(by_seq) == list(range(1, max(by_seq) + 1)), "no sequence number missing"
    assert sum(s.rows for s in by_seq.values()) == served
    assert daemon.outbox.dropped == 0


def test_a_stopped_agent_says_offline_and_loses_no_window(fleet, downloads, make_daemon,
                                                           bundles):
    daemon = make_daemon(seconds=3600)
    install(fleet, daemon, downloads.add(bundles.build("1.0.0")), 1)
    daemon.agent.predict(rows(17))
    daemon.stop()
    wait_until(lambda: any(s.rows == 17 for s in fleet.of(Summary)), 5, "the last window")
    assert [s for s in fleet.of(Status)][-1].state == "offline"


def test_restart_loads_the_installed_bundle_verified(fleet, downloads, make_daemon, bundles):
    daemon = make_daemon()
    ref = downloads.add(bundles.build("1.0.0"))
    install(fleet, daemon, ref, 1)
    daemon.stop()
    again = make_daemon()
    assert again.agent.model.ref.sha256 == ref.sha256
    assert downloads.downloads() == 1
    # the retained desired state arrives again: nothing to do, nothing reported
    time.sleep(0.5)
    assert len([r for r in reports(fleet) if r.revision == 1]) == 1


def test_a_corrupted_installed_file_falls_back_to_the_previous(fleet, downloads, make_daemon,
                                                                bundles):
    daemon = make_daemon()
    v1, v2 = downloads.add(bundles.build("1.0.0")), downloads.add(bundles.build("1.1.0"))
    install(fleet, daemon, v1, 1)
    install(fleet, daemon, v2, 2)
    daemon.stop()
    path = daemon.slots.path(v2.sha256)
    body = bytearray(path.read_bytes())
    body[-40] ^= 0xFF
    path.write_bytes(bytes(body))
    again = make_daemon()
    assert again.agent.model.ref.version == "1.0.0"
    wait_until(lambda: any(r.outcome == "rolled_back" and "failed to load" in r.reason
                           for r in reports(fleet)), 10, "the fall-back report")


def test_local_endpoint_serves_through_the_daemon(fleet, downloads, make_daemon, bundles):
    import http.client
    import json

    from tests.broker import free_port

    daemon = make_daemon(http_port=free_port())
    install(fleet, daemon, downloads.add(bundles.build("1.0.0")), 1)
    conn = http.client.HTTPConnection("127.0.0.1", daemon.http.port, timeout=5)
    conn.request("POST", "/predict", body=json.dumps({"rows": rows(3)}))
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 200 and len(body["predictions"]) == 3
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    conn.close()
    assert health["bundle"] == "sensor@1.0.0" and health["predictions"] == 3
    assert health["connected"] is True and health["revision"] == 1
    np.testing.assert_equal(health["errors"], 0)


def test_a_crashed_window_comes_back_from_its_checkpoint_and_the_rest_is_counted(
        fleet, downloads, make_daemon, bundles):
    import json

    daemon = make_daemon(seconds=3600, checkpoint_seconds=0.2)
    install(fleet, daemon, downloads.add(bundles.build("1.0.0")), 1)
    daemon.agent.predict(rows(30))

    def saved_rows() -> int:
        blob = daemon.outbox.get_state("window")
        return 0 if blob is None else decode("edgefleet/v1/dev1/summary", blob).rows

    wait_until(lambda: saved_rows() == 30, 10, "a checkpoint of 30 rows")
    daemon._checkpoint = lambda now: None  # no checkpoint after this ...
    daemon.agent.predict(rows(10, seed=4))
    wait_until(lambda: json.loads(daemon.outbox.get_state("served") or b"{}").get("rows") == 40,
               10, "the served counter")
    daemon._close_window = lambda now=None: None  # ... and a crash: the window never closes
    daemon.stop()
    assert not any(s.rows for s in fleet.of(Summary)), "the window closed after all"
    again = make_daemon(seconds=3600, checkpoint_seconds=0.2)  # same data directory
    assert again.restored is not None and again.restored.rows == 30
    wait_until(lambda: fleet.of(Summary), 10, "the restored window")
    (summary,) = fleet.of(Summary)
    assert summary.rows == 30 and summary.errors.get("lost_rows") == 10
    wait_until(lambda: again.outbox.depth == 0, 10, "the server to confirm it")
    assert again.outbox.get_state("window") is None  # cleared by the put that stored it
