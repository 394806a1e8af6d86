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
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from packager.trees import FLOAT32_X, FLOAT64, Ensemble, ensemble_of, find_ensembles

__all__ = ["elem_types", "exact_tree_thresholds"]

_ML = "ai.onnx.ml"
_TREE_OPS = ("TreeEnsembleRegressor", "TreeEnsembleClassifier")



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


def _prove(node, ens: Ensemble):
    """Return (thresholds64, weights64 or None, base64 or None) when node is ens, else None.

    The proof, check by check in order; a failed check ends it (None)."""
    a = _attrs(node)
    nodes = _node_arrays(a, ens)
    if nodes is None:
        return None
    thr = _thresholds(nodes, ens)
    if thr is None or not _same_in_float32(thr, nodes):
        return None
    return thr, _weights64(node, a, ens), _base64(a, ens)


class _Nodes(NamedTuple):
    """A tree ensemble node's per-node attributes, as arrays."""

    treeids: np.ndarray
    nodeids: np.ndarray
    featids: np.ndarray
    trues: np.ndarray
    falses: np.ndarray
    modes: list[str]
    values: np.ndarray  # float32, as skl2onnx wrote them


def _ints(a: dict, key: str) -> np.ndarray | None:
    return np.asarray(a[key].ints, dtype=np.int64) if key in a else None


def _node_arrays(a: dict, ens: Ensemble) -> _Nodes | None:
    """The node's arrays, when it is a skl2onnx layout of the ensemble's trees."""
    if "nodes_values" not in a or any(
        k.endswith("_as_tensor") for k in a
    ):  # already rewritten, or not a skl2onnx layout
        return None
    treeids, nodeids = _ints(a, "nodes_treeids"), _ints(a, "nodes_nodeids")
    featids = _ints(a, "nodes_featureids")
    trues, falses = _ints(a, "nodes_truenodeids"), _ints(a, "nodes_falsenodeids")
    modes = [m.decode() for m in a["nodes_modes"].strings]
    values = np.asarray(a["nodes_values"].floats, dtype=np.float32)
    if treeids is None or nodeids is None or featids is None or trues is None \
            or falses is None:
        return None
    n = len(values)
    if not (len(treeids) == len(nodeids) == len(featids) == len(modes) == n):
        return None
    if set(int(t) for t in np.unique(treeids)) != set(ens.trees):
        return None
    if any(m not in ("BRANCH_LEQ", "LEAF") for m in modes):
        return None
    return _Nodes(treeids, nodeids, featids, trues, falses, modes, values)


def _thresholds(nodes: _Nodes, ens: Ensemble) -> np.ndarray | None:
    """The estimator's float64 thresholds in the node's order, when every tree's shape
    (nodes, branches, features, children) is the estimator's."""
    thr = np.zeros(len(nodes.values), dtype=np.float64)
    for tid in np.unique(nodes.treeids):
        tree = ens.trees[int(tid)]
        sel = np.flatnonzero(nodes.treeids == tid)
        nid = nodes.nodeids[sel]
        if len(nid) != len(tree.feature) or np.any(np.sort(nid) != np.arange(len(tree.feature))):
            return None
        br = tree.is_branch[nid]
        if np.any(br != np.array([nodes.modes[i] == "BRANCH_LEQ" for i in sel])):
            return None
        b = sel[br]
        nb = nid[br]
        if np.any(nodes.featids[b] != tree.feature[nb]):
            return None
        if np.any(nodes.trues[b] != tree.left[nb]) or np.any(nodes.falses[b] != tree.right[nb]):
            return None
        thr[b] = tree.threshold[nb]
        thr[sel[~br]] = nodes.values[sel[~br]]  # leaves keep whatever skl2onnx wrote (0.0)
    return thr


