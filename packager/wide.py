"""Float64 ONNX converters for the preprocessing steps in front of a tree ensemble.

A tree compares each feature with a split threshold, so the trees' input must be the
very number scikit-learn computed, to the last bit: a value on the other side of a
threshold sends the row down another branch in every tree at once. scikit-learn's
preprocessing runs in float64; skl2onnx's converters for some steps do not:

* ``SimpleImputer`` becomes ``ai.onnx.ml.Imputer``, which onnxruntime implements for
  float32 only, so a pipeline with an imputer could not be converted in float64 at all
  and was built in float32 (a mixed HistGradientBoosting pipeline was off by 0.25 in
  probability);
* ``OneHotEncoder`` and ``OrdinalEncoder`` emit float32 (exact small integers, but a
  float32 tensor cannot be concatenated with the float64 numeric columns).

The converters here replace those for one conversion (skl2onnx's
``custom_conversion_functions``, never its global registry) and use only standard
ONNX operators that onnxruntime runs in float64: ``IsNaN``/``Equal`` + ``Where`` for
the imputer, ``LabelEncoder`` codes (strings) or ``Equal`` (numbers) for the
encoders. Every value they produce is bit-identical to scikit-learn's ``transform``:
an imputed cell is the float64 statistic itself, an encoded cell is 0, 1 or a small
integer code. skl2onnx's own float64 converters are already exact for
``StandardScaler``/``RobustScaler`` (``Sub``, ``Div``, as scikit-learn does),
``MinMaxScaler`` (``Mul``, ``Add``) and an identity ``FunctionTransformer``.

A configuration these converters do not reproduce exactly (infrequent categories,
missing values among the categories, an imputer keeping empty features) raises
:class:`NotExact` naming the step; the caller then keeps skl2onnx's float32 graph and
says which step and by how much. This module does not convert models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

__all__ = ["NotExact", "float32_cost", "float64_converters", "string_converters"]


class NotExact(NotImplementedError):
    """A preprocessing step this module cannot convert exactly in float64.

    A ``NotImplementedError`` so that skl2onnx's callers treat it like its own
    "not supported as configured" refusals.
    """

    def __init__(self, step: str, why: str) -> None:
        super().__init__(f"{step}: {why}")
        self.step = step


def _types():
    from skl2onnx.common.data_types import DoubleTensorType, StringTensorType

    return DoubleTensorType, StringTensorType


def _n_rows(operator: Any) -> Any:
    return operator.inputs[0].get_first_dimension()


def _width(operator: Any) -> int | None:
    total = 0
    for v in operator.inputs:
        if v.type.shape[1] is None:
            return None
        total += v.type.shape[1]
    return total


def _concat(scope: Any, container: Any, operator: Any) -> str:
    """All inputs side by side (one tensor, [N, C]); they share a type here."""
    names = [v.full_name for v in operator.inputs]
    if len(names) == 1:
        return names[0]
    out = scope.get_unique_variable_name("wide_concat")
    container.add_node("Concat", names, out, axis=1,
                       name=scope.get_unique_operator_name("Concat"))
    return out


def _const(scope: Any, container: Any, hint: str, values: np.ndarray) -> str:
    name = scope.get_unique_variable_name(hint)
    kind = {np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int64): TensorProto.INT64}
    container.add_initializer(name, kind[values.dtype], list(values.shape),
                              values.ravel().tolist())
    return name


def _column(scope: Any, container: Any, x: str, j: int) -> str:
    """Column ``j`` of ``x`` as [N, 1]."""
    idx = _const(scope, container, "col", np.array([j], dtype=np.int64))
    out = scope.get_unique_variable_name(f"col{j}")
    container.add_node("Gather", [x, idx], out, axis=1,
                       name=scope.get_unique_operator_name("Gather"))
    return out


def _is_string(operator: Any) -> bool:
    _, string = _types()
    return isinstance(operator.inputs[0].type, string)


def _name(op: Any) -> str:
    return type(op).__name__


# --------------------------------------------------------------------------- imputer


def _imputer_shape(operator: Any) -> None:
    double, string = _types()
    op = operator.raw_operator
    if _is_string(operator):
        operator.outputs[0].type = string([_n_rows(operator), _width(operator)])
        return
    stats = np.asarray(op.statistics_, dtype=np.float64)
    width = int(np.sum(~np.isnan(stats)))
    if op.add_indicator and getattr(op, "indicator_", None) is not None:
        width += len(op.indicator_.features_)
    operator.outputs[0].type = double([_n_rows(operator), width])



def _join(scope: Any, container: Any, operator: Any, parts: list[str]) -> None:
    """The operator's output: its one column as it is, or its columns side by side."""
    out = operator.outputs[0].full_name
    if len(parts) == 1:
        container.add_node("Identity", parts, out, name=scope.get_unique_operator_name("Id"))
    else:
        container.add_node("Concat", parts, out, axis=1,
                           name=scope.get_unique_operator_name("Concat"))

