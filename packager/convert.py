"""Convert a scikit-learn estimator (or adopt an ONNX model) into a bundle's graph.

Conversion is skl2onnx with ZipMap off (probabilities come out as a plain tensor,
which is faster and is what the runtime reads). Two layouts:

* ``tensor``: all features numeric and the model takes an array: one ``[N, F]`` input.
* ``columns``: a categorical feature or a ColumnTransformer: one ``[N, 1]`` input per
  feature, named after it (numeric as float, categorical as string).

Precision. A tree ensemble compares each feature with its split thresholds; a value
a hair away from a threshold goes the other way if it is computed in float32 where
scikit-learn computed it in float64. The biggest source is preprocessing before the
trees (a StandardScaler in float32): on load_diabetes a scaler + HistGradientBoosting
regressor was off by up to 13.4 on 4 % of rows. So when a pipeline ends in a tree
ensemble, its preprocessing is converted in float64 and cast to float32 just before
the trees ("cast late"), which took that error to 9e-5. skl2onnx's imputer and
encoders have no float64 form that onnxruntime runs; :mod:`packager.wide` supplies
exact ones for this conversion (a mixed imputer + scaler + one-hot pipeline before a
HistGradientBoosting model went from max |Δp| 0.25 to 1e-7). A step that still cannot
run in float64 keeps the float32 graph, and the note names it with its cost (how far
the trees' input moved, how many training rows crossed a threshold); the fidelity gate
judges it. XGBoost and LightGBM come through onnxmltools (:mod:`packager.boosters`).
The rest is float32 split thresholds:
skl2onnx rounds each float64 threshold to float32, and a value between the two goes
the other way in every tree at once (a held-out diabetes row was off by 2.2 % of the
spread). ``packager.precision`` rewrites the trees to compare against the exact
float64 thresholds, which onnxruntime supports (``nodes_values_as_tensor``).

This module does not quantise, profile or judge fidelity.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from edgefleet.contract.manifest import Binding, OutputSpec
from packager.boosters import library_of, register
from packager.data import Table
from packager.errors import ConversionError, UnsupportedModelError
from packager.precision import exact_tree_thresholds
from packager.wide import float32_cost, float64_converters, string_converters

__all__ = ["Converted", "adopt_onnx", "convert_sklearn", "describe", "sklearn_outputs"]

ONNX_OPSET = 17  # onnxruntime >= 1.14 runs it; devices are often a few releases behind
ML_OPSET = 3

TREE_ENSEMBLES = (
    "DecisionTreeClassifier", "DecisionTreeRegressor", "ExtraTreeClassifier",
    "ExtraTreeRegressor", "RandomForestClassifier", "RandomForestRegressor",
    "ExtraTreesClassifier", "ExtraTreesRegressor", "GradientBoostingClassifier",
    "GradientBoostingRegressor", "HistGradientBoostingClassifier",
    "HistGradientBoostingRegressor",
    # onnxmltools' converters, registered by packager.boosters
    "XGBClassifier", "XGBRegressor", "LGBMClassifier", "LGBMRegressor",
)


@dataclass
class Converted:
    model: bytes
    binding: Binding
    outputs: tuple[OutputSpec, ...]
    task: str
    classes: tuple[Any, ...]
    estimator: str
    notes: list[str] = field(default_factory=list)


def describe(est: Any) -> str:
    """A short readable name: ``Pipeline(StandardScaler, MLPClassifier)``."""
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    if isinstance(est, Pipeline):
        return f"Pipeline({', '.join(describe(s) for _, s in est.steps)})"
    if isinstance(est, ColumnTransformer):
        parts = [f"{n}: {describe(t)}" for n, t, _ in getattr(est, "transformers_",
                                                               est.transformers)
                 if n != "remainder" or t not in ("drop",)]
        return f"ColumnTransformer({', '.join(parts)})"
    if isinstance(est, str):
        return est
    return type(est).__name__


def _final(est: Any) -> Any:
    from sklearn.pipeline import Pipeline

    return est.steps[-1][1] if isinstance(est, Pipeline) else est


def _contains(est: Any, cls_name: str) -> bool:
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    if type(est).__name__ == cls_name:
        return True
    if isinstance(est, Pipeline):
        return any(_contains(s, cls_name) for _, s in est.steps)
    if isinstance(est, ColumnTransformer):
        return any(_contains(t, cls_name) for _, t, _ in est.transformers)
    return False


def _classes(est: Any) -> tuple[tuple[Any, ...], str]:
    classes = np.asarray(est.classes_)
    if classes.dtype.kind in "iub":
        return tuple(int(c) for c in classes), "int64"
    if classes.dtype.kind == "f" and np.all(classes == np.round(classes)):
        return tuple(int(c) for c in classes), "int64"
    return tuple(str(c) for c in classes), "string"


def sklearn_outputs(est: Any, table: Table, layout: str) -> dict[str, np.ndarray]:
    """What the original model says on ``table``: label/probabilities, or value."""
    from sklearn.base import is_classifier

    X = table.frame() if layout == "columns" or hasattr(est, "feature_names_in_") \
        else table.matrix()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if is_classifier(est):
            out = {"label": np.asarray(est.predict(X))}
            if hasattr(est, "predict_proba"):
                out["probabilities"] = np.asarray(est.predict_proba(X), dtype=np.float64)
            return out
        return {"value": np.asarray(est.predict(X), dtype=np.float64).reshape(-1)}


def _cast_late(est: Any) -> Any | None:
    """The pipeline with a float32 cast inserted before its final tree ensemble."""
    from skl2onnx.sklapi import CastTransformer
    from sklearn.pipeline import Pipeline

    if not isinstance(est, Pipeline) or len(est.steps) < 2:
        return None
    if type(_final(est)).__name__ not in TREE_ENSEMBLES:
        return None
    cast = CastTransformer(dtype=np.float32).fit(np.zeros((1, 1)))
    return Pipeline([*est.steps[:-1], ("edgefleet_cast", cast), est.steps[-1]])


def _initial_types(table: Table, layout: str, double: bool) -> list[tuple[str, Any]]:
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, StringTensorType

    num = DoubleTensorType if double else FloatTensorType
    if layout == "tensor":
        return [("input", num([None, len(table.names)]))]
    return [(n, StringTensorType([None, 1]) if table.kinds[n] == "categorical" else num([None, 1]))
            for n in table.names]


def _to_onnx(est: Any, table: Table, layout: str, double: bool, classifier: bool) -> bytes:
    from packager.quantize import repair_opsets

    options = {id(_final(est)): {"zipmap": False}} if classifier else None
    # float64: the preprocessing converters that skl2onnx writes in float32 (or with
    # no float64 kernel in onnxruntime) are replaced for this conversion only
    converters, shapes = float64_converters() if double else string_converters()
    custom = {"custom_conversion_functions": converters, "custom_shape_calculators": shapes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = to_onnx(est, initial_types=_initial_types(table, layout, double),
                            options=options,
                            target_opset={"": ONNX_OPSET, "ai.onnx.ml": ML_OPSET}, **custom)
        except Exception as exc:  # skl2onnx raises NameError for an unknown option
            # A classifier without probabilities (LinearSVC) has no ZipMap and its
            # converter refuses the option: "Option 'zipmap' not in [...]". Give it an
            # option it knows (its default), or skl2onnx's Pipeline parser adds zipmap.
            if options is None or "'zipmap'" not in str(exc):
                raise
            model = to_onnx(est, initial_types=_initial_types(table, layout, double),
                            options={id(_final(est)): {"nocl": False}},
                            target_opset={"": ONNX_OPSET, "ai.onnx.ml": ML_OPSET}, **custom)
    return repair_opsets(model).SerializeToString()


def to_onnx(est: Any, **kwargs: Any) -> Any:
    """skl2onnx's ``to_onnx``, with its ``custom_*`` arguments passed through.

    As ``to_onnx`` does: a fixed graph name (``convert_sklearn`` draws a random one,
    which would make two builds of the same model differ) and the main opset pinned to
    the target.
    """
    from skl2onnx import convert_sklearn

    model = convert_sklearn(est, name=f"ONNX({type(est).__name__})", **kwargs)
    for op in model.opset_import:
        if op.domain == "":
            op.version = ONNX_OPSET
    return model


def _loads(model: bytes) -> str | None:
    try:
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        return str(exc).splitlines()[0][:300]
    return None


def convert_sklearn(est: Any, table: Table) -> Converted:
    """Convert a fitted estimator whose features are ``table``'s columns.

    Raises:
        UnsupportedModelError: not a classifier or regressor, or no converter for it.
        ConversionError: the converted graph does not run in onnxruntime.
    """
    name, classifier, library = _check_estimator(est)
    categorical = any(table.kinds[n] == "categorical" for n in table.names)
    layout = "columns" if categorical or _contains(est, "ColumnTransformer") else "tensor"
    late = _cast_late(est)
    attempts = ([(late, True)] if late is not None else []) + [(est, False)]
    model, double, why_float32 = _first_that_runs(name, attempts, table, layout, classifier)
    notes: list[str] = []
    if late is not None and double:
        notes.append("preprocessing in float64" + (
            ", cast to float32 before the trees as XGBoost does" if library == "xgboost"
            else ""))
    elif late is not None:
        notes.append(_float32_note(model, est, table, layout, why_float32))
    exact = exact_tree_thresholds(onnx.load_from_string(model), est)
    if exact is not None:
        # the original estimator, not the cast-late copy: the rewrite then compares
        # exactly as scikit-learn does (float64 for HGB, float32(x) vs float64 t for
        # the others), so no row near a split goes the other way
        model = exact.SerializeToString()
        notes.append("split thresholds in float64, compared exactly as "
                     f"{'LightGBM' if library == 'lightgbm' else 'scikit-learn'} does")
    task, classes, outputs = _task_outputs(est, classifier)
    # the graph decides the tensor's type: cast late and the threshold rewrite both
    # make it double
    first = onnx.load_from_string(model).graph.input[0].type.tensor_type.elem_type
    wide = first == onnx.TensorProto.DOUBLE
    binding = Binding(layout, "input", "float64" if wide else "float32")
    return Converted(model, binding, outputs, task, classes, name, notes)


def _check_estimator(est: Any) -> tuple[str, bool, str | None]:
    """The estimator's name, whether it classifies, and the booster library it needs.

    Raises:
        UnsupportedModelError: not a scikit-learn classifier or regressor, or a booster
            whose converters are not installed.
    """
    from sklearn.base import BaseEstimator, is_classifier, is_regressor

    name = describe(est) if isinstance(est, BaseEstimator) else type(est).__name__
    if not isinstance(est, BaseEstimator):
        raise UnsupportedModelError(f"{name}: not a scikit-learn estimator")
    classifier = is_classifier(est)
    if not classifier and not is_regressor(est):
        raise UnsupportedModelError(f"{name}: only classifiers and regressors can be packaged")
    library = library_of(_final(est))
    if library is not None and not register(library):
        raise UnsupportedModelError(f"{name}: converting it needs onnxmltools: "
                                    f"pip install 'edgefleet[{library}]'")
    return name, classifier, library


def _first_that_runs(name: str, attempts: list[tuple[Any, bool]], table: Table, layout: str,
                     classifier: bool) -> tuple[bytes, bool, str]:
    """The first attempt (float64 first, when there is one) that converts and loads: its
    bytes, whether it is the float64 one, and why the float64 one failed (for the note).

    Raises:
        UnsupportedModelError: no converter, or none for this configuration.
        ConversionError: no attempt's graph runs in onnxruntime.
    """
    model, double, failure, unsupported = b"", False, "", False
    why_float32 = ""
    for candidate, double in attempts:
        if failure and not why_float32:
            why_float32 = failure  # the float64 attempt's reason, for the note
        try:
            model = _to_onnx(candidate, table, layout, double, classifier)
        except Exception as exc:  # skl2onnx raises RuntimeError / its own types
            text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            if not isinstance(exc, NotImplementedError) and (
                    "shape calculator" in text or "converter" in text.lower() or
                    "MissingShapeCalculator" in type(exc).__name__):
                raise UnsupportedModelError(
                    f"{name}: no ONNX converter for {_unsupported_part(text) or name}") from exc
            failure = text
            # skl2onnx's NotImplementedError: the converter exists but not for this
            # configuration (a multiclass GaussianProcessClassifier, say)
            unsupported = isinstance(exc, NotImplementedError)
            continue
        failure, unsupported = _loads(model) or "", False
        if not failure:
            break
    if failure and unsupported:
        raise UnsupportedModelError(f"{name}: the ONNX converter does not support this "
                                    f"estimator as configured ({failure})")
    if failure:
        raise ConversionError(f"{name}: converted graph does not run in onnxruntime: {failure}")
    return model, double, why_float32


def _task_outputs(est: Any, classifier: bool) -> tuple[str, tuple, tuple[OutputSpec, ...]]:
    """The task, the classes and the output specs the bundle declares."""
    if not classifier:
        return "regression", (), (OutputSpec("variable", "value", "float32"),)
    classes, label_dtype = _classes(est)
    outputs = [OutputSpec("label", "label", label_dtype)]
    if hasattr(est, "predict_proba"):
        outputs.append(OutputSpec("probabilities", "probabilities", "float32"))
    return "classification", classes, tuple(outputs)


def _float32_note(model: bytes, est: Any, table: Table, layout: str, why: str) -> str:
    """Which step kept the preprocessing in float32, and what it costs the trees."""
    step = why
    if "Could not find an implementation for " in why:  # onnxruntime: no double kernel
        op = why.split("Could not find an implementation for ", 1)[1].split("(", 1)[0]
        step = f"onnxruntime has no float64 {op} kernel"
    note = f"preprocessing kept in float32 ({step or 'no float64 conversion'})"
    sample = table.take(np.arange(min(table.rows, 2000)))
    if layout == "tensor":
        feeds = {"input": sample.matrix().astype(np.float32)}
    else:
        feeds = {n: (np.array(["" if v is None else str(v) for v in sample.columns[n].tolist()],
                              dtype=object) if sample.kinds[n] == "categorical"
                     else sample.columns[n].astype(np.float32)).reshape(-1, 1)
                 for n in sample.names}
    X = sample.frame() if layout == "columns" or hasattr(est, "feature_names_in_") \
        else sample.matrix()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cost = float32_cost(model, est, feeds, X)
    if cost is not None:
        delta, crossed, rows = cost
        note += (f": the trees' input differs from scikit-learn's by up to {delta:.3g}, "
                 f"{crossed} of {rows} training rows on the other side of a split threshold")
    return note + "; judged by the fidelity gate"


def _unsupported_part(text: str) -> str:
    # skl2onnx: "Unable to find a shape calculator for type '<class 'x.y.Z'>'."
    if "<class '" in text:
        return text.split("<class '", 1)[1].split("'", 1)[0].rsplit(".", 1)[-1]
    return ""


_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(string)": "string"}


def adopt_onnx(model: bytes, table: Table, path: str) -> Converted:
    """Describe an existing ONNX model from its graph and the data's columns.

    Raises:
        ConversionError: the graph does not load, or its inputs/outputs cannot be bound.
    """
    from packager.quantize import repair_opsets

    try:
        proto = onnx.load_from_string(model)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ConversionError(f"{path}: not a valid ONNX model ({exc})") from exc
    model = repair_opsets(proto).SerializeToString()
    try:
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ConversionError(f"{path}: onnxruntime cannot load it ({exc})") from exc
    inputs = session.get_inputs()
    names = table.names
    if len(inputs) == 1 and len(inputs[0].shape) == 2 and inputs[0].shape[1] in (len(names), None) \
            and inputs[0].name not in names:
        dtype = _ORT_TYPES.get(inputs[0].type)
        if dtype not in ("float32", "float64"):
            raise ConversionError(f"{path}: input {inputs[0].name!r} has type {inputs[0].type}; "
                                  "a single-tensor model must take float or double")
        binding = Binding("tensor", inputs[0].name, dtype)
    else:
        unknown = [i.name for i in inputs if i.name not in names]
        if unknown:
            raise ConversionError(f"{path}: graph input {unknown[0]!r} is not a column of "
                                  f"{table.path.name}")
        binding = Binding("columns", "input", "float32")
        table.names[:] = [i.name for i in inputs]
    outs = session.get_outputs()
    if any(o.type.startswith("seq") or o.type.startswith("map") for o in outs):
        raise ConversionError(f"{path}: outputs a ZipMap (list of dicts); re-export with "
                              "zipmap disabled (skl2onnx options={id(model): {'zipmap': False}})")
    label = next((o for o in outs if o.type in ("tensor(int64)", "tensor(string)")), None)
    if label is not None:
        specs = [OutputSpec(label.name, "label", _ORT_TYPES[label.type])]
        proba = next((o for o in outs if o is not label and o.type == "tensor(float)"), None)
        if proba is not None:
            specs.append(OutputSpec(proba.name, "probabilities", "float32"))
        classes: tuple[Any, ...] = ()
        if table.target is not None:
            uniq = np.unique(table.target)
            classes = tuple(int(c) for c in uniq) if uniq.dtype.kind in "iuf" \
                else tuple(str(c) for c in uniq)
        return Converted(model, binding, tuple(specs), "classification", classes,
                         f"ONNX({path})")
    value = next((o for o in outs if o.type in ("tensor(float)", "tensor(double)")), None)
    if value is None:
        raise ConversionError(f"{path}: no label, probability or value output found")
    return Converted(model, binding, (OutputSpec(value.name, "value", "float32"),),
                     "regression", (), f"ONNX({path})")
