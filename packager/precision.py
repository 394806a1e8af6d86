"""Exact split thresholds for scikit-learn tree ensembles converted by skl2onnx.

skl2onnx writes every split threshold into the ``nodes_values`` attribute of
``ai.onnx.ml.TreeEnsembleRegressor`` / ``TreeEnsembleClassifier``, a *float32*
list.  scikit-learn keeps its thresholds in float64, so a row whose feature value
and threshold round to the same float32 may take the other branch in ONNX.  For
HistGradientBoosting every tree shares the same bin thresholds, so all trees flip
together and a probability can move by almost 1.

:func:`exact_tree_thresholds` rewrites each such node so that it compares exactly
as scikit-learn does:

* the float32 ``nodes_values`` are replaced by the estimator's own float64
  thresholds in ``nodes_values_as_tensor`` (and the leaf weights / base values by
  their float64 values in ``*_as_tensor``), which onnxruntime honours when the
  node's input is ``tensor(double)``: its CPU kernels instantiate
  ``TreeEnsembleCommon<double, double, float>`` for double input (threshold and
  score accumulation in double, output float);
* the node's input is made double, with the comparison each family needs:

  - HistGradientBoosting* compares float64 ``x <= t`` (``X_DTYPE`` is float64),
    and so does LightGBM on float64 input (its thresholds are doubles).
    The tree is fed the double tensor itself (a float32 ``Cast`` just before the
    tree is bypassed; a float graph input consumed only by trees is widened to
    double);
  - RandomForest*, ExtraTrees*, GradientBoosting* and DecisionTree* convert X to
    float32 (``DTYPE``) and compare ``float32(x) <= t`` with float64 ``t``.  The
    tree is fed ``Cast(Cast(x, FLOAT), DOUBLE)``, which reproduces that exactly.

* onnxruntime's TreeEnsembleRegressor/Classifier v3 always output float; where the
  converted graph expected double outputs (a DoubleTensorType conversion) a Cast
  to double is added after the node.

Before replacing anything the mapping between ONNX nodes and estimator nodes is
proved: tree ids, node ids, feature ids, branch/leaf kind and children must match
and ``float32`` of the recovered thresholds must equal the ``nodes_values`` that
skl2onnx wrote (its nearest or its floor-adjusted float32).  Any mismatch, an
unsupported estimator or graph gives ``None``, and the caller keeps the float32
graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["exact_tree_thresholds", "tree_ensembles"]

_ML = "ai.onnx.ml"
_TREE_OPS = ("TreeEnsembleRegressor", "TreeEnsembleClassifier")

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


# --------------------------------------------------------------------------- views


@dataclass
class _Tree:
    """One fitted tree as skl2onnx walks it: node i of the ONNX tree is node i here."""

    feature: np.ndarray  # int64
    threshold: np.ndarray  # float64
    left: np.ndarray  # int64
    right: np.ndarray  # int64
    is_branch: np.ndarray  # bool
    leaf_weights: list  # per node: float64 array of weights by (class_id - bias)
    bias: int  # class/target id offset of this tree


@dataclass
class _Ensemble:
    estimator: object
    compare: str
    trees: dict = field(default_factory=dict)  # ONNX tree id -> _Tree
    base_values: np.ndarray | None = None  # float64, or None when skl2onnx writes none


def _sk_tree(tree, weight, counts, is_classifier, bias) -> _Tree:
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
    return _Tree(
        feature=np.asarray(tree.feature, dtype=np.int64),
        threshold=np.asarray(tree.threshold, dtype=np.float64),
        left=left,
        right=right,
        is_branch=is_branch,
        leaf_weights=leaf_weights,
        bias=bias,
    )


def _hgb_tree(predictor, bias) -> _Tree | None:
    """Mirror of add_tree_to_attribute_pairs_hist_gradient_boosting."""
    nodes = predictor.nodes
    if "is_categorical" in nodes.dtype.names and np.any(nodes["is_categorical"]):
        return None  # bitset splits: skl2onnx has no exact encoding for them
    is_branch = ~nodes["is_leaf"].astype(bool)
    return _Tree(
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
        trees[i] = _Tree(
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


def _ensemble(est) -> _Ensemble | None:
    """Trees of a supported fitted estimator, keyed by the tree id skl2onnx gives them."""
    name = type(est).__name__
    is_clf = hasattr(est, "classes_")
    if name in _LGBM:
        trees = _lgbm_trees(est)
        if not trees:
            return None
        return _Ensemble(est, FLOAT64, trees)
    if name in _HGB:
        preds = getattr(est, "_predictors", None)
        if not preds:
            return None
        k = len(preds[0])
        ens = _Ensemble(est, FLOAT64)
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
        ens = _Ensemble(est, FLOAT32_X)
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
        ens = _Ensemble(est, FLOAT32_X)
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


def _find(estimator) -> list:
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
    return [e for e, _ in _find(estimator)]


# --------------------------------------------------------------------------- proof


def _attrs(node) -> dict:
    return {a.name: a for a in node.attribute}


def _floor32(t: np.ndarray) -> np.ndarray:
    t32 = t.astype(np.float32)
    up = t32.astype(np.float64) > t
    t32[up] = np.nextafter(t32[up], np.float32(-np.inf))
    return t32


def _sklearn_threshold_f32(t: float) -> np.float32:
    """float32 of skl2onnx's threshold for a DoubleTensorType conversion (adjusted)."""
    from skl2onnx.common.tree_ensemble import sklearn_threshold

    return np.float32(sklearn_threshold(np.float64(t), np.float64, "BRANCH_LEQ"))