def _string_imputer(scope: Any, operator: Any, container: Any) -> None:
    """Strings: a missing cell reaches the graph as "" (the device's runtime feeds a
    missing categorical value so), and scikit-learn's missing value is NaN or None."""
    from skl2onnx.operator_converters.imputer_op import convert_sklearn_imputer

    op = operator.raw_operator
    mv = op.missing_values
    if isinstance(mv, str):  # an explicit string marker: skl2onnx's converter is exact
        convert_sklearn_imputer(scope, operator, container)
        return
    if not (mv is None or (isinstance(mv, float) and np.isnan(mv))):
        raise NotExact(_name(op), f"missing_values={mv!r} on a string column")
    stats = [str(v) for v in np.asarray(op.statistics_, dtype=object).tolist()]
    if op.add_indicator or any(v in ("nan", "None") for v in stats):
        raise NotExact(_name(op), "add_indicator, or a column never seen filled, on strings")
    x = _concat(scope, container, operator)
    parts = []
    for j, fill in enumerate(stats):
        col = _column(scope, container, x, j)
        flag, mask = (scope.get_unique_variable_name(h) for h in ("is_empty", "missing"))
        container.add_node("LabelEncoder", [col], flag, op_domain="ai.onnx.ml", op_version=2,
                           keys_strings=[""], values_int64s=[1], default_int64=0,
                           name=scope.get_unique_operator_name("LabelEncoder"))
        container.add_node("Cast", [flag], mask, to=TensorProto.BOOL,
                           name=scope.get_unique_operator_name("Cast"))
        value = scope.get_unique_variable_name("fill")
        container.add_initializer(value, TensorProto.STRING, [1, 1], [fill.encode()])
        filled = scope.get_unique_variable_name("imputed")
        container.add_node("Where", [mask, value, col], filled,
                           name=scope.get_unique_operator_name("Where"))
        parts.append(filled)
    _join(scope, container, operator, parts)


def _imputer(scope: Any, operator: Any, container: Any) -> None:
    op = operator.raw_operator
    if _is_string(operator):
        _string_imputer(scope, operator, container)
        return
    stats = np.asarray(op.statistics_, dtype=np.float64)
    valid = ~np.isnan(stats)
    if not valid.all() and getattr(op, "keep_empty_features", False):
        raise NotExact(_name(op), "keep_empty_features=True with an all-missing column")
    mv = op.missing_values
    x = _concat(scope, container, operator)
    mask = scope.get_unique_variable_name("missing")
    if isinstance(mv, float) and np.isnan(mv):
        container.add_node("IsNaN", [x], mask, name=scope.get_unique_operator_name("IsNaN"))
    elif isinstance(mv, (int, float, np.integer, np.floating)):
        value = _const(scope, container, "missing_value", np.array([float(mv)]))
        container.add_node("Equal", [x, value], mask,
                           name=scope.get_unique_operator_name("Equal"))
    else:
        raise NotExact(_name(op), f"missing_values={mv!r} on a numeric column")
    fill = _const(scope, container, "statistics", np.where(valid, stats, 0.0)[None, :])
    filled = scope.get_unique_variable_name("imputed")
    container.add_node("Where", [mask, fill, x], filled,
                       name=scope.get_unique_operator_name("Where"))
    parts = [filled]
    if not valid.all():  # scikit-learn drops the columns it saw no value in
        keep = _const(scope, container, "kept", np.flatnonzero(valid).astype(np.int64))
        kept = scope.get_unique_variable_name("imputed_kept")
        container.add_node("Gather", [filled, keep], kept, axis=1,
                           name=scope.get_unique_operator_name("Gather"))
        parts = [kept]
    if op.add_indicator and getattr(op, "indicator_", None) is not None:
        which = _const(scope, container, "indicated",
                       np.asarray(op.indicator_.features_, dtype=np.int64))
        sub = scope.get_unique_variable_name("indicator_mask")
        container.add_node("Gather", [mask, which], sub, axis=1,
                           name=scope.get_unique_operator_name("Gather"))
        ind = scope.get_unique_variable_name("indicator")
        container.add_node("Cast", [sub], ind, to=TensorProto.DOUBLE,
                           name=scope.get_unique_operator_name("Cast"))
        parts.append(ind)
    _join(scope, container, operator, parts)


