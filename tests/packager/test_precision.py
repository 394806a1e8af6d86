"""exact_tree_thresholds: converted tree ensembles split exactly as scikit-learn does.

Each case scores natural rows plus adversarial rows whose features sit on, or one
float64 ulp either side of, the estimator's own split thresholds: the rows where a
float32 ``nodes_values`` takes the other branch.  After the rewrite the only
difference left is onnxruntime's float32 output (TreeEnsemble v3 outputs float),
hence the relative tolerance of a few float32 ulps.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

pytest.importorskip("skl2onnx")
ort = pytest.importorskip("onnxruntime")

from skl2onnx import to_onnx  # noqa: E402
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType  # noqa: E402
from skl2onnx.sklapi import CastTransformer  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine  # noqa: E402
from sklearn.ensemble import (  # noqa: E402
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LinearRegression  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from packager.precision import exact_tree_thresholds  # noqa: E402
from packager.trees import ensemble_of, tree_ensembles  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
OPSET = {"": 17, "ai.onnx.ml": 3}

DATA = {
    "cancer": (load_breast_cancer, True),  # binary
    "wine": (load_wine, True),  # 3 classes
    "digits": (load_digits, True),  # 10 classes
    "diabetes": (load_diabetes, False),  # regression
}
FAMILIES = {
    "rf": (RandomForestClassifier, RandomForestRegressor, {"n_estimators": 30}),
    "et": (ExtraTreesClassifier, ExtraTreesRegressor, {"n_estimators": 30}),
    "gb": (GradientBoostingClassifier, GradientBoostingRegressor, {"n_estimators": 30}),
    "hgb": (HistGradientBoostingClassifier, HistGradientBoostingRegressor, {"max_iter": 20}),
}


def _make(family, clf):
    c, r, kw = FAMILIES[family]
    return (c if clf else r)(random_state=0, **kw)


_DATASETS: dict = {}
_FITTED: dict = {}


def _fitted(family, dataset, scaled=False):
    """Fitted once per run (HistGradientBoosting on digits is the slow one)."""
    key = (family, dataset, scaled)
    if key not in _FITTED:
        X, y, clf = _data(dataset)
        est = _make(family, clf)
        if scaled:
            est = Pipeline([("sc", StandardScaler()), ("m", est)])
        _FITTED[key] = est.fit(X, y)
    return _FITTED[key]


def _data(name):
    if name not in _DATASETS:
        loader, clf = DATA[name]
        X, y = loader(return_X_y=True)
        _DATASETS[name] = (X.astype(np.float64), y, clf)
    return _DATASETS[name]


def _adversarial(est, X, n=300, seed=0):
    """Rows moved onto the trees' thresholds (in raw-feature space)."""
    rng = np.random.default_rng(seed)
    ens = ensemble_of(tree_ensembles(est)[0])
    feats = np.concatenate([t.feature[t.is_branch] for t in ens.trees.values()])
    thr = np.concatenate([t.threshold[t.is_branch] for t in ens.trees.values()])
    rows = X[rng.integers(0, len(X), n)].copy()
    scaler = est.steps[0][1] if hasattr(est, "steps") else None
    Z = scaler.transform(rows) if scaler is not None else rows
    for r in range(n):
        for j in rng.integers(0, len(thr), 3):
            t = thr[j]
            Z[r, feats[j]] = [
                t,
                np.nextafter(t, np.inf),
                np.nextafter(t, -np.inf),
                float(np.float32(t)),
            ][rng.integers(0, 4)]
    if scaler is not None:
        # thresholds live after the scaler: invert it, then keep the rows whose
        # scaled value really lands on the wanted side (inversion is not exact)
        rows = scaler.inverse_transform(Z)
    return np.vstack([X, rows])


def _convert(est, X, clf, dtype):
    last = est.steps[-1][1] if hasattr(est, "steps") else est
    T = DoubleTensorType if dtype == np.float64 else FloatTensorType
    return to_onnx(
        est,
        initial_types=[("input", T([None, X.shape[1]]))],
        options={id(last): {"zipmap": False}} if clf else None,
        target_opset=OPSET,
    )