def _prove(node, ens: _Ensemble):
    """Return (thresholds64, weights64 or None, base64 or None) when node is ens, else None."""
    a = _attrs(node)
    get_ints = lambda k: np.asarray(a[k].ints, dtype=np.int64) if k in a else None  # noqa: E731
    if "nodes_values" not in a or any(
        k.endswith("_as_tensor") for k in a
    ):  # already rewritten, or not a skl2onnx layout
        return None
    treeids, nodeids = get_ints("nodes_treeids"), get_ints("nodes_nodeids")
    featids = get_ints("nodes_featureids")
    trues, falses = get_ints("nodes_truenodeids"), get_ints("nodes_falsenodeids")
    modes = [m.decode() for m in a["nodes_modes"].strings]
    values = np.asarray(a["nodes_values"].floats, dtype=np.float32)
    if any(x is None for x in (treeids, nodeids, featids, trues, falses)):
        return None
    n = len(values)
    if not (len(treeids) == len(nodeids) == len(featids) == len(modes) == n):
        return None
    if set(int(t) for t in np.unique(treeids)) != set(ens.trees):
        return None
    if any(m not in ("BRANCH_LEQ", "LEAF") for m in modes):
        return None
    thr = np.zeros(n, dtype=np.float64)
    for tid in np.unique(treeids):
        tree = ens.trees[int(tid)]
        sel = np.flatnonzero(treeids == tid)
        nid = nodeids[sel]
        if len(nid) != len(tree.feature) or np.any(np.sort(nid) != np.arange(len(tree.feature))):
            return None
        br = tree.is_branch[nid]
        if np.any(br != np.array([modes[i] == "BRANCH_LEQ" for i in sel])):
            return None
        b = sel[br]
        nb = nid[br]
        if np.any(featids[b] != tree.feature[nb]):
            return None
        if np.any(trues[b] != tree.left[nb]) or np.any(falses[b] != tree.right[nb]):
            return None
        thr[b] = tree.threshold[nb]
        thr[sel[~br]] = values[sel[~br]]  # leaves keep whatever skl2onnx wrote (0.0)
    # the thresholds are the estimator's, to float32 rounding (nearest or floor)
    t = thr.astype(np.float64)
    ok = (t.astype(np.float32) == values) | (_floor32(t) == values)
    for i in np.flatnonzero(~ok):
        if modes[i] == "BRANCH_LEQ" and _sklearn_threshold_f32(t[i]) == values[i]:
            ok[i] = True
    if not ok.all():
        return None

    weights = None
    wkey = "class_weights" if node.op_type == "TreeEnsembleClassifier" else "target_weights"
    pre = "class" if node.op_type == "TreeEnsembleClassifier" else "target"
    if wkey in a:
        w32 = np.asarray(a[wkey].floats, dtype=np.float32)
        wt, wn, wi = get_ints(f"{pre}_treeids"), get_ints(f"{pre}_nodeids"), get_ints(f"{pre}_ids")
        ids = (wt, wn, wi)
        if all(v is not None and len(v) == len(w32) for v in ids):
            w64 = np.empty(len(w32), dtype=np.float64)
            good = True
            for j, (tt, nn, ii) in enumerate(zip(wt, wn, wi, strict=True)):
                tree = ens.trees.get(int(tt))
                lw = (
                    tree.leaf_weights[int(nn)]
                    if tree is not None and nn < len(tree.leaf_weights)
                    else None
                )
                k = int(ii) - (tree.bias if tree is not None else 0)
                if lw is None or not 0 <= k < len(lw):
                    good = False
                    break
                w64[j] = lw[k]
            if good and np.array_equal(w64.astype(np.float32), w32):
                weights = w64
    base = None
    if "base_values" in a and ens.base_values is not None:
        b32 = np.asarray(a["base_values"].floats, dtype=np.float32)
        if len(b32) == len(ens.base_values) and np.array_equal(
            ens.base_values.astype(np.float32), b32
        ):
            base = ens.base_values
    return thr, weights, base