# --------------------------------------------------------------------------- encoders


def _categories(op: Any, j: int) -> np.ndarray:
    cats = np.asarray(op.categories_[j])
    if getattr(op, "_infrequent_enabled", False):
        raise NotExact(_name(op), "infrequent categories (min_frequency / max_categories)")
    if cats.dtype.kind == "O":
        if any(c is None or (isinstance(c, float) and c != c) for c in cats.tolist()):
            raise NotExact(_name(op), f"a missing value among the categories of column {j}")
        return np.array([str(c) for c in cats.tolist()], dtype=object)
    if cats.dtype.kind not in "iuf" or np.any(np.isnan(cats.astype(np.float64))):
        raise NotExact(_name(op), f"categories of column {j} are not plain numbers or strings")
    return cats.astype(np.float64)


def _codes(scope: Any, container: Any, col: str, cats: np.ndarray, string: bool) -> str:
    """[N, K] bool: column == category k."""
    eq = scope.get_unique_variable_name("is_category")
    if string:
        # onnxruntime's Equal has no string kernel before opset 19: map each string
        # to its index (unknown: -1), then compare indices
        code = scope.get_unique_variable_name("category_code")
        container.add_node("LabelEncoder", [col], code, op_domain="ai.onnx.ml", op_version=2,
                           keys_strings=[str(c) for c in cats],
                           values_int64s=list(range(len(cats))), default_int64=-1,
                           name=scope.get_unique_operator_name("LabelEncoder"))
        ks = _const(scope, container, "category_index",
                    np.arange(len(cats), dtype=np.int64)[None, :])
        container.add_node("Equal", [code, ks], eq, name=scope.get_unique_operator_name("Equal"))
    else:
        ks = _const(scope, container, "category_value", cats.astype(np.float64)[None, :])
        container.add_node("Equal", [col, ks], eq, name=scope.get_unique_operator_name("Equal"))
    return eq


def _onehot_width(op: Any) -> int:
    drop = getattr(op, "drop_idx_", None)
    return sum(len(c) - (1 if drop is not None and drop[j] is not None else 0)
               for j, c in enumerate(op.categories_))


def _onehot_shape(operator: Any) -> None:
    double, _ = _types()
    operator.outputs[0].type = double([_n_rows(operator), _onehot_width(operator.raw_operator)])


def _onehot(scope: Any, operator: Any, container: Any) -> None:
    op = operator.raw_operator
    string = _is_string(operator)
    x = _concat(scope, container, operator)
    drop = getattr(op, "drop_idx_", None)
    parts = []
    for j in range(len(op.categories_)):
        cats = _categories(op, j)
        eq = _codes(scope, container, _column(scope, container, x, j), cats, string)
        if drop is not None and drop[j] is not None:
            keep = np.delete(np.arange(len(cats)), int(drop[j])).astype(np.int64)
            if keep.size == 0:
                continue
            kept = scope.get_unique_variable_name("kept_categories")
            container.add_node("Gather", [eq, _const(scope, container, "keep", keep)], kept,
                               axis=1, name=scope.get_unique_operator_name("Gather"))
            eq = kept
        parts.append(eq)
    out = operator.outputs[0].full_name
    both = scope.get_unique_variable_name("onehot_bool")
    if len(parts) == 1:
        both = parts[0]
    else:
        container.add_node("Concat", parts, both, axis=1,
                           name=scope.get_unique_operator_name("Concat"))
    # an unknown category matches nothing: all zeros, as handle_unknown='ignore' gives
    container.add_node("Cast", [both], out, to=TensorProto.DOUBLE,
                       name=scope.get_unique_operator_name("Cast"))


def _ordinal_shape(operator: Any) -> None:
    double, _ = _types()
    operator.outputs[0].type = double([_n_rows(operator), len(operator.raw_operator.categories_)])


