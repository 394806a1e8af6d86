"""The shadow's answers by prediction id, paired with outcomes: McNemar's table per
candidate, exact against a count by hand, with real bundles and real onnxruntime."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.predictions import PredictionStore
from edge_agent.shadow_labels import MAX_BUNDLES, ShadowLabels, with_paired
from edgefleet.contract.messages import BundleRef, Paired, ShadowStats, decode, encode
from tests.bundles import FEATURES, sensor_data

A = BundleRef("sensor", "2.0.0")
B = BundleRef("sensor", "3.0.0")




@pytest.fixture
def agent(tmp_path):
    store = PredictionStore(tmp_path / "predictions.db")
    a = Agent("dev-1", store=store)
    yield a
    a.close()
    store.close()


@pytest.mark.parametrize("candidate", ["mlp", "inverted"])
def test_outcomes_fill_mcnemars_table_exactly(agent, load, candidate):
    agent.activate(load("1.0.0"))
    shadow = load("2.0.0", candidate)
    agent.set_shadow(shadow)
    frame = sensor_data(300, seed=8)
    data = frame[list(FEATURES)].to_dict("records")
    truth = frame["fault"].astype(int).to_numpy()
    served = [agent.predict(data[:200], ids=[f"b{i}" for i in range(200)])]
    served += [agent.predict([row]) for row in data[200:]]  # single rows, agent-made ids
    ids = [*served[0].ids, *(r.ids[0] for r in served[1:])]
    live = np.concatenate([r.labels.reshape(-1) for r in served])
    theirs = shadow.runner.run_columns(shadow.validator.batch(data).columns).labels
    labelled = list(range(0, 300, 2))  # half the rows get their outcome
    counts = agent.record_outcomes([(ids[i], int(truth[i])) for i in labelled])
    assert counts.joined == len(labelled)
    window = agent.close_window()
    ok_live = live[labelled] == truth[labelled]
    ok_shadow = theirs[labelled] == truth[labelled]
    expected = Paired(int((ok_live & ok_shadow).sum()), int((ok_live & ~ok_shadow).sum()),
                      int((ok_shadow & ~ok_live).sum()), int((~ok_live & ~ok_shadow).sum()))
    assert window.shadow.bundle == shadow.ref and window.shadow.paired == expected
    assert expected.n == len(labelled)
    if candidate == "inverted":
        assert expected.live_only > 10 * max(expected.shadow_only, 1)
    # reported once: the next window carries no table, and a repeated outcome pairs nothing
    agent.record_outcomes([(ids[0], int(truth[0]))])
    agent.predict(data[:1])
    assert agent.wait_idle()
    assert agent.close_window().shadow.paired is None
    # the table crosses the wire as it is
    summary = window.summary("dev-1", 1)
    assert decode(summary.topic, encode(summary)).shadow.paired == expected


def test_outcomes_after_the_shadow_stopped_still_pair(agent, load):
    agent.activate(load("1.0.0"))
    shadow = load("2.0.0", "inverted")
    agent.set_shadow(shadow)
    frame = sensor_data(50, seed=9)
    got = agent.predict(frame[list(FEATURES)].to_dict("records"))
    assert agent.wait_idle()
    agent.set_shadow(None)
    assert agent.close_window().shadow.paired is None  # no outcome yet
    agent.record_outcomes(list(zip(got.ids, frame["fault"].astype(int).tolist(),
                                   strict=True)))
    window = agent.close_window()  # no rows: reported because outcomes wait in the store
    assert window is not None and window.rows == 0
    stats = window.shadow
    assert (stats.bundle, stats.rows, stats.agreed) == (shadow.ref, 0, 0)
    assert stats.paired.n == 50


def test_label_keys_match_as_the_prediction_store_matches_them():
    labels = ShadowLabels()
    labels.add(["a", "b", "c"], A, np.array([1, 0, 1]), np.array(["1", "1", "0"]))
    assert labels.join([("a", 1.0), ("b", "0"), ("c", True), ("zz", 1)]) == 2
    assert labels.take() == (A, Paired(both=1, live_only=1))
    # "c" is used up unpaired: a bool is no class label (the prediction store counts it)
    assert labels.take() is None and labels.waiting == 0


def test_bounds_and_horizon_drop_the_oldest_pairs():
    now = [1000.0]
    labels = ShadowLabels(max_rows=3, horizon_s=100.0, clock=lambda: now[0])
    labels.add(["1", "2", "3", "4"], A, [0, 0, 0, 0], [0, 0, 0, 0])
    assert labels.waiting == 3 and labels.evicted == 1
    assert labels.join([("1", 0)]) == 0  # evicted: not paired (the store still joins it)
    now[0] = 1050.0
    labels.add(["5"], A, [1], [0])
    now[0] = 1101.0
    labels.add(["6"], A, [1], [1])
    assert labels.waiting == 2  # 2-4 are past the horizon
    assert labels.join([("5", 1), ("6", 0)]) == 2
    assert labels.take(A) == (A, Paired(live_only=1, neither=1))


def test_tables_per_candidate_and_a_bound_on_candidates():
    labels = ShadowLabels()
    refs = [BundleRef("sensor", f"9.{i}.0") for i in range(MAX_BUNDLES + 1)]
    for i, ref in enumerate(refs):
        labels.add([f"r{i}"], ref, [1], [1])
    assert labels.join([(f"r{i}", 1) for i in range(len(refs))]) == MAX_BUNDLES
    assert labels.take(refs[-1]) is None  # past the bound: dropped
    assert labels.take(refs[3]) == (refs[3], Paired(both=1))


@dataclass(frozen=True)
class Window:  # the one field of edge_agent.agent.Window that with_paired reads and replaces
    shadow: ShadowStats | None


def test_with_paired_fills_the_windows_shadow_or_adds_one():
    labels = ShadowLabels()
    labels.add(["x", "y"], A, [1, 1], [1, 0])
    labels.add(["z"], B, [1], [1])
    labels.join([("x", 1), ("y", 1), ("z", 1)])
    running = Window(ShadowStats(B, 10, 9, (), 0))
    assert with_paired(running, labels).shadow == ShadowStats(B, 10, 9, (), 0,
                                                              Paired(both=1))
    assert with_paired(running, labels) == running  # A waits for a window of its own
    alone = with_paired(Window(None), labels)
    assert alone.shadow == ShadowStats(A, 0, 0, (), 0, Paired(both=1, live_only=1))
    assert with_paired(None, labels) is None
    assert with_paired(running, None) is running
