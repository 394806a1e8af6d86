"""The performance block: exact merges, exact wire forms, scikit-learn's numbers, CBPE."""

from __future__ import annotations

import contextlib
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    precision_score,
    recall_score,
    roc_auc_score,
    root_mean_squared_error,
)

from edgefleet.contract.errors import ReferenceMismatchError, SchemaError
from edgefleet.contract.performance import (
    DELAY_EDGES,
    ERROR_EDGES,
    SCORE_EDGES,
    Estimated,
    Metric,
    PerformanceSpec,
    Realized,
    wilson,
)

BINARY = PerformanceSpec("classification", ("ok", "fault"))
THREE = PerformanceSpec("classification", (0, 1, 2))
REGRESSION = PerformanceSpec("regression", (), ERROR_EDGES)
SPECS = {"binary": BINARY, "three": THREE, "regression": REGRESSION}


# --------------------------------------------------------------------------- rows


@st.composite
def rows(draw, spec: PerformanceSpec, max_rows: int = 60):
    n = draw(st.integers(0, max_rows))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    delays = rng.exponential(86400.0, n) if draw(st.booleans()) else None
    if spec.task == "regression":
        truth = rng.normal(0, 10 ** draw(st.integers(-2, 4)), n)
        return truth + rng.normal(0, 10 ** draw(st.integers(-3, 3)), n), truth, None, delays
    k = spec.k
    scores = rng.dirichlet(np.full(k, draw(st.sampled_from([0.1, 1.0, 10.0]))), n)
    pred = scores.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    truth = rng.integers(0, k, n)
    return pred, truth, scores if draw(st.booleans()) or not n else None, delays


def realized(spec: PerformanceSpec, *batches) -> Realized:
    r = Realized(spec)
    for pred, truth, scores, delays in batches:
        r.add(pred, truth, scores, delays)
    return r


def _concat(a, b):
    if a is None or b is None:
        return None
    return np.concatenate([a, b])