# --------------------------------------------------------------------------- graph


def _elem_types(model) -> dict:
    types = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:  # a Cast's output type is certain, whatever inference says
        if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
            for at in node.attribute:
                if at.name == "to":
                    types[node.output[0]] = at.i
    for vi in model.graph.input:  # declared inputs win
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _ml_opset_ok(model) -> bool:
    """True when ai.onnx.ml opset >= 3 is imported, or can be raised to 3 safely."""
    imp = {o.domain: o for o in model.opset_import}
    ml = imp.get(_ML)
    if ml is None:
        return False
    if ml.version >= 3:
        return True
    for node in model.graph.node:
        if node.domain != _ML or node.op_type in _TREE_OPS:
            continue
        try:
            old = onnx.defs.get_schema(node.op_type, ml.version, _ML).since_version
            new = onnx.defs.get_schema(node.op_type, 3, _ML).since_version
        except Exception:
            return False
        if old != new:
            return False  # raising the opset would change this op's meaning
    ml.version = 3
    return True


class _Names:
    def __init__(self, model):
        self.used = {n for node in model.graph.node for n in list(node.input) + list(node.output)}
        self.used |= {v.name for v in list(model.graph.input) + list(model.graph.output)}
        self.used |= {i.name for i in model.graph.initializer}
        self.used |= {node.name for node in model.graph.node}

    def __call__(self, base):
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _cast(names, src, to, hint):
    out = names(f"{hint}_{'f64' if to == TensorProto.DOUBLE else 'f32'}")
    return helper.make_node("Cast", [src], [out], to=to, name=names(f"Cast_{out}")), out


_PASS_THROUGH = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose"}


def _expected_type(name, declared, consumers, depth=0):
    """The element type the graph expects for a tree output (skl2onnx declares it).

    Followed through type-preserving ops to a declared tensor; FLOAT when nothing says
    otherwise, which is what onnxruntime's kernels produce anyway.
    """
    if name in declared:
        return declared[name]
    if depth < 8:
        for c in consumers.get(name, []):
            if c.op_type in _PASS_THROUGH and c.domain in ("", "ai.onnx") and c.input[0] == name:
                t = _expected_type(c.output[0], declared, consumers, depth + 1)
                if t:
                    return t
    return TensorProto.FLOAT


