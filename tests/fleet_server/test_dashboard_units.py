"""The dashboard's pure parts: ticks, humane numbers, progress, the SVG charts' safety, and
the store's paged device list against the one-device status rule at a few hundred devices."""

from __future__ import annotations

import itertools
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet_server.dashboard import humane
from fleet_server.dashboard.charts import (
    Line,
    bars,
    heatmap,
    histogram,
    nice_ticks,
    series,
    short_label,
    time_ticks,
)
from fleet_server.dashboard.pages import STALE_AFTER_S, device_status
from fleet_server.dashboard.views import progress
from fleet_server.store import DeviceQuery

HOSTILE = '<script>alert("x")</script>'


@given(st.floats(-1e6, 1e6), st.floats(0, 1e6))
def test_nice_ticks_cover_the_range_in_round_equal_steps(lo, span):
    hi = lo + span
    ticks = nice_ticks(lo, hi)
    assert len(ticks) >= 2
    assert ticks[0] <= lo + 1e-9 * max(1, abs(lo)) and ticks[-1] >= hi - 1e-9 * max(1, abs(hi))
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    step = (ticks[1] - ticks[0])
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5, 10))
    assert max(steps) - min(steps) <= 1e-6 * max(1.0, step)
    assert len(ticks) <= 12


@pytest.mark.parametrize("span, label", [(3600, r"\d\d:\d\d"), (6 * 3600, r"\d\d:\d\d"),
                                          (7 * 86400, r"[A-Z][a-z]{2} \d\d"),
                                          (30 * 86400, r"[A-Z][a-z]{2} \d\d")])
def test_time_ticks_are_round_and_few(span, label):
    t0 = 1_790_000_123.0
    ticks = time_ticks(t0, t0 + span, 6)
    assert 2 <= len(ticks) <= 7
    assert all(t0 <= t <= t0 + span for t, _ in ticks)
    assert all(re.fullmatch(label, text) for _, text in ticks), ticks
    assert all(t % 60 == 0 for t, _ in ticks)


@pytest.mark.parametrize("label, short", [
    ("[20.0095, 25.1234)", "[20, 25.1)"), ("< 0.000123456", "< 0.000123"),
    ("> 1234567", "> 1.23e+06"), ("(unseen)", "(unseen)"), ("a" * 40, "a" * 17 + "…")])
def test_bin_labels_are_shortened_not_cut_mid_number(label, short):
    assert short_label(label) == short


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (59, "59 s"), (61, "1 min 1 s"),
                                           (3725, "1 h 2 min"), (90061, "1 d 1 h"),
                                           (None, "—")])
def test_durations(seconds, text):
    assert humane.duration(seconds) == text


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (50_000_000, "47.7 MiB"), (3 * 2**40, "3.0 TiB")])
def test_sizes(n, text):
    assert humane.size(n) == text


def test_ago_reads_past_and_future():
    assert humane.ago(1000.0, 1180.0) == "3 min ago"
    assert humane.ago(1200.0, 1180.0) == "in 20 s"
    assert humane.ago(None, 0.0) == "never"


@pytest.mark.parametrize("stage, status, text", [
    (2, "completed", "3/3 · 100 %"), (0, "running", "1/3 · 10 %"), (1, "aborted", "2/3 · 50 %"),
    (0, "ready", "0/3 · 0 %"), (0, "pending_approval", "0/3 · 0 %")])
def test_progress(stage, status, text):
    stages = [{"fraction": 0.1}, {"fraction": 0.5}, {"fraction": 1.0}]
    assert progress(stage, stages, status) == text


def test_charts_escape_every_text():
    svgs = [series([Line(HOSTILE, [(0.0, 1.0), (60.0, 2.0)])], title=HOSTILE,
                   thresholds=[(HOSTILE, 1.5, "#000")], y_label=HOSTILE),
            histogram([HOSTILE, "b"], [0.5, 0.5], [0.2, 0.8], title=HOSTILE),
            heatmap([(HOSTILE, ["drift", None])], [0.0, 60.0], 60, title=HOSTILE,
                    links={HOSTILE: "javascript:x\"><script>"}),
            bars([(HOSTILE, 3)], title=HOSTILE)]
    for svg in svgs:
        assert "<script" not in svg and 'x"><' not in svg