def assert_same(a: dict, b: dict) -> None:
    """Counts exactly, sums to rounding."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9, err_msg=key)
        else:
            assert x.tolist() == y.tolist(), key


# --------------------------------------------------------------------------- merge, wire


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_merge_equals_accumulating_both(name, data):
    spec = SPECS[name]
    a, b = data.draw(rows(spec)), data.draw(rows(spec))
    merged = realized(spec, a).merge(realized(spec, b))
    # one add over the rows of both (scores and delays only where both had them)
    both = tuple(np.concatenate([x, y]) if i < 2 else _concat(x, y)
                 for i, (x, y) in enumerate(zip(a, b, strict=True)))
    # scores or delays on one side only: one accumulator, two adds
    mixed = any((x is None) != (y is None) for x, y in zip(a[2:], b[2:], strict=True))
    once = realized(spec, a, b) if mixed else realized(spec, both)
    assert_same(merged.to_wire(), once.to_wire())
    assert merged.n == once.n == len(a[0]) + len(b[0])
    assert Realized.merged(spec, [realized(spec, a), realized(spec, b)]) == merged


@pytest.mark.parametrize("name", ["binary", "three"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_estimated_merge_equals_accumulating_both(name, data):
    spec = SPECS[name]
    parts = []
    for _ in range(2):
        n = data.draw(st.integers(0, 80))
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        parts.append((rng.uniform(0, 1, n), rng.integers(0, spec.k, n)))
    a, b, once = Estimated(spec), Estimated(spec), Estimated(spec)
    a.add(*parts[0])
    b.add(*parts[1])
    once.add(np.concatenate([parts[0][0], parts[1][0]]),
             np.concatenate([parts[0][1], parts[1][1]]))
    assert_same(Estimated.merged(spec, [a, b]).to_wire(), once.to_wire())
    assert_same(a.merge(b).to_wire(), once.to_wire())


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_wire_round_trip_is_exact(name, data):
    spec = SPECS[name]
    r = realized(spec, data.draw(rows(spec)), data.draw(rows(spec)))
    back = Realized.from_wire(spec, r.to_wire())
    assert back == r and back.to_wire() == r.to_wire()
    assert back.metrics() == r.metrics()
    e = Estimated(spec, calibrated=data.draw(st.booleans()))
    if spec.task == "classification":
        pred, _, scores, _ = data.draw(rows(spec))
        e.add(scores.max(axis=1) if scores is not None else np.full(len(pred), 0.7), pred)
    assert Estimated.from_wire(spec, e.to_wire()) == e


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False,
                                                                       allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=20)


def _mutations(wire: dict):
    """A valid wire form with one field replaced by junk, or one number nudged."""
    keys = sorted(wire)
    return st.one_of(
        st.builds(lambda k, v: {**wire, k: v}, st.sampled_from(keys), json_values),
        st.builds(lambda k: {x: y for x, y in wire.items() if x != k}, st.sampled_from(keys)),
        st.builds(lambda v: {**wire, "extra": v}, json_values),
        json_values,
    )


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_payloads_raise_only_schema_errors(name, data):
    spec = SPECS[name]
    r = realized(spec, data.draw(rows(spec, 20)))
    for cls, wire in ((Realized, r.to_wire()), (Estimated, Estimated(spec).to_wire())):
        with contextlib.suppress(SchemaError):
            cls.from_wire(spec, data.draw(_mutations(wire)))


def _binary_wire() -> dict:
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 200)
    return realized(BINARY, ((p > 0.5).astype(int), (rng.uniform(0, 1, 200) < p).astype(int),
                             np.column_stack([1 - p, p]), rng.exponential(600, 200))).to_wire()


def _with(path: tuple, value) -> dict:
    import copy

    doc = copy.deepcopy(_binary_wire())
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


BAD_REALIZED = [
    pytest.param(_with(("cm",), [[1, 2]]), "realized.cm", id="cm-rows"),
    pytest.param(_with(("cm", 0, 0), -1), "realized.cm[0]", id="negative-count"),
    pytest.param(_with(("cm", 0, 0), 1.5), "realized.cm[0]", id="float-count"),
    pytest.param(_with(("cm", 0, 0), True), "realized.cm[0]", id="bool-count"),
    pytest.param(_with(("hist",), []), "realized.hist", id="hist-missing-class"),
    pytest.param(_with(("hist", 0, 0), [0] * 3), "realized.hist[0][0]", id="hist-size"),
    pytest.param(_with(("hist", 0, 0, 0), 10**6), "realized.hist[0]", id="hist-total"),
    pytest.param(_with(("brier",), [1e9, 1.0]), "realized.brier", id="brier-too-big"),
    pytest.param(_with(("brier",), [-1.0, 1.0]), "realized.brier", id="brier-negative"),
    pytest.param(_with(("rel", 1, 0), 1e6), "realized.rel", id="rel-sum-outside-bin"),
    pytest.param(_with(("rel", 2, 0), 10**6), "realized.rel", id="rel-positives"),
    pytest.param(_with(("rel",), [[0], [0.0]]), "realized.rel", id="rel-shape"),
    pytest.param(_with(("delay",), [10**6] + [0] * len(DELAY_EDGES)), "realized.delay",
                 id="more-delays-than-rows"),
    pytest.param(_with(("extra",), 1), "realized.extra", id="unknown-field"),
]


@pytest.mark.parametrize(("doc", "field"), BAD_REALIZED)
def test_bad_realized_blocks_name_the_field(doc, field):
    with pytest.raises(SchemaError) as info:
        Realized.from_wire(BINARY, doc)
    assert info.value.field == field, str(info.value)


def _regression_wire(**changes) -> dict:
    rng = np.random.default_rng(4)
    t = rng.normal(0, 5, 100)
    doc = realized(REGRESSION, (t + rng.normal(0, 1, 100), t, None, None)).to_wire()
    doc.update(changes)
    return doc


@pytest.mark.parametrize(("doc", "field"), [
    pytest.param(_regression_wire(n=101), "realized.hist", id="n-not-hist-total"),
    pytest.param(_regression_wire(err=[0.0, 1.0, 5000.0, 1.0]), "realized.err",
                 id="abs-sum-impossible"),
    pytest.param(_regression_wire(err=[0.0, -1.0, 0.0, 0.0]), "realized.err",
                 id="negative-square-sum"),
    pytest.param(_regression_wire(err=[1.0, 2.0]), "realized.err", id="err-size"),
    pytest.param(_regression_wire(hist=[1, 2]), "realized.hist", id="hist-size"),
])
def test_bad_regression_blocks_name_the_field(doc, field):
    with pytest.raises(SchemaError) as info:
        Realized.from_wire(REGRESSION, doc)
    assert info.value.field == field, str(info.value)


def _estimated_wire(**changes) -> dict:
    e = Estimated(BINARY)
    e.add(np.array([0.9, 0.2, 0.6]), np.array([1, 0, 1]))
    return {**e.to_wire(), **changes}


@pytest.mark.parametrize(("doc", "field"), [
    pytest.param(_estimated_wire(q=[5.0, 1.0]), "estimated.q", id="q-above-rows"),
    pytest.param(_estimated_wire(q=[-0.1, 1.0]), "estimated.q", id="q-negative"),
    pytest.param(_estimated_wire(v=[0.9, 0.0]), "estimated.v", id="v-impossible"),
    pytest.param(_estimated_wire(n=[1]), "estimated.n", id="n-size"),
    pytest.param(_estimated_wire(calibrated=1), "estimated.calibrated", id="calibrated-int"),
    pytest.param({k: v for k, v in _estimated_wire().items() if k != "q"}, "estimated.q",
                 id="q-missing"),
])
def test_bad_estimated_blocks_name_the_field(doc, field):
    with pytest.raises(SchemaError) as info:
        Estimated.from_wire(BINARY, doc)
    assert info.value.field == field, str(info.value)


def test_a_block_of_scores_that_do_not_sum_to_one_still_travels():
    spec = PerformanceSpec("classification", tuple(range(5)))
    r = realized(spec, (np.zeros(4, int), np.arange(4), np.ones((4, 5)), None))
    assert r.metrics()["brier"].value == 4.0  # the most a row can score
    assert Realized.from_wire(spec, r.to_wire()) == r


def test_blocks_over_other_specs_do_not_merge():
    with pytest.raises(ReferenceMismatchError):
        Realized(BINARY).merge(Realized(THREE))
    with pytest.raises(ReferenceMismatchError):
        Estimated(BINARY).merge(Estimated(PerformanceSpec("classification", ("a", "b"))))


@pytest.mark.parametrize(("args", "field"), [
    pytest.param(([0, 2], [0, 1]), "predicted", id="index-beyond-classes"),
    pytest.param(([0, 1], [0, -1]), "truth", id="negative-index"),
    pytest.param(([0.5, 1.0], [0, 1]), "predicted", id="float-indices"),
    pytest.param(([0, 1], [0]), "truth", id="lengths-differ"),
    pytest.param(([0, 1], [0, 1], [[0.5, 0.5]]), "scores", id="scores-shape"),
    pytest.param(([0, 1], [0, 1], [[0.5, 0.5], [np.nan, 1]]), "scores", id="nan-score"),
    pytest.param(([0, 1], [0, 1], None, [1.0]), "delays_s", id="delays-length"),
])
def test_bad_rows_are_refused_naming_the_argument(args, field):
    r = Realized(BINARY)
    with pytest.raises(SchemaError) as info:
        r.add(*(np.asarray(a) if a is not None else None for a in args))
    assert info.value.field == field
    assert r.n == 0


def test_bad_regression_rows_are_refused_and_unknown_delays_not_counted():
    r = Realized(REGRESSION)
    for pred, truth in (([np.nan], [1.0]), ([1e61], [0.0]), ([1.0, 2.0], [1.0])):
        with pytest.raises(SchemaError) as info:
            r.add(np.asarray(pred), np.asarray(truth))
        assert info.value.field == "truth"
    r.add(np.array([1.0, 2.0]), np.array([1.5, 2.0]), None, np.array([np.nan, 120.0]))
    assert r.n == 2 and int(r.delay.sum()) == 1 and r.delay[1] == 1


def test_bad_estimated_rows_are_refused():
    e = Estimated(BINARY)
    for calibrated, predicted in (([0.5, 1.2], [0, 1]), ([0.5, np.nan], [0, 1]),
                                  ([0.5], [0, 1]), ([0.5, 0.5], [0, 2])):
        with pytest.raises(SchemaError):
            e.add(np.asarray(calibrated), np.asarray(predicted))
    assert e.n == 0


# --------------------------------------------------------------------------- metrics


def _model_rows(n: int, seed: int, k: int = 2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    logits = x @ rng.normal(size=(3, k)) * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth = np.array([rng.choice(k, p=p) for p in probs])
    noisy = probs * rng.uniform(0.7, 1.3, probs.shape)
    noisy /= noisy.sum(axis=1, keepdims=True)
    return noisy.argmax(axis=1), truth, noisy


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_realized_metrics_equal_scikit_learns(k, seed):
    spec = PerformanceSpec("classification", tuple(f"c{i}" for i in range(k)))
    pred, truth, scores = _model_rows(3000, seed, k)
    # accumulate in three device windows, merged as the server would
    parts = np.array_split(np.arange(len(pred)), 3)
    r = Realized(spec)
    for idx in parts:
        part = Realized(spec)
        part.add(pred[idx], truth[idx], scores[idx])
        r.merge(Realized.from_wire(spec, part.to_wire()))
    m = r.metrics()
    labels = list(range(k))
    assert r.confusion().tolist() == confusion_matrix(truth, pred, labels=labels).tolist()
    assert m["accuracy"].value == accuracy_score(truth, pred)
    prec = precision_score(truth, pred, labels=labels, average=None)
    rec = recall_score(truth, pred, labels=labels, average=None)
    f1 = f1_score(truth, pred, labels=labels, average=None)
    for i, c in enumerate(spec.classes):  # exactly: the same counts, the same division
        assert m[f"precision[{c}]"].value == prec[i]
        assert m[f"recall[{c}]"].value == rec[i]
        assert m[f"f1[{c}]"].value == f1[i]
    assert m["f1_macro"].value == f1_score(truth, pred, average="macro")
    if k == 2:
        assert abs(m["auc"].value - roc_auc_score(truth, scores[:, 1])) < 0.005
        assert m["brier"].value == pytest.approx(brier_score_loss(truth, scores[:, 1]),
                                                 abs=1e-12)
        assert m["precision"] == m["precision[c1]"]
    else:
        for i, c in enumerate(spec.classes):
            assert abs(m[f"auc[{c}]"].value - roc_auc_score(truth == i, scores[:, i])) < 0.005
        onehot = np.eye(k)[truth]
        assert m["brier"].value == pytest.approx(((scores - onehot) ** 2).sum(1).mean(),
                                                 abs=1e-12)
    for name, metric in m.items():
        if metric.method != "binned":  # ece has no interval
            assert metric.low <= metric.value <= metric.high, name


@pytest.mark.parametrize("mu", [0.02, 0.2, 0.5, 1.0, 2.0, 3.0])
def test_binned_auc_holds_for_hesitant_and_confident_models(mu):
    """Calibrated scores of two Gaussian classes at +-mu (logit = 2 mu x), as float32 like
    an ONNX model's: crowded at 0.5 (mu 0.02, AUC 0.51) to saturated (mu 3, AUC 0.9999)."""
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, 20000)
    x = rng.normal(np.where(truth == 1, mu, -mu), 1.0)
    p = (1 / (1 + np.exp(-2 * mu * x))).astype(np.float32).astype(np.float64)
    r = realized(BINARY, ((p > 0.5).astype(int), truth, np.column_stack([1 - p, p]), None))
    assert abs(r.metrics()["auc"].value - roc_auc_score(truth, p)) < 0.005