def _same_in_float32(thr: np.ndarray, nodes: _Nodes) -> bool:
    """The thresholds are the estimator's, to float32 rounding (nearest or floor)."""
    t = thr.astype(np.float64)
    values = nodes.values
    ok = (t.astype(np.float32) == values) | (_floor32(t) == values)
    for i in np.flatnonzero(~ok):
        if nodes.modes[i] == "BRANCH_LEQ" and _sklearn_threshold_f32(t[i]) == values[i]:
            ok[i] = True
    return bool(ok.all())


def _weights64(node, a: dict, ens: Ensemble) -> np.ndarray | None:
    """The estimator's float64 leaf weights in the node's order, when they round to the
    node's float32 ones."""
    wkey = "class_weights" if node.op_type == "TreeEnsembleClassifier" else "target_weights"
    pre = "class" if node.op_type == "TreeEnsembleClassifier" else "target"
    if wkey not in a:
        return None
    w32 = np.asarray(a[wkey].floats, dtype=np.float32)
    wt, wn, wi = _ints(a, f"{pre}_treeids"), _ints(a, f"{pre}_nodeids"), _ints(a, f"{pre}_ids")
    if wt is None or wn is None or wi is None \
            or not all(len(v) == len(w32) for v in (wt, wn, wi)):
        return None
    w64 = np.empty(len(w32), dtype=np.float64)
    for j, (tt, nn, ii) in enumerate(zip(wt, wn, wi, strict=True)):
        tree = ens.trees.get(int(tt))
        lw = (
            tree.leaf_weights[int(nn)]
            if tree is not None and nn < len(tree.leaf_weights)
            else None
        )
        k = int(ii) - (tree.bias if tree is not None else 0)
        if lw is None or not 0 <= k < len(lw):
            return None
        w64[j] = lw[k]
    return w64 if np.array_equal(w64.astype(np.float32), w32) else None


def _base64(a: dict, ens: Ensemble) -> np.ndarray | None:
    """The estimator's float64 base values, when they round to the node's."""
    if "base_values" in a and ens.base_values is not None:
        b32 = np.asarray(a["base_values"].floats, dtype=np.float32)
        if len(b32) == len(ens.base_values) and np.array_equal(
            ens.base_values.astype(np.float32), b32
        ):
            return ens.base_values
    return None


# --------------------------------------------------------------------------- graph


def elem_types(model) -> dict:
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
    ensembles = _ensembles(estimator)
    if not ensembles:
        return None
    model = copy.deepcopy(model)
    g = model.graph
    tree_nodes = [n for n in g.node if n.domain == _ML and n.op_type in _TREE_OPS]
    if len(tree_nodes) != len(ensembles) or not _ml_opset_ok(model):
        return None
    plan = _pair(tree_nodes, ensembles)
    if plan is None:
        return None
    rw = _Rewrite(model, tree_nodes, plan)
    before: dict[int, list] = {}  # id(tree node) -> nodes to insert before it
    after: dict[int, list] = {}  # id(tree node) -> nodes to insert after it
    for node, ens, (thr, w64, b64) in plan:
        casts = rw.double_input(node, ens)
        if casts is None:
            return None
        before[id(node)] = casts
        _float64_attributes(node, thr, w64, b64)
        after[id(node)] = rw.double_outputs(node)
    _splice(g, tree_nodes, before, after)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError:
        return None
    return model if _loads(model) else None


def _ensembles(estimator) -> list[Ensemble] | None:
    """The views of every tree ensemble in ``estimator``; None if one is unsupported."""
    out = []
    for est, cast32 in find_ensembles(estimator):
        ens = ensemble_of(est)
        if ens is None:
            return None
        if cast32:  # the estimator itself feeds the trees float32 values
            ens.compare = FLOAT32_X
        out.append(ens)
    return out


def _pair(tree_nodes: list, ensembles: list[Ensemble]) -> list | None:
    """Each tree node with the ensemble its thresholds prove it is: paired by proof, not
    by position; None if a node matches no ensemble."""
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
    return plan


