"""Groups' own rollups, kept at ingest: a group's report reads one rollup per bucket, and it
is the merge of its members' device rollups (every count, min and max exactly; sums and M2
to rounding, as the fleet's).

Summaries go through :meth:`Ingestor.process` into a real store (SQLite and PostgreSQL);
what is asserted is what the store and the drift service give back.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.contract.messages import Status, Summary, encode
from fleet_server.monitoring.drift import tile
from fleet_server.profiles.rollups import Packed
from fleet_server.store import FLEET_SCOPE, group_scope
from fleet_server.telemetry.link import Incoming
from tests.fleet_server.conftest import profile_of, summary_of

HOUR, DAY = 3600, 86400
T0 = 1_700_000_000 // HOUR * HOUR  # on the hour
_mids = itertools.count(1)


def incoming(msgs: list[Summary | Status], received: float) -> list[Incoming]:
    return [Incoming(m.topic, encode(m), 1, next(_mids), 1, received) for m in msgs]


def status(device: str, site: str) -> Status:
    return Status(device, "online", "test", labels={"site": site})


def assert_same(got: Packed, want: Packed) -> None:
    """Counts, rows, summaries, min and max exactly; sums and M2 to rounding."""
    assert got.ints.tolist() == want.ints.tolist()
    assert np.allclose(got.floats, want.floats, rtol=1e-9, atol=1e-9, equal_nan=True)
    finite = np.isfinite(want.floats)
    assert (np.isfinite(got.floats) == finite).all()


def device_merge(services, ref, selector, lo, hi) -> Packed:
    """What a group's report merged before groups had rollups: its members' rollups."""
    blobs = [d for w, a, b in tile(lo, hi, services.drift.levels)
             for _, _, d in services.store.read_rollups(ref.bundle.id, w, a, b,
                                                        selector=selector)]
    return ref.layout.merge_bytes(blobs)


@pytest.fixture
def rig(services_on, sensor_bundle, sensor_ref):
    s = services_on
    s.bundles.upload(sensor_bundle.read_bytes(), "test", T0)
    group = s.registry.create_group("plant-a", {"site": "a"}, "test", T0)
    spec, _ = sensor_ref
    return s, s.bundles.reference(1), group, spec


def test_a_group_keeps_rollups_of_its_own_from_a_boundary_after_it_is_seen(rig):
    s, ref, group, spec = rig
    store = s.store
    # first seen at T0: complete from the first hour starting max_clock_skew_s later
    start = T0 + DAY
    assert store.group_rollups_from("plant-a", group.created) is None
    early = [summary_of(d, 1, profile_of(spec, 20, i), T0 - 600, T0 - 300)
             for i, d in enumerate(("dev1", "dev2", "dev3"))]
    s.ingestor.process(incoming([status("dev1", "a"), status("dev2", "a"),
                                 status("dev3", "b"), *early], T0), now=T0)
    assert store.group_rollups_from("plant-a", group.created) == start
    assert s.drift.group_from(group) == start
    # windows in the six hours from the start, sent a day later
    later = [summary_of(d, 2 + k, profile_of(spec, 30 + k, 10 * i + k),
                        start + k * HOUR + 60 * i, start + k * HOUR + 60 * i + 900)
             for i, d in enumerate(("dev1", "dev2", "dev3")) for k in range(6)]
    now = start + DAY
    s.ingestor.process(incoming(later, now), now=now)
    own = group_scope("plant-a")
    assert len(store.read_rollups(ref.bundle.id, HOUR, start, start + 6 * HOUR,
                                  scope=own)) == 6
    # nothing before the start went into the group's rollups
    assert store.read_rollups(ref.bundle.id, HOUR, T0 - HOUR, start, scope=own) == []
    # device reads leave the group's rollups out; the fleet's devices are three
    every = store.read_rollups(ref.bundle.id, HOUR, T0 - HOUR, start + 6 * HOUR)
    assert {sc for sc, _, _ in every} == {"dev1", "dev2", "dev3"}
    tiles = tile(T0 - HOUR, start + 6 * HOUR, s.drift.levels)
    assert store.count_rollup_scopes(ref.bundle.id, tiles) == 3

    scope = s.drift.scope("plant-a")
    for lo, hi in ((start, start + 6 * HOUR), (start + 60, start + 5 * HOUR - 120),
                   (T0 - HOUR, start + 3 * HOUR)):  # the last falls back before the start
        merged, devices, n = s.drift.merged(ref, scope, lo, hi)
        assert_same(merged, device_merge(s, ref, {"site": "a"}, lo, hi))
        assert devices == 2
    _, _, n = s.drift.merged(ref, scope, start, start + 6 * HOUR)
    assert n == 6  # one rollup per hour, not one per device and hour
    # the drift-over-time series too, on either side of the start
    series = s.drift.series("sensor@1.0.0", group="plant-a", since=T0 - HOUR,
                            until=start + 6 * HOUR, step=HOUR, now=now)
    assert len(series.starts) == DAY // HOUR + 7
    assert list(series.rows) == [device_merge(s, ref, {"site": "a"}, t, t + HOUR).rows
                                 for t in series.starts]
    assert sum(series.rows) > 0
    # the public report says the same
    result = s.drift.report("sensor@1.0.0", group="plant-a", since=start,
                            until=start + 6 * HOUR, now=now)
    assert (result.devices, result.rollups, result.summaries) == (2, 6, 12)

    # redelivered (a lost PUBACK): stored once, counted once
    before = {(b, sc): d for sc, b, d in store.read_rollups(
        ref.bundle.id, 60, start, start + 6 * HOUR, scope=own)}
    again = s.ingestor.process(incoming(later, now + 5), now=now + 5)
    assert again.duplicates["summary"] == len(later)
    assert {(b, sc): d for sc, b, d in store.read_rollups(
        ref.bundle.id, 60, start, start + 6 * HOUR, scope=own)} == before


def test_a_device_that_changes_group_leaves_its_past_where_it_reported(rig):
    s, ref, _, spec = rig
    start = T0 + DAY
    s.ingestor.process(incoming([status("dev1", "a"), status("dev2", "b"),
                                 summary_of("dev1", 1, profile_of(spec, 5, 1), T0 - 60, T0)],
                                T0), now=T0)
    now = start + DAY
    first = [summary_of(d, 2, profile_of(spec, 40, i), start, start + 600)
             for i, d in enumerate(("dev1", "dev2"))]
    s.ingestor.process(incoming(first, now), now=now)
    # dev2 moves to site a (its status and its next window in one batch: the status counts)
    second = [summary_of(d, 3, profile_of(spec, 25, 5 + i), start + HOUR, start + HOUR + 600)
              for i, d in enumerate(("dev1", "dev2"))]
    s.ingestor.process(incoming([status("dev2", "a"), *second], now + 10), now=now + 10)
    merged, devices, _ = s.drift.merged(ref, s.drift.scope("plant-a"), start,
                                        start + 2 * HOUR)
    # dev1 both hours, dev2 only the hour it reported as a member
    assert merged.summaries == 3
    assert merged.rows == 40 + 25 + 25
    assert devices == 2  # the members now with rollups in the range
    # the first hour is dev1's alone, the second both devices'
    assert_same(s.drift.merged(ref, s.drift.scope("plant-a"), start, start + HOUR)[0],
                ref.layout.merge_bytes([d for _, _, d in s.store.read_rollups(
                    ref.bundle.id, HOUR, start, start + HOUR, scope="dev1")]))
    assert_same(s.drift.merged(ref, s.drift.scope("plant-a"), start + HOUR,
                               start + 2 * HOUR)[0],
                device_merge(s, ref, {"site": "a"}, start + HOUR, start + 2 * HOUR))


def test_a_group_made_again_under_its_name_starts_anew(rig):
    s, _, group, spec = rig
    s.ingestor.process(incoming([status("dev1", "a"),
                                 summary_of("dev1", 1, profile_of(spec, 5, 1), T0 - 60, T0)],
                                T0), now=T0)
    assert s.store.group_rollups_from("plant-a", group.created) == T0 + DAY
    s.registry.delete_group("plant-a", "test", T0 + 100)
    again = s.registry.create_group("plant-a", {"site": "a"}, "test", T0 + 200)
    assert s.store.group_rollups_from("plant-a", again.created) is None
    # until ingest sees it, its reports read device rollups only
    assert s.drift.group_from(again) > T0 + 400 * DAY
    later = T0 + 3 * DAY + 1
    s.ingestor.process(incoming([summary_of("dev1", 2, profile_of(spec, 5, 2), later - 60,
                                            later)], later), now=later)
    assert s.store.group_rollups_from("plant-a", again.created) == T0 + 4 * DAY + HOUR


_summaries = st.lists(
    st.tuples(st.integers(0, 4),  # device
              st.integers(0, 5),  # hour
              st.integers(0, 59),  # minute
              st.integers(1, 40),  # window length in minutes
              st.integers(1, 30),  # rows
              st.booleans()),  # sent twice
    min_size=1, max_size=25)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(summaries=_summaries, batches=st.integers(1, 3), data=st.data())
def test_a_group_report_from_its_rollups_is_the_merge_of_its_devices_rollups(
        services, sensor_bundle, sensor_ref, summaries, batches, data):
    """Over summaries, devices (members and not), hours, batches and redeliveries: the
    group's report from its own rollups equals the merge of its members' rollups."""
    s = services
    if s.store.get_bundle("sensor", "1.0.0") is None:
        s.bundles.upload(sensor_bundle.read_bytes(), "test", T0)
    spec, _ = sensor_ref
    run = next(_mids)  # each example its own group, devices and days
    base = T0 + run * 10 * DAY
    group = s.registry.create_group(f"g{run}", {"run": str(run)}, "test", base)
    devices = [f"r{run}-d{i}" for i in range(5)]
    members = {d: i % 2 == 0 for i, d in enumerate(devices)}  # d0, d2, d4
    labels = [Status(d, "online", "test", labels={"run": str(run) if m else "other"})
              for d, m in members.items()]
    prime = summary_of(devices[1], 1, profile_of(spec, 3, run), base - 60, base)
    s.ingestor.process(incoming([*labels, prime], base), now=base)
    start = s.store.group_rollups_from(group.name, group.created)
    assert start == base + DAY
    msgs = []
    for seq, (dev, hour, minute, length, rows, twice) in enumerate(summaries, 2):
        begin = start + hour * HOUR + minute * 60
        msg = summary_of(devices[dev], seq, profile_of(spec, rows, seq + run),
                         begin, begin + length * 60)
        msgs += [msg, msg] if twice else [msg]
    now = start + 2 * DAY
    cuts = sorted(data.draw(st.lists(st.integers(0, len(msgs)), min_size=batches - 1,
                                     max_size=batches - 1)))
    for a, b in itertools.pairwise([0, *cuts, len(msgs)]):
        s.ingestor.process(incoming(msgs[a:b], now), now=now)
    first = data.draw(st.integers(0, 5 * 60), label="from minute")
    lo = start + first * 60
    hi = start + data.draw(st.integers(first + 1, 7 * 60), label="to minute") * 60
    ref = s.bundles.reference(1)
    got, n_devices, _ = s.drift.merged(ref, s.drift.scope(group.name), lo, hi)
    assert_same(got, device_merge(s, ref, {"run": str(run)}, lo, hi))
    want_devices = {d for d in members if members[d] and s.store.read_rollups(
        ref.bundle.id, 60, lo, hi, scope=d)}
    assert n_devices == len(want_devices)
    # the fleet's rollups are untouched by the group's: the fleet is its devices
    tiles = tile(lo, hi, s.drift.levels)
    fleet = [d for w, a, b in tiles
             for _, _, d in s.store.read_rollups(ref.bundle.id, w, a, b, scope=FLEET_SCOPE)]
    every = [d for w, a, b in tiles for _, _, d in s.store.read_rollups(ref.bundle.id, w, a, b)]
    assert_same(ref.layout.merge_bytes(fleet), ref.layout.merge_bytes(every))


def test_summaries_folded_when_their_bundle_arrives_go_into_their_groups_once(rig, bundles):
    s, _, group, spec = rig
    start = T0 + DAY
    s.ingestor.process(incoming([status("dev1", "a"), status("dev2", "b"),
                                 summary_of("dev1", 1, profile_of(spec, 5, 1), T0 - 60, T0)],
                                T0), now=T0)
    assert s.store.group_rollups_from("plant-a", group.created) == start
    # windows of sensor@1.1.0, not uploaded yet: stored pending, in no rollup
    waiting = [summary_of(d, 2 + k, profile_of(spec, 20 + k, 7 * k + i),
                          start + k * HOUR, start + k * HOUR + 900, version="1.1.0")
               for i, d in enumerate(("dev1", "dev2")) for k in range(3)]
    now = start + DAY
    assert s.ingestor.process(incoming(waiting, now), now=now).pending == 6
    s.bundles.upload(bundles.build("1.1.0").read_bytes(), "test", now)  # folds them
    newer = s.bundles.reference(s.store.bundle_id("sensor", "1.1.0"))
    merged, devices, n = s.drift.merged(newer, s.drift.scope("plant-a"), start,
                                        start + 3 * HOUR)
    assert (merged.summaries, devices, n) == (3, 1, 3)  # dev1's, in the group's own rollups
    assert_same(merged, device_merge(s, newer, {"site": "a"}, start, start + 3 * HOUR))
    assert s.ingestor.sweep_pending() == 0  # nothing left to fold twice
    assert s.drift.merged(newer, s.drift.scope("plant-a"), start, start + 3 * HOUR)[0] \
        .summaries == 3