def test_regression_metrics_equal_scikit_learns():
    rng = np.random.default_rng(6)
    truth = rng.normal(50, 20, 5000)
    pred = truth + rng.standard_t(3, 5000) * 4 + 0.5
    r = Realized(REGRESSION)
    for idx in np.array_split(np.arange(5000), 4):
        r.merge(realized(REGRESSION, (pred[idx], truth[idx], None, None)))
    m = r.metrics()
    assert m["mae"].value == pytest.approx(mean_absolute_error(truth, pred), rel=1e-9)
    assert m["rmse"].value == pytest.approx(root_mean_squared_error(truth, pred), rel=1e-9)
    assert m["bias"].value == pytest.approx(float(np.mean(pred - truth)), rel=1e-9, abs=1e-12)
    assert int(r.err_hist.sum()) == r.n == 5000
    for metric in m.values():
        assert metric.low < metric.value < metric.high and metric.n == 5000


def test_wilson_interval_matches_the_textbook():
    # 8 of 10: (0.4902, 0.9433), e.g. Newcombe (1998) and every Wilson table
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    r = realized(BINARY, (np.array([1] * 10), np.array([1] * 8 + [0] * 2), None, None))
    acc = r.metrics()["accuracy"]
    assert acc == Metric(0.8, low, high, 10, "wilson")
    assert r.metrics()["precision[ok]"].value is None  # never predicted: undefined