def _run(model, X, clf, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = X.astype(np.float64 if "double" in inp.type else np.float32)
    out = sess.run(None, {inp.name: x})
    return np.asarray(out[1] if clf else out[0], dtype=np.float64).reshape(len(X), -1)


def _expected(est, X, clf):
    return np.asarray(est.predict_proba(X) if clf else est.predict(X), dtype=np.float64).reshape(
        len(X), -1
    )


def _assert_exact(got, want):
    # float32 output rounding only: a couple of float32 ulps of the value
    tol = 4 * np.finfo(np.float32).eps * np.maximum(1.0, np.abs(want))
    bad = np.abs(got - want) > tol
    assert not bad.any(), (
        f"{bad.any(axis=1).sum()} rows differ, max |d|={np.abs(got - want).max():.3g}"
    )


CASES = [(f, d) for f in FAMILIES for d in DATA]


@pytest.mark.parametrize("family,dataset", CASES)
def test_bare_estimator_float_input(family, dataset):
    X, _y, clf = _data(dataset)
    est = _fitted(family, dataset)
    Xa = _adversarial(est, X)
    model = _convert(est, X, clf, np.float32)
    want = _expected(est, Xa, clf)
    before = np.abs(_run(model, Xa, clf) - want).max()

    exact = exact_tree_thresholds(model, est)
    assert exact is not None
    _assert_exact(_run(exact, Xa, clf), want)
    if family == "hgb":
        # the float64 comparison is the whole point: the float32 graph is visibly off
        assert before > 1e-3
        assert exact.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    else:
        # DecisionTree-based: sklearn itself compares float32(x); the input stays float
        assert exact.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("family,dataset", CASES)
def test_bare_estimator_double_input(family, dataset):
    """A DoubleTensorType conversion does not even load for most families; it does after."""
    X, _y, clf = _data(dataset)
    est = _fitted(family, dataset)
    Xa = _adversarial(est, X, seed=1)
    exact = exact_tree_thresholds(_convert(est, X, clf, np.float64), est)
    assert exact is not None
    _assert_exact(_run(exact, Xa, clf), _expected(est, Xa, clf))


@pytest.mark.parametrize("family,dataset", CASES)
def test_behind_standard_scaler(family, dataset):
    X, _y, clf = _data(dataset)
    pipe = _fitted(family, dataset, scaled=True)
    cast_late = Pipeline(
        [
            ("sc", pipe.steps[0][1]),
            ("cast", CastTransformer(dtype=np.float32).fit(X)),
            ("m", pipe.steps[1][1]),
        ]
    )
    Xa = _adversarial(pipe, X, seed=2)
    want = _expected(pipe, Xa, clf)

    # the cast-late graph (double scaler, float32 cast, tree) against the user's pipeline
    model = _convert(cast_late, X, clf, np.float64)
    exact = exact_tree_thresholds(model, pipe)
    assert exact is not None
    _assert_exact(_run(exact, Xa, clf), want)

    # the same graph against the cast-late pipeline itself: its trees see float32 values
    exact_cl = exact_tree_thresholds(model, cast_late)
    assert exact_cl is not None
    _assert_exact(_run(exact_cl, Xa, clf), _expected(cast_late, Xa, clf))

    # a plain double conversion of the pipeline
    exact_dbl = exact_tree_thresholds(_convert(pipe, X, clf, np.float64), pipe)
    assert exact_dbl is not None
    _assert_exact(_run(exact_dbl, Xa, clf), want)


@pytest.mark.parametrize("family", ["rf", "hgb"])
def test_exact_without_graph_optimisations(family):
    """The Cast(FLOAT)->Cast(DOUBLE) pair is semantic: no optimisation level may fuse it."""
    X, _y, clf = _data("wine")
    pipe = _fitted(family, "wine", scaled=True)
    Xa = _adversarial(pipe, X, seed=3)
    exact = exact_tree_thresholds(_convert(pipe, X, clf, np.float64), pipe)
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        _assert_exact(_run(exact, Xa, clf, level), _expected(pipe, Xa, clf))


def test_input_model_is_not_changed():
    X, _y, clf = _data("cancer")
    est = _fitted("hgb", "cancer")
    model = _convert(est, X, clf, np.float32)
    before = model.SerializeToString()
    assert exact_tree_thresholds(model, est) is not None
    assert model.SerializeToString() == before


def test_thresholds_are_float64_tensors():
    X, _y, clf = _data("diabetes")
    est = _fitted("hgb", "diabetes")
    exact = exact_tree_thresholds(_convert(est, X, clf, np.float32), est)
    (node,) = [n for n in exact.graph.node if n.op_type == "TreeEnsembleRegressor"]
    attrs = {a.name: a for a in node.attribute}
    assert "nodes_values" not in attrs and "target_weights" not in attrs
    vals = onnx.numpy_helper.to_array(attrs["nodes_values_as_tensor"].t)
    assert vals.dtype == np.float64
    thr = np.concatenate(
        [p[0].nodes["num_threshold"][~p[0].nodes["is_leaf"].astype(bool)] for p in est._predictors]
    )
    assert set(thr.tolist()) <= set(vals.tolist())


def test_other_estimator_is_refused():
    """The mapping is proved: the same architecture fitted differently does not pass."""
    X, y, clf = _data("cancer")
    est = _fitted("rf", "cancer")
    other = RandomForestClassifier(n_estimators=30, random_state=1).fit(X, y)
    assert exact_tree_thresholds(_convert(est, X, clf, np.float32), other) is None


def test_tampered_threshold_is_refused():
    X, _y, clf = _data("cancer")
    est = _fitted("hgb", "cancer")
    model = _convert(est, X, clf, np.float32)
    node = next(n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier")
    attr = next(a for a in node.attribute if a.name == "nodes_values")
    modes = next(a for a in node.attribute if a.name == "nodes_modes").strings
    i = next(k for k, m in enumerate(modes) if m == b"BRANCH_LEQ")
    attr.floats[i] = attr.floats[i] + 1.0
    assert exact_tree_thresholds(model, est) is None


def test_not_a_tree_model_is_refused():
    X, y, _ = _data("diabetes")
    est = LinearRegression().fit(X, y)
    assert exact_tree_thresholds(_convert(est, X, False, np.float32), est) is None


def test_already_rewritten_model_is_refused():
    X, _y, clf = _data("wine")
    est = _fitted("gb", "wine")
    exact = exact_tree_thresholds(_convert(est, X, clf, np.float32), est)
    assert exact is not None
    assert exact_tree_thresholds(exact, est) is None


def test_categorical_hgb_is_refused():
    X, y, _ = _data("wine")
    Xc = X.copy()
    Xc[:, 0] = np.arange(len(X)) % 4
    est = HistGradientBoostingClassifier(max_iter=10, categorical_features=[0], random_state=0).fit(
        Xc, y
    )
    try:
        model = _convert(est, Xc, True, np.float32)
    except Exception:
        pytest.skip("skl2onnx does not convert categorical HistGradientBoosting")
    if not any(p.nodes["is_categorical"].any() for it in est._predictors for p in it):
        pytest.skip("no categorical split was learnt")
    assert exact_tree_thresholds(model, est) is None
