"""The prediction store on real SQLite files: bounds, eviction, horizon, restart, the join
by reason, exactly-once claims and numbered batches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.errors import OutcomeLabelError
from edge_agent.predictions import ROW_OVERHEAD, OutcomeCounts, PredictionStore
from edgefleet.contract.messages import BundleRef

V1 = BundleRef("sensor", "1.0.0", "a" * 64)
V2 = BundleRef("sensor", "2.0.0", "b" * 64)
REG = BundleRef("load", "1.0.0", "c" * 64)


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def open_store(tmp_path, clock, request):
    def make(**bounds) -> PredictionStore:
        store = PredictionStore(tmp_path / "predictions.db", clock=clock, **bounds)
        request.addfinalizer(store.close)
        return store

    return make


def served(store: PredictionStore, bundle: int, ids: list[str], *, classes: int = 2,
           t: float | None = None) -> np.ndarray:
    """Store predictions for ``ids``: class i % classes, probabilities favouring it."""
    n = len(ids)
    pred = np.arange(n) % classes
    proba = np.full((n, classes), 0.1 / (classes - 1))
    proba[np.arange(n), pred] = 0.9
    store.add(bundle, ids, store.clock() if t is None else t, pred, proba)
    return pred


def test_a_join_counts_every_reason(open_store, clock):
    store = open_store(horizon_s=100.0)
    b1 = store.register(V1, "classification", (0, 1))
    served(store, b1, ["a", "b", "c"], t=clock.t - 200)  # already past the horizon
    served(store, b1, ["d", "e", "f"])
    counts = store.record([("d", 1), ("e", "0"), ("e", 1), ("zz", 0), ("a", 0), ("f", 1.0)],
                          strict=False)
    assert counts == OutcomeCounts(joined=3, unknown=1, expired=1, duplicate=1)
    counts = store.record([("b", 7)], strict=False)  # expired before its label is looked at
    assert counts == OutcomeCounts(expired=1)
    served(store, b1, ["g"])
    assert store.record([("g", 7)], strict=False) == OutcomeCounts(bad_label=1)
    assert store.totals == OutcomeCounts(joined=3, unknown=1, expired=2, duplicate=1,
                                         bad_label=1)


def test_a_bad_label_in_a_direct_call_is_refused_and_nothing_applies(open_store):
    store = open_store()
    b1 = store.register(V1, "classification", ("ok", "fault"))
    served(store, b1, ["p1", "p2"])
    with pytest.raises(OutcomeLabelError) as info:
        store.record([("p1", "ok"), ("p2", "broken")])
    assert info.value.id == "p2" and "broken" in str(info.value) and "fault" in str(info.value)
    assert store.unreported() == 0
    assert store.record([("p1", "ok"), ("p2", "fault")]) == OutcomeCounts(joined=2)


@pytest.mark.parametrize("label", [float("nan"), float("inf"), "3.5", True, None],
                         ids=["nan", "inf", "string", "bool", "none"])
def test_a_regressor_takes_finite_numbers_only(open_store, label):
    store = open_store()
    bid = store.register(REG, "regression", ())
    store.add(bid, ["r1"], store.clock(), np.array([2.5]), None)
    with pytest.raises(OutcomeLabelError):
        store.record([("r1", label)])
    assert store.record([("r1", label)], strict=False) == OutcomeCounts(bad_label=1)
    assert store.record([("r1", 3)]) == OutcomeCounts(joined=1)
    claim = store.claim(1)
    (rows,) = claim.bundles
    assert rows.task == "regression" and rows.scores is None
    assert rows.predicted.tolist() == [2.5] and rows.truth.tolist() == [3.0]


def test_rows_are_bounded_oldest_first_and_evicted_ids_count_expired(open_store):
    store = open_store(max_rows=100)
    b1 = store.register(V1, "classification", (0, 1))
    for chunk in range(5):
        served(store, b1, [f"id-{chunk}-{i}" for i in range(40)])
    assert store.rows == 100
    counts = store.record([("id-0-0", 0), ("id-2-19", 1), ("id-2-20", 0), ("id-4-39", 1),
                           ("never", 0)], strict=False)
    assert counts == OutcomeCounts(joined=2, expired=2, unknown=1)


def test_bytes_are_bounded(open_store):
    per_row = ROW_OVERHEAD + 2 * 4 + len("id-000")
    store = open_store(max_bytes=50 * per_row)
    b1 = store.register(V1, "classification", (0, 1))
    served(store, b1, [f"id-{i:03d}" for i in range(120)])
    assert store.rows == 50 and store.bytes == 50 * per_row


def test_the_horizon_evicts_by_time(open_store, clock):
    store = open_store(horizon_s=3600.0)
    b1 = store.register(V1, "classification", (0, 1))
    served(store, b1, ["old-1", "old-2"])
    clock.t += 1800
    served(store, b1, ["new-1"])
    clock.t += 1801
    assert store.evict() == 2 and store.rows == 1
    assert store.record([("old-1", 0), ("new-1", 0)], strict=False) == \
        OutcomeCounts(joined=1, expired=1)


def test_everything_survives_a_restart(open_store, tmp_path, clock):
    store = open_store()
    b1 = store.register(V1, "classification", (0, 1))
    served(store, b1, ["x1", "x2", "x3"])
    assert store.apply_batch(1, [("x1", 0)])[1] == 1
    store.close()
    again = open_store()
    assert again.rows == 3 and again.applied_batch == 1
    assert again.register(V1, "classification", (0, 1)) == b1
    assert again.apply_batch(1, [("x2", 0)]) == (None, 1)  # from the past: not again
    assert again.record([("x1", 0), ("x2", 1)]) == OutcomeCounts(joined=1, duplicate=1)
    claim = again.claim(1)
    assert claim.rows == 2 and claim.bundles[0].bundle == V1


def test_batches_apply_in_order_once(open_store):
    store = open_store()
    b1 = store.register(V1, "classification", (0, 1))
    served(store, b1, [f"p{i}" for i in range(6)])
    assert store.apply_batch(2, [("p2", 0)]) == (None, 0)  # from the future: ignored
    counts, applied = store.apply_batch(1, [("p0", 0), ("p1", 9), ("nope", 1)])
    assert applied == 1 and counts == OutcomeCounts(joined=1, bad_label=1, unknown=1)
    assert store.apply_batch(1, [("p3", 0)]) == (None, 1)
    assert store.apply_batch(2, [("p2", 0)])[1] == 2
    assert store.claim(1).rows == 2


def test_a_claim_is_exactly_once_across_retries_of_one_sequence(open_store):
    store = open_store()
    b1 = store.register(V1, "classification", (0, 1))
    b2 = store.register(V2, "classification", (0, 1))
    served(store, b1, ["a1", "a2"])
    served(store, b2, ["b1"])
    store.record([("a1", 0), ("b1", 1), ("zz", 0)])
    first = store.claim(7)  # summary 7 was not stored (a crash, a full disk) ...
    assert {b.bundle for b in first.bundles} == {V1, V2} and first.counts == {"unknown": 1}
    store.record([("a2", 1)])
    again = store.claim(7)  # ... so the next summary takes 7 again: the same rows and more
    assert again.rows == 3 and again.counts == {"unknown": 1}
    later = store.claim(8)  # 7 was stored: nothing of it again
    assert later.rows == 0 and later.counts is None
    assert store.unreported() == 0


def test_an_old_bundles_rows_stay_its_own(open_store):
    store = open_store()
    b1 = store.register(V1, "classification", ("no", "yes"))
    served(store, b1, ["v1-a", "v1-b"])
    b2 = store.register(V2, "classification", ("no", "maybe", "yes"))
    served(store, b2, ["v2-a"], classes=3)
    assert store.record([("v1-a", "yes"), ("v2-a", "maybe")]) == OutcomeCounts(joined=2)
    with pytest.raises(OutcomeLabelError):  # "maybe" is a class of v2 only
        store.record([("v1-b", "maybe")])
    by = {b.bundle: b for b in store.claim(1).bundles}
    assert by[V1].truth.tolist() == [1] and by[V1].scores.shape == (1, 2)
    assert by[V2].truth.tolist() == [1] and by[V2].scores.shape == (1, 3)
    assert by[V1].delays_s.tolist() == [0.0]


def test_a_repeated_prediction_id_keeps_the_first(open_store):
    store = open_store()
    b1 = store.register(V1, "classification", (0, 1))
    store.add(b1, ["same", "other"], store.clock(), np.array([0, 1]),
              np.array([[0.8, 0.2], [0.3, 0.7]]))
    repeated = store.add(b1, ["same"], store.clock(), np.array([1]), np.array([[0.1, 0.9]]))
    assert repeated == 1 and store.rows == 2
    store.record([("same", 0)])
    (rows,) = store.claim(1).bundles
    assert rows.predicted.tolist() == [0]
    np.testing.assert_allclose(rows.scores, [[0.8, 0.2]], rtol=1e-6)


def test_a_claim_carries_at_most_seven_bundles_and_the_rest_waits(open_store):
    store = open_store()
    for v in range(9):
        bid = store.register(BundleRef("sensor", f"1.{v}.0", f"{v:064x}"), "classification",
                             (0, 1))
        served(store, bid, [f"v{v}-a"])
        store.record([(f"v{v}-a", 0)])
    first = store.claim(1)
    assert len(first.bundles) == 7 and store.waiting
    assert [b.bundle.version for b in first.bundles] == [f"1.{v}.0" for v in range(7)]
    second = store.claim(2)
    assert [b.bundle.version for b in second.bundles] == ["1.7.0", "1.8.0"]
    assert not store.waiting and store.claim(3).rows == 0


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["join", "join", "stored", "lost", "reopen"]), max_size=30))
def test_every_joined_row_is_in_exactly_one_stored_summary(tmp_path_factory, steps):
    """Summaries stored or lost (a crash between the claim and the outbox's commit, a full
    disk) and restarts, in any order: each joined row is reported once."""
    path = tmp_path_factory.mktemp("claims") / "predictions.db"
    store = PredictionStore(path)
    bid = store.register(V1, "classification", (0, 1))
    served(store, bid, [f"p{i}" for i in range(200)])
    joined = next_id = reported = 0
    seq = 1  # the outbox's next sequence number: it moves only when a summary is stored
    try:
        for step in [*steps, "stored"]:
            if step == "join":
                joined += store.record([(f"p{next_id + i}", 1) for i in range(3)]).joined
                next_id += 3
            elif step == "reopen":
                store.close()
                store = PredictionStore(path)
            else:
                claim = store.claim(seq)
                if step == "stored":
                    reported += claim.rows
                    seq += 1
        assert reported == joined and store.unreported() == 0
    finally:
        store.close()