def test_series_has_axes_ticks_and_a_legend_for_its_thresholds():
    svg = series([Line("PSI", [(1_790_000_000.0 + 60 * i, 0.05 * i) for i in range(60)])],
                 title="t", thresholds=[("drift at", 0.25, "#c00"), ("warn at", 0.1, "#fa0")])
    texts = re.findall(r">([^<>]+)</text>", svg)
    assert "drift at 0.25" in texts and "warn at 0.1" in texts
    assert sum(bool(re.fullmatch(r"\d\d:\d\d", t)) for t in texts) >= 3
    values = [float(t) for t in texts if re.fullmatch(r"[\d.]+", t)]
    assert len(values) >= 4 and values[0] == 0 and max(values) >= 0.05 * 59
    empty = series([Line("PSI", [(0.0, None)])], title="t")
    assert "no data in this range" in empty


def test_the_paged_device_list_applies_the_status_rule_in_sql(services_on):
    services = services_on
    store = services.store
    now = 1_790_000_000.0
    ids = [f"d{i:03d}" for i in range(230)]
    store.ensure_devices(ids, now - 7200)
    with store.transaction():
        for i, d in enumerate(ids):
            if i % 3 == 0:
                continue  # never said anything: offline
            heard = now - (10 if i % 3 == 1 else 4000)
            store.apply_status(d, online=True, time=heard, agent_version="1.0",
                               bundle=None, shadow=None, labels=None)
    everyone = {d.id: device_status(d, now) for d in store.list_devices(limit=1000)}
    counts = store.count_device_statuses(now - STALE_AFTER_S)
    assert counts == {s: list(everyone.values()).count(s) for s in set(everyone.values())}
    seen: list[str] = []
    for offset in range(0, 230, 50):
        page = store.device_page(DeviceQuery(now - STALE_AFTER_S, sort="status", limit=50,
                                             offset=offset))
        assert page.total == 230
        assert all(page.statuses[d.id] == everyone[d.id] for d in page.devices)
        seen += [d.id for d in page.devices]
    assert sorted(seen) == ids and len(set(seen)) == 230
    rank = {"offline": 0, "stale": 1, "online": 2}
    assert [rank[everyone[d]] for d in seen] == sorted(rank[everyone[d]] for d in seen)
    stale = store.device_page(DeviceQuery(now - STALE_AFTER_S, status="stale", limit=1000))
    assert {d.id for d in stale.devices} == {d for d, s in everyone.items() if s == "stale"}
    found = store.device_page(DeviceQuery(now - STALE_AFTER_S, search="d12"))
    assert [d.id for d in found.devices] == [f"d12{i}" for i in range(10)]
    assert found.total == 10
    assert store.device_page(DeviceQuery(now, search="%")).total == 0  # LIKE's wildcards are text
    assert store.device_page(DeviceQuery(now, search="_")).total == 0


def test_the_drift_grid_keeps_the_worst_verdict_per_cell_and_the_newest_per_row(services_on):
    services = services_on
    from fleet_server.models import DriftWindow

    store = services.store
    since = 1_790_000_000
    windows = [("*", 0, "ok"), ("*", 60, "drift"), ("*", 120, "ok"), ("*", 600, "warn"),
               ("g", 0, "insufficient"), ("g", 700, "ok"), ("*", -60, "drift")]  # before
    for scope, offset, verdict in windows:
        store.save_window(7, DriftWindow("b@1", scope, since + offset, since + offset + 60,
                                         verdict, 0.0, 1, 1, {}, 0.0))
    grid = sorted(store.drift_grid(since, 300, 4))
    assert grid == [(7, "*", 0, "drift"), (7, "*", 2, "warn"), (7, "g", 0, "insufficient"),
                    (7, "g", 2, "ok")]
    assert store.drift_grid(since, 100, 4)[-1][2] == 3  # past the last column: the last
    assert store.drift_latest(since) == {(7, "*"): ("warn", "drift", 4),
                                         (7, "g"): ("ok", "ok", 2)}  # no data is not worse than ok


@pytest.mark.parametrize("hours, step", [(1, 60), (6, 300), (24, 900), (168, 3 * 3600),
                                         (720, 12 * 3600), (24 * 366, 7 * 86400)])
def test_drift_steps_are_round_and_few(hours, step):
    from fleet_server.dashboard.drift_page import MAX_POINTS, pick_step

    assert pick_step(hours * 3600, 60) == step
    assert hours * 3600 / step <= MAX_POINTS or step == 7 * 86400


def test_heatmap_draws_one_rectangle_per_run_of_a_verdict():
    svg = heatmap([("f", ["ok", "ok", "ok", None, "drift", "drift"])],
                  [60.0 * i for i in range(6)], 60, title="t")
    titles = re.findall(r"<rect [^>]*><title>([^<]*)</title>", svg)
    assert len(titles) == 2
    assert titles[0].endswith("00:00 UTC – 1970-01-01 00:03 UTC: ok")
    assert titles[1].endswith("00:04 UTC – 1970-01-01 00:06 UTC: drift")