def test_hanley_mcneil_interval_narrows_with_rows():
    widths = []
    for n in (200, 2000, 20000):
        pred, truth, scores = _model_rows(n, 7)
        auc = realized(BINARY, (pred, truth, scores, None)).metrics()["auc"]
        assert auc.method == "hanley-mcneil" and auc.low < auc.value < auc.high
        widths.append(auc.high - auc.low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]


def test_reliability_diagram_and_ece():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.95, 0.95])
    truth = np.array([0, 0, 1, 1, 1, 0])
    r = realized(BINARY, ((p > 0.5).astype(int), truth, np.column_stack([1 - p, p]), None))
    assert r.reliability() == [(0.0, 0.1, 2, pytest.approx(0.05), 0.0),
                               (0.9, 1.0, 4, pytest.approx(0.95), 0.75)]
    assert r.metrics()["ece"].value == pytest.approx((2 * 0.05 + 4 * 0.2) / 6)


def test_label_delays_land_in_their_bins():
    r = realized(BINARY, (np.zeros(4, int), np.zeros(4, int), None,
                          np.array([5.0, 60.0, 3600.0, 1e9])))
    assert r.delay[0] == 1 and r.delay[1] == 1 and r.delay[-1] == 1 and r.delay.sum() == 4


def test_score_edges_are_increasing_and_cover_confident_scores():
    assert all(b > a for a, b in itertools.pairwise(SCORE_EDGES))
    assert SCORE_EDGES[0] < 1e-6 and SCORE_EDGES[-1] > 1 - 1e-6


