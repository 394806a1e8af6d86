"""packager.wide: each preprocessing step, converted in float64, is bit-identical to
scikit-learn's ``transform`` (real onnxruntime), including missing values and categories
never seen in training; what it cannot reproduce it refuses by name."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import DoubleTensorType, StringTensorType
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import (
    FunctionTransformer,
    MinMaxScaler,
    OneHotEncoder,
    OrdinalEncoder,
    RobustScaler,
    StandardScaler,
)

from packager.wide import NotExact, float64_converters

NUMERIC = ["a", "b", "c"]
STRINGS = ["color", "shape"]


def frame(n: int, seed: int, unseen: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    colors = ["red", "green", "blue"] + (["purple"] if unseen else [])
    X = pd.DataFrame({
        "a": rng.normal(size=n) * 1e3 + 1 / 3,
        "b": rng.lognormal(size=n),
        "c": rng.integers(0, 5, n).astype(np.float64),
        "color": rng.choice(colors, n).astype(object),
        "shape": rng.choice(["square", "circle"], n).astype(object),
    })
    X.loc[rng.random(n) < 0.15, "a"] = np.nan
    X.loc[rng.random(n) < 0.1, "b"] = np.nan
    return X


STEPS = [
    ("imputer-mean", lambda: SimpleImputer(strategy="mean"), NUMERIC),
    ("imputer-median", lambda: SimpleImputer(strategy="median"), NUMERIC),
    ("imputer-most-frequent", lambda: SimpleImputer(strategy="most_frequent"), NUMERIC),
    ("imputer-constant", lambda: SimpleImputer(strategy="constant", fill_value=-7.25),
     NUMERIC),
    ("imputer-add-indicator", lambda: SimpleImputer(add_indicator=True), NUMERIC),
    ("imputer-then-standard",
     lambda: Pipeline([("i", SimpleImputer()), ("s", StandardScaler())]), NUMERIC),
    ("imputer-then-minmax",
     lambda: Pipeline([("i", SimpleImputer()), ("s", MinMaxScaler())]), NUMERIC),
    ("imputer-then-robust",
     lambda: Pipeline([("i", SimpleImputer()), ("s", RobustScaler())]), NUMERIC),
    ("function-identity",
     lambda: Pipeline([("i", SimpleImputer()), ("f", FunctionTransformer())]), NUMERIC),
    ("onehot-ignore", lambda: OneHotEncoder(handle_unknown="ignore", sparse_output=False),
     STRINGS),
    ("onehot-drop-first",
     lambda: OneHotEncoder(drop="first", handle_unknown="ignore", sparse_output=False),
     STRINGS),
    ("onehot-drop-if-binary",
     lambda: OneHotEncoder(drop="if_binary", handle_unknown="ignore", sparse_output=False),
     STRINGS),
    ("onehot-numeric", lambda: OneHotEncoder(handle_unknown="ignore", sparse_output=False),
     ["c"]),
    ("ordinal-unknown-value",
     lambda: OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1), STRINGS),
    ("ordinal-unknown-nan",
     lambda: OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan),
     STRINGS),
    ("ordinal-numeric", lambda: OrdinalEncoder(), ["c"]),
]


def _convert(ct: ColumnTransformer, X: pd.DataFrame):
    types = [(c, StringTensorType([None, 1]) if X[c].dtype == object
              else DoubleTensorType([None, 1])) for c in X.columns]
    converters, shapes = float64_converters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_sklearn(ct, initial_types=types,
                               target_opset={"": 17, "ai.onnx.ml": 3},
                               custom_conversion_functions=converters,
                               custom_shape_calculators=shapes)


def session(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(X: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: (X[c].to_numpy(dtype=object) if X[c].dtype == object
                else X[c].to_numpy(dtype=np.float64)).reshape(-1, 1) for c in X.columns}


@pytest.mark.parametrize("remainder", ["drop", "passthrough"])
@pytest.mark.parametrize("make, columns", [pytest.param(m, c, id=i) for i, m, c in STEPS])
def test_step_in_float64_is_bit_identical(make, columns, remainder):
    train = frame(300, 0)
    if remainder == "passthrough":  # strings passed through are no input for a tree
        train = train.drop(columns=[c for c in STRINGS if c not in columns])
    ct = ColumnTransformer([("step", make(), columns)], remainder=remainder,
                           sparse_threshold=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct.fit(train)
    model = _convert(ct, train)
    test = frame(200, 1, unseen=True)[list(train.columns)]
    got = session(model).run(None, _feeds(test))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown categories with drop= warn
        want = np.asarray(ct.transform(test), dtype=np.float64)
    assert got.dtype == np.float64
    assert got.shape == want.shape
    # bit for bit (NaN where scikit-learn has NaN): the trees see the very same numbers
    assert np.array_equal(got, want, equal_nan=True)


def test_imputer_drops_a_column_it_never_saw_a_value_in():
    train = frame(100, 0).assign(a=np.nan)
    ct = ColumnTransformer([("i", SimpleImputer(), NUMERIC)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct.fit(train)
        want = ct.transform(frame(50, 1).assign(a=np.nan))
    got = session(_convert(ct, train)).run(None, _feeds(frame(50, 1).assign(a=np.nan)))[0]
    assert got.shape == want.shape == (50, 2)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("make, step", [
    pytest.param(lambda: OneHotEncoder(min_frequency=40, handle_unknown="infrequent_if_exist",
                                       sparse_output=False), "OneHotEncoder", id="infrequent"),
    pytest.param(lambda: OrdinalEncoder(max_categories=2), "OrdinalEncoder",
                 id="ordinal-max-categories"),
])
def test_what_cannot_be_exact_is_refused_by_name(make, step):
    train = frame(300, 0)
    ct = ColumnTransformer([("step", make(), STRINGS)], sparse_threshold=0).fit(train)
    with pytest.raises(NotExact, match=step) as info:
        _convert(ct, train)
    assert info.value.step == step


@pytest.mark.parametrize("make", [
    pytest.param(lambda: SimpleImputer(strategy="most_frequent"), id="most-frequent"),
    pytest.param(lambda: SimpleImputer(strategy="constant", fill_value="unknown"),
                 id="constant"),
])
@pytest.mark.parametrize("double", [True, False], ids=["float64", "float32"])
def test_string_imputer_fills_what_the_device_sends_as_empty(make, double):
    """A missing string is NaN for scikit-learn and "" on the device (the runtime feeds
    a missing categorical cell so): the graph fills "" as scikit-learn fills NaN."""
    from packager.wide import string_converters

    train, test = frame(300, 0), frame(200, 1, unseen=True)
    for X, seed in ((train, 2), (test, 3)):
        X.loc[np.random.default_rng(seed).random(len(X)) < 0.2, STRINGS] = np.nan
    ct = ColumnTransformer([("step", make(), STRINGS)]).fit(train)
    converters, shapes = float64_converters() if double else string_converters()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_sklearn(ct, initial_types=[
            (c, StringTensorType([None, 1]) if c in STRINGS else DoubleTensorType([None, 1]))
            for c in train.columns], target_opset={"": 17, "ai.onnx.ml": 3},
            custom_conversion_functions=converters, custom_shape_calculators=shapes)
    feeds = {c: (test[c].fillna("").to_numpy(dtype=object) if c in STRINGS
                 else test[c].to_numpy(dtype=np.float64)).reshape(-1, 1) for c in test.columns}
    got = session(model).run(None, feeds)[0]
    want = ct.transform(test)
    assert test[STRINGS].isna().to_numpy().sum() > 20
    assert got.shape == want.shape
    assert got.astype(str).tolist() == want.astype(str).tolist()
