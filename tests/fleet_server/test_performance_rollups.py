"""Performance rollups, kept at ingest per device, group and the fleet by hour and by day:
a report read from them is the merge of the raw entries whose window's middle falls in
its range and steps (every count and n exactly, metrics to the rounding of their sums).

Entries go through :meth:`Ingestor.process` into a real store; the expectation is the
stored entries themselves, read back and merged with the server's own merge.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.contract.messages import Status, encode
from fleet_server.profiles.performance import confusion_of, merged_blocks, metric_values
from fleet_server.telemetry.link import Incoming
from tests.fleet_server.conftest import profile_of, summary_of
from tests.fleet_server.test_performance import entry, rows

HOUR, DAY = 3600, 86400
T0 = 1_750_000_000 // DAY * DAY  # a day boundary
_mids = itertools.count(1)


def ingest(services, msgs, now: float) -> None:
    services.ingestor.process([Incoming(m.topic, encode(m), 1, next(_mids), 1, now)
                               for m in msgs], now=now)


def same_metrics(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, m in want.items():
        g = got[name]
        assert (g["n"], g["method"]) == (m["n"], m["method"]), name
        for k in ("value", "low", "high"):
            if m[k] is None or (isinstance(m[k], float) and math.isnan(m[k])):
                assert g[k] is None or math.isnan(g[k]), (name, k)
            else:
                assert g[k] == pytest.approx(m[k], rel=1e-9, abs=1e-12), (name, k)


def check(report, services, perf, raw, lo: int, hi: int, step: int) -> None:
    """``report`` against the raw entries ``raw``: per step and in total."""
    spans = [(lo, hi, [r for r in raw if lo <= r.middle < hi])]
    spans += [(t, t + step, [r for r in raw if t <= r.middle < t + step])
              for t in range(lo, hi, step)]
    points = [report.total, *report.points]
    assert len(points) == len(spans)
    for point, (a, b, mine) in zip(points, spans, strict=True):
        realized, estimated = merged_blocks(perf.spec, mine)
        assert (point.start, point.end) == (a, b)
        assert (point.entries, point.labelled, point.served, point.devices) == (
            len(mine), sum(r.labelled for r in mine), sum(r.served for r in mine),
            len({r.device for r in mine}))
        same_metrics(point.realized, metric_values(realized))
        same_metrics(point.estimated, metric_values(estimated))
    total_realized, _ = merged_blocks(perf.spec, spans[0][2])
    assert report.confusion == confusion_of(total_realized)  # counts: exactly


_entries = st.lists(
    st.tuples(st.integers(0, 3),  # device (0 and 2 are the group's)
              st.integers(0, 50),  # hour
              st.integers(0, 59),  # minute
              st.integers(1, 90),  # window length in minutes: some cross an hour
              st.integers(1, 60),  # rows
              st.booleans(),  # estimate only (no labels yet)
              st.booleans()),  # sent twice
    min_size=1, max_size=20)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sent=_entries, data=st.data())
def test_a_report_from_rollups_is_the_merge_of_the_raw_entries(services, sensor_bundle,
                                                               sent, data):
    s = services
    if s.store.get_bundle("sensor", "1.0.0") is None:
        s.bundles.upload(sensor_bundle.read_bytes(), "test", T0)
    ref = s.bundles.reference(1)
    perf = s.bundles.performance(1)
    run = next(_mids)
    base = T0 + run * 10 * DAY
    group = s.registry.create_group(f"p{run}", {"run": str(run)}, "test", base)
    devices = [f"q{run}-d{i}" for i in range(4)]
    labels = [Status(d, "online", "test", labels={"run": str(run) if i % 2 == 0 else "x"})
              for i, d in enumerate(devices)]
    # first seen now: the group's own rollups start a day later, on the day
    ingest(s, [*labels, summary_of(devices[1], 1, profile_of(ref.spec, 3, run), base - 60,
                                   base)], base)
    start = s.store.group_rollups_from(group.name, group.created)
    assert start == base + DAY
    msgs = []
    for seq, (dev, hour, minute, length, n, est_only, twice) in enumerate(sent, 2):
        begin = start + hour * HOUR + minute * 60
        msg = summary_of(devices[dev], seq, profile_of(ref.spec, 5, seq), begin,
                         begin + length * 60)
        msg = replace(msg, performance=(entry(*rows(n, seq + run), estimated_only=est_only),))
        msgs += [msg, msg] if twice else [msg]
    now = start + 4 * DAY
    ingest(s, msgs[:len(msgs) // 2], now)
    ingest(s, msgs[len(msgs) // 2:], now)
    if data.draw(st.booleans(), label="by day"):
        step = DAY
        lo = start + data.draw(st.integers(-1, 1), label="first day") * DAY
        hi = lo + data.draw(st.integers(3, 4), label="days") * DAY
    else:
        step = HOUR
        lo = start + data.draw(st.integers(-2, 40), label="first hour") * HOUR
        hi = lo + data.draw(st.integers(1, 48), label="hours") * HOUR
    everything = s.store.read_performance(1, base - DAY, now + DAY)
    for kind, name, mine in (("fleet", None, set(devices)),
                             ("group", group.name, {devices[0], devices[2]}),
                             ("device", devices[2], {devices[2]})):
        report = s.performance.report(
            "sensor@1.0.0", group=name if kind == "group" else None,
            device=name if kind == "device" else None, since=lo, until=hi, now=now)
        assert (report.since, report.until, report.step) == (lo, hi, step)
        assert not report.truncated
        check(report, s, perf, [r for r in everything if r.device in mine], lo, hi, step)
        if kind != "device":  # one rollup per step from where the group's are complete
            assert len(s.store.read_performance_rollups(
                1, step, max(lo, start), hi,
                scope="*" if kind == "fleet" else f"group:{group.name}")) <= \
                (hi - max(lo, start)) // step


def test_performance_rollups_on_both_engines_and_once_under_redelivery(services_on,
                                                                       sensor_bundle):
    s = services_on
    s.bundles.upload(sensor_bundle.read_bytes(), "test", T0)
    ref = s.bundles.reference(1)
    perf = s.bundles.performance(1)
    s.registry.create_group("plant-a", {"site": "a"}, "test", T0)
    # the group is first seen at T0 with these windows of the six hours before it: they
    # are in the device rollups only, which its reports read before its own start
    before = []
    for seq, device in enumerate(("dev1", "dev2", "dev1"), 100):
        begin = T0 - (seq - 98) * HOUR
        msg = summary_of(device, seq, profile_of(ref.spec, 5, seq), begin, begin + 600)
        before.append(replace(msg, performance=(entry(*rows(30 + seq, seq)),)))
    ingest(s, [Status("dev1", "online", "t", labels={"site": "a"}),
               Status("dev2", "online", "t", labels={"site": "b"}), *before], T0)
    start = T0 + DAY
    msgs = []
    for seq, (device, hour) in enumerate(itertools.product(("dev1", "dev2"), range(30)), 2):
        begin = start + hour * HOUR + 1200
        msg = summary_of(device, seq, profile_of(ref.spec, 5, seq), begin, begin + 1800)
        msgs.append(replace(msg, performance=(entry(*rows(40 + seq, seq)),)))
    now = start + 2 * DAY
    ingest(s, msgs, now)
    ingest(s, msgs[::3], now + 1)  # redelivered: counted once
    everything = s.store.read_performance(1, T0 - DAY, now)
    assert len(everything) == len(msgs) + len(before)
    for group, mine in ((None, {"dev1", "dev2"}), ("plant-a", {"dev1"})):
        for lo, hi, step in ((start, start + 2 * DAY, HOUR), (start, start + 3 * DAY, DAY),
                             (T0, start + DAY, HOUR), (T0 - 6 * HOUR, T0 + 18 * HOUR, HOUR),
                             (T0 - DAY, start + DAY, DAY)):
            report = s.performance.report("sensor@1.0.0", group=group, since=lo, until=hi,
                                          now=now)
            assert report.step == step
            check(report, s, perf, [r for r in everything if r.device in mine], lo, hi, step)
    # the fleet's 30 hours are 30 rollups, its days 2
    assert len(s.store.read_performance_rollups(1, HOUR, start, now, scope="*")) == 30
    assert len(s.store.read_performance_rollups(1, DAY, start, now, scope="*")) == 2
    assert np.array_equal(
        [r.entries for r in s.store.read_performance_rollups(1, DAY, start, now,
                                                             scope="group:plant-a")],
        [24, 6])