def exact_tree_thresholds(model: onnx.ModelProto, estimator) -> onnx.ModelProto | None:
    """Rewrite the tree ensembles of ``model`` to split exactly as ``estimator`` does.

    ``model`` is skl2onnx's conversion of ``estimator`` (a tree ensemble, or a Pipeline
    ending in one).  Returns a new model (``model`` is not changed) whose tree nodes
    hold the float64 thresholds, leaf weights and base values in ``*_as_tensor``
    attributes and take double input, or ``None`` when the graph or the estimator is
    not one this rewrite can prove (the caller then keeps the float32 graph).

    A float graph input that only feeds HistGradientBoosting trees becomes a double
    input, so that sklearn's float64 comparison can be reproduced; feed it float64.
    """
    found = _find(estimator)
    ensembles = []
    for est, cast32 in found:
        ens = _ensemble(est)
        if ens is None:
            return None
        if cast32:  # the estimator itself feeds the trees float32 values
            ens.compare = FLOAT32_X
        ensembles.append(ens)
    if not ensembles:
        return None
    model = copy.deepcopy(model)
    g = model.graph
    tree_nodes = [n for n in g.node if n.domain == _ML and n.op_type in _TREE_OPS]
    if len(tree_nodes) != len(ensembles):
        return None
    if not _ml_opset_ok(model):
        return None
    types = _elem_types(model)
    declared = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in list(g.output) + list(g.value_info)
        if vi.type.HasField("tensor_type")
    }
    names = _Names(model)

    # pair nodes and ensembles by proof, not by position
    plan = []
    free = list(ensembles)
    for node in tree_nodes:
        for ens in free:
            proof = _prove(node, ens)
            if proof is not None:
                plan.append((node, ens, proof))
                free.remove(ens)
                break
        else:
            return None

    producers = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_inputs = {v.name: v for v in g.input}
    new_before = {}  # id(tree node) -> nodes to insert before it
    new_after = {}  # id(tree node) -> nodes to insert after it
    tree_ids = {id(n) for n in tree_nodes}
    hgb_inputs = {node.input[0] for node, ens, _ in plan if ens.compare == FLOAT64}

    for node, ens, (thr, w64, b64) in plan:
        x = node.input[0]
        x_type = types.get(x)
        if x_type is None:
            return None
        before = []
        if ens.compare == FLOAT64:
            if x_type == TensorProto.DOUBLE:
                x64 = x
            else:
                p = producers.get(x)
                src = p.input[0] if p is not None and p.op_type == "Cast" else None
                if src is not None and types.get(src) == TensorProto.DOUBLE:
                    x64 = src  # skip the float32 cast-late step for this tree
                elif (
                    x in graph_inputs
                    and x_type == TensorProto.FLOAT
                    and all(id(c) in tree_ids and c.input[0] in hgb_inputs for c in consumers[x])
                ):
                    graph_inputs[x].type.tensor_type.elem_type = TensorProto.DOUBLE
                    x64 = x
                else:  # float32 data: compares float32(x) <= t64, still closer than before
                    c, x64 = _cast(names, x, TensorProto.DOUBLE, x)
                    before.append(c)
        else:  # FLOAT32_X: sklearn compares float32(x) with float64 t
            x32 = x
            if x_type != TensorProto.FLOAT:
                c, x32 = _cast(names, x, TensorProto.FLOAT, x)
                before.append(c)
            c, x64 = _cast(names, x32, TensorProto.DOUBLE, x32)
            before.append(c)
        node.input[0] = x64

        # attributes: float64 thresholds, weights, base values
        keep = []
        wkey = "class_weights" if node.op_type == "TreeEnsembleClassifier" else "target_weights"
        for at in node.attribute:
            if at.name == "nodes_values":
                continue
            if at.name == wkey and w64 is not None:
                continue
            if at.name == "base_values" and b64 is not None:
                continue
            keep.append(copy.deepcopy(at))
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(
            helper.make_attribute(
                "nodes_values_as_tensor", numpy_helper.from_array(thr, "nodes_values")
            )
        )
        if w64 is not None:
            node.attribute.append(
                helper.make_attribute(wkey + "_as_tensor", numpy_helper.from_array(w64, wkey))
            )
        if b64 is not None:
            node.attribute.append(
                helper.make_attribute(
                    "base_values_as_tensor", numpy_helper.from_array(b64, "base_values")
                )
            )

        # outputs: onnxruntime's v3 kernels emit float; restore double where expected
        after = []
        first = 1 if node.op_type == "TreeEnsembleClassifier" else 0
        for i in range(first, len(node.output)):
            out = node.output[i]
            if out and _expected_type(out, declared, consumers) == TensorProto.DOUBLE:
                tmp = names(f"{out}_f32")
                node.output[i] = tmp
                after.append(
                    helper.make_node(
                        "Cast", [tmp], [out], to=TensorProto.DOUBLE, name=names(f"Cast_{out}")
                    )
                )
        new_before[id(node)] = before
        new_after[id(node)] = after

    nodes = []
    for n in g.node:
        nodes.extend(new_before.get(id(n), []))
        nodes.append(n)
        nodes.extend(new_after.get(id(n), []))
    # a float32 cast that no longer feeds anything goes
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    nodes = [n for n in nodes if not (n.op_type == "Cast" and n.output[0] not in used)]
    del g.node[:]
    g.node.extend(nodes)
    # stale intermediate types (tree outputs are float now) would mislead runtimes
    tree_outs = {o for n in tree_nodes for o in n.output}
    keep_vi = [vi for vi in g.value_info if vi.name not in tree_outs]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError:
        return None
    if not _loads(model):
        return None
    return model


def _loads(model) -> bool:
    """The rewritten graph loads in onnxruntime (types and attributes accepted)."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - the packager always has it
        return True
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True