class _Rewrite:
    """What the rewrite of one graph needs to know about it: types, producers,
    consumers, the graph inputs, fresh names."""

    def __init__(self, model: onnx.ModelProto, tree_nodes: list, plan: list) -> None:
        g = model.graph
        self.types = elem_types(model)
        self.declared = {
            vi.name: vi.type.tensor_type.elem_type
            for vi in list(g.output) + list(g.value_info)
            if vi.type.HasField("tensor_type")
        }
        self.names = _Names(model)
        self.producers = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.graph_inputs = {v.name: v for v in g.input}
        self.tree_ids = {id(n) for n in tree_nodes}
        self.hgb_inputs = {node.input[0] for node, ens, _ in plan if ens.compare == FLOAT64}

    def double_input(self, node, ens: Ensemble) -> list | None:
        """Feed ``node`` double, compared as its library compares; the casts to insert
        before it (None if its input's type is unknown)."""
        x = node.input[0]
        x_type = self.types.get(x)
        if x_type is None:
            return None
        before = []
        if ens.compare == FLOAT64:
            if x_type == TensorProto.DOUBLE:
                x64 = x
            else:
                p = self.producers.get(x)
                src = p.input[0] if p is not None and p.op_type == "Cast" else None
                if src is not None and self.types.get(src) == TensorProto.DOUBLE:
                    x64 = src  # skip the float32 cast-late step for this tree
                elif (
                    x in self.graph_inputs
                    and x_type == TensorProto.FLOAT
                    and all(id(c) in self.tree_ids and c.input[0] in self.hgb_inputs
                            for c in self.consumers[x])
                ):
                    self.graph_inputs[x].type.tensor_type.elem_type = TensorProto.DOUBLE
                    x64 = x
                else:  # float32 data: compares float32(x) <= t64, still closer than before
                    c, x64 = _cast(self.names, x, TensorProto.DOUBLE, x)
                    before.append(c)
        else:  # FLOAT32_X: sklearn compares float32(x) with float64 t
            x32 = x
            if x_type != TensorProto.FLOAT:
                c, x32 = _cast(self.names, x, TensorProto.FLOAT, x)
                before.append(c)
            c, x64 = _cast(self.names, x32, TensorProto.DOUBLE, x32)
            before.append(c)
        node.input[0] = x64
        return before

    def double_outputs(self, node) -> list:
        """onnxruntime's v3 kernels emit float: casts back to double where the graph
        expects it, to insert after ``node``."""
        after = []
        first = 1 if node.op_type == "TreeEnsembleClassifier" else 0
        for i in range(first, len(node.output)):
            out = node.output[i]
            if out and _expected_type(out, self.declared, self.consumers) == TensorProto.DOUBLE:
                tmp = self.names(f"{out}_f32")
                node.output[i] = tmp
                after.append(
                    helper.make_node(
                        "Cast", [tmp], [out], to=TensorProto.DOUBLE,
                        name=self.names(f"Cast_{out}")
                    )
                )
        return after


def _float64_attributes(node, thr: np.ndarray, w64, b64) -> None:
    """Replace the node's float32 thresholds, weights and base values with float64 ones."""
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
        helper.make_attribute("nodes_values_as_tensor",
                              numpy_helper.from_array(thr, "nodes_values"))
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


def _splice(g, tree_nodes: list, before: dict[int, list], after: dict[int, list]) -> None:
    """Insert the new casts around the tree nodes; drop casts that feed nothing now and
    the stale value infos of the tree outputs (float now: they would mislead runtimes)."""
    nodes = []
    for n in g.node:
        nodes.extend(before.get(id(n), []))
        nodes.append(n)
        nodes.extend(after.get(id(n), []))
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    nodes = [n for n in nodes if not (n.op_type == "Cast" and n.output[0] not in used)]
    del g.node[:]
    g.node.extend(nodes)
    tree_outs = {o for n in tree_nodes for o in n.output}
    keep_vi = [vi for vi in g.value_info if vi.name not in tree_outs]
    del g.value_info[:]
    g.value_info.extend(keep_vi)


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
