"""Views of fitted tree ensembles: every split threshold as the original library compares it.

:func:`ensemble_of` reads a scikit-learn tree ensemble (forests, extra trees, gradient
boosting, single trees), a HistGradientBoosting model or a LightGBM model into an
:class:`Ensemble` of :class:`Tree` views: per tree the features, thresholds and leaves,
and how the library compares a value with a threshold (float64, or float32 of the value
against a float64 threshold). :func:`tree_ensembles` finds the ensembles inside a
pipeline. :mod:`packager.precision` proves a converted graph against these views.

Nothing here reads or writes ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FLOAT32_X", "FLOAT64", "Ensemble", "Tree", "ensemble_of", "find_ensembles",
           "tree_ensembles"]

# How scikit-learn compares a feature value with a split threshold.
FLOAT64 = "float64"  # x <= t in float64                     (HistGradientBoosting*)
FLOAT32_X = "float32x"  # float32(x) <= t, t float64             (DecisionTree-based)

_DT_ENSEMBLES = {
    "RandomForestClassifier",
    "RandomForestRegressor",
    "ExtraTreesClassifier",
    "ExtraTreesRegressor",
    "GradientBoostingClassifier",
    "GradientBoostingRegressor",
}
_SINGLE_TREES = {
    "DecisionTreeClassifier",
    "DecisionTreeRegressor",
    "ExtraTreeClassifier",
    "ExtraTreeRegressor",
}
_HGB = {"HistGradientBoostingClassifier", "HistGradientBoostingRegressor"}
# LightGBM predicts float64 input in float64 (``fval <= threshold``, both double);
# onnxmltools writes its thresholds as float32. XGBoost is not here: it compares
# float32 inputs with float32 thresholds, which its ONNX graph already does exactly.
_LGBM = {"LGBMClassifier", "LGBMRegressor"}




@dataclass
class Tree:
    """One fitted tree as skl2onnx walks it: node i of the ONNX tree is node i here."""

    feature: np.ndarray  # int64
    threshold: np.ndarray  # float64
    left: np.ndarray  # int64
    right: np.ndarray  # int64
    is_branch: np.ndarray  # bool
    leaf_weights: list  # per node: float64 array of weights by (class_id - bias)
    bias: int  # class/target id offset of this tree


@dataclass
class Ensemble:
    estimator: object
    compare: str
    trees: dict = field(default_factory=dict)  # ONNX tree id -> Tree
    base_values: np.ndarray | None = None  # float64, or None when skl2onnx writes none


def _sk_tree(tree, weight, counts, is_classifier, bias) -> Tree:
    """Mirror of skl2onnx.common.tree_ensemble.add_tree_to_attribute_pairs."""
    n = tree.node_count
    idx = np.arange(n)
    left = np.asarray(tree.children_left, dtype=np.int64)
    right = np.asarray(tree.children_right, dtype=np.int64)
    is_branch = (left > idx) | (right > idx)
    leaf_weights = []
    for i in range(n):
        w = np.asarray(tree.value[i], dtype=np.float64).ravel()
        factor = weight
        if counts:
            s = float(sum(w))
            factor /= s if s != 0.0 else 1.0
        w = np.array([v * factor for v in w], dtype=np.float64)
        if len(w) == 2 and is_classifier:
            w = w[1:]
        leaf_weights.append(w)
    return Tree(
        feature=np.asarray(tree.feature, dtype=np.int64),
        threshold=np.asarray(tree.threshold, dtype=np.float64),
        left=left,
        right=right,
        is_branch=is_branch,
        leaf_weights=leaf_weights,
        bias=bias,
    )


def _hgb_tree(predictor, bias) -> Tree | None:
    """Mirror of add_tree_to_attribute_pairs_hist_gradient_boosting."""
    nodes = predictor.nodes
    if "is_categorical" in nodes.dtype.names and np.any(nodes["is_categorical"]):
        return None  # bitset splits: skl2onnx has no exact encoding for them
    is_branch = ~nodes["is_leaf"].astype(bool)
    return Tree(
        feature=np.where(is_branch, nodes["feature_idx"], 0).astype(np.int64),
        threshold=np.asarray(nodes["num_threshold"], dtype=np.float64),
        left=nodes["left"].astype(np.int64),
        right=nodes["right"].astype(np.int64),
        is_branch=is_branch,
        leaf_weights=[np.array([float(v)]) for v in nodes["value"]],
        bias=bias,
    )


def _lgbm_trees(est) -> dict | None:
    """LightGBM's trees as onnxmltools numbers them, with the booster's float64 values.

    onnxmltools' own parser is run on the booster's dump (the very code that wrote the
    ONNX node), so node and tree ids are its ids; its thresholds are Python floats
    (the dump's 17 significant digits, so the booster's doubles) before they are
    written as float32. The proof in :func:`_prove` then checks them against the node.
    """
    try:
        from onnxmltools.convert.common.tree_ensemble import (
            get_default_tree_classifier_attribute_pairs,
        )
        from onnxmltools.convert.lightgbm.operator_converters.LightGbm import (
            _parse_tree_structure,
            dump_booster_model,
            modify_tree_for_rule_in_set,
        )
    except ImportError:
        return None
    try:
        dump, info = dump_booster_model(est.booster_)
        modify_tree_for_rule_in_set(dump, use_float=True, info=info)
    except Exception:  # a booster onnxmltools cannot read: leave the graph alone
        return None
    n_classes = int(dump.get("num_class", 1) or 1)
    trees = {}
    for i, tree in enumerate(dump["tree_info"]):
        attrs = get_default_tree_classifier_attribute_pairs()
        _parse_tree_structure(i, i % n_classes, 1.0, tree["tree_structure"], attrs)
        nid = np.asarray(attrs["nodes_nodeids"], dtype=np.int64)
        n = len(nid)
        if sorted(nid.tolist()) != list(range(n)):
            return None
        order = np.argsort(nid)
        modes = np.asarray(attrs["nodes_modes"], dtype=object)[order]
        if any(m not in ("BRANCH_LEQ", "LEAF") for m in modes):
            return None  # categorical (==) splits: not a threshold
        leaf_w = dict(zip(attrs["class_nodeids"], attrs["class_weights"], strict=True))
        trees[i] = Tree(
            feature=np.asarray(attrs["nodes_featureids"], dtype=np.int64)[order],
            threshold=np.asarray([float(v) for v in attrs["nodes_values"]],
                                 dtype=np.float64)[order],
            left=np.asarray(attrs["nodes_truenodeids"], dtype=np.int64)[order],
            right=np.asarray(attrs["nodes_falsenodeids"], dtype=np.int64)[order],
            is_branch=modes == "BRANCH_LEQ",
            leaf_weights=[np.array([float(leaf_w.get(k, 0.0))]) for k in range(n)],
            bias=i % n_classes,
        )
    return trees


def ensemble_of(est) -> Ensemble | None:
    """Trees of a supported fitted estimator, keyed by the tree id skl2onnx gives them."""
    name = type(est).__name__
    is_clf = hasattr(est, "classes_")
    if name in _LGBM:
        trees = _lgbm_trees(est)
        if not trees:
            return None
        return Ensemble(est, FLOAT64, trees)
    if name in _HGB:
        preds = getattr(est, "_predictors", None)
        if not preds:
            return None
        k = len(preds[0])
        ens = Ensemble(est, FLOAT64)
        for i, it in enumerate(preds):
            for c, p in enumerate(it):
                t = _hgb_tree(p, c if k > 1 else 0)
                if t is None:
                    return None
                ens.trees[i * k + c if k > 1 else i] = t
        ens.base_values = np.asarray(est._baseline_prediction, dtype=np.float64).ravel()
        return ens
    if name in _DT_ENSEMBLES:
        ests = getattr(est, "estimators_", None)
        if ests is None:
            return None
        ens = Ensemble(est, FLOAT32_X)
        if name.startswith("GradientBoosting"):
            if est.init not in (None, "zero"):
                return None
            ests = np.asarray(ests)
            k = ests.shape[1]
            for i in range(ests.shape[0]):
                for c in range(k):
                    ens.trees[i * k + c] = _sk_tree(
                        ests[i, c].tree_, est.learning_rate, False, is_clf, c
                    )
            if est.init == "zero":
                ens.base_values = np.zeros(k)
            elif is_clf:
                x0 = np.zeros((1, est.estimators_[0, 0].n_features_in_))
                ens.base_values = np.asarray(est._raw_predict_init(x0), dtype=np.float64).ravel()
            else:
                ens.base_values = np.asarray(est.init_.constant_, dtype=np.float64).ravel()
            return ens
        if getattr(est, "n_outputs_", 1) != 1:
            return None  # multi-output forests are not a single TreeEnsemble node
        w = 1.0 / len(ests)
        for i, e in enumerate(ests):
            ens.trees[i] = _sk_tree(e.tree_, w, is_clf, is_clf, 0)
        return ens
    if name in _SINGLE_TREES:
        if getattr(est, "n_outputs_", 1) != 1 or not hasattr(est, "tree_"):
            return None
        ens = Ensemble(est, FLOAT32_X)
        ens.trees[0] = _sk_tree(est.tree_, 1.0, is_clf, is_clf, 0)
        return ens
    return None


def _is_cast32(step) -> bool:
    if type(step).__name__ != "CastTransformer":
        return False
    try:
        return np.dtype(getattr(step, "dtype", None)) == np.float32
    except TypeError:
        return False


def find_ensembles(estimator) -> list:
    """(tree ensemble, fed float32 by a CastTransformer step) pairs inside ``estimator``."""
    found = []

    def walk(o, cast32=False):
        steps = getattr(o, "steps", None)
        if steps is not None and hasattr(o, "named_steps"):
            prev = cast32
            for _, s in steps:
                walk(s, prev)
                prev = _is_cast32(s) or (prev and s in (None, "passthrough"))
            return
        tr = getattr(o, "transformers_", None)
        if tr is not None:
            for _, s, _ in tr:
                walk(s)
            return
        if type(o).__name__ in _HGB | _LGBM | _DT_ENSEMBLES | _SINGLE_TREES:
            found.append((o, cast32))

    walk(estimator)
    return found


def tree_ensembles(estimator) -> list:
    """The supported tree ensembles inside ``estimator`` (Pipelines, ColumnTransformers walked)."""
    return [e for e, _ in find_ensembles(estimator)]