def _ordinal(scope: Any, operator: Any, container: Any) -> None:
    op = operator.raw_operator
    string = _is_string(operator)
    x = _concat(scope, container, operator)
    unknown = op.unknown_value if op.handle_unknown == "use_encoded_value" else np.nan
    parts = []
    for j in range(len(op.categories_)):
        cats = _categories(op, j)
        eq = _codes(scope, container, _column(scope, container, x, j), cats, string)
        hit = scope.get_unique_variable_name("hit")
        container.add_node("Cast", [eq], hit, to=TensorProto.DOUBLE,
                           name=scope.get_unique_operator_name("Cast"))
        # code = sum_k k * [x == category k]: one term is k, the others 0 (exact)
        weighted = scope.get_unique_variable_name("weighted")
        container.add_node("Mul", [hit, _const(scope, container, "k",
                                               np.arange(len(cats), dtype=np.float64)[None, :])],
                           weighted, name=scope.get_unique_operator_name("Mul"))
        axes = _const(scope, container, "axis1", np.array([1], dtype=np.int64))
        code, found = (scope.get_unique_variable_name(h) for h in ("code", "found"))
        container.add_node("ReduceSum", [weighted, axes], code, keepdims=1,
                           name=scope.get_unique_operator_name("ReduceSum"))
        anyhit = scope.get_unique_variable_name("anyhit")
        container.add_node("ReduceMax", [hit], anyhit, axes=[1], keepdims=1,
                           name=scope.get_unique_operator_name("ReduceMax"))
        container.add_node("Cast", [anyhit], found, to=TensorProto.BOOL,
                           name=scope.get_unique_operator_name("Cast"))
        coded = scope.get_unique_variable_name("ordinal")
        container.add_node("Where", [found, code, _const(scope, container, "unknown",
                                                         np.array([float(unknown)]))],
                           coded, name=scope.get_unique_operator_name("Where"))
        parts.append(coded)
    _join(scope, container, operator, parts)


def _imputer_float32(scope: Any, operator: Any, container: Any) -> None:
    """The float32 conversion: skl2onnx's imputer for numbers, ours for strings."""
    from skl2onnx.operator_converters.imputer_op import convert_sklearn_imputer

    if _is_string(operator):
        _string_imputer(scope, operator, container)
    else:
        convert_sklearn_imputer(scope, operator, container)


def string_converters() -> tuple[dict[type, Any], dict[type, Any]]:
    """For a float32 conversion: only the string imputer (missing as "")."""
    from skl2onnx.shape_calculators.imputer import calculate_sklearn_imputer_output_shapes
    from sklearn.impute import SimpleImputer

    return ({SimpleImputer: _imputer_float32},
            {SimpleImputer: calculate_sklearn_imputer_output_shapes})


def float64_converters() -> tuple[dict[type, Any], dict[type, Any]]:
    """(converters, shape calculators) for skl2onnx's ``convert_sklearn``, by class."""
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

    converters = {SimpleImputer: _imputer, OneHotEncoder: _onehot, OrdinalEncoder: _ordinal}
    shapes = {SimpleImputer: _imputer_shape, OneHotEncoder: _onehot_shape,
              OrdinalEncoder: _ordinal_shape}
    return converters, shapes


# --------------------------------------------------------------------------- the cost


def float32_cost(model: bytes, est: Any, feeds: dict[str, np.ndarray], X: Any
                 ) -> tuple[float, int, int] | None:
    """How far a float32 preprocessing graph is from scikit-learn's float64, before the trees.

    Runs ``model`` on ``feeds`` with the first tree ensemble's input exposed, and
    compares it with ``est[:-1].transform(X)`` (``est`` a Pipeline ending in a tree
    ensemble): the largest absolute difference, and how many rows have a feature on the
    other side of one of the trees' split thresholds (those rows can take another branch).

    Returns:
        (max |Δx|, rows across a threshold, rows), or None when it cannot be measured.
    """
    import onnx
    import onnxruntime as ort

    from packager.precision import elem_types
    from packager.trees import ensemble_of

    try:
        proto = onnx.load_from_string(model)
        node = next(n for n in proto.graph.node
                    if n.op_type in ("TreeEnsembleClassifier", "TreeEnsembleRegressor"))
        name = node.input[0]
        kind = elem_types(proto).get(name, onnx.TensorProto.FLOAT)
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, kind, None))
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        got = np.asarray(session.run([name], feeds)[0], dtype=np.float64)
        want = est[:-1].transform(X)
        want = np.asarray(want.toarray() if hasattr(want, "toarray") else want, dtype=np.float64)
    except Exception:  # a graph or step this measurement does not understand
        return None
    if got.shape != want.shape:
        return None
    both = np.isfinite(got) & np.isfinite(want)
    delta = float(np.max(np.abs(got - want)[both], initial=0.0))
    crossed = np.zeros(len(got), dtype=bool)
    ens = ensemble_of(est[-1])
    if ens is not None:
        for j in range(got.shape[1]):
            ts = np.unique(np.concatenate([t.threshold[t.is_branch & (t.feature == j)]
                                           for t in ens.trees.values()]))
            if ts.size:
                crossed |= np.searchsorted(ts, got[:, j]) != np.searchsorted(ts, want[:, j])
    return delta, int(crossed.sum()), len(got)