# --------------------------------------------------------------------------- estimated


def _logistic_world(n: int, seed: int, shift: float = 0.0, flip: bool = False):
    """Rows whose labels follow a logistic rule exactly (so a logistic model is
    calibrated wherever the inputs go); ``shift`` moves the inputs (covariate shift),
    ``flip`` flips the labels where x0 > 0.5 (concept drift: inputs unchanged)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)) + np.array([shift, -shift / 2])
    p = 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.5 * x[:, 1] + 0.3)))
    y = (rng.uniform(size=n) < p).astype(int)
    if flip:
        y = np.where(x[:, 0] > 0.5, 1 - y, y)
    return x, y


@pytest.fixture(scope="module")
def logistic_model():
    x, y = _logistic_world(20000, 0)
    return LogisticRegression().fit(x, y)


def _both(model, x, y) -> tuple[Metric, Metric]:
    p = model.predict_proba(x)[:, 1]
    pred = (p > 0.5).astype(np.int64)
    e = Estimated(BINARY)
    for idx in np.array_split(np.arange(len(p)), 40):  # the agent's chunks
        e.add(p[idx], pred[idx])
    r = realized(BINARY, (pred, y, np.column_stack([1 - p, p]), None))
    return e.metrics()["accuracy"], r.metrics()["accuracy"]


@pytest.mark.parametrize("shift", [0.0, 0.8, 1.6])
def test_estimate_tracks_realized_accuracy_under_covariate_shift(logistic_model, shift):
    x, y = _logistic_world(8000, 11, shift=shift)
    est, real = _both(logistic_model, x, y)
    assert abs(est.value - real.value) <= 0.02, (shift, est, real)
    assert est.low <= real.value <= est.high or abs(est.value - real.value) < 0.01


def test_estimated_binary_precision_recall_f1_track_realized(logistic_model):
    x, y = _logistic_world(8000, 12, shift=1.0)
    p = logistic_model.predict_proba(x)[:, 1]
    pred = (p > 0.5).astype(np.int64)
    e = Estimated(BINARY)
    e.add(p, pred)
    m = e.metrics()
    assert abs(m["precision"].value - precision_score(y, pred)) < 0.03
    assert abs(m["recall"].value - recall_score(y, pred)) < 0.03
    assert abs(m["f1"].value - f1_score(y, pred)) < 0.03
    for metric in m.values():
        assert metric.low < metric.value < metric.high and metric.method == "cbpe"


def test_concept_drift_is_caught_by_realized_not_by_the_estimate(logistic_model):
    """Labels flipped in a region of the input space leave every confidence as it was:
    the estimate cannot see it (by construction); the realized accuracy falls."""
    x, y = _logistic_world(8000, 13)
    before_est, before_real = _both(logistic_model, x, y)
    _, y_flipped = _logistic_world(8000, 13, flip=True)
    after_est, after_real = _both(logistic_model, x, y_flipped)
    assert after_est == before_est  # same inputs, same confidences, same estimate
    assert before_real.value - after_real.value > 0.2
    assert after_real.high < after_est.low  # the realized interval excludes the estimate


def test_multiclass_estimate_is_the_mean_top_class_probability():
    e = Estimated(THREE)
    q = np.array([0.9, 0.6, 0.5, 0.8])
    e.add(q, np.array([0, 2, 2, 1]))
    m = e.metrics()
    assert m["accuracy"].value == pytest.approx(q.mean())
    assert m["precision[2]"].value == pytest.approx(0.55)
    sd = math.sqrt((q * (1 - q)).sum()) / 4
    assert m["accuracy"].high == pytest.approx(min(1.0, q.mean() + 1.959963984540054 * sd))


def test_the_calibration_sets_noise_widens_the_accuracy_interval():
    e = Estimated(BINARY)
    e.add(np.full(1000, 0.8), np.ones(1000, dtype=np.int64))
    bare, wide = e.metrics()["accuracy"], e.metrics(calibration_rows=5000)["accuracy"]
    assert bare.value == wide.value == pytest.approx(0.8)
    se = math.sqrt(0.16 / 1000 + 0.16 / 5000)
    assert wide.high - wide.value == pytest.approx(1.959963984540054 * se)
    assert wide.high - wide.low > bare.high - bare.low


def test_an_uncalibrated_block_stays_flagged_after_merge():
    a, b = Estimated(BINARY, calibrated=True), Estimated(BINARY, calibrated=False)
    assert not a.merge(b).calibrated
    assert Estimated.from_wire(BINARY, a.to_wire()).calibrated is False


def test_spec_from_manifest_and_its_refusals():
    from types import SimpleNamespace

    assert PerformanceSpec.from_manifest(SimpleNamespace(task="classification",
                                                         classes=("a", "b"))) == \
        PerformanceSpec("classification", ("a", "b"))
    assert PerformanceSpec.from_manifest(SimpleNamespace(task="regression", classes=())) \
        .error_edges == ERROR_EDGES
    for bad in (("classification", ("a",)), ("classification", tuple(range(257))),
                ("ranking", ()), ("regression", (), (1.0, 1.0)), ("regression", (), ())):
        with pytest.raises(SchemaError):
            PerformanceSpec(*bad)
