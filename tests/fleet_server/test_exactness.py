"""What the devices profiled is what the drift report counts, exactly.

Devices profile raw rows with the agent's own profile code, publish the summaries through
the agent's outbox and link to a real Mosquitto; the server ingests them into SQLite; the
drift report over the fleet, a group and one device must count every bin of every feature
exactly as ``Profile.merged`` of the devices' own profiles does, over ranges that mix
hourly and per-minute rollups. Summaries that arrived before their bundle, and those of an
old-version database, are counted once the bundle is uploaded.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from edgefleet.contract.messages import encode
from edgefleet.contract.profile import Profile
from fleet_server.monitoring.drift import Scope
from fleet_server.services import build_services
from fleet_server.store import Store
from fleet_server.store.migrations import MIGRATIONS
from tests.fleet_server.conftest import make_config, profile_of, summary_of, wait_until

pytestmark = pytest.mark.slow


def counts(profile: Profile) -> dict:
    doc = profile.to_dict()
    return {"rows": doc["rows"],
            **{f"{side}.{name}": (s["counts"], s.get("missing"))
               for side in ("inputs", "outputs") for name, s in doc[side].items()}}


def test_the_report_counts_exactly_what_the_devices_profiled(broker, devices, server_factory,
                                                             sensor_bundle, sensor_ref):
    server = server_factory(broker)
    s = server.services
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    s.registry.create_group("plant-a", {"site": "a"}, "test", time.time())
    spec, _ = sensor_ref
    hour = int(time.time() // 3600) * 3600 - 2 * 3600  # two hours ago, on the hour
    sent: dict[str, list[tuple[float, Profile]]] = {}
    plan = {"dev1": ("a", {}), "dev2": ("a", {"temperature": 12.0}), "dev3": ("b", {})}
    for i, (device, (site, shift)) in enumerate(plan.items()):
        dev = devices(device)
        dev.online({"site": site})
        sent[device] = []
        for w in range(8):  # windows of 15 minutes from 30 min before the hour
            start = hour - 1800 + 900 * w
            prof = profile_of(spec, 30 + 7 * w + i, 100 * i + w, shift)
            sent[device].append((start, prof))
            dev.send(summary_of(device, w, prof, start, start + 900))
        dev.flush()
    store = s.store
    wait_until(lambda: store.count_summaries() == 24, 15, "24 summaries")

    def want(devs, lo, hi) -> Profile:
        # a window counts where its middle falls
        return Profile.merged(spec, [p for d in devs for start, p in sent[d]
                                     if lo <= start + 450 < hi])

    ranges = [(hour - 1800, hour + 5400), (hour - 1234, hour + 3600), (hour, hour + 3600),
              (hour + 60, hour + 3540)]
    ref = s.bundles.reference(1)
    for lo, hi in ranges:
        for scope, devs in ((Scope("fleet"), ["dev1", "dev2", "dev3"]),
                            (s.drift.scope("plant-a"), ["dev1", "dev2"]),
                            (s.drift.scope(device="dev3"), ["dev3"])):
            a, b = s.drift.window(lo, hi, 0)
            merged, n_devices, _ = s.drift.merged(ref, scope, a, b)
            expected = want(devs, a, b)
            assert counts(merged.to_profile()) == counts(expected), (scope.label, lo, hi)
            # sums travel at 5 significant digits: within 5e-5 relative (1.00005 → 1.0001)
            assert merged.to_profile().inputs["temperature"].sums.sum() == pytest.approx(
                expected.inputs["temperature"].sums.sum(), rel=5e-5)
            assert n_devices == sum(1 for d in devs if any(a <= t + 450 < b
                                                            for t, _ in sent[d]))
    # and through the public report: per-feature values are the merged counts
    result = s.drift.report("sensor@1.0.0", group="plant-a", since=hour - 1800,
                            until=hour + 5400, now=time.time())
    expected = want(["dev1", "dev2"], hour - 1800, hour + 5400)
    assert result.summaries == 16 and result.devices == 2
    assert result.report.rows_live == expected.rows
    assert result.report.feature("humidity").n_live == expected.inputs["humidity"].n
    assert result.report.feature("temperature").verdict == "drift"  # dev2 is 12 degrees hot


def test_summaries_wait_for_their_bundle_and_then_count(broker, devices, server_factory,
                                                        sensor_bundle, sensor_ref):
    server = server_factory(broker)
    s = server.services
    spec, _ = sensor_ref
    dev = devices("dev1")
    now = time.time()
    profs = [profile_of(spec, 20 + i, i) for i in range(4)]
    for i, p in enumerate(profs):
        dev.send(summary_of("dev1", i, p, now - 300 + 60 * i, now - 240 + 60 * i))
    dev.flush()
    wait_until(lambda: s.store.count_summaries() == 4, 10, "4 pending summaries")
    assert not any(x.folded for x in s.store.list_summaries())
    assert s.metrics.value("edgefleet_summaries_pending") == 4
    ids = [x.id for x in sorted(s.store.window_summaries(["dev1"], now - 3600),
                                key=lambda x: x.window_end)]
    assert s.store.summary_profiles(ids) == {}  # nothing packed before its reference is known
    s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
    assert all(x.folded for x in s.store.list_summaries())
    # folding decoded each summary once and kept its packed profile: what the gates read
    layout = s.bundles.reference(1).layout
    packed = s.store.summary_profiles(ids)
    assert [counts(layout.from_bytes(packed[i]).to_profile()) for i in ids] == \
        [counts(p) for p in profs]
    merged, _, _ = s.drift.merged(s.bundles.reference(1), Scope("fleet"), int(now) - 3600,
                                  int(now) + 60)
    assert counts(merged.to_profile()) == counts(Profile.merged(spec, profs))
    # a late copy of one of them is still a duplicate, not a second count
    dev.send(summary_of("dev1", 2, profs[2], now - 180, now - 120))
    dev.flush()
    wait_until(lambda: s.metrics.value("edgefleet_duplicates_total", {"type": "summary"}) == 1)
    merged, _, _ = s.drift.merged(s.bundles.reference(1), Scope("fleet"), int(now) - 3600,
                                  int(now) + 60)
    assert merged.summaries == 4


def test_an_old_version_database_is_migrated_and_its_summaries_counted(
        tmp_path, signing_keys, sensor_bundle, sensor_ref):
    spec, _ = sensor_ref
    path = tmp_path / "fleet.db"
    now = time.time()
    profs = [profile_of(spec, 25, i) for i in range(3)]
    with Store(path, target_version=1) as old:
        for i, p in enumerate(profs):
            payload = encode(summary_of("dev1", i, p, now - 120, now - 60))
            old.conn.execute(
                "INSERT INTO summaries (device, seq, bundle_name, bundle_version, "
                "reference_hash, window_start, window_end, rows, received, latency, errors, "
                "shadow, dropped, profile) VALUES (?, ?, 'sensor', '1.0.0', ?, ?, ?, ?, ?, "
                "'[]', '{}', NULL, 0, ?)",
                [f"dev{1}", i, spec.reference_hash, now - 120, now - 60, p.rows, now,
                 sqlite3.Binary(payload)])
    s = build_services(make_config(tmp_path, signing_keys))
    try:
        assert s.store.version == MIGRATIONS[-1][0]  # migrated to the newest version
        s.bundles.upload(sensor_bundle.read_bytes(), "test", time.time())
        merged, _, _ = s.drift.merged(s.bundles.reference(1), Scope("fleet"), int(now) - 3600,
                                      int(now) + 60)
        assert counts(merged.to_profile()) == counts(Profile.merged(spec, profs))
    finally:
        s.close()
